"""The TUI's pure parts: formatting, the filter, the header's link state, the fake feed."""

from __future__ import annotations

import math

import pytest

from tui import format as fmt
from tui.connection import Connection, LinkState
from tui.feed import Disconnected, FakeFeed, Snapshot
from tui.filter import Filter


@pytest.mark.parametrize(
    ("formatter", "value", "shown"),
    [
        (fmt.gb_s, 1234.5, "1,234.5 GB-s"),
        (fmt.money, 0.020575, "$0.020575"),
        (fmt.money, 1234.5, "$1,234.50"),
        (fmt.seconds, 0.0421, "42 ms"),
        (fmt.seconds, 3.5, "3.50 s"),
        (fmt.seconds, 42.0, "42.0 s"),
        (fmt.seconds, 600.0, "10.0 min"),
        (fmt.percent, 0.925, "92.5%"),
        (fmt.experts, [[0, 1], [1, 2]], "L0:E1 L1:E2"),
        (fmt.experts, [[0, e] for e in range(8)], "L0:E0 L0:E1 L0:E2 L0:E3 L0:E4 L0:E5 +2"),
    ],
)
def test_formatters(formatter, value, shown):
    assert formatter(value) == shown


@pytest.mark.parametrize("value", [None, "3", True, math.nan, math.inf, [1], {}])
def test_anything_but_a_finite_number_is_a_dash(value):
    assert fmt.gb_s(value) == fmt.money(value) == fmt.seconds(value) == fmt.percent(value) == fmt.DASH


def test_money_in_another_currency_and_dig_through_gaps():
    assert fmt.money(0.5, "JPY") == "0.500000 JPY"
    assert fmt.dig({"a": {"b": [7]}}, "a", "b", 0) == 7
    assert fmt.dig({"a": None}, "a", "b", default="x") == "x"
    assert fmt.records({"xs": [1, {"k": 2}, None]}, "xs") == [{"k": 2}]


@pytest.mark.parametrize(
    ("query", "parsed"),
    [("", Filter()), ("L3", Filter(layer=3)), ("layer 12", Filter(layer=12)),
     ("layer=0", Filter(layer=0)), (" GPU-0 ", Filter(node="gpu-0")), ("l3x", Filter(node="l3x"))],
)
def test_filter_parse(query, parsed):
    assert Filter.parse(query) == parsed


def test_filter_matches_instances_by_node_or_by_layer():
    instance = {"node": "cpu-1", "experts": [[0, 1], [2, 5]]}
    assert Filter.parse("cpu").instance_ok(instance)
    assert not Filter.parse("gpu").instance_ok(instance)
    assert Filter.parse("L2").instance_ok(instance)
    assert not Filter.parse("L1").instance_ok(instance)
    assert not Filter.parse("L1").instance_ok({"node": "cpu-1", "experts": None})


def test_link_states_in_order_of_precedence():
    link = Connection(interval=1.0)
    assert link.state(0.0) is LinkState.WAITING
    link.last_snapshot_at = 10.0
    assert link.state(13.0) is LinkState.LIVE  # exactly 3 intervals: still live
    assert link.state(13.01) is LinkState.STALE
    assert link.describe(20.0) == "stale: no snapshot for 10.0 s"
    link.link_up, link.reason = False, "publisher went away"
    assert link.state(10.0) is LinkState.RECONNECTING
    link.ended = "the feed closed"
    assert link.describe(12.0) == "feed ended: the feed closed (last snapshot 2.00 s ago)"


async def test_fake_feed_plays_its_script_then_what_is_pushed_until_closed():
    feed = FakeFeed([{"seq": 1}, Disconnected("x")])
    events = feed.__aiter__()
    assert await anext(events) == Snapshot({"seq": 1})
    assert await anext(events) == Disconnected("x")
    feed.close()
    with pytest.raises(StopAsyncIteration):
        await anext(events)
