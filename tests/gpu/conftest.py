"""Fixtures for the GPU tests: deterministic float32 maths (no TF32) and a tiny checkpoint.

Every test under tests/gpu/ is marked `gpu`; tests/conftest.py skips them, with the reason,
where torch.cuda.is_available() is false. `python -m mesh.gpu_check --out DIR` runs them.
"""

from __future__ import annotations

import pytest
import torch

from tests.mesh.conftest import write_tiny


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
    return write_tiny(tmp_path_factory.mktemp("gpu-tiny-mixtral"))
