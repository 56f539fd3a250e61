"""What a panel is given to show: one payload, the filter in force, the rate history."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tui.filter import Filter


@dataclass(frozen=True, slots=True)
class View:
    payload: Mapping[str, Any]
    filter: Filter = field(default_factory=Filter)
    # billing.rate_gb_s_per_s of each snapshot received (paused ones too), oldest first
    rate_history: tuple[float, ...] = ()
