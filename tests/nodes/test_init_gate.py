"""nodes.init_gate.InitGate: cold starts admitted while their CPU shares fit, first come first served."""

from __future__ import annotations

import asyncio

import pytest

from nodes.init_gate import InitGate


async def _entered(gate: InitGate, key: str, need: float, log: list[str]) -> None:
    await gate.enter(key, need)
    log.append(key)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)  # let woken waiters run (no timing: a few loop turns)


@pytest.mark.asyncio
async def test_admits_while_the_shares_fit_then_in_arrival_order():
    gate, log = InitGate(1.0), []
    tasks = [asyncio.create_task(_entered(gate, k, need, log))
             for k, need in (("a", 0.5), ("b", 0.5), ("c", 0.75), ("d", 0.25))]
    await _settle()
    assert log == ["a", "b"] and gate.waiting == 2  # d would fit beside c, but c came first
    gate.leave("a")
    await _settle()
    assert log == ["a", "b"]  # 0.5 + 0.75 > 1: c still waits, and d behind it
    gate.leave("b")
    await _settle()
    assert log == ["a", "b", "c", "d"] and gate.waiting == 0
    gate.leave("b")  # idempotent
    assert set(gate.holders) == {"c", "d"}
    await asyncio.gather(*tasks)


@pytest.mark.asyncio
async def test_a_need_above_the_capacity_runs_alone():
    gate, log = InitGate(1.0), []
    await gate.enter("small", 0.5)
    big = asyncio.create_task(_entered(gate, "big", 2.0, log))
    await _settle()
    assert log == []
    gate.leave("small")
    await _settle()
    assert log == ["big"]
    await big


@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_those_behind():
    gate, log = InitGate(1.0), []
    await gate.enter("a", 0.5)
    head = asyncio.create_task(_entered(gate, "head", 1.0, log))  # waits for an empty gate
    behind = asyncio.create_task(_entered(gate, "behind", 0.5, log))  # fits, but queued behind
    await _settle()
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    await _settle()
    assert log == ["behind"] and "head" not in gate.holders
    await behind


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        InitGate(0)
