"""The header line: is the feed live, which snapshot is on screen, paused, filtered.

Reads payload["seq"], payload["uptime_s"] and payload["policy"]["name"] of the snapshot on
screen; the link state comes from the app's `Connection`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual.widgets import Static

from tui import format as fmt
from tui.connection import LinkState

STATE_STYLES = {
    LinkState.LIVE: "bold green",
    LinkState.STALE: "bold yellow",
    LinkState.RECONNECTING: "bold red",
    LinkState.WAITING: "bold yellow",
    LinkState.ENDED: "bold red",
}


class StatusBar(Static):
    def show(
        self,
        state: LinkState,
        description: str,
        payload: Mapping[str, Any] | None,
        *,
        paused_behind: int | None = None,
        filter_text: str = "",
        rejected: int = 0,
    ) -> None:
        """`paused_behind` is None when live, else how many snapshots arrived since the pause."""
        for link_state in LinkState:
            self.set_class(link_state is state, f"-{link_state.value}")
        line = Text.assemble(("moemesh ", "bold"), ("● ", STATE_STYLES[state]), (description, STATE_STYLES[state]))
        if payload is not None:
            line.append(
                f"  seq {fmt.count(payload.get('seq'))} · up {fmt.seconds(payload.get('uptime_s'))}"
                f" · policy {fmt.text(fmt.dig(payload, 'policy', 'name'))}"
            )
        if paused_behind is not None:
            line.append(f"  PAUSED ({paused_behind} new)", style="bold reverse")
        if filter_text:
            line.append(f"  filter: {filter_text}", style="bold cyan")
        if rejected:
            line.append(f"  {rejected} bad messages", style="red")
        self.update(line)
