"""Cold starts: how long each instance took to become ready, stage by stage.

Reads payload["cold_starts"]: [{time, instance_id, function_id, node, path ("zygote" |
"fresh"), stages{spawn, limits, weights, ready}, total_s, critical_path}], payload["time"].
A start on a request's critical path (a request waited for it) is marked. The node filter
applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from tui import format as fmt
from tui.view import View
from tui.widgets.panel import Panel
from tui.widgets.table import make_table, refill

STAGES = ("spawn", "limits", "weights", "ready")


class ColdStartsPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static("cold starts, newest first (! = on a request's critical path)", classes="caption")
        yield make_table(
            "", "when", "instance", "function", "node", "path", *STAGES, "total",
            table_id="cold-starts",
        )

    def show(self, view: View) -> None:
        starts = [s for s in fmt.records(view.payload, "cold_starts") if view.filter.node_ok(s.get("node"))]
        starts.sort(key=lambda s: -(fmt.number(s.get("time")) or 0.0))
        now = view.payload.get("time")
        rows = [(f"{s.get('time')}/{s.get('instance_id')}", start_row(s, now)) for s in starts]
        refill(self.query_one("#cold-starts", DataTable), rows, empty="no cold starts")


def start_row(start: Mapping[str, Any], now: Any) -> list[str | Text]:
    critical = start.get("critical_path") is True
    return [
        Text("!", style="bold red") if critical else "",
        fmt.ago(start.get("time"), now),
        fmt.text(start.get("instance_id")),
        fmt.text(start.get("function_id")),
        fmt.text(start.get("node")),
        fmt.text(start.get("path")),
        *(fmt.seconds(fmt.dig(start, "stages", stage)) for stage in STAGES),
        Text(fmt.seconds(start.get("total_s")), style="bold" if critical else ""),
    ]
