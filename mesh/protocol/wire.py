"""Framing and the tensor codec: `encode(msg) -> frames`, `decode(frames) -> msg`.

A message travels as ZeroMQ frames:

    frame 0     1 byte    MsgType
    frame 1     msgpack   header: a map of the message's plain fields, plus
                          "tensors": [{"dtype": "float32", "shape": [n, hidden]}, ...]
                          when the message carries tensors
    frame 2...  raw bytes one frame per tensor, C-contiguous, in the order of "tensors"

`encode` sends tensors zero-copy: each tensor frame is a memoryview of the (contiguous, CPU)
tensor's own buffer. Send with `copy=False` and do not write to the tensor until ZeroMQ has
sent it. `decode` maps tensor frames back zero-copy when it can (a `zmq.Frame` received with
`copy=False`, or any writable buffer); read-only input such as `bytes` is copied once, so the
tensors it returns are always writable.

Decoders trust nothing: every size is bounded by `Limits` before it is read (frame count,
header bytes, tensor bytes, rank and each dimension, string, list and map lengths, nesting
depth), every header field is checked against its dataclass type hint (`fields.py`), and every
failure is a `ProtocolError` subclass naming the field, what it got and what it expected. Unknown header keys are ignored
(a newer peer may add fields); missing required ones are errors.

Adding a message takes a few lines in `messages.py`: a `MsgType` member and a frozen dataclass
under `@message`, with typed fields bounded by `spec(...)` where the defaults do not fit.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, TypeVar

import msgpack
import torch
import zmq

from mesh.errors import BadTensor, MalformedFrame, OversizedMessage, UnknownMessageType
from mesh.protocol.fields import DEFAULT_LIMITS, Checker, Limits, bad, checker, show

Frame = bytes | bytearray | memoryview | zmq.Frame

# The dtypes a tensor frame may carry, by header name. bfloat16 has no numpy dtype, but torch
# reads and writes its bytes directly, so it needs no detour.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

TENSORS_KEY = "tensors"  # header key declaring the tensor frames; no field may be named so


class Message:
    """Base of every wire message: a frozen dataclass with a one-byte `TYPE`.

    BIG_HEADER: the header may use `Limits.max_big_header_bytes` instead of `max_header_bytes`
    (messages carrying a prompt or a report).
    """

    __slots__ = ()
    TYPE: ClassVar[enum.IntEnum]
    BIG_HEADER: ClassVar[bool] = False

    def _check(self) -> None:
        """Cross-field checks, run after decoding (override where fields depend on each other)."""


@dataclass(frozen=True)
class _PlainField:
    name: str
    path: str  # "ExpertCall.counts", for errors
    check: Checker
    required: bool


@dataclass(frozen=True)
class _TensorField:
    name: str
    path: str
    dtypes: tuple[str, ...]
    ndim: int | None


@dataclass(frozen=True)
class _Codec:
    """What encode and decode need to know about one message class, derived once."""

    cls: type[Message]
    plain: tuple[_PlainField, ...]
    tensors: tuple[_TensorField, ...]
    type_frame: bytes


_CODECS: dict[type[Message], _Codec] = {}
_BY_TYPE: dict[int, _Codec] = {}

M = TypeVar("M", bound=type[Message])


def message(cls: M) -> M:
    """Register a message class (put it above `@dataclass(frozen=True, slots=True)`): derive
    its field checks from its type hints and `spec` bounds, and claim its type byte."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: put @message above @dataclass(frozen=True)")
    code = int(cls.TYPE)
    if not 0 <= code <= 255:
        raise TypeError(f"{cls.__name__}.TYPE: {code} does not fit in one byte")
    if code in _BY_TYPE:
        raise TypeError(f"{cls.__name__}.TYPE: {code} is {_BY_TYPE[code].cls.__name__}'s already")
    hints = typing.get_type_hints(cls)
    plain: list[_PlainField] = []
    tensors: list[_TensorField] = []
    for f in dataclasses.fields(cls):
        if f.name == TENSORS_KEY:
            raise TypeError(f"{cls.__name__}.{f.name}: the name {TENSORS_KEY!r} is reserved")
        path = f"{cls.__name__}.{f.name}"
        if hints[f.name] is torch.Tensor:
            dtypes = tuple(f.metadata.get("dtypes", tuple(DTYPES)))
            tensors.append(_TensorField(f.name, path, dtypes, f.metadata.get("ndim")))
        else:
            required = f.default is MISSING and f.default_factory is MISSING
            check, _ = checker(hints[f.name], dict(f.metadata))
            plain.append(_PlainField(f.name, path, check, required))
    codec = _Codec(cls, tuple(plain), tuple(tensors), bytes((code,)))
    _CODECS[cls] = codec
    _BY_TYPE[code] = codec
    return cls


