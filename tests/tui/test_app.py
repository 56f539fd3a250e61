"""The dashboard driven by a FakeFeed under a pilot: what each panel shows, and the keys."""

from __future__ import annotations

from textual.widgets import TabbedContent

from tests.tui.helpers import FakeClock, cell, header, push, rows, running, sample, screen_text
from tui.feed import BadMessage, Connected, Disconnected, FakeFeed
from tui.help import HelpScreen


async def test_billing_shows_gb_s_cost_split_and_saving():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample())
        text = screen_text(app)
        assert "1,234.5 GB-s" in text and "$0.020575" in text
        assert "1,000.0 GB-s" in text and "81.0%" in text  # main model, its share
        assert "2,000.0 GB-s" in text and "$0.033333" in text  # all-local baseline
        assert "+38.3%" in text  # (2000 - 1234.5) / 2000
        assert rows(app, "billing-functions")[0][:4] == ["fn-a", "200.0 GB-s", "16.2%", "$0.003333"]


async def test_sparkline_keeps_every_rate_received():
    feed = FakeFeed([sample(billing={"rate_gb_s_per_s": r}) for r in (10.0, 20.0, 15.0)])
    async with running(feed) as (app, pilot):
        await feed.drained()
        await pilot.pause()
        assert app.query_one("#billing-rate").data == [10.0, 20.0, 15.0]


async def test_missing_and_malformed_keys_show_dashes_on_every_tab():
    weird = {"billing": {"gb_s": "lots", "by_function": [1]}, "slo": {"classes": {"x": None}},
             "nodes": [None, {"name": 3, "gpus": "many"}], "instances": "none",
             "stragglers": {"recent": [{"time": None}], "imbalance": {"x": 1}},
             "load": {"counts": [[1, None], "row"]}, "policy": {"plan": {"local": [[0]]}}}
    feed = FakeFeed([{}, weird])
    async with running(feed) as (app, pilot):
        await feed.drained()
        for key in "123456":
            await pilot.press(key)
            await pilot.pause()
            assert "—" in screen_text(app)
        assert "feed ended" not in header(app)


async def test_slo_percentiles_over_target_and_low_attainment_are_red():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample())
        assert rows(app, "slo-classes")[0][:4] == ["interactive", "40", "30", "75.0%"]
        assert "red" in str(cell(app, "slo-classes", 0, 3).style)  # attainment 75%
        assert "green" in str(cell(app, "slo-classes", 0, 6).style)  # TTFT p95 450 ms <= 500 ms
        assert "red" in str(cell(app, "slo-classes", 0, 7).style)  # TTFT p99 900 ms > 500 ms


async def test_straggler_appears_flagged_with_how_late():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample())
        await pilot.press("3")
        await pilot.pause()
        (row,) = rows(app, "stragglers-recent")
        assert row[0] == "●" and row[2:6] == ["fn-b", "fn-b-0", "cpu-2", "1"]
        assert row[8] == "4.2× median (+32 ms)"
        assert "1 flagged now" in screen_text(app)


async def test_node_not_alive_shows_down():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample())
        await pilot.press("4")
        await pilot.pause()
        status = {row[0]: row[3] for row in rows(app, "nodes-table")}
        assert status == {"cpu-1": "up", "cpu-2": "down"}
        assert "red" in str(cell(app, "nodes-table", 1, 3).style)


async def test_pause_freezes_the_display_while_the_feed_goes_on():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample(billing={"gb_s": 1.0}))
        await pilot.press("p")
        await push(feed, pilot, sample(billing={"gb_s": 2.0}, seq=43))
        assert "1.0 GB-s" in screen_text(app) and "2.0 GB-s" not in screen_text(app)
        assert "PAUSED (1 new)" in header(app) and "seq 42" in header(app)
        await pilot.press("p")
        await pilot.pause()
        assert "2.0 GB-s" in screen_text(app) and "PAUSED" not in header(app)


async def test_filter_narrows_the_instance_table_by_node_and_by_layer():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        await push(feed, pilot, sample())
        await pilot.press("5", "f", *"cpu-2", "enter")
        await pilot.pause()
        assert [row[0] for row in rows(app, "functions-instances")] == ["fn-b-0"]
        assert "filter: node ~ 'cpu-2'" in header(app)
        await pilot.press("f", "escape", "f", *"L0", "enter")  # escape clears the old filter
        await pilot.pause()
        assert [row[0] for row in rows(app, "functions-instances")] == ["fn-a-0", "fn-a-1"]
        await pilot.press("f", "escape")
        await pilot.pause()
        assert len(rows(app, "functions-instances")) == 3 and "filter" not in header(app)


async def test_stale_when_the_clock_moves_on_without_snapshots():
    clock = FakeClock()
    feed = FakeFeed()
    async with running(feed, clock) as (app, pilot):
        assert "waiting for the first snapshot" in header(app)
        await push(feed, pilot, sample())
        assert "● live" in header(app)
        clock.advance(3.5)  # more than 3 intervals of 1 s
        app.update_status()  # what the app's timer does
        assert "stale: no snapshot for 3.50 s" in header(app)
        assert app.query_one("#status").has_class("-stale")


async def test_link_down_shows_reconnecting_until_snapshots_return():
    feed = FakeFeed([Connected("tcp://127.0.0.1:1"), sample()])
    async with running(feed) as (app, pilot):
        await feed.drained()
        await push(feed, pilot, Disconnected("publisher went away"))
        assert "reconnecting: publisher went away (last snapshot 0 ms ago)" in header(app)
        await push(feed, pilot, Connected("tcp://127.0.0.1:1"))
        await push(feed, pilot, sample())
        assert "● live" in header(app)


async def test_bad_messages_are_counted_in_the_header():
    feed = FakeFeed([sample(), BadMessage("MalformedFrame: short header")])
    async with running(feed) as (app, pilot):
        await feed.drained()
        await pilot.pause()
        assert "1 bad messages" in header(app) and "● live" in header(app)


async def test_a_failing_feed_is_shown_not_swallowed():
    class Broken:
        async def __aiter__(self):
            yield sample()
            raise RuntimeError("boom")

    async with running(Broken()) as (app, pilot):  # type: ignore[arg-type]
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "feed ended: RuntimeError: boom" in header(app)


async def test_number_keys_switch_panels_and_help_opens_and_closes():
    feed = FakeFeed()
    async with running(feed) as (app, pilot):
        for key, tab in zip("654321", ("plan", "functions", "nodes", "stragglers", "slo", "billing")):
            await pilot.press(key)
            assert app.query_one(TabbedContent).active == tab
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "pause: freeze the display" in screen_text(app)
        await pilot.press("4")  # the panels' keys wait under the help screen
        await push(feed, pilot, sample())  # and snapshots still reach the panels
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        assert app.query_one(TabbedContent).active == "billing"
        assert "1,234.5 GB-s" in screen_text(app)
        await pilot.press("q")
        assert app.return_code == 0
