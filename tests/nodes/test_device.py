"""Device plumbing that a CPU can verify (issue 14): `coordinator.device` rules, the model and
its caches on the resolved device, no host-only tensor made on the hot path, tokens unchanged.

What needs CUDA itself is in tests/gpu/ (marked `gpu`, skipped here with the reason).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mesh.config import MeshConfig
from mesh.device import (
    DEVICE_KEY,
    device_name,
    model_device,
    move_model,
    price_kind,
    resolve_device,
)
from mesh.errors import ConfigError
from mesh.protocol import SpawnFunction, decode, encode
from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from nodes.model.layers import Rotary
from nodes.model.model import MoEModel
from nodes.worker import WorkerSpec
from tests.nodes.hf_tiny import TINY, random_model

BUNDLED = MeshConfig().model.resolved_path()
PROMPTS = [[5, 17, 301, 44, 9], [1000, 2, 3], [77]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is fastest, and stays fast on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


tiny = random_model


# -- resolve_device --------------------------------------------------------------------------


def test_cpu_is_always_cpu(monkeypatch):
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_cpu_without_cuda_and_cuda0_with_it(monkeypatch):
    fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    fake_cuda(monkeypatch, 1)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_cuda_and_cuda_n_where_present(monkeypatch):
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" CUDA:0 ") == torch.device("cuda", 0)


def test_cuda_asked_for_but_absent_names_the_key(monkeypatch):
    fake_cuda(monkeypatch, 0)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError) as err:
            resolve_device(spec)
        assert err.value.key == DEVICE_KEY
        assert str(err.value).startswith("coordinator.device: ")
        assert "CUDA is not available" in str(err.value)
        assert "cpu" in err.value.hint and "auto" in err.value.hint


def test_cuda_index_out_of_range(monkeypatch):
    fake_cuda(monkeypatch, 1)
    with pytest.raises(ConfigError, match="has 1 CUDA device") as err:
        resolve_device("cuda:1")
    assert err.value.key == DEVICE_KEY


def test_unknown_device_and_custom_key(monkeypatch):
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda", key="SpawnFunction.device")
    assert err.value.key == "SpawnFunction.device"


def test_names_and_price_kinds():
    assert device_name(torch.device("cpu")) == "cpu"
    assert device_name(torch.device("cuda")) == "cuda:0"
    assert device_name(torch.device("cuda", 1)) == "cuda:1"
    assert price_kind(torch.device("cuda", 0)) == "gpu" and price_kind("cuda") == "gpu"
    assert price_kind(torch.device("cpu")) == "cpu" and price_kind("cpu") == "cpu"


# -- the model on the resolved device ----------------------------------------------------------


def rotaries(model: MoEModel) -> list[Rotary]:
    return [m.self_attn.rotary for m in model.model.layers]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_move_model_moves_weights_and_rotary_tables(family):
    """The meta device stands in for CUDA: a device the host is not, with no data to copy."""
    model = move_model(tiny(family), torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}
    for rotary in rotaries(model):
        tensors = [v for v in vars(rotary).values() if isinstance(v, torch.Tensor)]
        assert tensors and {t.device.type for t in tensors} == {"meta"}
    assert model_device(model) == torch.device("meta")


def test_move_model_to_cpu_is_a_no_op():
    model = tiny("mixtral")
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert move_model(model, torch.device("cpu")) is model
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}


class FactorySpy(TorchFunctionMode):
    """Records tensor factories called from nodes/model/ without an explicit device=."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
                 torch.as_tensor, torch.randn, torch.rand, torch.linspace, torch.eye}

    def __init__(self) -> None:
        super().__init__()
        self.hostbound: set[tuple[str, str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and "/nodes/model/" in frame.f_code.co_filename:
                self.hostbound.add((func.__name__, frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_lineno))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", sorted(TINY))
def test_no_host_only_tensor_is_made_on_the_hot_path(family):
    """Every tensor the model, its caches and the engine create follows the input's device: a
    factory without device= in nodes/model/ would put a CPU tensor beside CUDA ones."""
    engine = Engine(tiny(family))
    prompts = [[1, 5, 9, 2], [7, 3], [40]]
    with FactorySpy() as spy:
        engine.complete(prompts, SamplingParams(max_new_tokens=3, stop_at_eos=False))
        engine.complete(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0.9, top_p=0.8, seed=3,
                                                    stop_at_eos=False))
    assert spy.hostbound == set()


def test_caches_logits_and_generators_live_on_the_model_device():
    model = move_model(Checkpoint(BUNDLED).load_model(), resolve_device("cpu"))
    engine = Engine(model)
    assert engine.device == model_device(model) == torch.device("cpu")
    seq = engine.add([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0.7, seed=1))
    assert seq.generator.device == engine.device
    engine.step()
    engine.step()
    tensors = [t for t in (*seq.cache.keys, *seq.cache.values) if t is not None]
    assert tensors and {t.device for t in tensors} == {engine.device}
    cache = model.new_cache()
    logits = model(torch.tensor([1, 2]), [Segment(0, 2, cache)], all_logits=False)
    assert logits.device == engine.device


def test_tokens_identical_via_the_device_path():
    """An engine built as the coordinator builds it (resolve, move) gives the plain engine's tokens."""
    plain = Engine(Checkpoint(BUNDLED).load_model())
    moved = Engine(move_model(Checkpoint(BUNDLED).load_model(), resolve_device("cpu")))
    for params in (SamplingParams(max_new_tokens=8, stop_at_eos=False),
                   SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False)):
        assert moved.complete(PROMPTS, params) == plain.complete(PROMPTS, params)


