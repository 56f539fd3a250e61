"""Billing: GB-s and money so far, the GB-s rate over time, and who spent it.

Reads payload["billing"]: mode, currency, gb_s, cost, gb_s_main, gb_s_experts,
rate_gb_s_per_s (through the app's rate history), by_function{id: gb_s, cost, invocations},
baseline_all_local_gb_s, baseline_all_local_cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Sparkline, Static

from tui import format as fmt
from tui.view import View
from tui.widgets.panel import Panel
from tui.widgets.table import make_table, refill


class BillingPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="billing-summary")
        yield Static("GB-s per second", classes="caption", id="billing-rate-caption")
        yield Sparkline([], id="billing-rate")
        yield make_table("function", "GB-s", "share", "cost", "invocations", table_id="billing-functions")

    def show(self, view: View) -> None:
        billing = fmt.dig(view.payload, "billing", default={})
        self.query_one("#billing-summary", Static).update(summary(billing))
        now = fmt.number(fmt.dig(billing, "rate_gb_s_per_s"))
        caption = "GB-s per second" + ("" if now is None else f", now {now:,.2f}")
        self.query_one("#billing-rate-caption", Static).update(caption)
        self.query_one("#billing-rate", Sparkline).data = list(view.rate_history)
        refill(self.query_one("#billing-functions", DataTable), function_rows(billing))


def summary(billing: Mapping[str, Any]) -> Table:
    """This plan against the all-local baseline, with main vs experts and the saving."""
    currency = billing.get("currency", "USD")
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column(f"billing ({fmt.text(billing.get('mode'))} mode)")
    table.add_column("GB-s", justify="right")
    table.add_column("cost", justify="right")
    total = billing.get("gb_s")
    table.add_row("this plan", fmt.gb_s(total), fmt.money(billing.get("cost"), currency))
    for label, key in (("  main model", "gb_s_main"), ("  experts", "gb_s_experts")):
        table.add_row(label, fmt.gb_s(billing.get(key)), share(billing.get(key), total))
    base_gb_s = billing.get("baseline_all_local_gb_s")
    base_cost = billing.get("baseline_all_local_cost")
    if fmt.number(base_gb_s) is not None or fmt.number(base_cost) is not None:
        table.add_row("all-local baseline", fmt.gb_s(base_gb_s), fmt.money(base_cost, currency))
        table.add_row(
            "saving", saving(total, base_gb_s), saving(billing.get("cost"), base_cost), style="bold"
        )
    return table


def share(part: Any, whole: Any) -> str:
    part, whole = fmt.number(part), fmt.number(whole)
    if part is None or not whole:
        return fmt.DASH
    return f"{part / whole * 100:.1f}%"


def saving(spent: Any, baseline: Any) -> Text:
    """How much less than the baseline, green when less and red when more."""
    spent, baseline = fmt.number(spent), fmt.number(baseline)
    if spent is None or not baseline:
        return Text(fmt.DASH)
    value = (baseline - spent) / baseline
    return Text(f"{value * 100:+.1f}%", style="green" if value >= 0 else "red")


def function_rows(billing: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """By function, biggest spender first; share is of the whole bill."""
    by_function = billing.get("by_function")
    if not isinstance(by_function, Mapping):
        return []
    total = billing.get("gb_s")
    entries = [(str(fid), e) for fid, e in by_function.items() if isinstance(e, Mapping)]
    entries.sort(key=lambda item: -(fmt.number(item[1].get("gb_s")) or 0.0))
    currency = billing.get("currency", "USD")
    return [
        (
            fid,
            [
                fid,
                fmt.gb_s(e.get("gb_s")),
                share(e.get("gb_s"), total),
                fmt.money(e.get("cost"), currency),
                fmt.count(e.get("invocations")),
            ],
        )
        for fid, e in entries
    ]
