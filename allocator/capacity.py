"""Capacity-factor token dropping: the one MoEless baseline that changes tokens (PAPERS.md 3.2).

Source: GShard / Switch Transformer's expert capacity, ``capacity = ceil(capacity_factor *
slots / experts)`` where ``slots`` is the layer's token-slots in the batch (tokens x top_k,
i.e. the sum of the per-expert counts). An expert keeps at most ``capacity`` of the rows
routed to it and the rest are dropped: their contribution to the MoE output is zero (the
residual stream carries the token on), as Switch does. Which rows go: the first ``kept``
rows of each expert in token order (first come, first served, Switch's default), so the
executor keeps ``rows[:kept[e]]`` of expert e.

``capacity_factor <= 0`` means "no dropping" (the Plan default), so a plan without the field
behaves as before. Entry point: :func:`capacity_drop`.
"""

from __future__ import annotations

import math

import numpy as np


def expert_capacity(slots: int, experts: int, capacity_factor: float) -> int:
    """Rows one expert may keep: ``ceil(capacity_factor * slots / experts)`` (>= 1 when slots > 0)."""
    if experts < 1:
        raise ValueError(f"expert_capacity: experts must be >= 1, got {experts}")
    if slots < 0:
        raise ValueError(f"expert_capacity: slots must be >= 0, got {slots}")
    if capacity_factor <= 0:
        return slots
    if slots == 0:
        return 0
    return max(1, math.ceil(capacity_factor * slots / experts - 1e-9))


def capacity_drop(counts, capacity_factor: float) -> np.ndarray:
    """Rows each expert keeps under ``capacity_factor``.

    counts: [experts] or [layers, experts] int >= 0, rows routed to each expert (one layer's
            batch per row of a 2-D array; capacity is per layer)
    returns the same shape, int64: ``min(counts, capacity)``; ``capacity_factor <= 0`` keeps all.
    Dropped rows per expert are ``counts - kept``.
    """
    c = np.asarray(counts)
    if c.ndim not in (1, 2) or c.size == 0:
        raise ValueError(f"capacity_drop: counts must be [experts] or [layers, experts], got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("capacity_drop: counts must be whole numbers")
        c = c.astype(np.int64)
    if np.any(c < 0):
        raise ValueError("capacity_drop: counts must be >= 0")
    if not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_drop: capacity_factor must be finite, got {capacity_factor}")
    rows = c.reshape(-1, c.shape[-1]).astype(np.int64)  # [layers, experts]
    caps = np.array([expert_capacity(int(r.sum()), r.size, capacity_factor) for r in rows])  # [layers]
    kept = np.minimum(rows, caps[:, None])
    return kept.reshape(c.shape)