def message_types() -> dict[int, type[Message]]:
    """Every registered message class by its type byte."""
    return {code: codec.cls for code, codec in sorted(_BY_TYPE.items())}


# ------------------------------------------------------------------------------------- encode


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for `msg`: [type byte, msgpack header, one memoryview per tensor].

    Raises MalformedFrame naming the field when a value cannot be packed (e.g. a numpy int
    where an int belongs), BadTensor for a tensor of a dtype the wire does not carry.
    """
    codec = _CODECS.get(type(msg))
    if codec is None:
        raise TypeError(f"encode: {type(msg).__name__} is not a registered mesh message")
    header: dict[str, Any] = {f.name: getattr(msg, f.name) for f in codec.plain}
    tensor_frames: list[memoryview] = []
    if codec.tensors:
        descriptors = []
        for f in codec.tensors:
            frame, descriptor = _tensor_frame(getattr(msg, f.name), f.path)
            tensor_frames.append(frame)
            descriptors.append(descriptor)
        header[TENSORS_KEY] = descriptors
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unpackable_field(codec, header, exc) from exc
    return [codec.type_frame, packed, *tensor_frames]


def _tensor_frame(tensor: Any, path: str) -> tuple[memoryview, dict[str, Any]]:
    """The frame and header descriptor for one tensor.

    The frame is a memoryview of the tensor's own bytes: no copy when the tensor is already a
    C-contiguous CPU tensor (a GPU or strided tensor is copied once to become one).
    """
    if not isinstance(tensor, torch.Tensor):
        raise BadTensor(f"{path}: expected a torch.Tensor, got {show(tensor)}", field=path)
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise BadTensor(
            f"{path}: dtype {tensor.dtype} cannot go on the wire; expected one of {', '.join(DTYPES)}",
            field=path,
        )
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    descriptor = {"dtype": name, "shape": list(tensor.shape)}
    if tensor.numel() == 0:
        return memoryview(b""), descriptor
    # numpy has no bfloat16: hand it the same bytes as int16.
    array = (tensor.view(torch.int16) if tensor.dtype is torch.bfloat16 else tensor).numpy()
    return memoryview(array).cast("B"), descriptor  # [nbytes] over the tensor's storage


def _unpackable_field(codec: _Codec, header: dict[str, Any], exc: Exception) -> MalformedFrame:
    """Which field msgpack refused to pack (searched on the error path only)."""
    for f in codec.plain:
        value = header[f.name]
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return MalformedFrame(
                f"{f.path}: cannot encode {show(value)} ({exc}); expected plain str, int, "
                "float, bool, None, list or dict values",
                field=f.path,
                hint="convert numpy or torch scalars with int(), float() or .tolist() first",
            )
    return MalformedFrame(f"cannot encode {codec.cls.__name__}: {exc}")


# ------------------------------------------------------------------------------------- decode


def decode(frames: Sequence[Frame], limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message carried by `frames` (what follows any ROUTER identity envelope).

    Raises a ProtocolError subclass for anything but a well-formed message within `limits`:
    MalformedFrame, UnknownMessageType, OversizedMessage or BadTensor.
    """
    count = len(frames)
    if count == 0:
        raise MalformedFrame(
            "empty message: expected [type byte, msgpack header, tensor frames...]"
        )
    if count > limits.max_frames:
        raise OversizedMessage(f"{count} frames; at most {limits.max_frames} (Limits.max_frames)")
    type_view = _buffer(frames[0], 0)
    if type_view.nbytes != 1:
        raise MalformedFrame(f"frame 0 (type): {type_view.nbytes} bytes; expected exactly 1")
    codec = _BY_TYPE.get(type_view[0])
    if codec is None:
        known = ", ".join(f"0x{code:02x} {c.cls.__name__}" for code, c in sorted(_BY_TYPE.items()))
        raise UnknownMessageType(
            f"frame 0 (type): no message type 0x{type_view[0]:02x}; known: {known}"
        )
    name = codec.cls.__name__
    if count < 2:
        raise MalformedFrame(f"{name}: no header frame; expected [type byte, msgpack header, ...]")
    header = _decode_header(_buffer(frames[1], 1), codec, limits)

    descriptors: Any = header.get(TENSORS_KEY) if codec.tensors else []
    if type(descriptors) is not list or len(descriptors) != len(codec.tensors):
        raise bad(
            f"{name}.{TENSORS_KEY}", f"list of {len(codec.tensors)} tensor descriptors", descriptors
        )
    if count - 2 != len(codec.tensors):
        raise MalformedFrame(
            f"{name}: {count - 2} tensor frames; the header declares {len(codec.tensors)}"
        )

    kwargs: dict[str, Any] = {}
    for f in codec.plain:
        if f.name in header:
            kwargs[f.name] = f.check(header[f.name], f.path, limits)
        elif f.required:
            raise MalformedFrame(f"{f.path}: missing required field", field=f.path)
    for i, f in enumerate(codec.tensors):
        kwargs[f.name] = _decode_tensor(descriptors[i], frames[2 + i], 2 + i, f, limits)
    msg = codec.cls(**kwargs)
    msg._check()
    return msg


