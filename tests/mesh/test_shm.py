"""mesh.shm: expert-call rows through shared memory between real processes, bad descriptors
refused with typed errors, and nothing left behind by close() or kill -9 of either side."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap

import pytest
import torch

from mesh.bench_shm import Echo, crossover
from mesh.errors import BadTensor
from mesh.protocol import ExpertCall, ExpertResult, ShmRef, WorkerError
from mesh.shm import ALIGN, ShmMaps, ShmPool, ShmPools, ShmUnavailable, same_host

HIDDEN = 64


def leftovers(prefix: str) -> list[str]:
    """What still holds a segment whose name starts with `prefix`: this process's mappings and
    descriptors, and any /dev/shm entry of the mesh (there must never be one)."""
    found = [line.split()[-2] for line in open("/proc/self/maps") if prefix in line]
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if prefix in link:
            found.append(f"fd {fd} -> {link}")
    found += [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if name.startswith("moemesh-")]
    return found


def own_prefix() -> str:
    return f"moemesh-{os.getpid()}-"


def batch(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [2n, HIDDEN] and rows [n]: every other row, as a round's dispatch would pick them."""
    return torch.randn(2 * n, HIDDEN).to(dtype), torch.arange(0, 2 * n, 2)


@pytest.fixture
def pool():
    pool = ShmPool("test", min_call_bytes=0, min_segment_bytes=64 * 1024)
    yield pool
    pool.close()


@pytest.fixture
def maps():
    maps = ShmMaps()
    yield maps
    maps.close()


# -------------------------------------------------------------------- between real processes


