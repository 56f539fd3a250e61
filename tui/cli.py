"""`python -m tui --address tcp://127.0.0.1:5560` or `python -m tui --demo`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from tui.app import make_app
from tui.demo import demo_payloads
from tui.feed import FakeFeed, Feed, ZmqFeed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tui", description="moemesh live dashboard")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--address", help="the meter's PUB endpoint, e.g. tcp://127.0.0.1:5560")
    source.add_argument("--demo", action="store_true", help="play synthetic snapshots; no mesh needed")
    parser.add_argument(
        "--config", help="launch.toml whose [security] keys the feed dials with (CURVE: its first "
                         "client_keys pair, as the SDK's MeshClient.from_config); default: plain")
    parser.add_argument(
        "--interval", type=float, default=1.0,
        help="the meter's publish interval in seconds (stale after 3 without a snapshot)",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    feed: Feed
    if args.demo:
        feed = FakeFeed(demo_payloads(start=time.time(), interval=args.interval), interval=args.interval)
    else:
        config = None
        if args.config:  # only for a secured mesh: the demo needs no mesh package
            from mesh.config import load_config

            config = load_config(args.config)
        feed = ZmqFeed(args.address, interval=args.interval, config=config)
    make_app(feed, interval=args.interval).run()
    return 0
