"""GPU billing through the meter's public API, on a fake clock (issue 14).

A function instance on a node of kind "gpu", and the main function on CUDA, are billed at
`billing.price_gpu_gb_s` (default 3 x the CPU price); everything else at the CPU price.

The meter takes an instance's device (`instance_requested(..., device=)`) and prices the main
function's "gpu" (the allocator's name for a CUDA main, what the coordinator passes from
`plan.main.device`) as it prices "cuda:N".
"""

from __future__ import annotations

import pytest

from mesh.config import GPU_PRICE_RATIO, BillingConfig
from mesh.meter import Meter, Prices

CPU, GPU = 0.00001, 0.00004


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(mode: str = "instance") -> tuple[Meter, Clock]:
    clock = Clock()
    return Meter(Prices(mode=mode, cpu_gb_s=CPU, gpu_gb_s=GPU, per_million_requests=0.0), {}, clock=clock), clock


def test_default_gpu_price_is_three_times_cpu():
    billing = BillingConfig()
    assert GPU_PRICE_RATIO == 3.0
    assert billing.price_gpu_gb_s == pytest.approx(3 * billing.price_cpu_gb_s)
    assert BillingConfig(price_cpu_gb_s=1e-5).price_gpu_gb_s == pytest.approx(3e-5)
    assert BillingConfig(price_gpu_gb_s=7e-5).price_gpu_gb_s == 7e-5


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_main_function_on_cuda_is_billed_at_the_gpu_price(device):
    meter, clock = make()
    meter.set_main(2.0, device, baseline_memory_gb=4.0)
    clock.now += 10.0
    bill = meter.billing()
    assert bill["gb_s_main"] == pytest.approx(20.0)
    assert bill["cost"] == pytest.approx(20.0 * GPU)
    assert bill["baseline_all_local_cost"] == pytest.approx(40.0 * GPU)


def test_main_function_on_cpu_is_billed_at_the_cpu_price():
    meter, clock = make()
    meter.set_main(2.0, "cpu", baseline_memory_gb=4.0)
    clock.now += 10.0
    bill = meter.billing()
    assert bill["cost"] == pytest.approx(20.0 * CPU)
    assert bill["baseline_all_local_cost"] == pytest.approx(40.0 * CPU)


def test_main_function_planned_on_gpu_is_billed_at_the_gpu_price():
    meter, clock = make()
    meter.set_main(2.0, "gpu", baseline_memory_gb=4.0)
    clock.now += 10.0
    bill = meter.billing()
    assert bill["cost"] == pytest.approx(20.0 * GPU)
    assert bill["baseline_all_local_cost"] == pytest.approx(40.0 * GPU)


def run_instance(meter: Meter, clock: Clock, instance_id: str, memory_gb: float, seconds: float, **kw) -> None:
    meter.instance_requested(instance_id, instance_id.split("-")[0], "n0", memory_gb, [(0, 1)], 0, "zygote", 5.0,
                             **kw)
    meter.instance_ready(instance_id, clock.now, {"spawn": 0.0, "limits": 0.0, "weights": 0.0, "ready": 0.0})
    clock.now += seconds
    meter.instance_stopped(instance_id, clock.now, "idle")


def test_cpu_function_is_billed_at_the_cpu_price():
    meter, clock = make()
    run_instance(meter, clock, "fcpu-0", 0.5, 8.0)
    bill = meter.billing()
    assert bill["by_function"]["fcpu"]["gb_s"] == pytest.approx(4.0)
    assert bill["by_function"]["fcpu"]["cost"] == pytest.approx(4.0 * CPU)


@pytest.mark.parametrize("mode", ["instance", "invocation"])
def test_function_on_a_gpu_node_is_billed_at_the_gpu_price(mode):
    meter, clock = make(mode)
    meter.instance_requested("fgpu-0", "fgpu", "gpu-node", 0.5, [(0, 1)], 0, "zygote", 5.0, device="gpu")
    meter.instance_ready("fgpu-0", clock.now, {"spawn": 0.0, "limits": 0.0, "weights": 0.0, "ready": 0.0})
    clock.now += 8.0
    meter.instance_stopped("fgpu-0", clock.now, "idle")
    run_instance(meter, clock, "fcpu-0", 0.5, 8.0)
    bill = meter.billing()
    gpu_fn, cpu_fn = bill["by_function"]["fgpu"], bill["by_function"]["fcpu"]
    assert gpu_fn["cost"] == pytest.approx(gpu_fn["gb_s"] * GPU)
    assert cpu_fn["cost"] == pytest.approx(cpu_fn["gb_s"] * CPU)
    if mode == "instance":
        assert gpu_fn["cost"] == pytest.approx(4.0 * GPU)


def test_gpu_main_with_cpu_expert_functions_against_all_local_on_the_gpu():
    """Remoe's split: a small GPU main plus CPU functions is cheaper than all experts on the GPU."""
    meter, clock = make()
    meter.set_main(1.0, "cuda:0", baseline_memory_gb=3.0)  # all-local would hold 3 GB on the GPU
    run_instance(meter, clock, "f0-0", 1.0, 10.0)
    run_instance(meter, clock, "f1-0", 1.0, 10.0)
    bill = meter.billing()
    main_s = clock.now - 1000.0
    assert bill["cost"] == pytest.approx(1.0 * main_s * GPU + 2 * 10.0 * CPU)
    assert bill["baseline_all_local_cost"] == pytest.approx(3.0 * main_s * GPU)
    assert bill["cost"] < bill["baseline_all_local_cost"]
