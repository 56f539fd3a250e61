"""A heat map of expert load, layers down and experts across, marking where each expert runs.

    load_map(counts [layers, experts], local, remote) -> Text

Each cell is two columns: its background is the expert's token load (dark = idle, bright =
the busiest expert in the snapshot), its mark says where the plan put it: L = local (in the
main function), R = remote (in an expert function), · = in neither.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from tui import format as fmt

COLD = (24, 32, 64)
HOT = (250, 90, 40)
LABEL_EVERY = 4


class LoadHeatmap(Static):
    """Shows a `load_map`; a Static so it scrolls inside its panel like any text."""


def heat(share: float) -> Color:
    """The colour of a load share in 0..1, from COLD to HOT."""
    share = min(max(share, 0.0), 1.0)
    return Color.from_rgb(*(round(c + (h - c) * share) for c, h in zip(COLD, HOT)))


def load_map(
    counts: Sequence[Sequence[float]],
    local: Collection[tuple[int, int]],
    remote: Collection[tuple[int, int]],
    layers: Collection[int] | None = None,
) -> Text:
    """The map for `counts` [layers, experts], only the rows in `layers` when given."""
    experts = max((len(row) for row in counts), default=0)
    peak = max((fmt.number(c) or 0.0 for row in counts for c in row), default=0.0) or 1.0
    out = Text()
    header = [" "] * (experts * 2)
    for expert in range(0, experts, LABEL_EVERY):
        label = str(expert)
        header[expert * 2 : expert * 2 + len(label)] = label
    out.append("     " + "".join(header).rstrip() + "\n", style="dim")
    for layer, row in enumerate(counts):
        if layers is not None and layer not in layers:
            continue
        out.append(f"L{layer:<3} ", style="bold")
        for expert in range(experts):
            load = fmt.number(row[expert]) if expert < len(row) else None
            place = (layer, expert)
            mark = "L" if place in local else "R" if place in remote else "·"
            background = heat((load or 0.0) / peak)
            foreground = Color.from_rgb(0, 0, 0) if (load or 0.0) / peak > 0.6 else Color.from_rgb(230, 230, 230)
            out.append(f" {mark}", style=Style(color=foreground, bgcolor=background))
        out.append("\n")
    out.append("L local  R remote function  · unplaced   load: ", style="dim")
    for step in range(6):
        out.append("  ", style=Style(bgcolor=heat(step / 5)))
    out.append(f" 0 → {peak:,.0f} tokens", style="dim")
    return out
