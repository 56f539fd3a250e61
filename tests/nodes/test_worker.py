"""An expert worker started as a fresh process (`python -m nodes.worker`) on a tiny safetensors
checkpoint, with the test playing its node daemon (a ROUTER the worker reports to) and its
caller (a DEALER on the worker's data socket)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from mesh.protocol import (
    ErrorReply,
    ExpertCall,
    ExpertResult,
    InstanceReady,
    Ping,
    Pong,
    StopFunction,
    WorkerError,
    decode,
    encode,
)
from nodes.model.checkpoint import Checkpoint, save_checkpoint
from nodes.model.config import MoEConfig
from nodes.model.model import MoEModel
from nodes.worker import WorkerSpec, read_run_record

TIMEOUT_S = 60.0  # a fresh interpreter imports torch: seconds on a busy 2-core machine
HIDDEN = 32
EXPERTS = ((0, 1), (0, 3), (1, 5))
TINY_MIXTRAL = dict(
    model_type="mixtral", vocab_size=96, hidden_size=HIDDEN, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, num_hidden_layers=2, intermediate_size=48, num_local_experts=8,
    num_experts_per_tok=2,
)


def make_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = MoEModel(MoEConfig.from_hf_dict(TINY_MIXTRAL))
    save_checkpoint(model, TINY_MIXTRAL, path, dtype=torch.float32)
    return path


class FakeDaemon:
    """The ROUTER workers report to; messages kept by sender until a test asks for them."""

    def __init__(self, context: zmq.Context) -> None:
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pending: dict[str, list] = {}

    def expect(self, instance_id: str, timeout_s: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while not self.pending.get(instance_id):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise TimeoutError(f"nothing from worker {instance_id} within {timeout_s}s")
            identity, *frames = self.sock.recv_multipart()
            self.pending.setdefault(identity.decode(), []).append(decode(frames))
        return self.pending[instance_id].pop(0)

    def send(self, instance_id: str, msg) -> None:
        self.sock.send_multipart([instance_id.encode(), *encode(msg)])


def start_worker(daemon: FakeDaemon, ckpt: Path, run_dir: Path, instance_id: str, keep_alive_s: float):
    spec = WorkerSpec(
        instance_id=instance_id, function_id="f0", node_id="n0", experts=EXPERTS, memory_gb=1.0,
        cpu_share=1.0, keep_alive_s=keep_alive_s, model_path=str(ckpt), threads=1,
        host="127.0.0.1", daemon_endpoint=daemon.endpoint, run_dir=str(run_dir), t0=time.time(),
    )
    log = open(run_dir / f"{instance_id}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodes.worker", "--spec-json", json.dumps(spec.to_dict())],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    ckpt = make_checkpoint(root / "ckpt")
    run_dir = root / "run"
    run_dir.mkdir()
    context = zmq.Context()
    daemon = FakeDaemon(context)
    # Both start at once (each imports torch); "idle" only has to scale to zero by itself.
    main = start_worker(daemon, ckpt, run_dir, "w-main", keep_alive_s=120.0)
    idle = start_worker(daemon, ckpt, run_dir, "w-idle", keep_alive_s=0.5)
    ready = daemon.expect("w-main")
    assert isinstance(ready, InstanceReady), ready
    caller = context.socket(zmq.DEALER)
    caller.setsockopt(zmq.LINGER, 0)
    caller.connect(ready.endpoint)
    state = dict(ckpt=ckpt, run_dir=run_dir, daemon=daemon, main=main, idle=idle, ready=ready,
                 caller=caller, reference=Checkpoint(ckpt).load_experts(EXPERTS))
    yield state
    for proc in (main, idle):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    caller.close(linger=0)
    daemon.sock.close(linger=0)
    context.term()


def ask(caller: zmq.Socket, frames, timeout_s: float = 10.0):
    caller.send_multipart(frames)
    assert caller.poll(int(timeout_s * 1000)), "no reply from the worker"
    return decode(caller.recv_multipart())


def call_frames(call_id=1, layer=0, expert_ids=(1, 3), counts=(3, 4), x=None):
    x = torch.randn(sum(counts), HIDDEN) if x is None else x
    return encode(ExpertCall(call_id, layer, list(expert_ids), list(counts), x)), x


def with_header(frames, **changes):
    """The same message with header fields replaced (as a peer with another idea would send)."""
    header = msgpack.unpackb(bytes(frames[1]))
    for key, value in changes.items():
        if key == "tensors":
            header["tensors"] = value
        else:
            header[key] = value
    return [bytes(frames[0]), msgpack.packb(header), *[bytes(f) for f in frames[2:]]]


def test_ready_reports_four_stages(setup):
    ready = setup["ready"]
    assert set(ready.stages) == {"spawn", "limits", "weights", "ready"}
    assert ready.pid == setup["main"].pid
    assert ready.endpoint.startswith("tcp://127.0.0.1:")
    assert ready.started_at <= time.time()
    print(f"\nfresh worker stages: {ready.stages}")


def test_call_is_exactly_its_experts_mlp(setup):
    reference = setup["reference"]
    frames, x = call_frames(call_id=7, layer=0, expert_ids=(3, 1), counts=(2, 5))
    result = ask(setup["caller"], frames)
    assert isinstance(result, ExpertResult) and result.call_id == 7 and result.compute_s >= 0
    with torch.no_grad():
        expected = torch.cat([reference[(0, 3)](x[:2]), reference[(0, 1)](x[2:])])
    torch.testing.assert_close(result.y, expected, atol=1e-6, rtol=0)

    frames, x = call_frames(call_id=8, layer=1, expert_ids=(5,), counts=(4,))
    result = ask(setup["caller"], frames)
    with torch.no_grad():
        torch.testing.assert_close(result.y, reference[(1, 5)](x), atol=1e-6, rtol=0)


def test_empty_call_and_ping(setup):
    frames, _ = call_frames(call_id=9, expert_ids=(1,), counts=(0,), x=torch.zeros(0, HIDDEN))
    result = ask(setup["caller"], frames)
    assert isinstance(result, ExpertResult) and tuple(result.y.shape) == (0, HIDDEN)
    assert ask(setup["caller"], encode(Ping(5))) == Pong(5)


def test_unknown_expert_then_still_serves(setup):
    frames, _ = call_frames(call_id=11, layer=0, expert_ids=(1, 2), counts=(1, 1))
    error = ask(setup["caller"], frames)
    assert isinstance(error, WorkerError) and error.call_id == 11
    assert error.code == "unknown_expert" and "[2]" in error.message
    frames, _ = call_frames(call_id=12)
    assert isinstance(ask(setup["caller"], frames), ExpertResult)


def bad_dtype():
    frames, x = call_frames(call_id=21)
    return with_header(frames, tensors=[{"dtype": "int64", "shape": list(x.shape)}])


def oversized():
    frames, _ = call_frames(call_id=22)
    return with_header(frames, tensors=[{"dtype": "float32", "shape": [1 << 30, HIDDEN]}])


def wrong_rows():
    frames, _ = call_frames(call_id=23, counts=(3, 4))
    return with_header(frames, counts=[3, 5])


def wrong_hidden():
    frames, _ = call_frames(call_id=24, counts=(1, 1), x=torch.randn(2, HIDDEN + 1))
    return frames


@pytest.mark.parametrize(
    "make, reply_type, call_id, code",
    [
        (bad_dtype, WorkerError, 21, "bad_tensor"),
        (oversized, WorkerError, 22, "oversized_message"),
        (wrong_rows, WorkerError, 23, "bad_tensor"),
        (wrong_hidden, WorkerError, 24, "bad_tensor"),
        (lambda: [b"\x99", b"\x80"], ErrorReply, None, "unknown_message_type"),
        (lambda: [bytes((0x40,)), b"\xc1 not msgpack"], ErrorReply, None, "malformed_frame"),
        (lambda: [b"\x40\x40"], ErrorReply, None, "malformed_frame"),
    ],
    ids=["wrong-dtype", "oversized", "rows-vs-counts", "hidden-size", "unknown-type",
         "garbage-header", "bad-type-frame"],
)
def test_bad_messages_get_typed_errors_then_it_still_serves(setup, make, reply_type, call_id, code):
    reply = ask(setup["caller"], make())
    assert isinstance(reply, reply_type), reply
    assert reply.code == code
    if call_id is not None:
        assert reply.call_id == call_id
    frames, _ = call_frames(call_id=30)
    assert isinstance(ask(setup["caller"], frames), ExpertResult)


def test_reads_only_its_experts(setup):
    record = read_run_record(setup["run_dir"], "w-main")
    names = {f"model.layers.{layer}.mlp.experts.{e}.{w}.weight"
             for layer, e in EXPERTS for w in ("gate_proj", "up_proj", "down_proj")}
    assert set(record["tensors_read"]) == names and len(record["tensors_read"]) == len(names)
    assert record["pid"] == setup["main"].pid


def test_scales_to_zero_after_keep_alive(setup):
    ready = setup["daemon"].expect("w-idle")
    assert isinstance(ready, InstanceReady)
    assert setup["idle"].wait(timeout=TIMEOUT_S) == 0
    record = read_run_record(setup["run_dir"], "w-idle")
    assert record["exit_reason"] == "idle" and record["pid"] == ready.pid
    assert record["started_at"] == ready.started_at
    assert record["stopped_at"] - record["started_at"] >= 0.5  # at least its keep-alive


def test_stop_function_exits_promptly(setup):
    setup["daemon"].send("w-main", StopFunction("w-main", "test over"))
    assert setup["main"].wait(timeout=10) == 0
    record = read_run_record(setup["run_dir"], "w-main")
    assert record["exit_reason"] == "requested" and record["stopped_at"] >= record["started_at"]
