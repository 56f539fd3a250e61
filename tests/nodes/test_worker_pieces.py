"""A long call is computed in pieces of rows, and the daemon's Pings are answered between them
(nodes.worker: a Mixtral-sized expert at a fraction of a vCPU computes for seconds, longer than
the daemon's 2 s hung threshold). The serving loop's own object, a real expert module made slow,
and a recording stand-in for the control socket: which messages were answered after which piece
is then exact, with no timing in the assertions."""

from __future__ import annotations

import time

import torch

from mesh.protocol import Ping, Pong, StopFunction, decode, encode
from nodes import worker as worker_mod
from nodes.model.layers import MLP
from nodes.worker import Server, WorkerSpec

HIDDEN, WIDTH = 16, 24


class SlowMLP(MLP):
    """A real expert that takes `row_s` seconds per row, and records each piece it computed."""

    def __init__(self, row_s: float) -> None:
        super().__init__(HIDDEN, WIDTH)
        self.row_s = row_s
        self.pieces: list[int] = []

    def forward(self, x):
        self.pieces.append(x.shape[0])
        time.sleep(self.row_s * x.shape[0])
        return super().forward(x)


class RecordingControl:
    """The worker's control DEALER: queued daemon messages in, what the worker sent recorded with
    the pieces computed so far."""

    def __init__(self, expert: SlowMLP, queued: list) -> None:
        self.expert, self.inbox, self.sent = expert, [encode(m) for m in queued], []

    def poll(self, timeout=0):
        return len(self.inbox)

    def recv_multipart(self, flags=0):
        return self.inbox.pop(0)

    def send_multipart(self, frames, **_):
        self.sent.append((len(self.expert.pieces), decode(frames)))


def server(expert: SlowMLP, control: RecordingControl) -> Server:
    spec = WorkerSpec(instance_id="w", function_id="f", node_id="n", experts=((0, 0),), memory_gb=1.0,
                      cpu_share=1.0, keep_alive_s=60.0, model_path="unused", threads=1, host="127.0.0.1",
                      daemon_endpoint="inproc://unused", run_dir="unused", t0=0.0)
    return Server(spec, data=None, control=control, experts={(0, 0): expert})


def test_a_long_call_answers_pings_between_pieces_and_defers_a_stop(monkeypatch):
    monkeypatch.setattr(worker_mod, "PIECE_S", 0.05)
    torch.manual_seed(0)
    expert = SlowMLP(row_s=0.002)
    control = RecordingControl(expert, [Ping(seq=1), StopFunction(instance_id="w", reason="requested"), Ping(seq=2)])
    srv = server(expert, control)
    srv.row_s = 0.004  # as if the prior said so: a first piece of 0.05 s is 12 rows
    x = torch.randn(64, HIDDEN)
    with torch.inference_mode():
        y = srv._compute(0, [0], [64], x)
        want = MLP.forward(expert, x)
    assert torch.allclose(y, want, atol=1e-6)  # pieces change nothing in the result
    assert expert.pieces[0] == 12 and len(expert.pieces) >= 3 and sum(expert.pieces) == 64
    # both Pings answered right after the first piece, inside the call; the stop is kept for the loop
    assert control.sent == [(1, Pong(1)), (1, Pong(2))]
    assert srv._drain_control() == "requested"


def test_a_short_call_is_one_piece(monkeypatch):
    expert = SlowMLP(row_s=0.0)
    control = RecordingControl(expert, [Ping(seq=7)])
    srv = server(expert, control)
    with torch.inference_mode():
        srv._compute(0, [0], [300], torch.randn(300, HIDDEN))  # a tiny expert's prior: never split
        assert expert.pieces == [300] and control.sent == []  # the common path: no split, no control check
        srv.row_s = 1e-6
        srv._compute(0, [0, 0], [300, 5], torch.randn(305, HIDDEN))
    assert expert.pieces[1:] == [300, 5]  # known fast: each expert's rows in one piece