def test_round_trip_through_a_worker_process_then_its_kill_9_leaves_nothing() -> None:
    with Echo() as peer:
        pool = ShmPool("echo", min_call_bytes=0, min_segment_bytes=1 << 20)
        call_id = 0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n in (1, 7, 300):
                call_id += 1
                x, rows = batch(n, dtype)
                call = pool.call(call_id, 0, [2, 5], [n - n // 2, n // 2], x, rows)
                assert call.x_shm is not None and call.y_shm == call.x_shm
                assert tuple(call.x.shape) == (0, HIDDEN)  # only the descriptor travels
                peer.send(call)
                msg = peer.recv()
                assert isinstance(msg, ExpertResult) and msg.call_id == call_id
                assert msg.y_shm == call.y_shm and tuple(msg.y.shape) == (0, HIDDEN)
                assert torch.equal(pool.result(msg), x[rows])
                pool.release(call_id)
        assert pool.stats.segments == 1 and pool.stats.calls == 9  # slots were reused

        x, rows = batch(3)  # below the crossover: frames, as today, through the same peer
        assert ShmPool("small").call(99, 0, [0], [3], x, rows) is None
        peer.send(ExpertCall(99, 0, [0], [3], x=x[rows]))
        msg = peer.recv()
        assert msg.y_shm is None and torch.equal(pool.result(msg), x[rows])

        # A descriptor the worker cannot map: a typed error back, and the worker lives on.
        ref = ShmRef(f"{own_prefix()}{secrets.token_hex(16)}", 10_000, 0, "float32", 3, HIDDEN)
        peer.send(ExpertCall(100, 0, [0], [3], x=torch.empty(0, HIDDEN), x_shm=ref))
        msg = peer.recv()
        assert isinstance(msg, WorkerError) and msg.code == "shm_unavailable"
        assert "cannot open segment" in msg.message
        ref = ref._replace(segment="psm_1234")
        peer.send(ExpertCall(101, 0, [0], [3], x=torch.empty(0, HIDDEN), x_shm=ref))
        msg = peer.recv()
        assert isinstance(msg, WorkerError) and msg.code == "bad_tensor"
        assert "is not a mesh segment" in msg.message

        peer.proc.kill()  # kill -9 of the worker, its mappings still open
        peer.proc.wait()
        assert leftovers(own_prefix())  # our own descriptor and mapping, nothing else
        pool.close()
        assert leftovers(own_prefix()) == []


OWNER = textwrap.dedent("""
    import json, sys, torch
    from mesh.shm import ShmPool
    pool = ShmPool("owner", min_call_bytes=0, min_segment_bytes=1 << 16)
    x = torch.arange(2 * 5 * 64, dtype=torch.float32).view(10, 64)
    call = pool.call(1, 0, [0], [5], x, torch.arange(0, 10, 2))
    spare = pool.call(2, 0, [0], [5], x, torch.arange(1, 10, 2))
    print(json.dumps([call.x_shm._asdict(), spare.x_shm._asdict()]), flush=True)
    sys.stdin.read()  # hold the segment until killed
""")


def test_kill_9_of_the_owner_leaves_nothing_and_the_worker_keeps_its_mapping(maps: ShmMaps) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        first, spare = (ShmRef(**d) for d in json.loads(owner.stdout.readline()))
        prefix = f"moemesh-{owner.pid}-"
        assert first.segment.startswith(prefix) and first.segment == spare.segment
        x = torch.arange(2 * 5 * 64, dtype=torch.float32).view(10, 64)
        view = maps.view(first, "ExpertCall.x_shm")
        assert torch.equal(view, x[0::2])
    finally:
        owner.kill()  # kill -9 of the owner: no close(), no atexit
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()
    assert torch.equal(view, x[0::2])  # the pages live on while mapped: no SIGBUS, no garbage file
    assert torch.equal(maps.view(spare, "x"), x[1::2])  # already mapped: served from the cache
    other = ShmRef(f"{prefix}{secrets.token_hex(16)}", spare.fd, 0, "float32", 1, 64)
    with pytest.raises(ShmUnavailable, match="owner"):  # gone (or, were its pid reused, not that memfd)
        maps.view(other)
    assert leftovers(prefix) and not [f for f in leftovers(prefix) if f.startswith("/dev/shm")]
    del view
    maps.close()
    assert leftovers(prefix) == []  # owner dead, our mapping gone: the kernel freed the pages


# ---------------------------------------------------------------------------- bad descriptors


@pytest.fixture
def ref(pool: ShmPool) -> ShmRef:
    x, rows = batch(4)
    return pool.call(1, 0, [0], [4], x, rows).x_shm


@pytest.mark.parametrize("change, match", [
    (dict(segment="psm_deadbeef"), "not a mesh segment"),
    (dict(segment="moemesh-1-abc"), "not a mesh segment"),
    (dict(segment="moemesh-../../etc/passwd"), "not a mesh segment"),
    (dict(segment="moemesh-0-" + "0" * 32), "not a mesh segment"),
    (dict(dtype="int32"), "'int32' not accepted"),
    (dict(dtype="float64"), "'float64' not accepted"),
    (dict(offset=2), "not a multiple of 4"),
    (dict(offset=64 * 1024), "ends past the segment"),
    (dict(rows=10**12), "ends past the segment"),
    (dict(cols=-1), "expected an int >= 0"),
    (dict(fd=True), "expected an int >= 0"),
])
def test_malformed_descriptors_are_bad_tensors(maps: ShmMaps, ref: ShmRef, change: dict, match: str) -> None:
    with pytest.raises(BadTensor, match=match) as info:
        maps.view(ref._replace(**change), "ExpertCall.x_shm")
    assert info.value.code == "bad_tensor" and info.value.field == "ExpertCall.x_shm"


def test_descriptors_naming_no_usable_segment_are_unavailable(maps: ShmMaps, ref: ShmRef, tmp_path) -> None:
    with open(tmp_path / "file", "wb+") as f:  # a real file at that descriptor
        f.truncate(1 << 20)
        with pytest.raises(ShmUnavailable, match="is not segment"):
            maps.view(ref._replace(fd=f.fileno()))
    with pytest.raises(ShmUnavailable, match="its owner is gone, closed it"):
        maps.view(ref._replace(fd=ref.fd + 5000))
    with ShmPool(min_call_bytes=0) as second:  # another segment's descriptor under this name
        x, rows = batch(1)
        with pytest.raises(ShmUnavailable, match="is not segment"):
            maps.view(second.call(1, 0, [0], [1], x, rows).x_shm._replace(segment=ref.segment))
    name = f"{own_prefix()}{secrets.token_hex(16)}"
    fd = os.memfd_create(name)  # right name, but not sealed: could be truncated under us
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(ShmUnavailable, match="not sealed"):
            maps.view(ref._replace(segment=name, fd=fd))
    finally:
        os.close(fd)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with pytest.raises(ShmUnavailable):
        maps.view(ref._replace(segment=f"moemesh-{dead}-{secrets.token_hex(16)}"))
    assert len(maps) == 0  # nothing was mapped by a refused descriptor
    assert ShmUnavailable("x").code == "shm_unavailable"


def test_a_reply_naming_another_slot_is_refused(pool: ShmPool) -> None:
    x, rows = batch(4)
    call = pool.call(1, 0, [0], [4], x, rows)
    forged = ExpertResult(1, 0.0, torch.empty(0, HIDDEN), y_shm=call.y_shm._replace(offset=ALIGN))
    with pytest.raises(BadTensor, match="not the slot offered to call 1"):
        pool.result(forged)
    with pytest.raises(BadTensor):
        pool.result(ExpertResult(2, 0.0, torch.empty(0, HIDDEN), y_shm=call.y_shm))


# ------------------------------------------------------------------------------- the pool


def test_slots_are_reused_and_coalesced(pool: ShmPool) -> None:
    x, rows = batch(32)  # 32 x 64 float32 = 8 KiB: two pages a slot
    offsets = [pool.call(i, 0, [0], [32], x, rows).x_shm.offset for i in (1, 2, 3)]
    assert offsets == [0, 2 * ALIGN, 4 * ALIGN]
    pool.release(2)
    assert pool.call(4, 0, [0], [32], x, rows).x_shm.offset == 2 * ALIGN
    for call_id in (1, 3, 4):
        pool.release(call_id)
    segment = pool._segments[0]
    assert segment.free == [(0, segment.size)]
    pool.call(5, 0, [0], [32], x, rows)
    with pytest.raises(ValueError, match="call ids are unique"):
        pool.call(5, 0, [0], [32], x, rows)


def test_a_forgotten_call_keeps_its_slot_until_its_late_reply(pool: ShmPool) -> None:
    x, rows = batch(32)
    first = pool.call(1, 0, [0], [32], x, rows).x_shm
    pool.forget(1)  # given up on: a late worker may still write there
    pool.release(2)  # (a call sent as frames: nothing to do)
    assert pool.stats.quarantined == 1
    assert pool.call(2, 0, [0], [32], x, rows).x_shm.offset != first.offset
    with pytest.raises(BadTensor):
        pool.result(ExpertResult(1, 0.0, torch.empty(0, HIDDEN), y_shm=first))
    pool.release(1)  # the late reply came: the slot is free again
    assert pool.stats.quarantined == 0
    assert pool.call(3, 0, [0], [32], x, rows).x_shm.offset == first.offset


def test_rows_go_as_frames_below_the_crossover_when_full_or_disabled() -> None:
    x, rows = batch(32)  # 8 KiB
    with ShmPool(min_call_bytes=16 * 1024) as pool:
        assert not pool.wants(8 * 1024) and pool.call(1, 0, [0], [32], x, rows) is None
    with ShmPool(min_call_bytes=0, max_bytes=12 * 1024, min_segment_bytes=4096) as pool:
        assert pool.call(1, 0, [0], [32], x, rows) is not None  # a 12 KiB segment
        assert pool.call(2, 0, [0], [32], x, rows) is None
        assert pool.stats.declined == 1 and pool.stats.by_reason == {"full": 1}
        pool.disable("answered shm_unavailable")
        pool.release(1)
        assert pool.call(3, 0, [0], [32], x, rows) is None
    with ShmPool(min_call_bytes=0) as pool:  # int rows never go by shared memory
        assert pool.call(1, 0, [0], [2], torch.ones(2, 4, dtype=torch.int64)) is None


def test_worker_side_resolve_and_reply(pool: ShmPool, maps: ShmMaps) -> None:
    x, rows = batch(5, torch.bfloat16)
    call = maps.resolve(pool.call(1, 0, [0, 1], [2, 3], x, rows))
    assert call.x_shm is None and call.y_shm is not None and torch.equal(call.x, x[rows])
    result = maps.reply(call, ExpertResult(1, 0.5, (call.x * 2).contiguous()))
    assert result.y_shm == call.y_shm and result.y.shape == (0, HIDDEN) and result.compute_s == 0.5
    assert torch.equal(pool.result(result), x[rows] * 2)
    wrong = ExpertResult(1, 0.5, torch.zeros(4, HIDDEN, dtype=torch.bfloat16))  # does not fit the slot
    assert maps.reply(call, wrong) is wrong
    plain = ExpertCall(2, 0, [0], [1], x=torch.zeros(1, HIDDEN))
    assert maps.resolve(plain) is plain
    assert maps.reply(plain, wrong) is wrong and maps.y_slot(plain) is None
    error = WorkerError(1, "function_failed", "boom")
    assert maps.reply(call, error) is error  # errors pass through

    call = maps.resolve(pool.call(3, 0, [0], [5], x, rows))
    out = maps.y_slot(call)  # compute y straight into the slot: nothing left for reply to copy
    assert out.data_ptr() == call.x.data_ptr()  # x's own slot: y overwrites x
    torch.mul(call.x, 3, out=out)
    result = maps.reply(call, ExpertResult(3, 0.0, out))
    assert result.y_shm == call.y_shm and torch.equal(pool.result(result), x[rows] * 3)
    assert maps.opened == 1


def test_close_unmaps_once_no_tensor_views_the_segment() -> None:
    pool = ShmPool(min_call_bytes=0)
    x, rows = batch(4)
    call = pool.call(1, 0, [0], [4], x, rows)
    y = pool.result(ExpertResult(1, 0.0, torch.empty(0, HIDDEN), y_shm=call.y_shm))
    pool.close()
    assert pool.call(2, 0, [0], [4], x, rows) is None  # closed: frames only
    assert torch.equal(y, x[rows])  # a view taken before close stays valid (never unmapped under it)
    assert [f for f in leftovers(own_prefix()) if "fd " in f] == []  # no peer can open it any more
    del y
    assert leftovers(own_prefix()) == []


def test_trim_closes_idle_segments_and_prune_drops_their_mappings(maps: ShmMaps) -> None:
    pool = ShmPool(min_call_bytes=0, min_segment_bytes=16 * 1024)
    small, rows = batch(8)  # 2 KiB: the first 16 KiB segment
    big, big_rows = batch(256)  # 64 KiB: a segment of its own
    first = pool.call(1, 0, [0], [8], small, rows).x_shm
    second = pool.call(2, 0, [0], [256], big, big_rows).x_shm
    assert first.segment != second.segment and pool.stats.segment_bytes == 16 * 1024 + 64 * 1024
    maps.view(first)
    maps.view(second)
    pool.release(2)
    assert pool.trim() == 64 * 1024  # the idle one; the first still holds call 1
    assert pool.stats.segment_bytes == 16 * 1024 and len(pool._segments) == 1
    assert maps.prune() == 1 and len(maps) == 1  # the worker lets go of the closed one
    pool.close()
    assert maps.prune() == 1 and len(maps) == 0
    assert leftovers(own_prefix()) == []


def test_the_executors_pools_find_a_slot_by_call_id(maps: ShmMaps) -> None:
    pools = ShmPools(min_call_bytes=1024)
    x, rows = batch(8)  # 2 KiB
    here, there = "tcp://127.0.0.1:4000", "tcp://10.1.2.3:4000"
    assert pools.call("far", there, 1, 0, [0], [8], x, rows) is None  # another host: frames
    assert pools.call("w0", here, 2, 0, [0], [1], x, rows[:1]) is None  # below the crossover
    call = pools.call("w0", here, 3, 0, [0], [8], x, rows)
    result = maps.reply(maps.resolve(call), ExpertResult(3, 0.0, x[rows] + 1))
    assert torch.equal(pools.result(result), x[rows] + 1)
    pools.release(3)
    late = pools.call("w0", here, 4, 0, [0], [8], x, rows)
    pools.forget(4)  # given up on; its late reply still releases the slot
    assert pools.pools["w0"].stats.quarantined == 1
    pools.release(4)
    assert pools.pools["w0"].stats.quarantined == 0 and late.x_shm.offset == call.x_shm.offset
    with pytest.raises(BadTensor, match="was offered no slot"):
        pools.result(ExpertResult(9, 0.0, torch.empty(0, HIDDEN), y_shm=call.y_shm))
    frame = ExpertResult(5, 0.0, x[rows])
    assert pools.result(frame) is frame.y
    assert pools.held_bytes == pools.min_segment_bytes  # one segment of the smallest size (1 MiB)
    pools.disable("w0", "answered shm_unavailable")
    assert pools.call("w0", here, 6, 0, [0], [8], x, rows) is None
    pools.call("w1", here, 7, 0, [0], [8], x, rows)
    pools.close()
    assert pools.held_bytes == 0 and pools.pools == {}
    maps.close()
    assert leftovers(own_prefix()) == []


def test_same_host() -> None:
    assert same_host("tcp://127.0.0.1:5555") and same_host("tcp://localhost:1")
    assert same_host("ipc:///tmp/x") and same_host("tcp://[::1]:5")
    assert not same_host("tcp://10.0.0.2:5555") and not same_host("udp://127.0.0.1:1")


def test_crossover_is_where_shm_wins_from_then_on() -> None:
    rows = [{"bytes": b, "frames_median_s": f, "shm_median_s": s}
            for b, f, s in [(4, 1.0, 0.9), (8, 1.0, 1.1), (16, 1.0, 0.8), (32, 2.0, 1.0)]]
    assert crossover(rows) == 16
    assert crossover(rows[:2]) is None
