"""The `?` screen: what each key does and what the states in the header mean."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# moemesh dashboard

It shows what the meter publishes, nothing it computes itself.

| key | does |
| --- | --- |
| `1`–`6` | billing, SLOs, stragglers, nodes, functions, plan |
| `p` | pause: freeze the display; snapshots keep arriving and the header counts them |
| `f` | filter by node (any part of its name) or layer (`L3`, `layer 3`); `enter` keeps it, `escape` clears it |
| `?` | this help; `escape` or `?` closes it |
| `q` | quit |

**Header.** *live*: snapshots arrive. *stale*: none for more than 3 publish intervals,
with how long. *reconnecting*: the link to the meter is down and ZeroMQ is redialling.
*waiting*: connected, no snapshot yet. *feed ended*: the feed stopped, with why.

**Figures.** `—` means the meter did not send that figure.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss", "close"), ("question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
