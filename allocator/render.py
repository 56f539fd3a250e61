"""``render_plan``: a plan as a readable text table (for ``moemesh plan --policy X``)."""

from __future__ import annotations

from collections import defaultdict

from allocator.model import ModelShape
from allocator.plan import Expert, Plan


def _experts_text(experts: tuple[Expert, ...] | list[Expert], limit: int = 12) -> str:
    """``L3: 0,4,7`` per layer; long lists are cut with a count of the rest."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, e in sorted(experts):
        by_layer[layer].append(e)
    parts = []
    for layer, ids in by_layer.items():
        shown = ",".join(str(e) for e in ids[:limit]) + (
            f",+{len(ids) - limit}" if len(ids) > limit else ""
        )
        parts.append(f"L{layer}: {shown}")
    return "; ".join(parts)


def render_plan(plan: Plan, shape: ModelShape) -> str:
    """Main memory, local experts per layer, one row per function, and the recorded estimate."""
    lines = [
        f"plan {plan.policy}   model {shape.name or '?'} ({shape.moe_layers} MoE layers x {shape.experts_per_layer} experts, top-{shape.top_k})"
    ]
    device = plan.params.get("local_experts_device", "cpu")
    lines.append(
        f"main: {plan.main.memory_gb:.3f} GB on {plan.main.device}, {len(plan.local)} local experts (computed on {device})"
    )
    lines.append("local experts per layer:")
    for layer in range(shape.moe_layers):
        ids = sorted(e for lay, e in plan.local if lay == layer)
        lines.append(f"  L{layer:<3} {len(ids):>3}  {','.join(map(str, ids)) if ids else '-'}")
    if plan.functions:
        header = f"  {'id':<14} {'memory GB':>9} {'replicas':>8}  {'nodes':<20} experts"
        lines.append(
            f"functions: {len(plan.functions)}, {sum(f.replicas for f in plan.functions)} instances, "
            f"{sum(f.memory_gb * f.replicas for f in plan.functions):.3f} GB"
        )
        lines.append(header)
        for f in plan.functions:
            nodes = ",".join(f.nodes) if f.nodes else "-"
            lines.append(
                f"  {f.id:<14} {f.memory_gb:>9.3f} {f.replicas:>8}  {nodes:<20} {_experts_text(f.experts)}"
            )
    else:
        lines.append("functions: none")
    figures = plan.params.get("estimate")
    if figures:
        lines.append(
            f"estimate: TTFT {figures['ttft_s'] * 1e3:.1f} ms, TPOT {figures['tpot_s'] * 1e3:.2f} ms, "
            f"{figures['billed_gb_s']:.3f} GB-s (cpu {figures['cpu_gb_s']:.3f}, gpu {figures['gpu_gb_s']:.3f}), "
            f"${figures['money']:.6f}"
        )
    return "\n".join(lines)
