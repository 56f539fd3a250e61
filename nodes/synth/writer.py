"""Write a synthetic checkpoint in the HF layout, tensor by tensor, cached by its parameters.

    write_checkpoint("qwen1.5-moe-a2.7b", layers=4, out=DIR, seed=0)   # -> DIR
    ensure_checkpoint("qwen1.5-moe-a2.7b", layers=4)                   # generate on first use

A directory holds config.json, model.safetensors (or model-0000N-of-0000M.safetensors shards
with model.safetensors.index.json when larger than `max_shard_bytes`), tokenizer.json (the
bundled 2,048-token tokenizer) and synth_manifest.json: the parameters, their hash and every
file's size and sha256. The manifest is written last and the directory renamed into place, so a
directory with a manifest is complete; a second call with the same (preset, layers, seed, vocab)
checks the manifest and the file sizes and returns at once.

Tensor names and shapes come from `nodes.model.model.MoEModel` built on the meta device and are
stored under the family's HF names (`to_hf`), so `Checkpoint` loads the result exactly like a
real HF checkpoint. Weights are bf16 on disk; each tensor is drawn from its own seeded
`torch.Generator` (see design.py), so bytes depend only on the parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from nodes.model.checkpoint import to_hf
from nodes.model.config import MoEConfig
from nodes.model.model import MoEModel

from .design import BUNDLED, RouterDesign
from .presets import BUNDLED_VOCAB, get_preset

GENERATOR_VERSION = 1  # bump when design.py changes what a given key produces
MANIFEST = "synth_manifest.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
REPO = Path(__file__).resolve().parents[2]


class SynthError(RuntimeError):
    """A synthetic checkpoint could not be written or reused; the message says what to do."""


def default_cache_dir() -> Path:
    """$MOEMESH_CACHE if set, else checkpoints/ under the repository (gitignored)."""
    env = os.environ.get("MOEMESH_CACHE")
    return Path(env) if env else REPO / "checkpoints"


def checkpoint_key(preset: str, layers: int, seed: int, vocab: int) -> dict:
    key = {"preset": preset, "layers": layers, "seed": seed, "vocab": vocab, "version": GENERATOR_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return {**key, "params_hash": digest}


def tensor_plan(config: MoEConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(our name, shape) of every stored tensor, in model order (meta device: no memory)."""
    with torch.device("meta"):
        model = MoEModel(config)
    plan = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        plan.append((name, tuple(tensor.shape)))
    return plan


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_complete(path: Path, key: dict) -> bool:
    """The directory holds a finished checkpoint of exactly this key (sizes checked, not hashes)."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("key") != key:
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == meta["bytes"]
               for name, meta in manifest["files"].items())


def ensure_checkpoint(preset: str, layers: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                      vocab: int = BUNDLED_VOCAB, progress: bool = True) -> Path:
    """The path of the synthetic checkpoint for these parameters, generated on first use."""
    chosen = get_preset(preset)
    layers = layers or chosen.default_layers
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = checkpoint_key(chosen.name, layers, seed, vocab)
    out = cache / f"{chosen.name}-L{layers}-s{seed}-v{vocab}-{key['params_hash'][:8]}"
    return write_checkpoint(chosen.name, layers, out, seed=seed, vocab=vocab, progress=progress)


def write_checkpoint(preset: str, layers: int, out: str | Path, seed: int = 0, vocab: int = BUNDLED_VOCAB,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write (or reuse) the checkpoint directory `out`; returns it."""
    chosen = get_preset(preset)
    out = Path(out)
    key = checkpoint_key(chosen.name, layers, seed, vocab)
    if is_complete(out, key):
        return out
    if out.exists() and any(out.iterdir()):
        raise SynthError(f"{out} exists and does not hold this checkpoint ({chosen.name}, {layers} layers, "
                         f"seed {seed}, vocab {vocab}); remove it or choose another --out")
    raw = chosen.hf_config(layers, vocab)
    design = RouterDesign(chosen, raw, seed)
    plan = tensor_plan(design.config)
    shards = _shard(plan, max_shard_bytes)
    total = sum(_nbytes(shape) for _, shape in plan)
    _check_disk(out.parent, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    bar = Progress(f"synth {chosen.name} x{layers} layers", total, enabled=progress)
    try:
        files = _write_shards(design, shards, partial, bar)
        (partial / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(BUNDLED / "tokenizer.json", partial / "tokenizer.json")
        for name in ("config.json", "tokenizer.json"):
            files[name] = _file_meta(partial / name)
        manifest = {"format": "moemesh-synth", "key": key, "files": files, "tensor_bytes": total,
                    "real_model": {"layers": chosen.real_layers, "vocab": chosen.real_vocab},
                    "seconds": round(bar.elapsed, 2)}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # bf16
    for s in shape:
        n *= s
    return n


def _shard(plan, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in plan:
        nbytes = _nbytes(shape)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    return shards


def _check_disk(path: Path, need: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * 1.05:
        raise SynthError(f"{probe}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB; "
                         "free space, choose fewer --layers, or set MOEMESH_CACHE elsewhere")


def _write_shards(design: RouterDesign, shards, directory: Path, bar: Progress) -> dict:
    from safetensors.torch import save_file

    family = design.config.family
    files, weight_map = {}, {}
    single = len(shards) == 1
    for index, shard in enumerate(shards, start=1):
        file = "model.safetensors" if single else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for name, shape in shard:
            state[to_hf(family, name)] = design.tensor(name, shape).to(torch.bfloat16).contiguous()
            weight_map[to_hf(family, name)] = file
            bar.update(_nbytes(shape), name)
        save_file(state, str(directory / file), metadata={"format": "pt"})
        del state
        files[file] = _file_meta(directory / file)
    if not single:
        index = {"metadata": {"total_size": sum(_nbytes(s) for shard in shards for _, s in shard)},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        files["model.safetensors.index.json"] = _file_meta(directory / "model.safetensors.index.json")
    return files


def _file_meta(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


class Progress:
    """A one-line progress bar on stderr: bytes generated of the total, and the current tensor."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 30) -> None:
        self.label, self.total, self.enabled, self.width = label, max(total, 1), enabled, width
        self.done, self.start, self._last = 0, time.perf_counter(), 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, nbytes: int, what: str) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.25 and self.done < self.total):
            return
        self._last = now
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {100 * self.done / self.total:3.0f}% "
                         f"{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB {self.elapsed:5.1f} s  {what[:48]:<48}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
