"""Activation traces on disk: append-only, versioned, portable.

A trace store is a directory a user can copy to another mesh::

    traces/
      meta.json       {"format": "moemesh-traces", "version": 1, "model_id": ..., "layers": L,
                       "experts": E, "top_k": k, "embedding_dim": d, "extra": {...}}
      records.jsonl   one JSON object per line, one line per finished request

Each record line holds plain fields (``request_id``, ``prompt_text``, ``new_tokens``) and arrays
encoded as ``{"dtype": "<i8", "shape": [L, E], "data": "<base64 of little-endian bytes>"}``:

    token_ids        [n_prompt]              int64
    embedding        [d]                     float32  the prompt's mean input embedding (or a sentence embedding)
    prefill          [L, E]                  int64    prompt token-slots routed per expert
    decode           [L, E]                  int64    generated token-slots routed per expert
    token_embeddings [n_prompt, d]           float32  optional: input-embedding rows (SPS)
    gate_inputs      [L, d]                  float32  optional: mean hidden state each MoE gate saw
    token_routing    [n_prompt, L, top_k]    int16    optional: experts each prompt token chose

One writer at a time (the coordinator's meter); readers may run while it appends.
Why JSONL + base64: every language reads it, a crash mid-append damages only the last line
(detected, warned about, and cut off before the next append), and there is no pickle anywhere
(DESIGN.md: "No pickle, ever"). Arrays are always stored little-endian with an explicit dtype.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from predictor.forecast import Activation, PromptFeatures

FORMAT_NAME = "moemesh-traces"
FORMAT_VERSION = 1
META_FILE = "meta.json"
RECORDS_FILE = "records.jsonl"

# Decoders bound every size (DESIGN.md transport rules); these are generous for real models.
MAX_LINE_BYTES = 256 * 1024 * 1024
MAX_ARRAY_ELEMENTS = 64 * 1024 * 1024


class TraceFormatError(ValueError):
    """The store on disk is not one this code can read (wrong format, version, or corrupt data)."""


@dataclass(frozen=True)
class TraceMeta:
    """What every record of a store shares: the model and its routed-expert geometry."""

    model_id: str
    layers: int
    experts: int
    top_k: int
    embedding_dim: int
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "top_k", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TraceMeta: {name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"TraceMeta: top_k={self.top_k} > experts={self.experts}")

    def to_json(self) -> dict:
        body = asdict(self)
        return {"format": FORMAT_NAME, **body}

    @staticmethod
    def from_json(body: dict, where: str = "meta.json") -> TraceMeta:
        if body.get("format") != FORMAT_NAME:
            raise TraceFormatError(f"{where}: format {body.get('format')!r} is not {FORMAT_NAME!r}")
        version = body.get("version")
        if version != FORMAT_VERSION:
            raise TraceFormatError(
                f"{where}: trace format version {version!r} is not supported by this moemesh "
                f"(reads version {FORMAT_VERSION}); convert the store or use a matching moemesh"
            )
        try:
            return TraceMeta(
                model_id=str(body["model_id"]),
                layers=int(body["layers"]),
                experts=int(body["experts"]),
                top_k=int(body["top_k"]),
                embedding_dim=int(body["embedding_dim"]),
                version=int(version),
                extra=dict(body.get("extra", {})),
            )
        except KeyError as missing:
            raise TraceFormatError(f"{where}: missing field {missing}") from None


@dataclass(frozen=True)
class TraceRecord:
    """One finished request: its prompt, what the predictor could see, and its true routing.

    Shapes: token_ids [n], embedding [d], prefill/decode [L, E], token_embeddings [n, d] or None,
    gate_inputs [L, d] or None, token_routing [n, L, top_k] or None.
    """

    request_id: str
    prompt_text: str
    token_ids: np.ndarray
    embedding: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray
    new_tokens: int = 0
    token_embeddings: np.ndarray | None = None
    gate_inputs: np.ndarray | None = None
    token_routing: np.ndarray | None = None

    def features(self) -> PromptFeatures:
        """What a predictor may see before the run. Without stored token embeddings the
        prompt embedding stands in as a single row ([1, d])."""
        token_embeddings = (
            self.token_embeddings if self.token_embeddings is not None else self.embedding[None, :]
        )
        return PromptFeatures(
            token_ids=self.token_ids,
            token_embeddings=token_embeddings,
            embedding=self.embedding,
            expected_new_tokens=self.new_tokens,
            text=self.prompt_text,
        )

    def activation(self) -> Activation:
        return Activation(prefill=self.prefill, decode=self.decode)


# Array fields: name -> (stored dtype, required)
_ARRAY_FIELDS: dict[str, tuple[str, bool]] = {
    "token_ids": ("<i8", True),
    "embedding": ("<f4", True),
    "prefill": ("<i8", True),
    "decode": ("<i8", True),
    "token_embeddings": ("<f4", False),
    "gate_inputs": ("<f4", False),
    "token_routing": ("<i2", False),
}


def _encode_array(array: np.ndarray, dtype: str) -> dict:
    little_endian = np.ascontiguousarray(array, dtype=np.dtype(dtype))
    return {
        "dtype": dtype,
        "shape": list(little_endian.shape),
        "data": base64.b64encode(little_endian.tobytes()).decode("ascii"),
    }


def _decode_array(body: dict, name: str) -> np.ndarray:
    dtype = np.dtype(body["dtype"])
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise TraceFormatError(f"{name}: dtype {body['dtype']!r} not allowed")
    shape = tuple(int(size) for size in body["shape"])
    elements = int(np.prod(shape)) if shape else 1
    if any(size < 0 for size in shape) or elements > MAX_ARRAY_ELEMENTS:
        raise TraceFormatError(f"{name}: shape {shape} out of bounds")
    raw = base64.b64decode(body["data"], validate=True)
    if len(raw) != elements * dtype.itemsize:
        raise TraceFormatError(f"{name}: {len(raw)} bytes for shape {shape} and dtype {dtype}")
    native = dtype.newbyteorder("=")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(native)


def encode_record(record: TraceRecord) -> str:
    """One JSON line (without the newline) for ``record``."""
    body: dict = {
        "request_id": record.request_id,
        "prompt_text": record.prompt_text,
        "new_tokens": int(record.new_tokens),
    }
    for name, (dtype, _required) in _ARRAY_FIELDS.items():
        value = getattr(record, name)
        if value is not None:
            body[name] = _encode_array(value, dtype)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


def decode_record(line: str | bytes, where: str = "record") -> TraceRecord:
    """Inverse of :func:`encode_record`; raises ``TraceFormatError`` on malformed input."""
    try:
        body = json.loads(line)
        arrays = {}
        for name, (_dtype, required) in _ARRAY_FIELDS.items():
            if name in body:
                arrays[name] = _decode_array(body[name], f"{where}.{name}")
            elif required:
                raise TraceFormatError(f"{where}: missing array {name!r}")
        return TraceRecord(
            request_id=str(body["request_id"]),
            prompt_text=str(body.get("prompt_text", "")),
            new_tokens=int(body.get("new_tokens", 0)),
            token_ids=arrays["token_ids"],
            embedding=arrays["embedding"],
            prefill=arrays["prefill"],
            decode=arrays["decode"],
            token_embeddings=arrays.get("token_embeddings"),
            gate_inputs=arrays.get("gate_inputs"),
            token_routing=arrays.get("token_routing"),
        )
    except TraceFormatError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise TraceFormatError(f"{where}: {error}") from None


def check_record_shape(record: TraceRecord, meta: TraceMeta) -> None:
    """Raise ``ValueError`` when any array of ``record`` disagrees with ``meta``."""
    matrix = (meta.layers, meta.experts)
    n_prompt = record.token_ids.shape[0] if record.token_ids.ndim == 1 else -1
    expected: dict[str, tuple[int, ...]] = {
        "token_ids": (n_prompt,),
        "embedding": (meta.embedding_dim,),
        "prefill": matrix,
        "decode": matrix,
        "token_embeddings": (n_prompt, meta.embedding_dim),
        "gate_inputs": (meta.layers, meta.embedding_dim),
        "token_routing": (n_prompt, meta.layers, meta.top_k),
    }
    if record.token_ids.ndim != 1:
        raise ValueError(f"record {record.request_id}: token_ids must be 1-D, got {record.token_ids.shape}")
    for name, shape in expected.items():
        value = getattr(record, name)
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(
                f"record {record.request_id}: {name} has shape {tuple(value.shape)}, store expects {shape} "
                f"(model {meta.model_id}: layers={meta.layers}, experts={meta.experts}, "
                f"top_k={meta.top_k}, embedding_dim={meta.embedding_dim})"
            )
    if (record.prefill < 0).any() or (record.decode < 0).any():
        raise ValueError(f"record {record.request_id}: negative expert counts")
    routing = record.token_routing
    if routing is not None and routing.size and (routing.min() < 0 or routing.max() >= meta.experts):
        raise ValueError(f"record {record.request_id}: token_routing holds expert ids outside [0, {meta.experts})")


def hash_fraction(key: str, seed: int) -> float:
    """A stable number in [0, 1) from ``key`` and ``seed`` (SHA-256; same on every machine)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def split_records(
    records: Iterable[TraceRecord], by: str = "id hash", test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[TraceRecord], list[TraceRecord]]:
    """Deterministic ``(train_records, test_records)``, same on every machine.

    by: ``"id hash"`` (hash of request_id) or ``"text hash"`` (hash of prompt text, so
    repeated prompts never land on both sides). A record is a test record when
    ``hash_fraction(key, seed) < test_fraction``.
    """
    key_of = {"id hash": _id_key, "id_hash": _id_key, "text hash": _text_key, "text_hash": _text_key}
    if by not in key_of:
        raise ValueError(f"split by {by!r}: use 'id hash' or 'text hash'")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction {test_fraction} outside [0, 1]")
    train, test = [], []
    for record in records:
        is_test = hash_fraction(key_of[by](record), seed) < test_fraction
        (test if is_test else train).append(record)
    return train, test


