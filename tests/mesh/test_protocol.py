"""mesh.protocol: every message round-trips, tensors travel zero-copy, and every malformed input
is answered by the right typed ProtocolError (never anything else, fuzzed with hypothesis)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import (
    Cancelled,
    ConfigError,
    FunctionFailed,
    MeshError,
    MeshUnavailable,
    RequestRejected,
    Timeout,
    UnknownExpert,
    error_from_reply,
)
from mesh.protocol import (
    DTYPES,
    BadTensor,
    CancelRequest,
    ErrorReply,
    ExpertCall,
    ExpertResult,
    GenerateRequest,
    InstanceReady,
    InstanceStopped,
    Limits,
    MalformedFrame,
    Message,
    MetricsSnapshot,
    MsgType,
    NodeHeartbeat,
    NodeRegister,
    OversizedMessage,
    Ping,
    Pong,
    ProtocolError,
    RegisterAck,
    RequestDone,
    ShmRef,
    Shutdown,
    SpawnFailed,
    SpawnFunction,
    StatusReply,
    StatusRequest,
    StopFunction,
    TokenEvent,
    UnknownMessageType,
    WorkerError,
    ZygoteExited,
    ZygoteForked,
    ZygoteReady,
    ZygoteSpawn,
    decode,
    encode,
    error_reply_for,
    message_types,
    wire,
)

HIDDEN = 8


def expert_call(x: torch.Tensor | None = None, counts: list[int] | None = None) -> ExpertCall:
    x = torch.randn(5, HIDDEN) if x is None else x
    counts = [2, 3] if counts is None else counts
    return ExpertCall(call_id=7, layer=1, expert_ids=list(range(len(counts))), counts=counts, x=x)


SHM_REF = ShmRef("moemesh-4242-" + "ab" * 16, fd=5, offset=8192, dtype="float32", rows=5, cols=HIDDEN)


def expert_call_shm(**changes: Any) -> ExpertCall:
    """An ExpertCall whose 5 rows lie in shared memory (mesh.shm), with that slot offered for y."""
    fields = dict(x=torch.empty(0, HIDDEN), x_shm=SHM_REF, y_shm=SHM_REF) | changes
    return ExpertCall(call_id=7, layer=1, expert_ids=[0, 1], counts=[2, 3], **fields)


# One instance of every message, fields away from their defaults where it matters.
SAMPLES: list[Message] = [
    GenerateRequest(
        request_id="r-1",
        prompt="Once upon a time ✨",
        max_new_tokens=16,
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        slo_class="interactive",
        stop_at_eos=False,
        prompt_ids=[1, 2, 3],
    ),
    CancelRequest(request_id="r-1"),
    TokenEvent(request_id="r-1", index=0, token_id=42, text=" the"),
    RequestDone(
        request_id="r-1",
        finish_reason="length",
        prompt_tokens=4,
        generated_tokens=16,
        ttft_s=0.25,
        tpot_s=0.01,
        record={"cost_usd": 1.5e-6, "functions": [{"id": "L0-r0", "gb_s": 0.1}], "slo_met": True},
    ),
    ErrorReply(request_id=None, code="overloaded", message="queue full", hint="retry later"),
    StatusRequest(),
    StatusReply(status={"nodes": {"cpu0": {"free_gb": 1.5}}, "requests": 3}),
    NodeRegister(
        node_id="cpu0", kind="cpu", host="local", capacity_gb=2.0, cpus=1.0, pid=4321, zygote=True
    ),
    RegisterAck(node_id="cpu0", heartbeat_interval_s=0.5, liveness=3),
    NodeHeartbeat(
        node_id="cpu0", seq=9, resources={"free_gb": 1.25}, instances=[{"id": "i-1", "idle_s": 2}]
    ),
    SpawnFunction(
        instance_id="i-1",
        function_id="L0-r0",
        experts=[(0, 1), (1, 3)],
        memory_gb=0.25,
        cpu_share=0.25,
        keep_alive_s=30.0,
        spawn="zygote",
        model_path="/models/tiny",
        start_delay_s=0.5,
    ),
    InstanceReady(
        instance_id="i-1",
        node_id="cpu0",
        endpoint="tcp://127.0.0.1:40001",
        pid=4400,
        started_at=1_700_000_000.25,
        stages={"spawn": 0.01, "limits": 0.002, "weights": 0.05, "ready": 0.001},
        cgroup={"memory_limit_bytes": 268435456, "cpu_quota_us": 2500},
        cgroup_skipped="",
    ),
    SpawnFailed(instance_id="i-1", node_id="cpu0", error="out of memory"),
    StopFunction(instance_id="i-1", reason="plan changed"),
    InstanceStopped(
        instance_id="i-1",
        node_id="cpu0",
        reason="idle",
        started_at=1_700_000_000.0,
        stopped_at=1_700_000_030.0,
        exit_code=None,
    ),
    Shutdown(reason="mesh-down"),
    expert_call(),
    ExpertResult(call_id=7, compute_s=0.002, y=torch.randn(5, HIDDEN)),
    expert_call_shm(),
    ExpertResult(call_id=7, compute_s=0.002, y=torch.empty(0, HIDDEN), y_shm=SHM_REF),
    WorkerError(call_id=7, code="function_failed", message="expert 3 not loaded"),
    MetricsSnapshot(seq=3, time=1_700_000_001.5, payload={"cost_usd": 0.0, "stragglers": []}),
    Ping(seq=1),
    Pong(seq=1),
    ZygoteReady(pid=4000, import_s=1.5),
    ZygoteSpawn(instance_id="i-1", worker={"experts": [[0, 1]], "memory_gb": 0.25}),
    ZygoteForked(instance_id="i-1", pid=4401, error=""),
    ZygoteExited(pid=4401, exit_code=None, signal=9),
]


def fields_equal(a: Message, b: Message) -> bool:
    """Dataclass equality that compares tensors by dtype, shape and values."""
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


def with_header(msg: Message, **changes: Any) -> list[Any]:
    """Frames of `msg` with header keys replaced (value `...` deletes the key)."""
    frames = encode(msg)
    header = msgpack.unpackb(frames[1])
    for key, value in changes.items():
        if value is ...:
            del header[key]
        else:
            header[key] = value
    return [frames[0], msgpack.packb(header), *frames[2:]]


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A connected PAIR of inproc sockets, closed with linger=0, context terminated."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock in (a, b):
        sock.linger = 0
        sock.rcvtimeo = 5000  # a lost message fails the test instead of hanging it
    a.bind("inproc://protocol-test")
    b.connect("inproc://protocol-test")
    yield a, b
    a.close()
    b.close()
    ctx.term()


# ----------------------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(message_types().values())
    assert set(message_types()) == {int(t) for t in MsgType}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frames = encode(msg)
    assert frames[0] == bytes([msg.TYPE])
    assert fields_equal(decode(frames), msg)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_zmq_without_copy(
    msg: Message, pair: tuple[zmq.Socket, zmq.Socket]
) -> None:
    sender, receiver = pair
    sender.send_multipart(encode(msg), copy=False)
    frames = receiver.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    assert fields_equal(decode(frames), msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 33])
def test_tensor_dtypes_and_empty_tensors(dtype: torch.dtype, rows: int) -> None:
    x = torch.randn(rows, HIDDEN).to(dtype)
    call = decode(encode(expert_call(x, counts=[rows, 0])))
    assert call.x.dtype == dtype and call.x.shape == (rows, HIDDEN)
    assert torch.equal(call.x, x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_int_dtypes_travel_on_the_wire(dtype: torch.dtype) -> None:
    # No message carries an int tensor yet: check the codec itself.
    y = torch.arange(12, dtype=dtype).reshape(3, 4)
    frame, descriptor = wire._tensor_frame(y, "T.y")
    field = wire._TensorField("y", "T.y", tuple(DTYPES), None)
    back = wire._decode_tensor(descriptor, bytes(frame), 2, field, Limits())
    assert back.dtype == dtype and torch.equal(back, y)


def test_float_only_fields_refuse_int_tensors() -> None:
    frames = with_header(
        expert_call(counts=[5]), tensors=[{"dtype": "int32", "shape": [5, HIDDEN]}]
    )
    frames[2] = torch.zeros(5, HIDDEN, dtype=torch.int32).numpy().tobytes()
    with pytest.raises(BadTensor, match="'int32' not accepted; expected one of float32"):
        decode(frames)


def test_defaults_fill_missing_optional_fields_and_unknown_keys_are_ignored() -> None:
    frames = with_header(
        GenerateRequest(request_id="r", prompt="hi", max_new_tokens=1),
        temperature=...,
        seed=...,
        prompt_ids=...,
        added_in_a_later_version={"x": 1},
    )
    req = decode(frames)
    assert req == GenerateRequest(request_id="r", prompt="hi", max_new_tokens=1)


def test_strided_and_grad_tensors_are_sent_as_their_values() -> None:
    x = torch.randn(HIDDEN, 4, requires_grad=True).T  # [4, HIDDEN], not contiguous
    call = decode(encode(expert_call(x, counts=[4])))
    assert torch.equal(call.x, x.detach())


# --------------------------------------------------------------------------------- zero copy


def test_encode_shares_the_tensor_memory() -> None:
    x = torch.randn(4, HIDDEN)
    frame = encode(expert_call(x, counts=[4]))[2]
    assert isinstance(frame, memoryview)
    assert np.frombuffer(frame, dtype=np.uint8).ctypes.data == x.data_ptr()
    x[0, 0] = 123.0
    assert np.frombuffer(frame, dtype=np.float32)[0] == 123.0


def test_encode_shares_bfloat16_memory() -> None:
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    frame = encode(expert_call(x, counts=[4]))[2]
    assert np.frombuffer(frame, dtype=np.uint8).ctypes.data == x.data_ptr()


def test_decode_maps_writable_frames_without_copy() -> None:
    frames = encode(expert_call(torch.zeros(4, HIDDEN), counts=[4]))
    payload = bytearray(frames[2])
    call = decode([frames[0], frames[1], payload])
    payload[:4] = np.float32(7.0).tobytes()
    assert call.x[0, 0].item() == 7.0


@pytest.mark.filterwarnings("error")  # torch warns when it maps non-writable memory
def test_decode_of_read_only_bytes_gives_a_writable_tensor() -> None:
    frames = [bytes(f) for f in encode(expert_call(counts=[5]))]
    call = decode(frames)
    call.x.add_(1.0)  # must not touch the caller's bytes, nor warn


def test_decode_of_zmq_frames_shares_their_memory(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    sender, receiver = pair
    x = torch.randn(1024, HIDDEN)  # above pyzmq's copy threshold
    sender.send_multipart(encode(expert_call(x, counts=[1024])), copy=False)
    frames = receiver.recv_multipart(copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call = decode(frames)
    assert call.x.data_ptr() == np.frombuffer(frames[2].buffer, dtype=np.uint8).ctypes.data


# ----------------------------------------------------------------------- malformed messages


def test_empty_frame_list() -> None:
    with pytest.raises(MalformedFrame, match="empty message"):
        decode([])


def test_unknown_type_byte() -> None:
    with pytest.raises(UnknownMessageType, match="0xee") as info:
        decode([b"\xee", msgpack.packb({})])
    assert info.value.code == "unknown_message_type"


def test_type_frame_of_wrong_length() -> None:
    with pytest.raises(MalformedFrame, match="expected exactly 1"):
        decode([b"\x70\x00", msgpack.packb({"seq": 1})])


def test_missing_header_frame() -> None:
    with pytest.raises(MalformedFrame, match="no header frame"):
        decode([bytes([MsgType.PING])])


def test_garbage_header_bytes() -> None:
    with pytest.raises(MalformedFrame, match="not valid msgpack") as info:
        decode([bytes([MsgType.PING]), b"\xc1\xff\x00garbage"])
    assert info.value.code == "malformed_frame"


def test_header_with_trailing_bytes() -> None:
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        decode([bytes([MsgType.PING]), msgpack.packb({"seq": 1}) + b"\x00"])


def test_header_that_is_not_a_map() -> None:
    with pytest.raises(MalformedFrame, match="expected msgpack map, got list"):
        decode([bytes([MsgType.PING]), msgpack.packb([1, 2])])


def test_header_with_non_string_keys() -> None:
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        decode([bytes([MsgType.PING]), msgpack.packb({1: 2})])


def test_frame_of_unsupported_object() -> None:
    with pytest.raises(
        MalformedFrame, match="frame 1: expected bytes, memoryview or zmq.Frame, got str"
    ):
        decode([bytes([MsgType.PING]), "not bytes"])  # type: ignore[list-item]


def test_missing_required_field() -> None:
    with pytest.raises(
        MalformedFrame, match=r"NodeRegister\.capacity_gb: missing required field"
    ) as info:
        decode(with_header(SAMPLES[7], capacity_gb=...))
    assert info.value.field == "NodeRegister.capacity_gb"


@pytest.mark.parametrize(
    ("msg", "field", "value", "expected"),
    [
        (Ping(seq=1), "seq", "1", "expected int >= 0, got str '1'"),
        (Ping(seq=1), "seq", True, "expected int >= 0, got bool True"),
        (Ping(seq=1), "seq", 1.0, "expected int >= 0, got float 1.0"),
        (Ping(seq=1), "seq", -1, "expected int >= 0, got int -1"),
        (CancelRequest(request_id="r"), "request_id", 5, "expected str, got int 5"),
        (CancelRequest(request_id="r"), "request_id", b"r", "expected str, got bytes"),
        (SAMPLES[0], "stop_at_eos", 1, "expected bool, got int 1"),
        (SAMPLES[0], "temperature", "hot", "expected finite number >= 0.0"),
        (SAMPLES[0], "temperature", float("nan"), "expected finite number >= 0.0, got float nan"),
        (SAMPLES[0], "top_p", 1.5, "expected finite number > 0.0 <= 1.0, got float 1.5"),
        (SAMPLES[0], "seed", "x", "expected int or nil"),
        (SAMPLES[0], "prompt_ids", [1, "2"], r"prompt_ids\[1\]: expected int >= 0, got str '2'"),
        (SAMPLES[7], "kind", "tpu", "expected one of 'cpu', 'gpu', got str 'tpu'"),
        (SAMPLES[7], "capacity_gb", 0, "expected finite number > 0.0, got int 0"),
        (SAMPLES[10], "experts", [[0, 1], [2]], r"experts\[1\]: expected \[int >= 0, int >= 0\]"),
        (SAMPLES[10], "experts", [[0, -1]], r"experts\[0\]\[1\]: expected int >= 0, got int -1"),
        (SAMPLES[10], "spawn", "warm", "expected one of 'zygote', 'fresh'"),
        (SAMPLES[11], "stages", {"spawn": "fast"}, r"stages\['spawn'\]: expected finite number"),
        (SAMPLES[11], "cgroup", [1], "expected map or nil, got list"),
        (SAMPLES[9], "instances", [{"id": 1}, 3], r"instances\[1\]: expected map, got int 3"),
        (SAMPLES[14], "exit_code", 1.5, "expected int or nil, got float 1.5"),
        (SAMPLES[16], "counts", [2, -3], r"counts\[1\]: expected int >= 0, got int -3"),
    ],
)
def test_wrong_field_type_names_the_field(
    msg: Message, field: str, value: Any, expected: str
) -> None:
    with pytest.raises(MalformedFrame, match=expected) as info:
        decode(with_header(msg, **{field: value}))
    assert info.value.field.startswith(f"{type(msg).__name__}.{field}")
    assert f"{type(msg).__name__}.{field}" in str(info.value)


def test_oversized_header() -> None:
    big = msgpack.packb({"seq": 1, "padding": "x" * 70_000})
    with pytest.raises(OversizedMessage, match=r"header of \d+ bytes; at most 65536") as info:
        decode([bytes([MsgType.PING]), big])
    assert info.value.code == "oversized_message"


def test_big_header_messages_take_a_long_prompt() -> None:
    prompt = "word " * 100_000  # 500 kB: over the ordinary header bound, under the prompt bound
    assert decode(encode(GenerateRequest("r", prompt, 1))).prompt == prompt
    with pytest.raises(OversizedMessage, match=r"GenerateRequest\.prompt: 500000 characters"):
        decode(encode(GenerateRequest("r", prompt, 1)), Limits(max_prompt_len=1000))


def test_oversized_string_and_list() -> None:
    with pytest.raises(OversizedMessage, match=r"ShutDown|Shutdown\.reason: 20000 characters"):
        decode(encode(Shutdown(reason="x" * 20_000)))
    with pytest.raises(
        OversizedMessage, match=r"expert_ids: 9 items; at most 8 \(Limits.max_list_len\)"
    ):
        decode(encode(expert_call(counts=[0] * 8 + [5])), Limits(max_list_len=8))


def test_deeply_nested_values() -> None:
    deep: Any = 0
    for _ in range(900):
        deep = [deep]
    with pytest.raises(
        OversizedMessage, match=r"StatusReply\.status: nested deeper than 32 levels"
    ):
        decode(encode(StatusReply(status={"x": deep})))
    with pytest.raises(
        MalformedFrame, match=r"Ping\.seq: expected int >= 0, got list \[\[\[\[\.\.\.\]\]\]\]"
    ):
        decode(with_header(Ping(seq=1), seq=deep))
    assert decode(encode(StatusReply(status={"a": {"b": [[1]]}}))).status == {"a": {"b": [[1]]}}


def test_too_many_frames() -> None:
    with pytest.raises(OversizedMessage, match="17 frames; at most 16"):
        decode([bytes([MsgType.PING])] + [b""] * 16)


def test_oversized_tensor_checked_before_its_frame() -> None:
    # The header claims a huge tensor; the decoder refuses before looking at the frame.
    frames = with_header(
        expert_call(counts=[5]), tensors=[{"dtype": "float32", "shape": [1 << 20, 1 << 10]}]
    )
    frames[2] = b""
    with pytest.raises(OversizedMessage, match="Limits.max_tensor_bytes"):
        decode(frames)
    with pytest.raises(OversizedMessage, match="at most 64 "):
        decode(encode(expert_call(counts=[5])), Limits(max_tensor_bytes=64))


def test_dtype_not_in_allowlist() -> None:
    frames = with_header(
        expert_call(counts=[5]), tensors=[{"dtype": "float64", "shape": [5, HIDDEN]}]
    )
    with pytest.raises(
        BadTensor, match="dtype 'float64' not accepted; expected one of float32, float16, bfloat16"
    ) as info:
        decode(frames)
    assert info.value.code == "bad_tensor"
    with pytest.raises(BadTensor, match="torch.float64 cannot go on the wire"):
        encode(expert_call(torch.randn(5, HIDDEN, dtype=torch.float64)))


def test_shape_and_length_mismatch() -> None:
    frames = encode(expert_call(counts=[5]))
    with pytest.raises(
        BadTensor, match=r"frame 2 has 156 bytes; shape \[5, 8\] of float32 needs 160"
    ):
        decode([frames[0], frames[1], bytes(frames[2])[:-4]])


def test_tensor_rank_bounds() -> None:
    frames = with_header(
        expert_call(counts=[5]), tensors=[{"dtype": "float32", "shape": [5, 2, 4]}]
    )
    with pytest.raises(BadTensor, match=r"shape \[5, 2, 4\] has 3 dimensions; expected 2"):
        decode(frames)
    frames = with_header(
        expert_call(counts=[5]), tensors=[{"dtype": "float32", "shape": [1] * 9 + [40]}]
    )
    with pytest.raises(BadTensor, match="10 dimensions; at most 8"):
        decode(frames)


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**40]])
def test_huge_dimensions_beside_a_zero_are_refused(shape: list[int]) -> None:
    """0 bytes in all, but no torch shape can hold such a dimension (found by fuzzing)."""
    frames = with_header(expert_call(counts=[]), tensors=[{"dtype": "float32", "shape": shape}])
    with pytest.raises(OversizedMessage, match="has a dimension over"):
        decode([frames[0], frames[1], b""])


@pytest.mark.parametrize(
    "descriptor",
    [
        [{"dtype": 1, "shape": [5, 8]}],
        [{"dtype": "float32", "shape": [5, -8]}],
        [{"dtype": "float32"}],
        ["x"],
    ],
)
def test_malformed_tensor_descriptor(descriptor: Any) -> None:
    with pytest.raises(MalformedFrame, match=r"ExpertCall\.x"):
        decode(with_header(expert_call(counts=[5]), tensors=descriptor))


def test_wrong_number_of_tensor_frames() -> None:
    frames = encode(expert_call(counts=[5]))
    with pytest.raises(MalformedFrame, match="0 tensor frames; the header declares 1"):
        decode(frames[:2])
    with pytest.raises(MalformedFrame, match="2 tensor frames; the header declares 1"):
        decode([*frames, frames[2]])
    with pytest.raises(MalformedFrame, match="1 tensor frames; the header declares 0"):
        decode([*encode(Ping(seq=1)), b"\x00" * 4])
    with pytest.raises(
        MalformedFrame, match=r"ExpertCall\.tensors: expected list of 1 tensor descriptors"
    ):
        decode(with_header(expert_call(counts=[5]), tensors=...))


def test_counts_must_sum_to_rows() -> None:
    with pytest.raises(BadTensor, match="5 rows but counts sum to 4"):
        decode(encode(expert_call(counts=[2, 2])))
    with pytest.raises(MalformedFrame, match="2 counts for 3 expert_ids"):
        decode(with_header(expert_call(counts=[2, 3]), expert_ids=[0, 1, 2]))


def test_shm_refs_are_optional_and_travel_as_arrays() -> None:
    plain = decode(encode(expert_call()))
    assert plain.x_shm is None and plain.y_shm is None  # absent: the rows are the frame, as before
    frames = encode(expert_call_shm())
    assert len(frames) == 3 and len(frames[2]) == 0  # an empty frame: only the descriptor travels
    assert msgpack.unpackb(frames[1])["x_shm"] == list(SHM_REF)
    call = decode(frames)
    assert type(call.x_shm) is ShmRef and call.x_shm == SHM_REF and call.y_shm == SHM_REF
    assert decode(encode(expert_call_shm(y_shm=None))).y_shm is None  # rows in shm, y as a frame


@pytest.mark.parametrize("changes, match", [
    (dict(x=torch.randn(5, HIDDEN)), "ExpertCall.x_shm: set, but the tensor frame holds 5 rows"),
    (dict(x=torch.empty(0, HIDDEN, dtype=torch.bfloat16)), r"x_shm.dtype: 'float32'; expected 'bfloat16'"),
    (dict(x=torch.empty(0, 4)), r"x_shm.cols: 8; expected 4"),
    (dict(x_shm=SHM_REF._replace(rows=4), y_shm=None), "4 rows but counts sum to 5"),
    (dict(y_shm=SHM_REF._replace(rows=4)), r"ExpertCall.y_shm.rows: 4; expected 5"),
    (dict(y_shm=SHM_REF._replace(dtype="float16")), r"y_shm.dtype: 'float16'; expected 'float32'"),
    (dict(x_shm=None, x=torch.randn(5, HIDDEN), y_shm=SHM_REF._replace(rows=6)), "y_shm.rows: 6"),
])
def test_shm_refs_must_agree_with_the_call(changes: dict, match: str) -> None:
    with pytest.raises(BadTensor, match=match):
        decode(encode(expert_call_shm(**changes)))


def test_shm_ref_of_a_result_must_come_with_an_empty_frame() -> None:
    result = ExpertResult(call_id=7, compute_s=0.0, y=torch.randn(5, HIDDEN), y_shm=SHM_REF)
    with pytest.raises(BadTensor, match="ExpertResult.y_shm: set, but the tensor frame holds 5 rows"):
        decode(encode(result))


@pytest.mark.parametrize("value", [
    "moemesh-1-x", [SHM_REF.segment, 5, 0, "float32", 5], [SHM_REF.segment, 5, -1, "float32", 5, HIDDEN],
    [SHM_REF.segment, "5", 0, "float32", 5, HIDDEN], [7, 5, 0, "float32", 5, HIDDEN], {"segment": "x"},
])
def test_malformed_shm_refs_name_the_field(value: Any) -> None:
    with pytest.raises(MalformedFrame) as info:
        decode(with_header(expert_call_shm(), x_shm=value))
    assert info.value.field.startswith("ExpertCall.x_shm")


def test_unpackable_value_names_the_field() -> None:
    with pytest.raises(MalformedFrame, match=r"Ping\.seq: cannot encode") as info:
        encode(Ping(seq=np.int64(3)))  # type: ignore[arg-type]
    assert "int()" in info.value.hint
    with pytest.raises(TypeError, match="not a registered mesh message"):
        encode("hello")  # type: ignore[arg-type]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        Limits(max_frames=0)


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "exc",
    [
        MeshUnavailable("no coordinator at tcp://127.0.0.1:7555"),
        RequestRejected("unknown SLO class 'gold'", code="unknown_slo_class"),
        RequestRejected("queue full", code="overloaded"),
        Timeout("request r-1 ran past 120 s"),
        Cancelled("request r-1 cancelled"),
        FunctionFailed("instance i-1 died"),
        UnknownExpert("layer 9 has no expert 99"),
        ConfigError("expected a number > 0", key="nodes[1].cpus", path="launch.toml"),
        MalformedFrame("Ping.seq: expected int", field="Ping.seq"),
        BadTensor("x: dtype"),
        OversizedMessage("too big"),
        UnknownMessageType("0xee"),
    ],
    ids=lambda e: f"{type(e).__name__}-{e.code}",
)
def test_error_reply_round_trip(exc: MeshError) -> None:
    reply = decode(encode(error_reply_for(exc, request_id="r-1")))
    assert reply == ErrorReply("r-1", exc.code, exc.message, exc.hint)
    back = error_from_reply(reply)
    assert type(back) is type(exc)
    assert (back.code, back.message, back.hint) == (exc.code, exc.message, exc.hint)


def test_error_reply_for_unexpected_exception() -> None:
    reply = error_reply_for(KeyError("boom"))
    assert (reply.request_id, reply.code) == (None, "internal")
    assert reply.message == "KeyError: 'boom'"
    assert "bug" in reply.hint
    assert type(error_from_reply(reply)) is MeshError


def test_unknown_code_from_a_newer_peer_keeps_the_code() -> None:
    err = error_from_reply(ErrorReply(None, "quota_exceeded", "too many", "wait"))
    assert type(err) is MeshError and err.code == "quota_exceeded"
    assert str(err) == "too many (hint: wait)"


def test_protocol_errors_are_mesh_errors_with_stable_codes() -> None:
    codes = {
        ProtocolError: "protocol_error",
        MalformedFrame: "malformed_frame",
        UnknownMessageType: "unknown_message_type",
        OversizedMessage: "oversized_message",
        BadTensor: "bad_tensor",
    }
    for cls, code in codes.items():
        assert issubclass(cls, MeshError) and cls.code == code


def test_long_error_messages_are_clipped_to_fit_the_wire() -> None:
    reply = error_reply_for(RuntimeError("x" * 100_000))
    assert decode(encode(reply)).message.startswith("RuntimeError: xxx")


# --------------------------------------------------------------------------------- fuzzing

# database=None: no .hypothesis/ folder in the work tree; failures print their reproducer.
FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_bytes_only_raise_protocol_errors(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


@FUZZ
@given(
    st.sampled_from(sorted(message_types())),
    st.binary(max_size=256),
    st.lists(st.binary(max_size=64), max_size=2),
)
def test_valid_type_random_header_only_raises_protocol_errors(
    code: int, header: bytes, tensors: list[bytes]
) -> None:
    try:
        decode([bytes([code]), header, *tensors])
    except ProtocolError:
        pass


@FUZZ
@given(st.data())
def test_random_field_values_only_raise_protocol_errors(data: st.DataObject) -> None:
    """Headers with the right keys and random values: decoded or refused, never a crash."""
    msg = data.draw(st.sampled_from(SAMPLES))
    header = msgpack.unpackb(encode(msg)[1])
    keys = [*sorted(header), "added_in_a_later_version"]
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        header[key] = data.draw(msgpack_values)
    frames = [bytes([msg.TYPE]), msgpack.packb(header), *encode(msg)[2:]]
    try:
        decoded = decode(frames)
    except ProtocolError:
        return
    assert type(decoded) is type(msg)
