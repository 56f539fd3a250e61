"""Per-request cost: what the mesh was billed while a request was in flight, shared equally
among the requests in flight at each moment.

The meter bills functions (GB-s of instances and of the main function) and has no notion of
which request an instance's seconds belong to: replicas serve every request of a batch, and
in instance mode a warm instance bills its keep-alive whether or not anyone calls it. So a
request's figure is a *share*, not a measurement of its own calls:

    gb_s(request)  = sum over the intervals it was in flight of  delta(mesh GB-s) / n_in_flight
    cost_usd(...)  = the same over the meter's dollars

Concurrency changes only at admissions and completions, so stepping the integral at each of
them (`admitted`, `finished`) is exact for this definition. Spend while no request is in flight
(idle keep-alive) belongs to no request. `finished` returns the two figures; the coordinator
puts them into the request's record (and so into its RequestDone and the HTTP "moemesh" field).
Costs O(instances) per admission and per completion (one `Meter.billing()` call), never per token.
"""

from __future__ import annotations

from mesh.meter import Meter


class CostShares:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.shares: dict[str, list[float]] = {}  # request id -> [gb_s, cost_usd] so far
        self._last: tuple[float, float] | None = None  # the meter's (gb_s, cost) at the last step

    def _step(self) -> None:
        billing = self.meter.billing()
        now = (float(billing["gb_s"]), float(billing["cost"]))
        if self._last is not None and self.shares:
            d_gb_s = max(0.0, now[0] - self._last[0]) / len(self.shares)
            d_cost = max(0.0, now[1] - self._last[1]) / len(self.shares)
            for share in self.shares.values():
                share[0] += d_gb_s
                share[1] += d_cost
        self._last = now

    def admitted(self, request_id: str) -> None:
        self._step()
        self.shares[request_id] = [0.0, 0.0]

    def finished(self, request_id: str) -> dict:
        """{"gb_s", "cost_usd"} of a request (zeros for one never admitted here)."""
        if request_id not in self.shares:
            return {"gb_s": 0.0, "cost_usd": 0.0}
        self._step()
        gb_s, cost = self.shares.pop(request_id)
        return {"gb_s": gb_s, "cost_usd": cost}
