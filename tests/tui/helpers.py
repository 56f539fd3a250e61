"""Shared pieces of the TUI tests: a fake clock, a sample payload, the app under a pilot."""

from __future__ import annotations

import copy
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable

from tui.app import Dashboard, make_app
from tui.feed import FakeFeed

T0 = 1_700_000_000.0
SIZE = (160, 48)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SAMPLE: dict[str, Any] = {
    "time": T0, "uptime_s": 3600.0, "seq": 42,
    "policy": {"name": "remoe", "reason": "forecast skew on L1",
               "plan": {"main_memory_gb": 24.0, "local": [[0, 0], [1, 1]],
                        "functions": [{"id": "fn-a", "experts": [[0, 1], [1, 0]], "memory_gb": 2.0,
                                       "replicas": 2, "nodes": ["cpu-1"]},
                                      {"id": "fn-b", "experts": [[1, 2]], "memory_gb": 1.0,
                                       "replicas": 1, "nodes": ["cpu-2"]}]}},
    "billing": {"mode": "instance", "currency": "USD", "gb_s": 1234.5, "cost": 0.020575,
                "gb_s_main": 1000.0, "gb_s_experts": 234.5, "rate_gb_s_per_s": 28.0,
                "by_function": {"fn-a": {"gb_s": 200.0, "cost": 0.003333, "invocations": 120},
                                "fn-b": {"gb_s": 34.5, "cost": 0.000575, "invocations": 7}},
                "baseline_all_local_gb_s": 2000.0, "baseline_all_local_cost": 0.033333},
    "slo": {"window_s": 60.0, "requests_total": 50, "requests_active": 3,
            "classes": {"interactive": {"ttft_target_s": 0.5, "tpot_target_s": 0.05, "requests": 40,
                                        "attained": 30, "attainment": 0.75,
                                        "ttft": {"p50": 0.2, "p95": 0.45, "p99": 0.9},
                                        "tpot": {"p50": 0.02, "p95": 0.04, "p99": 0.049}}}},
    "stragglers": {"recent": [{"time": T0 - 2.0, "function_id": "fn-b", "instance_id": "fn-b-0",
                               "layer": 1, "latency_s": 0.042, "median_s": 0.01, "ratio": 4.2}],
                   "imbalance": {"0": 1.2, "1": 2.5}},
    "nodes": [{"name": "cpu-1", "kind": "cpu", "host": "10.0.0.2", "alive": True,
               "last_heartbeat_s_ago": 0.4, "cpu_percent": 35.0, "mem_used_gb": 8.0,
               "mem_total_gb": 32.0, "capacity_gb": 16.0, "gpus": []},
              {"name": "cpu-2", "kind": "cpu", "host": "10.0.0.3", "alive": False,
               "last_heartbeat_s_ago": 12.0, "cpu_percent": 0.0, "mem_used_gb": 0.0,
               "mem_total_gb": 32.0, "capacity_gb": 16.0, "gpus": []}],
    "instances": [{"instance_id": "fn-a-0", "function_id": "fn-a", "node": "cpu-1", "state": "busy",
                   "memory_gb": 2.0, "experts": [[0, 1], [1, 0]], "replica": 0,
                   "keep_alive_left_s": 30.0, "invocations": 100, "started_at": T0 - 60, "stopped_at": None},
                  {"instance_id": "fn-a-1", "function_id": "fn-a", "node": "cpu-1", "state": "idle",
                   "memory_gb": 2.0, "experts": [[0, 1], [1, 0]], "replica": 1,
                   "keep_alive_left_s": 12.5, "invocations": 20, "started_at": T0 - 30, "stopped_at": None},
                  {"instance_id": "fn-b-0", "function_id": "fn-b", "node": "cpu-2", "state": "failed",
                   "memory_gb": 1.0, "experts": [[1, 2]], "replica": 0,
                   "keep_alive_left_s": None, "invocations": 7, "started_at": T0 - 90, "stopped_at": T0 - 5}],
    "cold_starts": [{"time": T0 - 60, "instance_id": "fn-a-0", "function_id": "fn-a", "node": "cpu-1",
                     "path": "zygote", "stages": {"spawn": 0.02, "limits": 0.005, "weights": 0.8, "ready": 0.05},
                     "total_s": 0.875, "critical_path": True}],
    "load": {"layers": 2, "experts": 3, "counts": [[90, 10, 0], [5, 40, 60]]},
}


def sample(**changes: Any) -> dict[str, Any]:
    """A deep copy of SAMPLE with top-level keys replaced."""
    payload = copy.deepcopy(SAMPLE)
    payload.update(changes)
    return payload


@asynccontextmanager
async def running(feed: FakeFeed, clock: FakeClock | None = None) -> AsyncIterator[tuple[Dashboard, Pilot]]:
    """The app on `feed` under a pilot, at a fixed size, with animations off."""
    app = make_app(feed, clock=clock or FakeClock())
    app.animation_level = "none"
    async with app.run_test(size=SIZE) as pilot:
        yield app, pilot


async def push(feed: FakeFeed, pilot: Pilot, item: Any) -> None:
    """Hand `item` to the app and wait until it has been handled (no sleeps: see FakeFeed)."""
    await feed.push(item)
    await pilot.pause()


def screen_text(app: Dashboard) -> str:
    """What the terminal shows, as plain text (colours dropped)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True,
                      force_terminal=True, color_system="truecolor", legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text(styles=False)


def header(app: Dashboard) -> str:
    return str(app.query_one("#status").content)


def rows(app: Dashboard, table_id: str) -> list[list[str]]:
    table = app.query_one(f"#{table_id}", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def cell(app: Dashboard, table_id: str, row: int, column: int) -> Text:
    value = app.query_one(f"#{table_id}", DataTable).get_row_at(row)[column]
    return value if isinstance(value, Text) else Text(str(value))
