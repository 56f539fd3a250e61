"""SLOs: TTFT and TPOT percentiles against each request class's targets, and attainment.

Reads payload["slo"]: window_s, requests_total, requests_active, classes{name: ttft_target_s,
tpot_target_s, requests, attained, attainment, ttft{p50,p95,p99}, tpot{p50,p95,p99}}.
A percentile over its target is red (within it green); attainment below ATTAINMENT_GOAL is
red. The payload carries no attainment target, so the goal is ours, and only a colour.
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

ATTAINMENT_GOAL = 0.9
PERCENTILES = ("p50", "p95", "p99")


class SloPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="slo-summary")
        yield make_table(
            "class", "requests", "attained", "attainment",
            "TTFT target", *(f"TTFT {p}" for p in PERCENTILES),
            "TPOT target", *(f"TPOT {p}" for p in PERCENTILES),
            table_id="slo-classes",
        )

    def show(self, view: View) -> None:
        slo = fmt.dig(view.payload, "slo", default={})
        self.query_one("#slo-summary", Static).update(
            f"window {fmt.seconds(fmt.dig(slo, 'window_s'))} · "
            f"{fmt.count(fmt.dig(slo, 'requests_total'))} requests · "
            f"{fmt.count(fmt.dig(slo, 'requests_active'))} active"
        )
        classes = fmt.dig(slo, "classes")
        rows = []
        if isinstance(classes, Mapping):
            rows = [(str(name), class_row(str(name), c)) for name, c in classes.items() if isinstance(c, Mapping)]
        refill(self.query_one("#slo-classes", DataTable), rows)


def class_row(name: str, cls: Mapping[str, Any]) -> list[str | Text]:
    ttft_target, tpot_target = cls.get("ttft_target_s"), cls.get("tpot_target_s")
    return [
        name,
        fmt.count(cls.get("requests")),
        fmt.count(cls.get("attained")),
        attainment(cls.get("attainment")),
        fmt.seconds(ttft_target),
        *(against(fmt.dig(cls, "ttft", p), ttft_target) for p in PERCENTILES),
        fmt.seconds(tpot_target),
        *(against(fmt.dig(cls, "tpot", p), tpot_target) for p in PERCENTILES),
    ]


def against(value: Any, target: Any) -> Text:
    """A latency, red when over its target and green within it (plain when either is unknown)."""
    seconds, limit = fmt.number(value), fmt.number(target)
    if seconds is None or limit is None:
        return Text(fmt.seconds(value))
    return Text(fmt.seconds(seconds), style="red" if seconds > limit else "green")


def attainment(value: Any) -> Text:
    share = fmt.number(value)
    if share is None:
        return Text(fmt.DASH)
    return Text(fmt.percent(share), style="bold red" if share < ATTAINMENT_GOAL else "green")
