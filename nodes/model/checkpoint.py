"""HF safetensors checkpoints: single file or sharded (`model.safetensors.index.json`), memory-mapped.

`Checkpoint` opens a model directory and reads tensors lazily; it counts every tensor and byte
it reads, so tests (and the meter) can see that an expert worker reads only its experts:

    ckpt = Checkpoint("nodes/bundled")
    model = ckpt.load_model()                           # the whole model (the in-process engine)
    main = ckpt.load_model(experts=[(0, 1)])            # non-expert weights + chosen experts (the mesh's main)
    experts = ckpt.load_experts([(0, 3), (2, 5)])       # only those experts (a function)
    ckpt.tensors_read, ckpt.bytes_read

Parameter names are HF's, with a few per-family renames (Mixtral's `block_sparse_moe.experts.N.w1`
is our `mlp.experts.N.gate_proj`). Every error names the file, the tensor and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import MoEConfig
from .layers import MLP
from .model import MoEModel

# (HF name fragment, our name fragment), applied in order, per family.
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (
        (".block_sparse_moe.", ".mlp."),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
        (".w2.", ".down_proj."),
    ),
    "qwen2_moe": ((".mlp.shared_expert.", ".mlp.shared_experts."),),
}
_BUFFERS = ("e_score_correction_bias",)  # stored in checkpoints, registered as buffers here


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing tensor, wrong shape, bad index."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """One .safetensors file read with pread, each tensor straight into its destination.

    `safe_open(...).get_tensor` reads a tensor into a fresh allocation that the loader then
    copies into its parameter (twice the tensor in anonymous memory at the peak), and a mapping
    of the file keeps its pages in the process: either way an expert function's memory limit
    had to hold its weights twice (a Mixtral-sized expert is 336 MB in bf16, and its 0.75 GB
    function was OOM-killed at weight load). `read_into` fills the parameter from the file
    directly; the page cache it passes through is not mapped, so the kernel reclaims it first.
    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
        self.base = 8 + size
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def meta(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        meta = self.header.get(name)
        if meta is None or meta.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: no readable tensor {name!r} in its header")
        begin, end = meta["data_offsets"]
        return SAFETENSORS_DTYPES[meta["dtype"]], list(meta["shape"]), begin, end

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.meta(name)
        out = torch.empty(shape, dtype=dtype)
        self._read(begin, end, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Fill `out` (contiguous, CPU) with the tensor if it has the file's dtype and shape; False
        (nothing read) where it does not, and the caller converts."""
        dtype, shape, begin, end = self.meta(name)
        if dtype != out.dtype or list(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
            return False
        self._read(begin, end, out)
        return True

    def _read(self, begin: int, end: int, out: torch.Tensor) -> None:
        if end == begin:
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(view) != end - begin:
            raise CheckpointError(f"{self.path}: tensor data of {end - begin} bytes for {len(view)} expected")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.base + begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: file ends inside a tensor (truncated?)")
            done += n

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def to_ours(family: str, hf_name: str) -> str:
    for theirs, ours in _RENAMES.get(family, ()):
        hf_name = hf_name.replace(theirs, ours)
    return hf_name


def to_hf(family: str, our_name: str) -> str:
    for theirs, ours in reversed(_RENAMES.get(family, ())):
        our_name = our_name.replace(ours, theirs)
    return our_name


def expert_prefix(config: MoEConfig, moe_layer: int, expert: int) -> str:
    return f"model.layers.{config.moe_layer_ids[moe_layer]}.mlp.experts.{expert}."


class Checkpoint:
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.config = MoEConfig.from_file(self.path)
        self.family = self.config.family
        self._file_of: dict[str, Path] = {}  # our name -> shard file
        self._hf_name: dict[str, str] = {}  # our name -> name stored in the file
        self._handles: dict[Path, object] = {}
        self.tensors_read: list[str] = []
        self.bytes_read = 0
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
            for hf_name, shard in weight_map.items():
                self._register(hf_name, self.path / shard)
        elif single.exists():
            with safe_open(single, "pt") as f:
                for hf_name in f.keys():
                    self._register(hf_name, single)
        else:
            raise CheckpointError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")

    def _register(self, hf_name: str, file: Path) -> None:
        ours = to_ours(self.family, hf_name)
        self._file_of[ours] = file
        self._hf_name[ours] = hf_name

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def _handle(self, name: str) -> tuple[SafetensorsFile, str]:
        file = self._file_of.get(name)
        if file is None:
            raise CheckpointError(
                f"{self.path}: tensor {to_hf(self.family, name)!r} is missing "
                f"(expected by the {self.family} config; the files hold {len(self._file_of)} tensors)"
            )
        handle = self._handles.get(file)
        if handle is None:
            if not file.exists():
                raise CheckpointError(f"{file}: shard listed in the index is missing (holds {name!r})")
            handle = self._handles[file] = SafetensorsFile(file)
        return handle, self._hf_name[name]

    def _check_shape(self, handle: SafetensorsFile, hf_name: str, shape) -> None:
        stored = handle.meta(hf_name)[1]
        if shape is not None and tuple(stored) != tuple(shape):
            raise CheckpointError(
                f"{handle.path}: tensor {hf_name!r} has shape {tuple(stored)}, "
                f"expected {tuple(shape)} from {self.path / 'config.json'}"
            )

    def read(self, name: str, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor by our name, checked against `shape`, cast to the checkpoint dtype."""
        handle, hf_name = self._handle(name)
        self._check_shape(handle, hf_name, shape)
        tensor = handle.get(hf_name)
        self.tensors_read.append(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(self.dtype)

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """target <- the tensor by our name (shape checked), read straight into it when the file
        holds it in target's dtype, else read and cast."""
        handle, hf_name = self._handle(name)
        self._check_shape(handle, hf_name, target.shape)
        if handle.read_into(hf_name, target):
            self.tensors_read.append(name)
            self.bytes_read += target.numel() * target.element_size()
        else:
            target.copy_(self.read(name, target.shape))

    def _fill(self, module: nn.Module, prefix: str) -> None:
        expected = dict(module.named_parameters(remove_duplicate=True))
        expected.update({n: b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] in _BUFFERS})
        with torch.no_grad():
            for name, target in expected.items():
                full = prefix + name
                if full == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
                self.read_into(full, target)

    def load_model(self, skip_experts: bool = False,
                   experts: Iterable[tuple[int, int]] | None = None) -> MoEModel:
        """The model with every routed expert (default), only `experts` ((moe_layer, expert) pairs:
        what the mesh's main function keeps local), or none of them (skip_experts)."""
        if skip_experts:
            experts = ()
        config = self.config
        experts = ([(m, e) for m in range(config.num_moe_layers) for e in range(config.num_experts)]
                   if experts is None else list(experts))
        self._check_experts(experts)
        model = MoEModel(config, experts=()).to(self.dtype)  # the non-expert weights
        self._fill(model, "")
        blocks = model.moe_blocks()
        for (layer, e), mlp in self.load_experts(experts).items():  # each allocated once, in dtype
            blocks[layer].experts.add(e, mlp)
        return model.eval()

    def _check_experts(self, experts: Iterable[tuple[int, int]]) -> None:
        config = self.config
        for layer, expert in experts:
            if not (0 <= layer < config.num_moe_layers and 0 <= expert < config.num_experts):
                raise CheckpointError(
                    f"{self.path}: unknown expert ({layer}, {expert}); this model has "
                    f"{config.num_moe_layers} MoE layers x {config.num_experts} experts"
                )

    def load_experts(self, experts: Iterable[tuple[int, int]]) -> dict[tuple[int, int], MLP]:
        """Only the given (moe_layer, expert) pairs: what one expert function loads."""
        config, out = self.config, {}
        experts = list(experts)
        self._check_experts(experts)
        for layer, expert in experts:
            with torch.device("meta"):  # no float32 init: a function's memory limit is its weights
                mlp = MLP(config.hidden_size, config.expert_intermediate_size)
            mlp = mlp.to(self.dtype).to_empty(device="cpu")
            self._fill(mlp, expert_prefix(config, layer, expert))
            out[(layer, expert)] = mlp.eval()
        return out

    def close(self) -> None:
        self._handles.clear()


def save_checkpoint(model: MoEModel, raw_config: dict, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `model` in the HF layout of its family: config.json + model.safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family = model.config.family
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[to_hf(family, name)] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
