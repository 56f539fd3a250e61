"""Refilling a DataTable every snapshot without losing the reader's place."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.widgets import DataTable

Row = tuple[str, Sequence[str | Text]]  # (row key, cells)


def make_table(*columns: str, table_id: str | None = None) -> DataTable:
    table = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
    table.add_columns(*columns)
    return table


def refill(table: DataTable, rows: Iterable[Row], empty: str = "nothing yet") -> None:
    """Replace the rows; a cursor the reader moved down stays on its key where that row is
    still there. On the first row it stays on the first row: newest-first tables (stragglers,
    cold starts) keep their newest rows in view, instead of scrolling after one row as newer
    ones push it down."""
    keep = None
    if table.row_count and table.cursor_row > 0:
        keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    table.clear()
    keys: list[str] = []
    seen: set[str] = set()
    for key, cells in rows:
        if key in seen:  # a malformed payload may repeat an id; show both rows
            key = f"{key}#{len(keys)}"
        keys.append(key)
        seen.add(key)
        table.add_row(*cells, key=key, height=None)
    if not keys:
        table.add_row(Text(empty, style="dim"), *[""] * (len(table.columns) - 1), key="-")
    elif keep in keys:
        table.move_cursor(row=keys.index(keep), animate=False)
