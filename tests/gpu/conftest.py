"""Fixtures for the GPU tests: deterministic float32 maths (no TF32) and a tiny checkpoint.

Every test under tests/gpu/ is marked `gpu`; tests/conftest.py skips them, with the reason,
where torch.cuda.is_available() is false. `python -m mesh.gpu_check --out DIR` runs them.
"""

from __future__ import annotations

import pytest
import torch

from nodes.model.checkpoint import save_checkpoint
from nodes.model.config import MoEConfig
from nodes.model.model import MoEModel
from tests.mesh.conftest import TINY


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matmuls on the GPU (TF32 would move logits by ~1e-3)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The mesh tests' random 2-layer x 4-expert Mixtral, saved as safetensors (float32)."""
    path = tmp_path_factory.mktemp("gpu-tiny-mixtral")
    torch.manual_seed(0)
    model = MoEModel(MoEConfig.from_hf_dict(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in name
                    else torch.randn(p.shape) * (0.5 if "gate.weight" in name else 0.2))
    save_checkpoint(model, TINY, path, dtype=torch.float32)
    return path