def test_sampling_reads_all_rows_back_at_once():
    """sample_rows: one host transfer per step, same tokens as the per-row sampler."""
    from nodes.model.engine import sample, sample_rows

    logits = torch.randn(4, 50)
    params = [SamplingParams(), SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams()]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    again = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    rows = sample_rows(logits, params, gens)
    assert rows == [sample(logits[i], params[i], again[i]) for i in range(4)]
    assert all(type(t) is int for t in rows)


# -- the coordinator's hook, the worker's and the wire ------------------------------------------


def test_coordinator_refuses_cuda_without_it(monkeypatch):
    from mesh.coordinator import Coordinator

    fake_cuda(monkeypatch, 0)
    config = MeshConfig.from_dict({"coordinator": {"device": "cuda"}})
    with pytest.raises(ConfigError) as err:
        Coordinator(config)
    assert err.value.key == "coordinator.device"


def test_coordinator_puts_model_and_engine_on_the_resolved_device():
    from mesh.coordinator import Coordinator

    coordinator = Coordinator(MeshConfig.from_dict({"coordinator": {"device": "auto"}}))
    try:
        assert coordinator.device == resolve_device("auto")  # cpu here; cuda:0 on a GPU host
        assert model_device(coordinator.model) == coordinator.engine.device == coordinator.device
    finally:
        coordinator.executor.close()


def test_spawn_function_device_defaults_to_cpu_for_old_senders():
    import msgpack

    msg = SpawnFunction(instance_id="f-0", function_id="f", experts=[(0, 1)], memory_gb=0.5, cpu_share=0.5,
                        keep_alive_s=5.0, spawn="zygote", model_path="/m", device="cuda")
    assert decode(encode(msg)).device == "cuda"
    frames = encode(msg)
    header = msgpack.unpackb(frames[1])
    del header["device"]  # what a sender from before the field sends
    old = decode([frames[0], msgpack.packb(header, use_bin_type=True)])
    assert old.device == "cpu" and old.experts == [(0, 1)]


def test_worker_spec_carries_the_device_and_refuses_absent_cuda(tmp_path, monkeypatch):
    import zmq

    from nodes.worker import RunRecord, _start

    fake_cuda(monkeypatch, 0)
    spec = WorkerSpec(instance_id="f-0", function_id="f", node_id="n", experts=((0, 1),), memory_gb=0.5,
                      cpu_share=0.5, keep_alive_s=1.0, model_path=str(BUNDLED), threads=1, host="127.0.0.1",
                      daemon_endpoint="inproc://none", run_dir=str(tmp_path), t0=0.0, device="cuda")
    assert WorkerSpec.from_dict(spec.to_dict()) == spec
    assert WorkerSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "device"}).device == "cpu"
    context = zmq.Context()
    try:
        with pytest.raises(ConfigError) as err:
            _start(spec, context, RunRecord(str(tmp_path), spec.instance_id), 0.0)
        assert err.value.key == "SpawnFunction.device"
    finally:
        context.term()


def test_a_cpu_worker_computes_on_the_cpu(tmp_path):
    import zmq

    from nodes.worker import RunRecord, Server, _start

    spec = WorkerSpec(instance_id="f-1", function_id="f", node_id="n", experts=((0, 1),), memory_gb=0.5,
                      cpu_share=0.5, keep_alive_s=1.0, model_path=str(BUNDLED), threads=1, host="127.0.0.1",
                      daemon_endpoint="inproc://none", run_dir=str(tmp_path), t0=0.0)
    context = zmq.Context()
    data = None
    try:
        data, experts, _ = _start(spec, context, RunRecord(str(tmp_path), spec.instance_id), 0.0)
        server = Server(spec, data, None, experts)
        assert server.device == torch.device("cpu")
        from mesh.protocol import ExpertCall

        x = torch.randn(3, server.hidden)
        result = server._call(ExpertCall(call_id=1, layer=0, expert_ids=[1], counts=[3], x=x))
        with torch.inference_mode():
            assert torch.allclose(result.y, experts[(0, 1)](x))
    finally:
        if data is not None:
            data.close(linger=0)
        context.term()
