"""Functions: every expert-function instance the daemons run, and what state it is in.

Reads payload["instances"]: [{instance_id, function_id, node, state, memory_gb, experts,
replica, keep_alive_left_s, invocations, started_at, stopped_at}], and payload["time"] for
how long each has been up. The filter keeps instances on the node, or holding the layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from tui import format as fmt
from tui.view import View
from tui.widgets.panel import Panel
from tui.widgets.table import make_table, refill

STATE_STYLES = {
    "starting": "yellow",
    "warm": "green",
    "busy": "bold cyan",
    "idle": "",
    "stopped": "dim",
    "failed": "bold red",
}
STATE_ORDER = {state: n for n, state in enumerate(STATE_STYLES)}


class FunctionsPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="functions-summary")
        yield make_table(
            "instance", "function", "node", "state", "memory", "experts", "replica",
            "keep-alive left", "invocations", "up for",
            table_id="functions-instances",
        )

    def show(self, view: View) -> None:
        instances = [i for i in fmt.records(view.payload, "instances") if view.filter.instance_ok(i)]
        instances.sort(key=lambda i: (STATE_ORDER.get(i.get("state"), 99), str(i.get("instance_id"))))
        states = Counter(str(i.get("state")) for i in instances)
        order = [*STATE_STYLES, *sorted(s for s in states if s not in STATE_STYLES)]
        summary = " · ".join(f"{states[s]} {s}" for s in order if states.get(s))
        self.query_one("#functions-summary", Static).update(
            f"{len(instances)} instances" + (f": {summary}" if summary else "")
        )
        now = view.payload.get("time")
        rows = [(str(i.get("instance_id")), instance_row(i, now)) for i in instances]
        refill(self.query_one("#functions-instances", DataTable), rows, empty="no instances")


def instance_row(instance: Mapping[str, Any], now: Any) -> list[str | Text]:
    state = fmt.text(instance.get("state"))
    return [
        fmt.text(instance.get("instance_id")),
        fmt.text(instance.get("function_id")),
        fmt.text(instance.get("node")),
        Text(state, style=STATE_STYLES.get(state, "")),
        fmt.gb(instance.get("memory_gb")),
        fmt.experts(instance.get("experts")),
        fmt.count(instance.get("replica")),
        fmt.seconds(instance.get("keep_alive_left_s")),
        fmt.count(instance.get("invocations")),
        up_for(instance, now),
    ]


def up_for(instance: Mapping[str, Any], now: Any) -> str:
    """From start to stop, or to the snapshot's time while it runs."""
    started = fmt.number(instance.get("started_at"))
    end = fmt.number(instance.get("stopped_at"))
    end = end if end is not None else fmt.number(now)
    if started is None or end is None:
        return fmt.DASH
    return fmt.seconds(max(end - started, 0.0))
