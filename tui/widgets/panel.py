"""The base of every dashboard panel: a container the app redraws from a `View`."""

from __future__ import annotations

from textual.containers import VerticalScroll

from tui.view import View


class Panel(VerticalScroll):
    """Panels keep no state between snapshots: `show` redraws everything from `view`."""

    DEFAULT_CLASSES = "panel"

    def show(self, view: View) -> None:
        raise NotImplementedError(type(self).__name__)
