"""Stragglers: function replies that finished a scatter-gather round late, and load imbalance.

Reads payload["stragglers"]: recent[{time, function_id, instance_id, layer, latency_s,
median_s, ratio}], imbalance{"<layer>": max/mean expert load}; payload["time"] to date them
and to mark the ones flagged now (within FLAGGED_NOW_S); payload["instances"] to know an
instance's node for the node filter.
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

FLAGGED_NOW_S = 10.0
BAR_WIDTH = 20


class StragglersPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="stragglers-summary")
        yield make_table(
            "", "when", "function", "instance", "node", "layer", "latency", "median", "late by",
            table_id="stragglers-recent",
        )
        yield Static("expert load imbalance (max / mean per layer)", classes="caption")
        yield Static(id="stragglers-imbalance")

    def show(self, view: View) -> None:
        now = fmt.number(view.payload.get("time"))
        nodes = {
            i.get("instance_id"): i.get("node") for i in fmt.records(view.payload, "instances")
        }
        recent = [
            s for s in fmt.records(view.payload, "stragglers", "recent")
            if view.filter.layer_ok(s.get("layer")) and view.filter.node_ok(nodes.get(s.get("instance_id")))
        ]
        recent.sort(key=lambda s: -(fmt.number(s.get("time")) or 0.0))
        flagged = sum(is_now(s, now) for s in recent)
        dp = fmt.dig(view.payload, "data_plane") or {}
        troubles = sum(int(fmt.number(dp.get(k)) or 0) for k in ("retries", "late", "fallbacks"))
        self.query_one("#stragglers-summary", Static).update(
            Text.assemble(
                (f"{flagged} flagged now", "bold red" if flagged else "green"),
                f" (last {fmt.seconds(FLAGGED_NOW_S)}) · {len(recent)} recent",
                "\ncalls ", str(dp.get("calls", 0)),
                (f" · retries {dp.get('retries', 0)} · late {dp.get('late', 0)} · fallbacks "
                 f"{dp.get('fallbacks', 0)} · on-demand loads {dp.get('on_demand_loads', 0)}",
                 "bold yellow" if troubles else ""),
                f" · cold-start waits {dp.get('cold_start_waits', 0)}",
            )
        )
        rows = [
            (f"{s.get('time')}/{s.get('instance_id')}", straggler_row(s, now, nodes))
            for s in recent
        ]
        refill(self.query_one("#stragglers-recent", DataTable), rows, empty="no stragglers")
        imbalance = fmt.dig(view.payload, "stragglers", "imbalance")
        self.query_one("#stragglers-imbalance", Static).update(imbalance_bars(imbalance, view))


def is_now(straggler: Mapping[str, Any], now: float | None) -> bool:
    then = fmt.number(straggler.get("time"))
    return now is not None and then is not None and now - then <= FLAGGED_NOW_S


def straggler_row(s: Mapping[str, Any], now: float | None, nodes: Mapping[Any, Any]) -> list[str | Text]:
    latency, median = fmt.number(s.get("latency_s")), fmt.number(s.get("median_s"))
    late = fmt.ratio(s.get("ratio")) + " median"
    if latency is not None and median is not None:
        late += f" (+{fmt.seconds(latency - median)})"
    return [
        Text("●", style="bold red") if is_now(s, now) else Text("·", style="dim"),
        fmt.ago(s.get("time"), now),
        fmt.text(s.get("function_id")),
        fmt.text(s.get("instance_id")),
        fmt.text(nodes.get(s.get("instance_id"))),
        fmt.count(s.get("layer")),
        fmt.seconds(latency),
        fmt.seconds(median),
        Text(late, style="yellow"),
    ]


def imbalance_bars(imbalance: Any, view: View) -> Text:
    """One bar per layer, scaled to the worst layer; 1.0 means perfectly even."""
    if not isinstance(imbalance, Mapping) or not imbalance:
        return Text(fmt.DASH)
    values = {}
    for key, value in imbalance.items():
        if str(key).isdigit() and fmt.number(value) is not None and view.filter.layer_ok(int(key)):
            values[int(key)] = fmt.number(value)
    worst = max(values.values(), default=0.0) or 1.0
    out = Text()
    for layer in sorted(values):
        value = values[layer]
        bar = "█" * max(1, round(value / worst * BAR_WIDTH))
        style = "red" if value >= 2 else "yellow" if value >= 1.5 else "green"
        out.append(f"L{layer:<3}", style="bold").append(bar.ljust(BAR_WIDTH), style=style)
        out.append(f" {fmt.ratio(value)}\n")
    out.rstrip()
    return out
