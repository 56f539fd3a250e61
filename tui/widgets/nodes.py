"""Nodes: each host's daemon, alive or not, with its CPU, memory and GPUs.

Reads payload["nodes"]: [{name, kind, host, alive, last_heartbeat_s_ago, cpu_percent,
mem_used_gb, mem_total_gb, capacity_gb, gpus[{name, utilization_percent (or util), mem_used_gb,
mem_total_gb}]}] (gpus as nodes/resources.py reports them in heartbeats, via NVML).
A node the meter marks not alive is "down"; one still alive whose last heartbeat is older
than HEARTBEAT_STALE_S is "stale" (the payload has no heartbeat interval to judge by).
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

HEARTBEAT_STALE_S = 5.0


class NodesPanel(Panel):
    def compose(self) -> ComposeResult:
        yield Static(id="nodes-summary")
        yield make_table(
            "node", "kind", "host", "status", "heartbeat", "CPU", "memory", "capacity", "GPUs",
            table_id="nodes-table",
        )

    def show(self, view: View) -> None:
        nodes = [n for n in fmt.records(view.payload, "nodes") if view.filter.node_ok(n.get("name"))]
        statuses = [status(n)[0] for n in nodes]
        self.query_one("#nodes-summary", Static).update(
            f"{len(nodes)} nodes · {statuses.count('up')} up · {statuses.count('stale')} stale · "
            f"{statuses.count('down')} down"
        )
        rows = [(str(n.get("name")), node_row(n)) for n in nodes]
        refill(self.query_one("#nodes-table", DataTable), rows, empty="no nodes")


def status(node: Mapping[str, Any]) -> tuple[str, str]:
    """('up' | 'stale' | 'down' | '—', style)."""
    alive = node.get("alive")
    if alive is False:
        return "down", "bold red"
    heartbeat = fmt.number(node.get("last_heartbeat_s_ago"))
    if heartbeat is not None and heartbeat > HEARTBEAT_STALE_S:
        return "stale", "yellow"
    if alive is True:
        return "up", "green"
    return fmt.DASH, ""


def node_row(node: Mapping[str, Any]) -> list[str | Text]:
    label, style = status(node)
    cpu = fmt.number(node.get("cpu_percent"))
    return [
        fmt.text(node.get("name")),
        fmt.text(node.get("kind")),
        fmt.text(node.get("host")),
        Text(label, style=style),
        heartbeat(node.get("last_heartbeat_s_ago")),
        fmt.DASH if cpu is None else f"{cpu:.0f}%",
        used_of(node.get("mem_used_gb"), node.get("mem_total_gb")),
        fmt.gb(node.get("capacity_gb")),
        gpus(node.get("gpus")),
    ]


def heartbeat(seconds_ago: Any) -> str:
    return fmt.DASH if fmt.number(seconds_ago) is None else f"{fmt.seconds(seconds_ago)} ago"


def used_of(used: Any, total: Any) -> str:
    """'12.5 / 64.0 GB (20%)'."""
    used_n, total_n = fmt.number(used), fmt.number(total)
    if used_n is None and total_n is None:
        return fmt.DASH
    used_text = fmt.DASH if used_n is None else f"{used_n:.1f}"
    share = f" ({used_n / total_n * 100:.0f}%)" if used_n is not None and total_n else ""
    return f"{used_text} / {fmt.gb(total)}{share}"


def gpus(entries: Any) -> str:
    """One line per GPU: name, utilisation (util is a percentage, as NVML gives it), memory."""
    if not isinstance(entries, list) or not entries:
        return fmt.DASH
    lines = []
    for gpu in entries:
        if isinstance(gpu, Mapping):
            util = fmt.number(gpu.get("utilization_percent", gpu.get("util")))
            util_text = fmt.DASH if util is None else f"{util:.0f}%"
            lines.append(
                f"{fmt.text(gpu.get('name'))} {util_text} "
                f"{used_of(gpu.get('mem_used_gb'), gpu.get('mem_total_gb'))}"
            )
    return "\n".join(lines) or fmt.DASH
