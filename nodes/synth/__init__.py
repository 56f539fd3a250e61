"""Synthetic checkpoints with the exact per-layer shapes of real MoE models and a realistic router.

    from nodes.synth import ensure_checkpoint
    path = ensure_checkpoint("qwen1.5-moe-a2.7b", layers=4)   # generated on first use, then cached

See presets.py (the shapes), design.py (how the router is built), writer.py (the files),
sizes.py (bytes against the real model), routing_stats.py (the routing statistics).
"""

from .presets import PRESETS, Preset, RoutingProfile, get_preset
from .writer import SynthError, default_cache_dir, ensure_checkpoint, write_checkpoint

__all__ = ["PRESETS", "Preset", "RoutingProfile", "SynthError", "default_cache_dir", "ensure_checkpoint",
           "get_preset", "write_checkpoint"]
