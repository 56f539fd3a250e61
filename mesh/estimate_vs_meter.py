"""The planner's estimate beside the meter, term by term, for `moemesh bench --policies`.

Both sides split billed GB-s the same way (invocation billing, mesh/meter.py):

    main_gb_s             the main function: its memory x its busy (engine-step) seconds
    functions_busy_gb_s   every instance's calls, each rounded up to billing.round_ms
    functions_init_gb_s   every cold start's INIT (limits, weights, ready; the fork is not billed)
    wall_s                admission to the last token, summed over the requests

The estimate side sums the per-request records' `estimate` (allocator.cost.Estimate.summary);
the meter side reads the coordinator's status (billing and the instances' cold-start stages).
A term whose ratio is far from 1 is where the estimator and the run disagree.
"""

from __future__ import annotations

TERMS = ("main_gb_s", "functions_busy_gb_s", "functions_init_gb_s", "wall_s")


def meter_terms(records: list[dict], status: dict) -> dict:
    """The meter's terms (instances folded away as retired count as busy: their stages are gone)."""
    billing = status["billing"]
    init = 0.0
    for inst in status.get("instances", []):
        if inst.get("started_at") is not None:
            stages = inst.get("stages") or {}
            init += inst["memory_gb"] * sum(v for k, v in stages.items() if k != "spawn")
    wall = sum(r["done_at"] - r["admitted_at"] for r in records if r.get("done_at") is not None)
    return {"main_gb_s": billing["gb_s_main"], "functions_busy_gb_s": billing["gb_s_experts"] - init,
            "functions_init_gb_s": init, "wall_s": wall}


def estimate_terms(records: list[dict]) -> dict | None:
    """The estimate's terms summed over the requests (None if a request has no estimate)."""
    estimates = [r.get("estimate") for r in records]
    if not estimates or not all(estimates):
        return None
    return {term: sum(float(e.get(term, 0.0)) for e in estimates) for term in TERMS}


def components(records: list[dict], status: dict) -> dict:
    """{"meter": terms, "estimate": terms or None, "estimate_vs_meter": term -> ratio or None}."""
    meter, est = meter_terms(records, status), estimate_terms(records)
    ratios = {t: (est[t] / meter[t] if est is not None and meter[t] > 0 else None) for t in TERMS}
    return {"meter": meter, "estimate": est, "estimate_vs_meter": ratios}
