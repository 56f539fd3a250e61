"""Small pure packing functions shared by the policies: LPT partition, load-driven replication,
placement of replicas on nodes.

Sources:
- LPT (Graham 1969), as Remoe A8 uses it to split a layer's remote experts over z replicas
  (PAPERS.md 1.4): heaviest item first, to the least-loaded bin; makespan <= (4/3 - 1/(3z)) OPT.
- deepseek-ai/EPLB ``replicate_experts`` (next replica to argmax load / replicas) and
  ``balanced_packing`` (heaviest first into the lightest pack with a free slot), PAPERS.md 4.
- MoEless placement (PAPERS.md 3.2, [D]): locality first, then the least-loaded node with free
  memory. Placing each item on the least-loaded node keeps every node's load within
  ``total / nodes + max item`` (when the least-loaded node was at most the mean of what was
  placed before, i.e. whenever memory does not force another node); a warm node is taken only
  when it keeps that bound.
"""

from __future__ import annotations

import heapq
import math

import numpy as np


def lpt_partition(weights, bins: int, max_items_per_bin: int | None = None) -> np.ndarray:
    """Longest-processing-time partition of items into ``bins``.

    weights: [items] >= 0; returns assignment [items] int in [0, bins): heaviest item first
    (ties: lower index first) to the least-loaded bin with room (ties: fewer items, then lower
    bin index, so zero-weight items still spread and no bin stays empty while items remain).
    max_items_per_bin: cap on items per bin (memory), None = no cap.
    """
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("lpt_partition: weights must be a 1-D array of finite values >= 0")
    if bins < 1:
        raise ValueError(f"lpt_partition: bins must be >= 1, got {bins}")
    cap = w.size if max_items_per_bin is None else max_items_per_bin
    if cap < 1 or cap * bins < w.size:
        raise ValueError(f"lpt_partition: {w.size} items do not fit {bins} bins of {cap}")
    assignment = np.empty(w.size, dtype=int)
    heap = [(0.0, 0, b) for b in range(bins)]  # (load, items, bin); full bins leave the heap
    for item in np.argsort(-w, kind="stable"):
        load, count, chosen = heapq.heappop(heap)
        assignment[item] = chosen
        if count + 1 < cap:
            heapq.heappush(heap, (load + float(w[item]), count + 1, chosen))
    return assignment


def replicate_by_load(
    loads,
    *,
    tolerance: float | None = 1.1,
    total_replicas: int | None = None,
    eligible=None,
    max_replicas_per_item: int | None = None,
    memory_per_replica=0.0,
    memory_budget: float = math.inf,
) -> np.ndarray:
    """EPLB-style greedy replication; returns replicas [items] int >= 1.

    loads: [items] >= 0 expected load of each logical item (expert).
    Repeatedly gives one more replica to ``argmax load / replicas`` (ties: lower index) and stops
    when any of: the argmax per-replica load <= ``tolerance * mean(loads)`` (MoEless, [D]: mean
    over logical items, so the target is fixed and the loop ends), ``total_replicas`` reached
    (EPLB's fixed number of physical slots), the argmax item is not ``eligible`` or at
    ``max_replicas_per_item``, or its ``memory_per_replica`` exceeds what is left of
    ``memory_budget``.
    """
    w = np.asarray(loads, dtype=float)
    if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(
            "replicate_by_load: loads must be a non-empty 1-D array of finite values >= 0"
        )
    if tolerance is None and total_replicas is None:
        raise ValueError("replicate_by_load: give a tolerance, a total_replicas, or both")
    if total_replicas is not None and total_replicas < w.size:
        raise ValueError(f"replicate_by_load: total_replicas {total_replicas} < items {w.size}")
    allowed = np.ones(w.size, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    memory = np.broadcast_to(np.asarray(memory_per_replica, dtype=float), w.shape)
    cap = math.inf if max_replicas_per_item is None else max_replicas_per_item
    replicas = np.ones(w.size, dtype=int)
    target = math.inf if tolerance is None else tolerance * float(w.mean())
    left = memory_budget
    while total_replicas is None or replicas.sum() < total_replicas:
        per_replica = w / replicas
        item = int(np.argmax(per_replica))
        if tolerance is not None and per_replica[item] <= target:
            break
        if not allowed[item] or replicas[item] >= cap or memory[item] > left + 1e-12:
            break
        replicas[item] += 1
        left -= memory[item]
    return replicas


def place_on_nodes(loads, memory_gb, capacity_gb, preferred=None) -> np.ndarray:
    """Place items (function replicas) on nodes; returns node index [items].

    loads:      [items] >= 0 work each item brings (expected tokens)
    memory_gb:  [items] > 0 memory each item holds
    capacity_gb:[nodes] free memory of each node
    preferred:  [items] node index holding a warm copy, or -1 (locality first)
    Heaviest item first: its preferred node if it has room and stays within ``total / nodes +
    max item``, else the least-loaded node with room (ties: more free memory, lower index).
    Raises ValueError when an item fits no node.
    """
    load = np.asarray(loads, dtype=float)
    memory = np.asarray(memory_gb, dtype=float)
    free = np.array(capacity_gb, dtype=float)
    if load.ndim != 1 or memory.shape != load.shape:
        raise ValueError(
            f"place_on_nodes: loads {load.shape} and memory_gb {memory.shape} must be equal 1-D"
        )
    if free.ndim != 1 or free.size == 0:
        raise ValueError("place_on_nodes: need at least one node")
    if np.any(load < 0) or np.any(memory <= 0):
        raise ValueError("place_on_nodes: loads must be >= 0 and memory_gb > 0")
    prefer = np.full(load.size, -1) if preferred is None else np.asarray(preferred, dtype=int)
    if prefer.shape != load.shape or np.any(prefer >= free.size):
        raise ValueError("place_on_nodes: preferred must be [items] of node indices or -1")
    bound = load.sum() / free.size + (load.max() if load.size else 0.0)
    node_load = np.zeros(free.size)
    placement = np.full(load.size, -1)
    for item in np.argsort(-load, kind="stable"):
        fits = free >= memory[item] - 1e-9
        want = prefer[item]
        if want >= 0 and fits[want] and node_load[want] + load[item] <= bound + 1e-9:
            chosen = want
        else:
            if not fits.any():
                raise ValueError(
                    f"place_on_nodes: item {item} ({memory[item]:.3f} GB) fits no node (free {free.round(3)})"
                )
            candidates = np.flatnonzero(fits)
            chosen = int(
                candidates[np.lexsort((candidates, -free[candidates], node_load[candidates]))[0]]
            )
        placement[item] = chosen
        node_load[chosen] += load[item]
        free[chosen] -= memory[item]
    return placement