def _buffer(frame: Any, index: int) -> memoryview:
    """A flat byte view of one frame, whatever object carries it."""
    if isinstance(frame, zmq.Frame):
        view = frame.buffer
    elif isinstance(frame, bytes | bytearray | memoryview):
        view = memoryview(frame)
    else:
        raise MalformedFrame(
            f"frame {index}: expected bytes, memoryview or zmq.Frame, got {type(frame).__name__}"
        )
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise MalformedFrame(f"frame {index}: not a contiguous buffer ({exc})") from exc
    return view


def _decode_header(view: memoryview, codec: _Codec, limits: Limits) -> dict[str, Any]:
    """The header map, its size bounded before msgpack reads it and again inside msgpack."""
    name = codec.cls.__name__
    limit_name = "max_big_header_bytes" if codec.cls.BIG_HEADER else "max_header_bytes"
    limit = getattr(limits, limit_name)
    if view.nbytes > limit:
        raise OversizedMessage(
            f"{name}: header of {view.nbytes} bytes; at most {limit} (Limits.{limit_name})"
        )
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=max(limits.max_list_len, limits.max_prompt_tokens),
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack reports garbage as ValueError (ExtraData, FormatError, StackError, bad UTF-8,
        # non-str map keys, lengths over the max_* bounds) and a few cases as TypeError.
        if "exceeds max_" in str(exc):  # a string, list or map beyond the bounds given above
            raise OversizedMessage(
                f"{name}: frame 1 (header) holds a value beyond the Limits ({exc})"
            ) from exc
        raise MalformedFrame(f"{name}: frame 1 (header) is not valid msgpack ({exc})") from exc
    if type(header) is not dict:
        raise bad(f"{name} header", "msgpack map", header)
    return header


def _decode_tensor(
    descriptor: Any, frame: Any, index: int, field: _TensorField, limits: Limits
) -> torch.Tensor:
    """One tensor from its header descriptor and its frame, bounded and checked."""
    path = field.path
    if type(descriptor) is not dict:
        raise bad(path, 'map {"dtype": str, "shape": [int, ...]}', descriptor)
    dtype_name, shape = descriptor.get("dtype"), descriptor.get("shape")
    if type(dtype_name) is not str:
        raise bad(f"{path}.dtype", "str", dtype_name)
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise bad(f"{path}.shape", "list of int >= 0", shape)
    dtype = DTYPES.get(dtype_name)
    if dtype is None or dtype_name not in field.dtypes:
        raise BadTensor(
            f"{path}: dtype {dtype_name!r} not accepted; expected one of {', '.join(field.dtypes)}",
            field=path,
        )
    if len(shape) > limits.max_tensor_ndim:
        raise BadTensor(
            f"{path}: {len(shape)} dimensions; at most {limits.max_tensor_ndim} (Limits.max_tensor_ndim)",
            field=path,
        )
    if field.ndim is not None and len(shape) != field.ndim:
        raise BadTensor(
            f"{path}: shape {shape} has {len(shape)} dimensions; expected {field.ndim}", field=path
        )
    if any(d > limits.max_tensor_bytes for d in shape):  # bounds each dimension, even beside a 0
        raise OversizedMessage(
            f"{path}: shape {show(shape)} has a dimension over {limits.max_tensor_bytes} "
            "(Limits.max_tensor_bytes)",
            field=path,
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_tensor_bytes:
        raise OversizedMessage(
            f"{path}: shape {shape} of {dtype_name} is {nbytes} bytes; at most "
            f"{limits.max_tensor_bytes} (Limits.max_tensor_bytes)",
            field=path,
        )
    view = _buffer(frame, index)
    if view.nbytes != nbytes:
        raise BadTensor(
            f"{path}: frame {index} has {view.nbytes} bytes; shape {shape} of {dtype_name} needs {nbytes}",
            field=path,
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(view) if view.readonly else view  # torch needs writable memory
    tensor = torch.frombuffer(buffer, dtype=dtype)  # [numel], sharing the frame's memory
    if tensor.data_ptr() % dtype.itemsize:  # a tiny frame may sit unaligned in its zmq message
        tensor = tensor.clone()
    return tensor.view(shape)
