"""Reading the meter's payload defensively, and writing its figures for people.

The meter owns the schema and every key may be missing or of the wrong type (an older or
newer meter, a partial snapshot): `dig` never raises, and every formatter answers `DASH`
for anything that is not a number, so a widget never shows `None` or crashes on a gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

DASH = "—"

CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


def dig(data: Any, *keys: str | int, default: Any = None) -> Any:
    """`data[k0][k1]...`, or `default` where a key is missing or a level is not a container."""
    for key in keys:
        if isinstance(key, str) and isinstance(data, Mapping):
            data = data.get(key, default)
        elif isinstance(key, int) and isinstance(data, list | tuple) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return default
    return data


def records(data: Any, *keys: str) -> list[Mapping[str, Any]]:
    """The list at `keys`, keeping only its mapping items ([] where there is none)."""
    value = dig(data, *keys)
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools and NaN/inf are not figures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def text(value: Any) -> str:
    """A string field, or DASH."""
    return value if isinstance(value, str) and value else DASH


def count(value: Any) -> str:
    n = number(value)
    return DASH if n is None else f"{int(n):,}"


def gb_s(value: Any) -> str:
    n = number(value)
    return DASH if n is None else f"{_size(n)} GB-s"


def gb(value: Any) -> str:
    n = number(value)
    return DASH if n is None else f"{_size(n)} GB"


def _size(n: float) -> str:
    """One decimal, three below 1: instances are sized from 0.125 GB in 0.1 GB steps, and
    0.125 GB shown as '0.1 GB' would be 20% off."""
    return f"{n:.3f}" if abs(n) < 1 else f"{n:,.1f}"


def money(value: Any, currency: Any = "USD") -> str:
    """Serverless bills are fractions of a cent per call: 6 decimals below one unit."""
    n = number(value)
    if n is None:
        return DASH
    amount = f"{n:,.2f}" if abs(n) >= 1 else f"{n:.6f}"
    code = currency if isinstance(currency, str) and currency else "USD"
    symbol = CURRENCY_SYMBOLS.get(code)
    return f"{symbol}{amount}" if symbol else f"{amount} {code}"


def seconds(value: Any) -> str:
    """A duration: ms below one second, then s (two decimals below 10 s), then minutes."""
    n = number(value)
    if n is None:
        return DASH
    if abs(n) < 1:
        return f"{n * 1000:.0f} ms"
    if abs(n) < 10:
        return f"{n:.2f} s"
    if abs(n) < 120:
        return f"{n:.1f} s"
    return f"{n / 60:.1f} min"


def percent(value: Any) -> str:
    """A share in 0..1 as a percentage."""
    n = number(value)
    return DASH if n is None else f"{n * 100:.1f}%"


def ratio(value: Any) -> str:
    n = number(value)
    return DASH if n is None else f"{n:.1f}×"


def ago(event_time: Any, now: Any) -> str:
    """How long before `now` (both unix seconds) `event_time` was, e.g. '12 s ago'."""
    then, current = number(event_time), number(now)
    if then is None or current is None:
        return DASH
    return f"{seconds(max(current - then, 0.0))} ago"


def experts(pairs: Any, limit: int = 6) -> str:
    """[[layer, expert], ...] as 'L0:E3 L1:E5 …' (at most `limit`, then a count)."""
    if not isinstance(pairs, list | tuple):
        return DASH
    names = [
        f"L{pair[0]}:E{pair[1]}"
        for pair in pairs
        if isinstance(pair, list | tuple) and len(pair) == 2
    ]
    if not names:
        return DASH
    shown = " ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} +{len(names) - limit}"
