"""Timed expert calls straight to one worker's data socket, one at a time.

The socket is made as the executor makes its own (mesh/executor.py `MeshExecutor._socket`): a
DEALER hardened for the "data" role with the mesh's config (frame limit from [policy]
payload_cap_bytes, CURVE where [security] asks for it), linger 0; the messages are the
executor's ExpertCall and ExpertResult, through the same encode / decode. Not the executor itself: its round (registry, meter record, staging, poller
slices) is what `moemesh bench` measures against the floor, while the profile wants the
function's own time and the raw transport's, so that the planner can add the two.
"""

from __future__ import annotations

import time

import torch
import zmq

from mesh.config import MeshConfig
from mesh.errors import MeshError
from mesh.protocol import ExpertCall, ExpertResult, decode, encode
from mesh.sockets import harden

CALL_TIMEOUT_S = 30.0


class Caller:
    """A DEALER on one worker's data socket: timed ExpertCalls of [tokens, hidden] random rows
    (seeded, one tensor per token count, made once), one at a time."""

    def __init__(self, endpoint: str, hidden: int, dtype: torch.dtype, config: MeshConfig | None = None) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        harden(self.sock, "data", config, connect=endpoint)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.hidden = hidden
        self.inputs: dict[int, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(0)
        self.dtype = dtype
        self.call_id = 0

    def call(self, layer: int, expert: int, tokens: int) -> tuple[float, float]:
        """(round trip seconds, the worker's compute_s) of one call on `tokens` rows."""
        x = self.inputs.get(tokens)
        if x is None:
            x = self.inputs[tokens] = torch.randn(tokens, self.hidden, generator=self.generator).to(self.dtype)
        self.call_id += 1
        start = time.perf_counter()
        self.sock.send_multipart(encode(ExpertCall(call_id=self.call_id, layer=layer, expert_ids=[expert],
                                                    counts=[tokens], x=x)), copy=False)
        if not self.sock.poll(CALL_TIMEOUT_S * 1000):
            raise MeshError(f"no answer from {self.endpoint} within {CALL_TIMEOUT_S:.0f}s", code="timeout",
                            hint="the host may be overloaded; see the worker's log")
        reply = decode(self.sock.recv_multipart())
        elapsed = time.perf_counter() - start
        if not isinstance(reply, ExpertResult) or reply.call_id != self.call_id:
            raise MeshError(f"the worker answered {reply!r} to call {self.call_id}", code="function_failed",
                            hint="see the worker's log")
        return elapsed, reply.compute_s

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()

    def __enter__(self) -> Caller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
