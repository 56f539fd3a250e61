"""The dashboard app: one feed worker in, one status line and six panels out.

    feed ──@work consume_feed──► SnapshotReceived / LinkChanged / SnapshotRejected / FeedEnded
         ──App handlers──► Connection (header state), rate history, latest snapshot
         ──redraw (unless paused)──► every Panel.show(View)

`make_app(feed)` is the one way in, for the CLI and the tests alike.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Input, TabbedContent, TabPane

from tui import format as fmt
from tui.connection import Connection
from tui.feed import BadMessage, Connected, Disconnected, Feed, FeedError, Snapshot
from tui.filter import Filter
from tui.help import HelpScreen
from tui.messages import FeedEnded, LinkChanged, SnapshotReceived, SnapshotRejected
from tui.view import View
from tui.widgets.billing import BillingPanel
from tui.widgets.cold_starts import ColdStartsPanel
from tui.widgets.filter_input import FilterInput
from tui.widgets.functions import FunctionsPanel
from tui.widgets.nodes import NodesPanel
from tui.widgets.panel import Panel
from tui.widgets.plan import PlanPanel
from tui.widgets.slo import SloPanel
from tui.widgets.status import StatusBar
from tui.widgets.stragglers import StragglersPanel

Clock = Callable[[], float]

PANES: tuple[tuple[str, str, tuple[type[Panel], ...]], ...] = (  # (tab id, title, panels)
    ("billing", "1 billing", (BillingPanel,)),
    ("slo", "2 SLOs", (SloPanel,)),
    ("stragglers", "3 stragglers", (StragglersPanel,)),
    ("nodes", "4 nodes", (NodesPanel,)),
    ("functions", "5 functions", (FunctionsPanel, ColdStartsPanel)),
    ("plan", "6 plan", (PlanPanel,)),
)
TABS = tuple(tab for tab, _, _ in PANES)  # keys 1..6
RATE_HISTORY = 120  # sparkline points: 2 minutes at the default 1 s interval
STATUS_REFRESH_S = 0.5


class Dashboard(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "moemesh"
    ENABLE_COMMAND_PALETTE = False  # every action has its key; the help screen lists them
    BINDINGS = [
        *(Binding(str(n), f"tab('{tab}')", tab, show=False) for n, tab in enumerate(TABS, 1)),
        Binding("p", "pause", "pause"),
        Binding("f", "filter", "filter"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, feed: Feed, *, clock: Clock, interval: float) -> None:
        super().__init__()
        self.feed = feed
        self.clock = clock
        self.connection = Connection(interval)
        self.rate_history: deque[float] = deque(maxlen=RATE_HISTORY)
        self.latest: SnapshotReceived | None = None  # newest received
        self.shown: View | None = None  # on screen (older than latest while paused)
        self.paused = False
        self.behind = 0  # snapshots received since the pause
        self.filter = Filter()

    def compose(self) -> ComposeResult:
        # Kept as attributes: `query` searches the screen on top, which may be the help screen.
        self.status_bar = StatusBar(id="status")
        self.panels: list[Panel] = []
        yield self.status_bar
        with TabbedContent(initial=TABS[0]):
            for tab, title, panel_types in PANES:
                panels = [panel_type() for panel_type in panel_types]
                with TabPane(title, id=tab):
                    yield from panels
                self.panels += panels
        yield FilterInput()
        yield Footer()

    def on_ready(self) -> None:
        """Everything is mounted: only now may snapshots arrive."""
        self.update_status()
        self.set_interval(STATUS_REFRESH_S, self.update_status)
        self.consume_feed()

    # ---------------------------------------------------------------------------- the feed

    @work(exclusive=True, group="feed", exit_on_error=False)
    async def consume_feed(self) -> None:
        """The only way snapshots enter the app: each feed event becomes one message."""
        try:
            async for event in self.feed:
                now = self.clock()
                match event:
                    case Snapshot(payload=payload):
                        self.post_message(SnapshotReceived(payload, now))
                    case Connected(endpoint=endpoint):
                        self.post_message(LinkChanged(True, f"connected to {endpoint}", now))
                    case Disconnected(reason=reason):
                        self.post_message(LinkChanged(False, reason, now))
                    case BadMessage(reason=reason):
                        self.post_message(SnapshotRejected(reason, now))
        except FeedError as exc:
            reason = str(exc)
        except Exception as exc:  # shown in the header, not swallowed: the feed is gone
            self.log.error("feed failed", exc)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = "the feed closed"
        self.post_message(FeedEnded(reason, self.clock()))

    def on_snapshot_received(self, message: SnapshotReceived) -> None:
        self.connection.last_snapshot_at = message.received_at
        if self.connection.link_up is False:
            self.connection.link_up = True
        rate = fmt.number(fmt.dig(message.payload, "billing", "rate_gb_s_per_s"))
        if rate is not None:
            self.rate_history.append(rate)
        self.latest = message
        if self.paused:
            self.behind += 1
        else:
            self.show_latest()
        self.update_status()

    def on_link_changed(self, message: LinkChanged) -> None:
        self.connection.link_up = message.up
        self.connection.reason = message.reason
        self.update_status()

    def on_snapshot_rejected(self, message: SnapshotRejected) -> None:
        self.connection.rejected += 1
        self.connection.last_rejection = message.reason
        self.log.warning("bad snapshot", message.reason)
        self.update_status()

    def on_feed_ended(self, message: FeedEnded) -> None:
        self.connection.ended = message.reason
        self.update_status()

    # ----------------------------------------------------------------------------- drawing

    def show_latest(self) -> None:
        if self.latest is not None:
            self.redraw(View(self.latest.payload, self.filter, tuple(self.rate_history)))

    def redraw(self, view: View) -> None:
        self.shown = view
        for panel in self.panels:
            panel.show(view)

    def update_status(self) -> None:
        """The header line; also run by a timer, so 'stale' appears when nothing arrives."""
        now = self.clock()
        self.status_bar.show(
            self.connection.state(now),
            self.connection.describe(now),
            None if self.shown is None else self.shown.payload,
            paused_behind=self.behind if self.paused else None,
            filter_text=self.filter.describe(),
            rejected=self.connection.rejected,
        )

    # ----------------------------------------------------------------------------- actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Tabs and the filter belong to the main screen, not to the help on top of it."""
        return not (action in ("tab", "filter") and isinstance(self.screen, HelpScreen))

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.behind = 0
            self.show_latest()
        self.update_status()

    def action_filter(self) -> None:
        self.query_one(FilterInput).open()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.filter = Filter.parse(event.value)
        if self.shown is not None:
            self.redraw(View(self.shown.payload, self.filter, self.shown.rate_history))
        self.update_status()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self, event: Input.Submitted) -> None:
        self.query_one(FilterInput).close()


def make_app(feed: Feed, *, clock: Clock = time.time, interval: float = 1.0) -> Dashboard:
    """The dashboard on `feed`; `interval` is the meter's publish interval in seconds."""
    return Dashboard(feed, clock=clock, interval=interval)
