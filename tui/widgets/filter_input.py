"""The `f` filter's input line: hidden until asked for, escape clears and hides it.

Hidden and disabled while closed, so that it never takes focus from the tables.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class FilterInput(Input):
    BINDINGS = [Binding("escape", "cancel", "clear filter")]

    def __init__(self) -> None:
        super().__init__(placeholder="filter: node name, or L3 / layer 3 — enter keeps, escape clears", id="filter", disabled=True)

    def open(self) -> None:
        self.disabled = False
        self.display = True
        self.focus()

    def action_cancel(self) -> None:
        self.value = ""  # posts Input.Changed, so the app clears the filter
        self.close()

    def close(self) -> None:
        """Hide, keeping the value (the filter stays in force); keys go back to the app."""
        self.display = False
        self.disabled = True
        self.screen.set_focus(None)
