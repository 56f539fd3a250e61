"""Host staging for remote-expert activations: device -> host before a call, host -> device after.

    x_host = staging.to_host(plan.x, chunk.rows)       # [n, H] host rows, ready to encode
    staging.to_device(msg.y, y, chunk.rows)            # y[chunk.rows] = msg.y, on y's device

When the main model runs on CUDA (as kTransformers runs CPU experts beside GPU attention):

- `to_host` gathers the rows on the GPU, then copies them with `non_blocking=True` into a
  *pinned* host block on a side copy stream that waits only for the rows; the CPU waits for
  that copy alone (one event), never for the whole device. `stage()` + `Staged.wait()` split
  the two, so a caller may queue GPU work (local experts, the shared expert) in between.
- `to_device` copies a reply into a pinned block (a host memcpy out of the ZeroMQ frame),
  starts the host -> device copy on the copy stream and makes the compute stream wait for it
  with an event: the CPU goes straight back to gathering replies, the GPU keeps computing the
  local experts, and the scatter into `y` runs on the compute stream once the copy landed.

On the CPU the same code runs with plain (unpinned) host blocks and no streams: `to_host`
gathers the rows straight into a pooled block (`index_select(out=)`: no more copies than the
`plan.x[rows]` it replaces); `to_device` writes `out[rows]` directly unless `bounce=True`
(what tests use to exercise the CUDA path's reply blocks on a CPU).

Buffer lifetimes. A block `to_host` filled is referenced by ZeroMQ until the message is sent
(frames are sent zero-copy), and nothing says when that is. So a call's block is reused only
once `to_device` received that call's reply (same `rows` object): the worker had the whole
message by then. Blocks of calls that got no reply (late, failed, retried) are forgotten at the
next round (a new `x`), never rewritten: the garbage collector frees them once ZeroMQ lets go.
A reply block is reused once its host -> device copy has finished (its event). Blocks are
sized in powers of two and grow on demand; `stats` counts allocations and reuses.

Thread-safety: one Staging per engine thread (the executor's), like its sockets.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

MIN_BLOCK_ELEMENTS = 16 * 1024  # 64 KiB of float32: a decode round's rows fit in the first block
MAX_FREE_BLOCKS = 64  # free blocks kept per dtype beyond this are released


@dataclass(eq=False)  # identity: list.remove must never compare the tensors
class Block:
    """One reusable host buffer: `data` [capacity] of one dtype (pinned on a CUDA host)."""

    data: torch.Tensor
    event: object | None = None  # torch.cuda.Event of the last copy that reads it (reply blocks)

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return self.data[:n].view(shape)


@dataclass
class Staged:
    """A device -> host copy in flight: `wait()` returns the host rows [n, H] once landed."""

    host: torch.Tensor
    done: object | None = None  # torch.cuda.Event recorded after the copy (None: already done)

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self.host


@dataclass
class StagingStats:
    allocated: int = 0  # blocks ever allocated
    allocated_bytes: int = 0
    reused: int = 0  # takes served by a free block
    forgotten: int = 0  # call blocks never acknowledged by a reply, dropped (not reused)
    to_host_bytes: int = 0
    to_device_bytes: int = 0
    by_size: dict[int, int] = field(default_factory=dict)  # block capacity -> blocks allocated


class Staging:
    """Pinned-host staging buffers for the executor (see the module docstring).

    pin:    pin host blocks (default: where CUDA is available; pinning needs a CUDA driver).
    bounce: route replies through a host block even when `out` is on the CPU (tests).
    """

    def __init__(self, *, pin: bool | None = None, bounce: bool = False,
                 min_block_elements: int = MIN_BLOCK_ELEMENTS) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.bounce = bounce
        self.min_block_elements = max(1, min_block_elements)
        self.stats = StagingStats()
        self._free: dict[torch.dtype, list[Block]] = {}
        self._calls: dict[int, Block] = {}  # id(rows) -> block of that call's rows, until its reply
        self._round: weakref.ref | None = None  # the `x` of the current round
        self._copy_streams: dict[torch.device, object] = {}

    # -- device -> host --------------------------------------------------------------------

    def to_host(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [S, H] (any device), rows [n] int64 (host) -> x[rows] as a contiguous host tensor
        [n, H] in a pooled block (all of x when rows is None). Waits for this copy only."""
        return self.stage(x, rows).wait()

    def stage(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> Staged:
        """Start copying x[rows] to a host block; `.wait()` returns it (see to_host)."""
        if x.dim() != 2:
            raise ValueError(f"stage: x must be [rows, hidden], got shape {tuple(x.shape)}")
        self._new_round_if(x)
        n = x.shape[0] if rows is None else int(rows.numel())
        block = self._take(n * x.shape[1], x.dtype)
        host = block.view((n, x.shape[1]))
        if rows is not None:
            self._remember(rows, block)
        self.stats.to_host_bytes += host.numel() * host.element_size()
        if x.device.type == "cpu":
            if rows is None:
                host.copy_(x)
            else:
                torch.index_select(x, 0, rows, out=host)
            return Staged(host)
        src = x if rows is None else x.index_select(0, rows.to(x.device, non_blocking=True))
        if x.device.type != "cuda":
            host.copy_(src)
            return Staged(host)
        copy = self._copy_stream(x.device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(x.device))  # src is computed on the compute stream
        with torch.cuda.stream(copy):
            copy.wait_event(ready)
            host.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy)
        src.record_stream(copy)  # the allocator must not hand src out again before the copy ran
        return Staged(host, done)

    # -- host -> device --------------------------------------------------------------------

    def to_device(self, y_host: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
        """out[rows] = y_host (cast to out's dtype). y_host [n, H] on the host (e.g. a decoded
        ZeroMQ frame), out [S, H] on any device, rows [n] int64 on the host. Returns at once
        on CUDA: the compute stream waits for the copy, the CPU does not. Also marks the call
        with these `rows` as answered, so its to_host block may be reused."""
        if y_host.shape[0] != rows.numel() or (y_host.dim() == 2 and y_host.shape[1] != out.shape[1]):
            raise ValueError(f"to_device: y {tuple(y_host.shape)} for {rows.numel()} rows of out "
                             f"{tuple(out.shape)}")
        self._answered(rows)
        self.stats.to_device_bytes += y_host.numel() * y_host.element_size()
        if out.device.type == "cpu" and not self.bounce:
            out.index_copy_(0, rows, y_host.to(out.dtype))
            return
        block = self._take(y_host.numel(), y_host.dtype)
        host = block.view(tuple(y_host.shape))
        host.copy_(y_host)  # out of the ZeroMQ frame into a (pinned) block
        if out.device.type != "cuda":
            out.index_copy_(0, rows.to(out.device), host.to(device=out.device, dtype=out.dtype))
            self._give(block)
            return
        copy = self._copy_stream(out.device)
        with torch.cuda.stream(copy):
            dev = torch.empty(host.shape, dtype=host.dtype, device=out.device)
            dev.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy)
        compute = torch.cuda.current_stream(out.device)
        compute.wait_event(done)
        dev.record_stream(compute)  # allocated on the copy stream, read on the compute stream
        out.index_copy_(0, rows.to(out.device, non_blocking=True), dev.to(out.dtype))
        block.event = done  # the block is rewritten only after this copy finished
        self._give(block)

    # -- blocks ------------------------------------------------------------------------------

    def free_blocks(self, dtype: torch.dtype = torch.float32) -> list[Block]:
        return list(self._free.get(dtype, ()))

    def _take(self, numel: int, dtype: torch.dtype) -> Block:
        free = self._free.setdefault(dtype, [])
        fits = [b for b in free if b.capacity >= numel]
        if fits:
            block = min(fits, key=lambda b: b.capacity)
            free.remove(block)
            if block.event is not None:
                block.event.synchronize()  # its last host -> device copy must have read it
                block.event = None
            self.stats.reused += 1
            return block
        capacity = max(self.min_block_elements, 1 << max(0, numel - 1).bit_length())
        data = torch.empty(capacity, dtype=dtype, pin_memory=self.pin)
        self.stats.allocated += 1
        self.stats.allocated_bytes += capacity * data.element_size()
        self.stats.by_size[capacity] = self.stats.by_size.get(capacity, 0) + 1
        return Block(data)

    def _give(self, block: Block) -> None:
        free = self._free.setdefault(block.data.dtype, [])
        free.append(block)
        if len(free) > MAX_FREE_BLOCKS:
            free.remove(min(free, key=lambda b: b.capacity))

    def _remember(self, rows: torch.Tensor, block: Block) -> None:
        old = self._calls.pop(id(rows), None)
        if old is not None:  # a retry: the first attempt may still sit in a socket's queue
            self.stats.forgotten += 1
        self._calls[id(rows)] = block

    def _answered(self, rows: torch.Tensor) -> None:
        block = self._calls.pop(id(rows), None)
        if block is not None:
            self._give(block)

    def _new_round_if(self, x: torch.Tensor) -> None:
        if self._round is not None and self._round() is x:
            return
        self.stats.forgotten += len(self._calls)  # unanswered calls: their blocks are not reused
        self._calls.clear()
        self._round = weakref.ref(x)

    def _copy_stream(self, device: torch.device):
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        return stream
