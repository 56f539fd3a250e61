"""Plan: the placement policy in force, why, and where each expert runs against its load.

Reads payload["policy"]: name, reason, plan{main_memory_gb, local[[l, e]], functions[{id,
experts, memory_gb, replicas, nodes}]}; payload["load"]: layers, experts, counts[[int]].
The filter keeps functions on the node or holding the layer, and heat-map rows of the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from tui import format as fmt
from tui.filter import Filter
from tui.view import View
from tui.widgets.heatmap import LoadHeatmap, load_map
from tui.widgets.panel import Panel
from tui.widgets.table import make_table, refill


class PlanPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="plan-summary")
        yield make_table("function", "experts", "memory", "replicas", "nodes", table_id="plan-functions")
        yield Static("expert load per layer × expert", classes="caption")
        yield LoadHeatmap(id="plan-heatmap")

    def show(self, view: View) -> None:
        policy = fmt.dig(view.payload, "policy", default={})
        plan = fmt.dig(policy, "plan", default={})
        functions = fmt.records(plan, "functions")
        local = pairs(fmt.dig(plan, "local"))
        self.query_one("#plan-summary", Static).update(summary(policy, plan, local, functions))
        shown = [f for f in functions if function_ok(f, view.filter)]
        rows = [(str(f.get("id")), function_row(f)) for f in shown]
        refill(self.query_one("#plan-functions", DataTable), rows, empty="no remote functions")
        remote = {p for f in functions for p in pairs(f.get("experts"))}
        counts = load_counts(view.payload)
        layers = None if view.filter.layer is None else {view.filter.layer}
        heatmap = load_map(counts, local, remote, layers) if counts else Text(fmt.DASH)
        self.query_one("#plan-heatmap", LoadHeatmap).update(heatmap)


def summary(policy: Mapping[str, Any], plan: Any, local: set, functions: list) -> Text:
    replicas = sum(int(fmt.number(f.get("replicas")) or 0) for f in functions)
    return Text.assemble(
        ("policy ", "dim"), (fmt.text(policy.get("name")), "bold"),
        ("  reason ", "dim"), fmt.text(policy.get("reason")), "\n",
        ("main function ", "dim"), fmt.gb(fmt.dig(plan, "main_memory_gb")),
        ("  local experts ", "dim"), str(len(local)),
        ("  functions ", "dim"), f"{len(functions)} ({replicas} replicas)",
    )


def pairs(value: Any) -> set[tuple[int, int]]:
    """[[layer, expert], ...] as a set of tuples, skipping malformed entries."""
    if not isinstance(value, list | tuple):
        return set()
    return {
        (p[0], p[1])
        for p in value
        if isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, int) for x in p)
    }


def function_ok(function: Mapping[str, Any], flt: Filter) -> bool:
    nodes = function.get("nodes")
    on_node = not flt.node or (isinstance(nodes, list) and any(flt.node_ok(n) for n in nodes))
    return on_node and flt.experts_ok(function.get("experts"))


def function_row(function: Mapping[str, Any]) -> list[str]:
    nodes = function.get("nodes")
    return [
        fmt.text(function.get("id")),
        fmt.experts(function.get("experts")),
        fmt.gb(function.get("memory_gb")),
        fmt.count(function.get("replicas")),
        ", ".join(str(n) for n in nodes) if isinstance(nodes, list) and nodes else fmt.DASH,
    ]


def load_counts(payload: Mapping[str, Any]) -> list[list[float]]:
    """payload["load"]["counts"] as rows of numbers (non-numbers read as 0)."""
    counts = fmt.dig(payload, "load", "counts")
    if not isinstance(counts, list):
        return []
    return [
        [fmt.number(c) or 0.0 for c in row] if isinstance(row, list) else [] for row in counts
    ]
