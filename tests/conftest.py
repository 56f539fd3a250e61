"""Suite-wide hooks: tests marked `gpu` skip, with the reason, where CUDA is absent.

`make test` runs pytest with `-ra` (pyproject's addopts), so the summary lists every skipped
test and why, e.g. `SKIPPED [3] tests/gpu/test_gpu_engine.py: needs CUDA: ...`.
"""

from __future__ import annotations

import pytest
import torch


def _no_cuda_reason() -> str | None:
    if torch.cuda.is_available():
        return None
    return (f"needs CUDA: torch.cuda.is_available() is false here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run `python -m mesh.gpu_check` on a GPU host")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _no_cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
