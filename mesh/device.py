"""Where the main model runs: `coordinator.device` -> a `torch.device`, and the move onto it.

    device = resolve_device(config.coordinator.device)   # "cpu" | "cuda" | "cuda:N" | "auto"
    model = move_model(model, device)                     # weights, rotary tables; caches follow

Rules (tested in tests/nodes/test_device.py):

- "cpu"     -> cpu, always.
- "cuda"    -> cuda:0 where CUDA is available, else a ConfigError naming the key.
- "cuda:N"  -> cuda:N where CUDA has more than N devices, else a ConfigError naming the key.
- "auto"    -> cuda:0 where CUDA is available, else cpu.

Everything else the model makes on the hot path (positions, masks, KV caches, dispatch
indices, sampling) is created on its input's device by nodes/model/, so after `move_model`
a forward on CUDA never touches the host except for the few host ints it must read
(expert counts per MoE layer, and the sampled token ids once per step).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mesh.errors import ConfigError
from nodes.model.layers import Rotary

DEVICE_KEY = "coordinator.device"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str, key: str = DEVICE_KEY) -> torch.device:
    """`spec` ("cpu", "cuda", "cuda:N", "auto") -> the torch.device to use on this host.

    Raises ConfigError naming `key` when CUDA is asked for but absent (or the index is out of
    range), or when `spec` is none of the above.
    """
    text = str(spec).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    match = _CUDA.match(text)
    if match is None:
        raise ConfigError(f"unknown device {spec!r}; expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"",
                          key=key)
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{spec!r} asked for, but CUDA is not available on this host "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})",
            key=key, hint=f"set {key} = \"cpu\" (or \"auto\"), or install a CUDA build of torch on a GPU host",
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{spec!r} asked for, but this host has {count} CUDA device(s)", key=key,
                          hint=f"use cuda:0 .. cuda:{count - 1}, or \"auto\"")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """"cpu" or "cuda:N": the string the meter and the plan record (never "auto")."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def price_kind(device: torch.device | str) -> str:
    """"gpu" for a CUDA device, else "cpu": the allocator's and the meter's vocabulary."""
    return "gpu" if str(device).startswith("cuda") else "cpu"


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` (parameters, buffers, and the rotary tables, which are plain tensors on a
    non-Module helper) to `device`; returns the model. A no-op where it already lives there."""
    model = model.to(device)
    for module in model.modules():
        for helper in vars(module).values():
            if isinstance(helper, Rotary):
                for name, value in list(vars(helper).items()):
                    if isinstance(value, torch.Tensor) and value.device != device:
                        setattr(helper, name, value.to(device))
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (cpu for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
