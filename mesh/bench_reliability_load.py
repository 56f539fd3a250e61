"""The load of `moemesh bench --reliability`: requests at a fixed concurrency through the client
SDK, every outcome recorded and every wire message counted (mesh/bench_reliability.py).

    run_load(address, jobs, concurrency, new_tokens, deadline_s) -> Load
      jobs: [(job index into the distinct prompts, prompt token ids), ...], sent in order;
            `stop` (an asyncio.Event) ends the sending early (time-boxed loads)
      Load.outcomes: one Outcome per request sent, in send order

A request is *lost* when it has no outcome by its deadline (`deadline_s` after it was sent:
the bench's own, far past the mesh's timeouts, so a lost request is a hang, never a slow one)
and *duplicated* when the coordinator sent it more than one outcome, or the SDK delivered more
tokens than asked or out of order. The SDK drops duplicate TokenEvents itself; CountingClient
counts what reached the socket, so the bench sees duplicates the SDK hid.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.client import MeshClient
from mesh.errors import MeshError
from mesh.protocol import ErrorReply, RequestDone, TokenEvent, decode


@dataclass
class Wire:
    """What reached the client socket for one request id."""

    token_events: int = 0
    duplicate_tokens: int = 0  # TokenEvents whose index had been seen already (the SDK drops them)
    outcomes: int = 0  # RequestDone + ErrorReply
    indices: set[int] = field(default_factory=set)


class CountingClient(MeshClient):
    """A MeshClient that counts, per request, every TokenEvent and outcome the socket delivers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wire: dict[str, Wire] = {}

    def _dispatch(self, frames) -> None:
        try:
            msg = decode(frames)
        except MeshError:
            msg = None  # the SDK logs and drops it
        if isinstance(msg, TokenEvent | RequestDone | ErrorReply) and msg.request_id:
            wire = self.wire.setdefault(msg.request_id, Wire())
            if isinstance(msg, TokenEvent):
                wire.token_events += 1
                if msg.index in wire.indices:
                    wire.duplicate_tokens += 1
                wire.indices.add(msg.index)
            else:
                wire.outcomes += 1
        super()._dispatch(frames)


@dataclass
class Outcome:
    """One request as the bench saw it. Times are time.time() (the meter's clock)."""

    index: int
    job: int  # which distinct prompt (its reference continuation)
    request_id: str
    start: float
    end: float | None = None
    status: str = "pending"  # "done" | "error" | "lost"
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error_code: str | None = None
    error_type: str | None = None
    error: str | None = None
    typed: bool = False  # the error is a MeshError with a code (what a caller can act on)

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t and (self.end is None or self.end > t)


@dataclass
class Load:
    outcomes: list[Outcome]
    wire: dict[str, Wire]
    start: float
    end: float
    new_tokens: int

    def duplicated(self) -> list[Outcome]:
        """Requests with more than one outcome on the wire, or tokens beyond max / out of order."""
        out = []
        for o in self.outcomes:
            w = self.wire.get(o.request_id, Wire())
            if w.outcomes > 1 or len(o.tokens) > self.new_tokens:
                out.append(o)
        return out

    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ("done", "error")]

    def tokens_per_s(self) -> float:
        n = sum(len(o.tokens) for o in self.outcomes)
        return n / max(1e-9, self.end - self.start)


def windows(outcomes: list[Outcome], t0: float, t1: float, width_s: float = 1.0) -> list[float]:
    """Tokens per second in consecutive windows [t0 + k w, t0 + (k + 1) w) up to t1: [windows]."""
    n = max(0, int((t1 - t0) // width_s))
    counts = [0] * n
    for o in outcomes:
        for t in o.token_times:
            k = int((t - t0) // width_s)
            if 0 <= k < n:
                counts[k] += 1
    return [c / width_s for c in counts]


def progress_line(name: str, load_state: dict) -> None:
    s = load_state
    print(f"\r  {name:<14} sent {s['sent']:>5}  done {s['done']:>5}  errors {s['errors']:>3}  "
          f"in flight {s['in_flight']:>3}  {s['tok_s']:>7.0f} tok/s  {s.get('note', ''):<34}",
          end="", file=sys.stderr, flush=True)


async def run_load(client: CountingClient, jobs: list[tuple[int, list[int]]], concurrency: int, new_tokens: int,
                   deadline_s: float, name: str = "load", stop: asyncio.Event | None = None,
                   on_token: Callable[[Outcome], None] | None = None, state: dict | None = None,
                   quiet: bool = False) -> Load:
    """Send `jobs` at `concurrency` (greedy, `new_tokens` each, EOS ignored) and wait for each
    outcome; a progress line on stderr (none when quiet). `state` (a dict) is shared with fault injectors: it holds
    "outcomes" (the list being filled) and the counters of the progress line."""
    state = state if state is not None else {}
    state.update(sent=0, done=0, errors=0, in_flight=0, tok_s=0.0, outcomes=[])
    outcomes: list[Outcome] = state["outcomes"]
    queue = list(enumerate(jobs))
    queue.reverse()
    start = time.time()
    tokens_seen = [0]

    async def one(index: int, job: int, ids: list[int]) -> None:
        o = Outcome(index, job, f"rel-{name}-{index}-{int(start)}", time.time())
        outcomes.append(o)
        state["sent"] += 1
        state["in_flight"] += 1
        gen = client.generate("", prompt_ids=ids, max_new_tokens=new_tokens, stop_at_eos=False,
                              request_id=o.request_id, timeout_s=deadline_s + 30)

        async def consume() -> None:
            async for token in gen:
                o.tokens.append(token.token_id)
                o.token_times.append(time.time())
                tokens_seen[0] += 1
                if on_token is not None:
                    on_token(o)

        try:
            await asyncio.wait_for(consume(), deadline_s)
            o.status, o.finish_reason = "done", gen.done.finish_reason if gen.done else None
            state["done"] += 1
        except TimeoutError:
            o.status, o.error = "lost", f"no outcome within the bench's deadline of {deadline_s:.0f} s"
        except MeshError as exc:
            o.status, o.error_code, o.error_type, o.error = "error", exc.code, type(exc).__name__, exc.message
            o.typed = bool(exc.code)
            state["errors"] += 1
        except Exception as exc:  # an untyped failure is a finding, not a crash of the bench
            o.status, o.error_type, o.error = "error", type(exc).__name__, str(exc)
            state["errors"] += 1
        o.end = time.time()
        state["in_flight"] -= 1

    async def worker() -> None:
        while queue and not (stop is not None and stop.is_set()):
            index, (job, ids) = queue.pop()
            await one(index, job, ids)

    async def show() -> None:
        last_t, last_n = time.time(), 0
        while True:
            await asyncio.sleep(0.5)  # the display's refresh period
            now = time.time()
            state["tok_s"] = (tokens_seen[0] - last_n) / max(1e-9, now - last_t)
            last_t, last_n = now, tokens_seen[0]
            progress_line(name, state)

    display = asyncio.create_task(asyncio.sleep(0) if quiet else show())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        display.cancel()
        await asyncio.gather(display, return_exceptions=True)
    end = time.time()
    state["tok_s"] = tokens_seen[0] / max(1e-9, end - start)
    if not quiet:
        progress_line(name, state)
        print(file=sys.stderr)
    return Load(outcomes, client.wire, start, end, new_tokens)
