"""mesh/staging.py with CPU tensors: values, block reuse only after a reply, growth, forgetting.

The CUDA half (pinned blocks, the copy stream and its events) is in tests/gpu/test_gpu_engine.py.
"""

from __future__ import annotations

import torch

from mesh.protocol import ExpertCall, decode, encode
from mesh.staging import MIN_BLOCK_ELEMENTS, Staging


def rows_of(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def test_to_host_gathers_the_rows_contiguously():
    staging = Staging(pin=False)
    x = torch.randn(10, 4)
    rows = rows_of(7, 2, 3)
    host = staging.to_host(x, rows)
    assert host.device.type == "cpu" and host.is_contiguous() and host.shape == (3, 4)
    assert torch.equal(host, x[rows])
    assert torch.equal(staging.to_host(x), x)  # rows None: all of x


def test_to_host_keeps_the_dtype_and_encodes_on_the_wire():
    staging = Staging(pin=False)
    x = torch.randn(6, 8).to(torch.bfloat16)
    rows = rows_of(0, 5)
    host = staging.to_host(x, rows)
    assert host.dtype == torch.bfloat16
    msg = decode(encode(ExpertCall(call_id=1, layer=0, expert_ids=[3], counts=[2], x=host)))
    assert torch.equal(msg.x, x[rows])


def test_to_device_writes_the_rows_direct_and_bounced():
    for bounce in (False, True):
        staging = Staging(pin=False, bounce=bounce)
        out = torch.zeros(5, 3)
        rows = rows_of(4, 1)
        y = torch.arange(6, dtype=torch.float32).view(2, 3)
        staging.to_device(y, out, rows)
        expected = torch.zeros(5, 3)
        expected[rows] = y
        assert torch.equal(out, expected), bounce


def test_to_device_casts_to_the_output_dtype():
    staging = Staging(pin=False, bounce=True)
    out = torch.zeros(3, 2, dtype=torch.float32)
    staging.to_device(torch.ones(1, 2, dtype=torch.bfloat16), out, rows_of(2))
    assert out[2].tolist() == [1.0, 1.0] and out[:2].abs().sum() == 0


def test_a_call_block_is_reused_only_after_its_reply():
    staging = Staging(pin=False)
    x = torch.randn(8, 4)
    rows = rows_of(0, 1, 2)
    first = staging.to_host(x, rows)
    other = staging.to_host(x, rows_of(3))  # the first call is still unanswered: a new block
    assert first.data_ptr() != other.data_ptr()
    assert staging.stats.allocated == 2 and staging.stats.reused == 0
    staging.to_device(torch.zeros(3, 4), torch.zeros(8, 4), rows)  # its reply: the block is free
    again = staging.to_host(x, rows_of(4, 5))
    assert again.data_ptr() == first.data_ptr()
    assert staging.stats.reused == 1 and staging.stats.allocated == 2


def test_blocks_are_reused_across_rounds_and_values_stay_right():
    staging = Staging(pin=False)
    pointers = set()
    for step in range(5):  # five decode rounds, one call each, each answered
        x = torch.full((4, 16), float(step))
        rows = rows_of(1, 3)
        host = staging.to_host(x, rows)
        pointers.add(host.data_ptr())
        assert torch.equal(host, x[rows])
        out = torch.zeros(4, 16)
        staging.to_device(host * 2, out, rows)
        assert torch.equal(out[rows], x[rows] * 2)
    assert len(pointers) == 1 and staging.stats.allocated == 1 and staging.stats.reused == 4


def test_blocks_grow_in_powers_of_two():
    staging = Staging(pin=False, min_block_elements=64)
    hidden = 16
    sizes = []
    for n in (2, 4, 5, 30, 3):
        x = torch.randn(n, hidden)
        rows = torch.arange(n)
        host = staging.to_host(x, rows)
        assert torch.equal(host, x)
        sizes.append(max(staging.stats.by_size))
        staging.to_device(host, torch.zeros(n, hidden), rows)
    # 32 and 64 elements fit the first 64-element block; 80 needs 128; 480 needs 512; 48 reuses 64
    assert sizes == [64, 64, 128, 512, 512]
    assert sorted(staging.stats.by_size) == [64, 128, 512]
    assert staging.stats.allocated == 3


def test_first_block_is_min_block_elements():
    staging = Staging(pin=False)
    staging.to_host(torch.randn(1, 8), rows_of(0))
    assert staging.stats.by_size == {MIN_BLOCK_ELEMENTS: 1}


def test_unanswered_calls_are_forgotten_at_the_next_round_never_rewritten():
    staging = Staging(pin=False)
    x1 = torch.ones(4, 8)
    late = staging.to_host(x1, rows_of(0, 1))  # this call never gets a reply (late, dead worker)
    snapshot = late.clone()
    x2 = torch.full((4, 8), 7.0)  # the next round
    for _ in range(3):
        rows = rows_of(2, 3)
        host = staging.to_host(x2, rows)
        staging.to_device(host, torch.zeros(4, 8), rows)
        assert host.data_ptr() != late.data_ptr()
    assert torch.equal(late, snapshot)  # what ZeroMQ may still send is untouched
    assert staging.stats.forgotten == 1


def test_a_retry_gets_a_fresh_block():
    staging = Staging(pin=False)
    x = torch.randn(4, 8)
    rows = rows_of(0, 1)
    first = staging.to_host(x, rows)
    retry = staging.to_host(x, rows)  # same chunk sent again to another replica
    assert retry.data_ptr() != first.data_ptr()
    staging.to_device(retry, torch.zeros(4, 8), rows)
    reused = staging.to_host(x, rows_of(2))
    assert reused.data_ptr() == retry.data_ptr()  # the answered attempt's block, not the first


def test_shape_mismatch_is_refused():
    staging = Staging(pin=False)
    try:
        staging.to_device(torch.zeros(2, 3), torch.zeros(4, 3), rows_of(1))
    except ValueError as exc:
        assert "1 rows" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_free_blocks_of_different_sizes_are_taken_by_identity():
    # a regression: Block compared its tensors on list.remove, which fails for unequal sizes
    staging = Staging(min_block_elements=4)
    small, big = torch.randn(2, 4), torch.randn(64, 4)
    for x in (small, big):  # one block of each size, both answered and so free again
        rows = torch.arange(x.shape[0])
        host = staging.to_host(x, rows).clone()
        staging.to_device(host, torch.zeros_like(x), rows)
    x = torch.randn(3, 4)
    rows = torch.arange(3)
    assert torch.equal(staging.to_host(x, rows), x)
