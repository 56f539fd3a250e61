"""The engine thread: continuous batching over the mesh.

The asyncio side hands it commands through a thread-safe queue; it runs `Engine.step()` (one
forward over every active request, MoE layers through the `MeshExecutor`) and hands events back
through `emit`, which the coordinator wires to `loop.call_soon_threadsafe`. The hot path never
touches asyncio.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from mesh.executor import MeshExecutor
from mesh.meter import Meter
from nodes.model.engine import Engine, SamplingParams, Sequence
from nodes.model.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("moemesh.engine")

DENSE_WINDOW = 64  # steps whose dense time the planner's calibration takes (the latest)


@dataclass(frozen=True)
class Admit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Token:
    request_id: str
    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class Finished:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    prompt_ids: tuple[int, ...] = ()
    activation: tuple | None = None  # (prefill, decode) [layers, experts] token-slot counts


@dataclass(frozen=True)
class Failed:
    request_id: str
    error: BaseException


class EngineLoop(threading.Thread):
    def __init__(self, engine: Engine, executor: MeshExecutor, tokenizer: Tokenizer | None, meter: Meter,
                 emit) -> None:
        super().__init__(name="moemesh-engine", daemon=True)
        self.engine, self.executor, self.tokenizer, self.meter = engine, executor, tokenizer, meter
        self.emit = emit
        self.inbox: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.by_seq: dict[int, tuple[str, Sequence, StreamDecoder | None]] = {}
        self.steps = 0
        # (rows fed, seconds per MoE layer outside the MoE rounds) of the last DENSE_WINDOW steps:
        # the dense work as it runs here, engine overhead included (planning.calibrated_profiles)
        self._dense: deque[tuple[int, float]] = deque(maxlen=DENSE_WINDOW)
        self._dense_lock = threading.Lock()

    def dense_steps(self) -> list[tuple[int, float]]:
        """The last steps' (rows, dense seconds per MoE layer); safe from any thread."""
        with self._dense_lock:
            return list(self._dense)

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.put(None)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._drain(block=not self.engine.active)
                if self.engine.active:
                    self._step()
        finally:
            self.executor.close()

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if isinstance(item, Admit):
            try:
                seq = self.engine.add(item.prompt_ids, item.params)
            except ValueError as exc:
                self.emit(Failed(item.request_id, exc))
                return
            decoder = StreamDecoder(self.tokenizer) if self.tokenizer else None
            self.by_seq[seq.id] = (item.request_id, seq, decoder)
        elif isinstance(item, Cancel):
            for seq_id, (rid, seq, _) in list(self.by_seq.items()):
                if rid == item.request_id:
                    self.engine.cancel(seq)
                    del self.by_seq[seq_id]
                    self.executor.activations.pop(rid, None)
                    self.emit(Finished(rid, "cancelled", len(seq.prompt), len(seq.generated)))

    def _step(self) -> None:
        batch = self.engine.active[: self.engine.max_batch]
        self.executor.request_ids = [self.by_seq[s.id][0] for s in batch if s.id in self.by_seq]
        segments, rows = [], 0
        for seq in batch:  # the rows each request feeds this step (Engine.step's order)
            n = len(seq.pending_input())
            if seq.id in self.by_seq:
                segments.append((self.by_seq[seq.id][0], rows, rows + n,
                                 "prefill" if seq.cache.length == 0 else "decode"))
            rows += n
        self.executor.set_segments(segments)
        self.executor.between_steps()
        rounds_before = self.executor.round_s
        start = time.perf_counter()
        try:
            produced = self.engine.step()
        except Exception as exc:  # never take the coordinator down: fail the step's requests
            log.exception("engine step failed")
            for seq in batch:
                self.engine.cancel(seq, "error")
                entry = self.by_seq.pop(seq.id, None)
                if entry:
                    self.emit(Failed(entry[0], exc))
            return
        elapsed = time.perf_counter() - start
        self.meter.main_busy(elapsed)
        self.steps += 1
        dense = max(0.0, elapsed - (self.executor.round_s - rounds_before))
        with self._dense_lock:
            self._dense.append((rows, dense / max(1, self.engine.model.config.num_moe_layers)))
        for seq, token in produced:
            entry = self.by_seq.get(seq.id)
            if entry is None:
                continue
            rid, _, decoder = entry
            text = decoder.push(token) if decoder else ""
            self.emit(Token(rid, len(seq.generated) - 1, token, text))
            if seq.done:
                del self.by_seq[seq.id]
                config = self.engine.model.config
                activation = self.executor.take_activation(rid, config.num_moe_layers, config.num_experts)
                self.emit(Finished(rid, seq.finish_reason, len(seq.prompt), len(seq.generated),
                                   tuple(seq.prompt), activation))
