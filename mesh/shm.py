"""Shared memory for expert-call rows between processes on one host: only a descriptor on ZeroMQ.

    caller (executor): one ShmPool per worker instance       worker: one ShmMaps
    call = pool.call(call_id, layer, ids, counts, x, rows)   call = maps.resolve(call)
      rows gathered straight into a slot; None: send frames    x: zero-copy view on the slot
      send encode(call): a ShmRef instead of the rows  ───►    result = <compute>(call)
                                                       ◄───    result = maps.reply(call, result)
    y = pool.result(msg)       zero-copy view on the slot        y copied into the slot (y_shm)
    staging.to_device(y, out, chunk.rows); pool.release(call_id)

A segment is a sealed memfd named "moemesh-<pid>-<32 random hex>", not a /dev/shm file:

- Nothing is ever in a file system namespace, so no kill -9 of either side can leave garbage in
  /dev/shm or anywhere else: the kernel frees the pages when the last descriptor and mapping
  are gone. The owner holds the only descriptor (closed by close(), trim() or its death: no
  peer can open the segment after that); a worker holds only mappings (dropped by eviction,
  prune() once the owner's descriptor is gone, or its death). A mapping stays valid after
  the other side died: no SIGBUS, the pages live until it is dropped.
- It is sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), so
  neither side can truncate it under the other's mapping (which would SIGBUS the reader); the
  worker refuses a segment without those seals.
- A peer opens it as /proc/<pid>/fd/<fd> (ShmRef.segment, ShmRef.fd): only processes allowed
  to read the owner's descriptors (same user, or root) can; then it checks, race-free on the
  descriptor it opened, that this is the memfd of that exact name. The pages are charged to the
  owner's memory cgroup (the caller writes them first), not to the function's.

Slots: each segment is cut into 4 KiB-aligned first-fit extents. A slot is taken per call and
given back by `release(call_id)` once the reply was read (a WorkerError reply too: the worker
is done with it). A call given up on (`forget`) may still be written by a late worker, so its
slot is quarantined until that late reply arrives (release) or the pool closes. Segments are
created on demand (max(min_segment_bytes, next power of two of the call)) up to max_bytes per
pool; when full, `call` returns None and the rows go as frames. By default the reply slot is
the call's own slot: the worker has read all of x before it writes y, so one slot per call.

Which way a call goes: rows of at least `SHM_MIN_BYTES` (64 KiB) go through shared memory, the
rest as frames: the crossover measured by `python -m mesh.bench_shm` (docs/bench/shm.json;
2 shared, loaded cores, [n, 2048] bfloat16 rows): from 64 KiB on the median round trip through
shared memory is 0.39-0.90x that of tcp loopback frames (2 MiB: 1.98 against 5.11 ms), and it
costs less CPU; below it there is nothing to win (4 KiB: 0.79 against 0.72 ms). The wall-clock
crossover is noisy on this loaded host (load average 9-20: from 32 KiB to 512 KiB over five
runs, one of them tied at 16 MiB; the quietest at 32 and 64 KiB); the CPU per round trip fell below frames' from 16-64 KiB
on in every run. Re-measure on the serving host before trusting the exact figure.

Errors: a descriptor that is malformed (name, alignment, bounds, dtype) is a `BadTensor`; a
well-formed one that cannot be mapped here (owner gone, descriptor closed, another host or pid
namespace, no permission, no seals) is `ShmUnavailable`: the caller should send that peer
frames from then on (`pool.disable`). Thread-safety: a pool belongs to one thread (the engine's),
like its sockets; so do the worker's maps (its serving loop).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import torch

from mesh.errors import BadTensor, ProtocolError
from mesh.protocol import DTYPES, FLOAT_DTYPES, ExpertCall, ExpertResult, ShmRef
from mesh.protocol.wire import DTYPE_NAMES

log = logging.getLogger("moemesh.shm")
M = TypeVar("M")

KiB = 1024
MiB = 1024 * KiB
PREFIX = "moemesh-"
SEGMENT_NAME = re.compile(r"moemesh-([1-9][0-9]{0,9})-[0-9a-f]{32}")
ALIGN = 4 * KiB  # slot offsets: page-aligned, so no two calls share a page
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Rows of at least this many bytes go through shared memory (measured: docs/bench/shm.json).
SHM_MIN_BYTES = 64 * KiB
_FLOAT_DTYPES = {name: DTYPES[name] for name in FLOAT_DTYPES}
MAX_SEGMENT_BYTES = 1 << 34  # a worker refuses to map a larger segment (16 GiB)


class ShmUnavailable(ProtocolError):
    """A well-formed ShmRef names a segment that cannot be mapped here (owner gone, descriptor
    closed, another host or pid namespace, no permission, unsealed): the caller should send
    this peer tensor frames (`ShmPool.disable`) and resend the call as frames."""

    code = "shm_unavailable"


def same_host(endpoint: str) -> bool:
    """Whether a peer at this ZeroMQ endpoint can share memory with us: loopback tcp, ipc or
    inproc. (A peer on another address may still be on this host; then a call simply goes as
    frames.)"""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlsplit(endpoint).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def nbytes_of(rows: int, cols: int, dtype: torch.dtype) -> int:
    return rows * cols * dtype.itemsize


# ------------------------------------------------------------------------------- caller side


@dataclass(eq=False)
class _Segment:
    """One memfd the pool owns, mapped whole; `free`: sorted [(offset, size)] extents."""

    name: str
    fd: int
    size: int
    data: torch.Tensor | None  # [size] uint8, the mapping (each view keeps it alive); None: closed
    free: list[tuple[int, int]]
    typed: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # data viewed as a dtype


@dataclass(frozen=True)
class _Slot:
    segment: _Segment
    offset: int
    size: int  # bytes reserved (aligned)
    ref: ShmRef
    tensor: torch.Tensor  # [rows, cols] of the ref's dtype over the slot's bytes


@dataclass
class ShmStats:
    calls: int = 0  # calls whose rows went through shared memory
    bytes: int = 0  # their rows' bytes
    declined: int = 0  # calls at or above min_call_bytes that found no room (sent as frames)
    segments: int = 0  # segments created
    segment_bytes: int = 0  # bytes of shared memory held now
    quarantined: int = 0  # slots of forgotten calls not yet given back
    by_reason: dict[str, int] = field(default_factory=dict)  # why calls were declined


class ShmPool:
    """The shared memory a caller owns for one peer (one worker instance).

    peer:              for logs and stats only
    max_bytes:         shared memory this pool may hold in all (segments are made on demand and
                       closed only by trim() and close())
    min_segment_bytes: the smallest segment created
    min_call_bytes:    rows below this go as frames (`wants`); default the measured crossover
    """

    def __init__(self, peer: str = "", *, max_bytes: int = 64 * MiB, min_segment_bytes: int = 8 * MiB,
                 min_call_bytes: int = SHM_MIN_BYTES) -> None:
        if not hasattr(os, "memfd_create"):
            raise ShmUnavailable("shared memory needs Linux's memfd_create; send frames instead")
        self.peer = peer
        self.max_bytes = max_bytes
        self.min_segment_bytes = max(ALIGN, min_segment_bytes)
        self.min_call_bytes = min_call_bytes
        self.stats = ShmStats()
        self.disabled = ""  # why this peer gets frames only ("" while enabled)
        self._segments: list[_Segment] = []
        self._slots: dict[int, _Slot] = {}  # call id -> its slot, until released
        self._forgotten: set[int] = set()  # call ids given up on, slots quarantined
        self._pid = os.getpid()

    # -- sending ---------------------------------------------------------------------------

    def wants(self, nbytes: int) -> bool:
        """Whether rows of `nbytes` should go through shared memory (crossover, enabled)."""
        return not self.disabled and nbytes >= self.min_call_bytes

    def call(self, call_id: int, layer: int, expert_ids: list[int], counts: list[int], x: torch.Tensor,
             rows: torch.Tensor | None = None) -> ExpertCall | None:
        """An ExpertCall whose rows x[rows] ([n, hidden], all of x when rows is None; x on any
        device) are gathered straight into a slot, with that slot offered for the reply; None
        when the rows are below the crossover, the pool is disabled or full: send frames."""
        n = x.shape[0] if rows is None else int(rows.numel())
        cols = x.shape[1]
        nbytes = nbytes_of(n, cols, x.dtype)
        name = DTYPE_NAMES.get(x.dtype)
        if name not in FLOAT_DTYPES or not self.wants(nbytes) or n == 0:
            return None
        if call_id in self._slots:
            raise ValueError(f"ShmPool.call: call {call_id} still holds a slot; call ids are unique")
        slot = self._take(nbytes, name, n, cols)
        if slot is None:
            return None
        view = slot.tensor  # [n, hidden]
        if x.device.type == "cpu":
            if rows is None:
                view.copy_(x)
            else:
                torch.index_select(x, 0, rows, out=view)
        else:
            view.copy_(x if rows is None else x.index_select(0, rows.to(x.device)))
        self._slots[call_id] = slot
        self.stats.calls += 1
        self.stats.bytes += nbytes
        return ExpertCall(call_id, layer, list(expert_ids), list(counts), _empty(cols, x.dtype),
                          x_shm=slot.ref, y_shm=slot.ref)

    # -- replies ---------------------------------------------------------------------------

    def result(self, msg: ExpertResult) -> torch.Tensor:
        """The reply's y [n, hidden] on the host: msg.y when it came as a frame, else a zero-copy
        view on the call's slot, valid until `release(msg.call_id)`. Raises BadTensor when
        msg.y_shm is not the slot this pool offered to that call."""
        if msg.y_shm is None:
            return msg.y
        slot = self._slots.get(msg.call_id)
        if slot is None or msg.call_id in self._forgotten or msg.y_shm != slot.ref:
            raise BadTensor(f"ExpertResult.y_shm: {msg.y_shm} is not the slot offered to call "
                            f"{msg.call_id}", field="ExpertResult.y_shm")
        return slot.tensor

    def release(self, call_id: int) -> None:
        """The call's reply arrived (a result or an error) and y was copied out: its slot is
        free. Also for a late reply to a forgotten call. No-op for calls sent as frames."""
        slot = self._slots.pop(call_id, None)
        if slot is None:
            return
        if call_id in self._forgotten:
            self._forgotten.discard(call_id)
            self.stats.quarantined -= 1
        self._give(slot)

    def forget(self, call_id: int) -> None:
        """The call was given up on (late, instance gone): the worker may still write its slot,
        so it is not reused until a late reply releases it, or the pool closes."""
        if call_id in self._slots and call_id not in self._forgotten:
            self._forgotten.add(call_id)
            self.stats.quarantined += 1

    def disable(self, reason: str) -> None:
        """Send this peer frames from now on (e.g. it answered ShmUnavailable)."""
        if not self.disabled:
            log.warning("shared memory to %s disabled: %s", self.peer or "peer", reason)
        self.disabled = reason or "disabled"

    # -- slots -----------------------------------------------------------------------------

    def _take(self, nbytes: int, dtype: str, rows: int, cols: int) -> _Slot | None:
        size = -(-nbytes // ALIGN) * ALIGN
        for seg in self._segments:
            slot = self._cut(seg, size, dtype, rows, cols)
            if slot is not None:
                return slot
        seg_size = max(self.min_segment_bytes, 1 << (size - 1).bit_length())
        if self.stats.segment_bytes + seg_size > self.max_bytes:
            seg_size = self.max_bytes - self.stats.segment_bytes
            seg_size -= seg_size % ALIGN
        if seg_size < size:
            self._decline("full")
            return None
        try:
            seg = self._new_segment(seg_size)
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch could not map it
            log.warning("no shared memory segment of %d bytes for %s: %s", seg_size, self.peer, exc)
            self._decline(f"memfd: {getattr(exc, 'strerror', None) or exc}")
            return None
        return self._cut(seg, size, dtype, rows, cols)

    def _cut(self, seg: _Segment, size: int, dtype: str, rows: int, cols: int) -> _Slot | None:
        for i, (offset, length) in enumerate(seg.free):
            if length >= size:
                if length == size:
                    del seg.free[i]
                else:
                    seg.free[i] = (offset + size, length - size)
                ref = ShmRef(seg.name, seg.fd, offset, dtype, rows, cols)
                return _Slot(seg, offset, size, ref, _region(seg, offset, DTYPES[dtype], rows, cols))
        return None

    def _give(self, slot: _Slot) -> None:
        """Put the slot's extent back, merged with its neighbours."""
        free = slot.segment.free
        if slot.segment.data is None:  # its segment was closed
            return
        start, end = slot.offset, slot.offset + slot.size
        i = 0
        while i < len(free) and free[i][0] < start:
            i += 1
        if i and free[i - 1][0] + free[i - 1][1] == start:  # merge with the one before
            i -= 1
            start = free[i][0]
            del free[i]
        if i < len(free) and free[i][0] == end:  # and the one after
            end += free[i][1]
            del free[i]
        free.insert(i, (start, end - start))

    def _decline(self, reason: str) -> None:
        self.stats.declined += 1
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    def _new_segment(self, size: int) -> _Segment:
        name = f"{PREFIX}{self._pid}-{secrets.token_hex(16)}"
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            data = _map(fd, size)
        except (OSError, RuntimeError):
            os.close(fd)
            raise
        seg = _Segment(name, fd, size, data, [(0, size)])
        self._segments.append(seg)
        self.stats.segments += 1
        self.stats.segment_bytes += size
        return seg

    def trim(self, keep_bytes: int = 0) -> int:
        """Close segments with no slot in use (quarantined ones count as in use), newest first,
        until at most keep_bytes stay held; returns the bytes closed. A worker drops its mapping
        at its next `ShmMaps.prune()`, and only then are the pages freed."""
        closed = 0
        for seg in reversed(list(self._segments)):
            if self.stats.segment_bytes <= keep_bytes:
                break
            if seg.free == [(0, seg.size)]:
                self._segments.remove(seg)
                os.close(seg.fd)
                _unmap(seg)
                self.stats.segment_bytes -= seg.size
                closed += seg.size
        return closed

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every segment: descriptors at once (no peer can open them any more), mappings
        as soon as no tensor views them (views returned by `result` keep theirs alive)."""
        for seg in self._segments:
            os.close(seg.fd)
            _unmap(seg)
        self._segments.clear()
        self._slots.clear()
        self._forgotten.clear()
        self.stats.segment_bytes = 0
        self.stats.quarantined = 0
        self.disabled = self.disabled or "closed"

    def __enter__(self) -> ShmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map(fd: int, size: int) -> torch.Tensor:
    """[size] uint8 over a shared read-write mapping of the file open at `fd`. torch maps it
    through our own /proc/self/fd link (the same open file, whatever its name says) and keeps no
    descriptor: the mapping lives exactly as long as some tensor views it (unlike mmap.mmap,
    which dups the descriptor and whose close() would unmap live tensors)."""
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)


class ShmPools:
    """The executor's pools, one per worker instance on this host, and which pool each call's
    slot is in (so that a reply, even a late one, finds it by call id alone).

    enabled:        False: every call goes as frames ([policy]-style switch)
    min_call_bytes: the crossover (SHM_MIN_BYTES); max_bytes: per pool
    """

    def __init__(self, *, enabled: bool = True, min_call_bytes: int = SHM_MIN_BYTES,
                 max_bytes: int = 64 * MiB, min_segment_bytes: int = 1 * MiB) -> None:
        self.enabled = enabled and hasattr(os, "memfd_create")
        self.min_call_bytes = min_call_bytes
        self.max_bytes = max_bytes
        self.min_segment_bytes = min_segment_bytes
        self.pools: dict[str, ShmPool] = {}  # instance id -> its pool
        self._by_call: dict[int, ShmPool] = {}  # call id -> the pool holding its slot

    def call(self, instance_id: str, endpoint: str, call_id: int, layer: int, expert_ids: list[int],
             counts: list[int], x: torch.Tensor, rows: torch.Tensor | None = None) -> ExpertCall | None:
        """ShmPool.call on that instance's pool (made on first use when `same_host(endpoint)`);
        None: send frames."""
        nbytes = (x.shape[0] if rows is None else int(rows.numel())) * x.shape[1] * x.element_size()
        if not self.enabled or nbytes < self.min_call_bytes:
            return None
        pool = self.pools.get(instance_id)
        if pool is None:
            if not same_host(endpoint):
                return None
            pool = self.pools[instance_id] = ShmPool(instance_id, max_bytes=self.max_bytes,
                                                     min_call_bytes=self.min_call_bytes,
                                                     min_segment_bytes=self.min_segment_bytes)
        msg = pool.call(call_id, layer, expert_ids, counts, x, rows)
        if msg is not None:
            self._by_call[call_id] = pool
        return msg

    def result(self, msg: ExpertResult) -> torch.Tensor:
        """y of a reply: msg.y (a frame) or the view on its slot (BadTensor if not its slot)."""
        if msg.y_shm is None:
            return msg.y
        pool = self._by_call.get(msg.call_id)
        if pool is None:
            raise BadTensor(f"ExpertResult.y_shm: call {msg.call_id} was offered no slot",
                            field="ExpertResult.y_shm")
        return pool.result(msg)

    def release(self, call_id: int) -> None:
        """Any reply to call_id arrived (result, error, or late) and y was copied out."""
        pool = self._by_call.pop(call_id, None)
        if pool is not None:
            pool.release(call_id)

    def forget(self, call_id: int) -> None:
        """call_id was given up on: its slot waits for a late reply (or the pool's drop)."""
        pool = self._by_call.get(call_id)
        if pool is not None:
            pool.forget(call_id)

    def disable(self, instance_id: str, reason: str) -> None:
        """That instance answered ShmUnavailable: frames only from now on."""
        pool = self.pools.get(instance_id)
        if pool is None:
            pool = self.pools[instance_id] = ShmPool(instance_id, max_bytes=self.max_bytes)
        pool.disable(reason)

    def drop(self, instance_id: str) -> None:
        """The instance is gone: close its pool."""
        pool = self.pools.pop(instance_id, None)
        if pool is not None:
            self._by_call = {cid: p for cid, p in self._by_call.items() if p is not pool}
            pool.close()

    def trim(self, keep_bytes: int = 0) -> int:
        """ShmPool.trim on every pool (e.g. between steps); returns the bytes closed."""
        return sum(pool.trim(keep_bytes) for pool in self.pools.values())

    @property
    def held_bytes(self) -> int:
        """Shared memory held now (the main function's memory: bill it)."""
        return sum(pool.stats.segment_bytes for pool in self.pools.values())

    def close(self) -> None:
        for instance_id in list(self.pools):
            self.drop(instance_id)


def _region(seg: _Segment | _Mapping, offset: int, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] of dtype at byte `offset` of a mapping (bounds checked by the caller)."""
    typed = seg.typed.get(dtype)
    if typed is None:
        typed = seg.typed[dtype] = seg.data[: seg.size - seg.size % dtype.itemsize].view(dtype)
    return typed.as_strided((rows, cols), (cols, 1), offset // dtype.itemsize)


_EMPTY: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _empty(cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The [0, cols] frame that stands for rows in shared memory (shared: it has no data)."""
    tensor = _EMPTY.get((cols, dtype))
    if tensor is None:
        if len(_EMPTY) > 64:
            _EMPTY.clear()
        tensor = _EMPTY[(cols, dtype)] = torch.empty(0, cols, dtype=dtype)
    return tensor


def _unmap(seg: _Segment | _Mapping) -> None:
    """Drop our views: the pages are unmapped once no other tensor views them."""
    seg.data = None
    seg.typed.clear()


# ------------------------------------------------------------------------------- worker side


@dataclass(eq=False)
class _Mapping:
    name: str
    pid: int
    fd: int
    size: int
    data: torch.Tensor | None  # [size] uint8, the mapping (each view keeps it alive)
    typed: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # data viewed as a dtype


class ShmMaps:
    """The worker's mappings of its callers' segments: each mapped once, cached by name, the
    least recently used dropped beyond `max_segments`, and those whose owner closed them or
    died dropped by `prune()`."""

    def __init__(self, max_segments: int = 16) -> None:
        self.max_segments = max(1, max_segments)
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self.opened = 0  # segments ever mapped
        self._resolved: tuple[ShmRef, torch.Tensor] | None = None  # the last x resolve() mapped

    def resolve(self, call: ExpertCall) -> ExpertCall:
        """`call` with x the zero-copy [rows, hidden] view of its x_shm slot (x_shm cleared,
        y_shm kept); a call without x_shm unchanged. Raises BadTensor or ShmUnavailable."""
        if call.x_shm is None:
            return call
        x = self.view(call.x_shm, "ExpertCall.x_shm")
        self._resolved = (call.x_shm, x)  # reply() reuses it when y goes back in place
        return ExpertCall(call.call_id, call.layer, call.expert_ids, call.counts, x, None, call.y_shm)

    def y_slot(self, call: ExpertCall) -> torch.Tensor | None:
        """The writable [rows, hidden] view where the worker may compute y in place (`out=`),
        so that `reply` has nothing to copy; None when the call offered no usable slot. It may
        be x's own slot: write each row only after the rows it depends on were read."""
        if call.y_shm is None:
            return None
        resolved = self._resolved
        if resolved is not None and resolved[0] == call.y_shm:
            return resolved[1]
        try:
            return self.view(call.y_shm, "ExpertCall.y_shm")
        except ProtocolError:
            return None

    def reply(self, call: ExpertCall, result: M) -> M:
        """`result` with its y written into the call's y_shm slot (y_shm set, y an empty frame);
        unchanged when the call offered no slot, the slot does not fit y (y then goes as a
        frame: the caller takes either), or it is no ExpertResult (a WorkerError passes)."""
        ref = call.y_shm
        if ref is None or type(result) is not ExpertResult or result.y_shm is not None:
            self._resolved = None
            return result
        y = result.y
        if tuple(y.shape) != (ref.rows, ref.cols) or DTYPE_NAMES.get(y.dtype) != ref.dtype:
            return result
        resolved, self._resolved = self._resolved, None
        try:
            slot = resolved[1] if resolved is not None and resolved[0] == ref else self.view(ref, "ExpertCall.y_shm")
        except ProtocolError as exc:
            log.warning("call %d: reply slot unusable (%s); sending y as a frame", call.call_id, exc)
            return result
        if slot.data_ptr() != y.data_ptr():
            slot.copy_(y)
        return ExpertResult(result.call_id, result.compute_s, _empty(ref.cols, y.dtype), ref)

    def view(self, ref: ShmRef, path: str = "ShmRef") -> torch.Tensor:
        """The [rows, cols] tensor `ref` names, zero-copy and writable, after checking the name,
        dtype, alignment and bounds (BadTensor) and mapping the segment (ShmUnavailable)."""
        if type(ref) is not ShmRef:
            raise BadTensor(f"{path}: expected a ShmRef, got {type(ref).__name__}", field=path)
        segment, fd, offset, dtype_name, rows, cols = ref
        mapping = self._maps.get(segment) if type(segment) is str else None  # names mapped were checked
        if mapping is None and (type(segment) is not str or SEGMENT_NAME.fullmatch(segment) is None):
            raise BadTensor(f"{path}.segment: {str(segment)[:80]!r} is not a mesh segment; "
                            f"expected {PREFIX}<pid>-<32 hex digits>", field=path)
        dtype = _FLOAT_DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise BadTensor(f"{path}.dtype: {str(dtype_name)[:40]!r} not accepted; expected one of "
                            f"{', '.join(FLOAT_DTYPES)}", field=path)
        for key, value in (("fd", fd), ("offset", offset), ("rows", rows), ("cols", cols)):
            if type(value) is not int or value < 0:
                raise BadTensor(f"{path}.{key}: {value!r}; expected an int >= 0", field=path)
        if offset % dtype.itemsize:
            raise BadTensor(f"{path}.offset: {offset} is not a multiple of {dtype.itemsize} "
                            f"({dtype_name})", field=path)
        if mapping is None:
            mapping = self._mapping(segment, int(segment.split("-")[1]), fd, path)
        else:
            self._maps.move_to_end(segment)
        if offset + rows * cols * dtype.itemsize > mapping.size:
            raise BadTensor(f"{path}: [{rows}, {cols}] {dtype_name} at offset {offset} "
                            f"ends past the segment's {mapping.size} bytes", field=path)
        return _region(mapping, offset, dtype, rows, cols)

    def _mapping(self, name: str, pid: int, fd: int, path: str) -> _Mapping:
        mapping = _open_segment(name, pid, fd, path)
        self.opened += 1
        self._maps[name] = mapping
        self._evict()
        return mapping

    def _evict(self) -> None:
        self.prune()
        while len(self._maps) > self.max_segments:
            _unmap(self._maps.popitem(last=False)[1])

    def prune(self) -> int:
        """Drop the mappings of segments their owner closed (or died with): their pages are
        freed once no tensor views them. One readlink per mapping: call it when idle (and it
        runs whenever a new segment is mapped). Returns how many were dropped."""
        dropped = 0
        for name, mapping in list(self._maps.items()):
            try:
                live = os.readlink(f"/proc/{mapping.pid}/fd/{mapping.fd}") == f"/memfd:{name} (deleted)"
            except OSError:
                live = False
            if not live:
                _unmap(self._maps.pop(name))
                dropped += 1
        return dropped

    def forget(self, name: str) -> None:
        """Drop one segment's mapping (e.g. its owner said it closed it)."""
        mapping = self._maps.pop(name, None)
        if mapping is not None:
            _unmap(mapping)

    def close(self) -> None:
        self._resolved = None
        while self._maps:
            _unmap(self._maps.popitem()[1])

    def __len__(self) -> int:
        return len(self._maps)


def _open_segment(name: str, pid: int, fd: int, path: str) -> _Mapping:
    """Map the memfd `name` of process `pid` (its descriptor `fd`) whole, read-write."""
    where = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(where, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ShmUnavailable(
            f"{path}: cannot open segment {name} as {where} ({exc.strerror}): its owner is gone, "
            "closed it, or runs on another host or as another user",
            hint="send this peer tensor frames (ShmPool.disable)") from None
    try:
        link = os.readlink(f"/proc/self/fd/{own}")  # what we opened, not what the name says now
        if link != f"/memfd:{name} (deleted)":
            raise ShmUnavailable(f"{path}: {where} is not segment {name} (it is {link[:80]!r}); "
                                 "its owner closed it", hint="send this peer tensor frames")
        seals = fcntl.fcntl(own, fcntl.F_GET_SEALS)
        if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
            raise ShmUnavailable(f"{path}: segment {name} is not sealed against resizing; "
                                 "refusing to map it", hint="create segments with mesh.shm.ShmPool")
        size = os.fstat(own).st_size
        if not 0 < size <= MAX_SEGMENT_BYTES:
            raise ShmUnavailable(f"{path}: segment {name} has {size} bytes; expected 1 .. "
                                 f"{MAX_SEGMENT_BYTES}", hint="send this peer tensor frames")
        data = _map(own, size)
    except (OSError, RuntimeError) as exc:
        raise ShmUnavailable(f"{path}: cannot map segment {name} ({exc})",
                             hint="send this peer tensor frames") from None
    finally:
        os.close(own)
    return _Mapping(name, pid, fd, size, data)