class TraceStore:
    """An append-only directory of trace records (format in the module docstring).

    Use :meth:`create` for a new store and :meth:`open` for an existing one. Iterating yields
    :class:`TraceRecord` in append order; a truncated last line is skipped with a warning.
    """

    def __init__(self, path: Path, meta: TraceMeta) -> None:
        self.path = path
        self.meta = meta
        self._records_path = path / RECORDS_FILE
        self._count = sum(1 for _ in self._complete_lines(warn=False))

    @classmethod
    def create(cls, path: str | os.PathLike, meta: TraceMeta) -> TraceStore:
        """Make a new, empty store at ``path`` (which must not hold one already)."""
        directory = Path(path)
        if (directory / META_FILE).exists():
            raise FileExistsError(f"{directory}: a trace store already exists here")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        (directory / RECORDS_FILE).touch()
        return cls(directory, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TraceStore:
        """Open an existing store; ``TraceFormatError`` on a format or version mismatch."""
        directory = Path(path)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no {META_FILE}, not a trace store")
        try:
            body = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise TraceFormatError(f"{meta_path}: {error}") from None
        meta = TraceMeta.from_json(body, str(meta_path))
        if not (directory / RECORDS_FILE).exists():
            raise TraceFormatError(f"{directory}: {RECORDS_FILE} missing")
        return cls(directory, meta)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[TraceRecord]:
        for line_number, line in self._complete_lines(warn=True):
            yield decode_record(line, f"{self._records_path}:{line_number}")

    def append(self, record: TraceRecord) -> None:
        """Append one record (checked against ``meta``), flushed and fsynced before returning."""
        check_record_shape(record, self.meta)
        line = encode_record(record).encode("ascii") + b"\n"
        self._cut_partial_tail()
        with open(self._records_path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._count += 1

    def extend(self, records: Iterable[TraceRecord]) -> None:
        for record in records:
            self.append(record)

    def ids(self) -> list[str]:
        return [record.request_id for record in self]

    def split(
        self, by: str = "id hash", test_fraction: float = 0.1, seed: int = 0
    ) -> tuple[list[TraceRecord], list[TraceRecord]]:
        """Deterministic ``(train_records, test_records)``; see :func:`split_records`."""
        return split_records(self, by, test_fraction, seed)

    # -- internals -------------------------------------------------------------------------

    def _complete_lines(self, warn: bool) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, line) for every newline-terminated line; warns about a tail."""
        with open(self._records_path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if len(line) > MAX_LINE_BYTES:
                    raise TraceFormatError(f"{self._records_path}:{line_number}: line too long")
                if not line.endswith(b"\n"):
                    if warn and line.strip():
                        warnings.warn(
                            f"{self._records_path}:{line_number}: truncated last record "
                            f"({len(line)} bytes, likely a crash mid-append) skipped",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                    return
                if line.strip():
                    yield line_number, line

    def _cut_partial_tail(self) -> None:
        """Remove an unterminated last line so the next append starts on a fresh line."""
        size = self._records_path.stat().st_size
        if size == 0:
            return
        with open(self._records_path, "rb+") as handle:
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            # Scan back for the last newline (records are at most MAX_LINE_BYTES long).
            position = size
            block = 65536
            keep = 0
            while position > 0:
                start = max(0, position - block)
                handle.seek(start)
                chunk = handle.read(position - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                position = start
            warnings.warn(
                f"{self._records_path}: cutting a truncated last record ({size - keep} bytes) "
                "before appending",
                RuntimeWarning,
                stacklevel=3,
            )
            handle.truncate(keep)


def _id_key(record: TraceRecord) -> str:
    return record.request_id


def _text_key(record: TraceRecord) -> str:
    return record.prompt_text or " ".join(str(token) for token in record.token_ids.tolist())
