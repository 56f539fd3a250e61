"""`moemesh synth`: write a synthetic checkpoint with a real model's per-layer shapes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
Write an HF-layout checkpoint (config.json, safetensors in bf16, tokenizer.json) with the exact
per-layer shapes of a real MoE model and fewer layers, loadable like any HF checkpoint
(`moemesh generate --model DIR`, launch.toml model.path). Weights are deterministic under --seed
and structured so that the model's own router is skewed, locally consistent and partly
predictable from the layer before, as the real model's is (docs/synth/routing.md). The
vocabulary is the bundled 2,048-token tokenizer's. A second run with the same preset, layers,
seed and vocabulary returns at once (synth_manifest.json).

presets (per-layer shapes of the real model; bf16 bytes per MoE layer):
  qwen1.5-moe-a2.7b   60 x 1408 routed, top-4, shared 5632     1.14 GB/layer, default 4 layers
  deepseek-v2-lite    64 x 1408 routed, top-6, 2 shared, MLA   1.17 GB/layer, default 4 (layer 0 dense)
  mixtral-8x7b        8 x 14336 routed, top-2                  2.90 GB/layer, default 2 layers
  <name>-small        same family and structure, narrow (tests, calibration)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="one of the presets listed above")
    p.add_argument("--layers", type=int, help="decoder layers to write (default: the preset's, fits 24 GB)")
    p.add_argument("--out", type=Path, help="directory to write (default: the cache, "
                                            "$MOEMESH_CACHE or checkpoints/ under the repository)")
    p.add_argument("--seed", type=int, default=0, help="weights are a function of (preset, layers, seed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .presets import UnknownPreset, get_preset
    from .writer import SynthError, ensure_checkpoint, write_checkpoint

    try:
        preset = get_preset(args.preset)
        layers = args.layers or preset.default_layers
        if args.out is None:
            path = ensure_checkpoint(preset.name, layers, args.seed, progress=not args.quiet)
        else:
            path = write_checkpoint(preset.name, layers, args.out, seed=args.seed, progress=not args.quiet)
    except (UnknownPreset, SynthError, ValueError) as exc:
        print(f"moemesh synth: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh synth", description=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
