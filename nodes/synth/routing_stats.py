"""Routing statistics of a model's own forward pass, against ../shared/ROUTING.md's targets.

    python -m nodes.synth.routing_stats --preset qwen1.5-moe-a2.7b --layers 4 --tokens 8192 --out docs/synth

runs the real text stream (stream.py) through the checkpoint's real forward pass (nodes/model,
loaded by Checkpoint), records every MoE layer's top-k with forward hooks on the gates, and
for each layer also applies the *next* layers' gates to this layer's gate input (the
cross-layer predictor of Fate / ROUTING.md check 6). The same statistics are computed for the
bundled model and for a uniform random router on the same tokens, and written as a markdown
table beside the target ranges (`<out>/routing-<preset>.md`, plus the raw numbers as JSON).

Statistics (per MoE layer, pooled where said):
- LB: std of per-expert activation rates (% of tokens that use the expert), pooled over layers;
  CV = LB / mean rate.
- shares: per-layer share of assignments, min / max and max/mean; largest domain shift.
- first-choice repeat and top-k overlap (>= 1 common expert) of consecutive tokens.
- SCH(rho=2, m): hit rate of a cache of rho*k experts per layer, per sequence, that on a miss
  evicts the cached expert used least in the next m tokens (ties: least recently used).
  Shared experts are not in the cache (always resident): rho*k counts routed experts only.
- LRU and Belady hit rates at the same size; their ratio.
- cross-layer recall: share of layer l+j's top-k found in the top-k (and top-(k + k/2)) of
  layer l+j's gate applied to layer l's gate input.
- position 0: total-variation distance between the first-choice distribution at position 0
  and at other positions.
- batch tail: per batch of `batch` consecutive tokens, the worst layer's max/mean expert load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.model import MoEModel
from nodes.model.tokenizer import Tokenizer

from .stream import Sequence, build_stream

M_VALUES = (4, 16, 64, 256)
RHO = 2

# ROUTING.md "What a synthetic router should reproduce", per shape (family of the preset).
TARGETS = {
    "qwen2_moe": {"LB": (0.4, 0.8), "CV": "~0.09", "SCH": (41, 46, 35, 30), "cross": (75, 82), "prefetch": 95},
    "deepseek_v2": {"LB": (1.8, 2.9), "CV": "~0.25", "SCH": (56, 58, 48, 43), "cross": (75, 82), "prefetch": 95},
    "mixtral": {"LB": (2.2, 3.2), "CV": "~0.11", "SCH": (77, 74, 67, 64), "cross": (80, 100), "prefetch": None,
                "first": ((13, 15), (23, 29), (19, 27)), "overlap": ((44, 50), (61, 67), (44, 54)),
                "share": (0.06, 0.19), "max_mean": (1.1, 1.5)},
}


@dataclass
class Trace:
    """Routing of one model on one token stream; arrays concatenate every sequence."""

    name: str
    num_experts: int
    top_k: int
    experts: list[np.ndarray]  # per MoE layer [T, k] int64, the gate's own order (first = top-1)
    starts: np.ndarray  # [S + 1] sequence offsets into T
    domains: list[str]  # [S]
    ahead: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (layer, j) -> [T, k + k//2]
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def layers(self) -> int:
        return len(self.experts)


def record(model: MoEModel, sequences: list[Sequence], name: str, lookahead: int = 2,
           progress: bool = True) -> Trace:
    """Run every sequence through `model` (prefill), recording each MoE layer's routing."""
    blocks = model.moe_blocks()
    k, extra = model.config.top_k, model.config.top_k // 2
    per_layer: list[list[np.ndarray]] = [[] for _ in blocks]
    ahead: dict[tuple[int, int], list[np.ndarray]] = {}
    handles = []

    def hook_for(m: int):
        def hook(_module, inputs, output):
            per_layer[m].append(output.experts.numpy().copy())
            x = inputs[0]
            for j in range(1, lookahead + 1):
                if m + j < len(blocks):
                    # the later gate's weights on this gate input (not its module: that would fire its hook)
                    logits = torch.nn.functional.linear(x.float(), blocks[m + j].gate.weight.float())
                    ahead.setdefault((m, j), []).append(logits.topk(k + extra, dim=-1).indices.numpy())
        return hook

    for m, block in enumerate(blocks):
        handles.append(block.gate.register_forward_hook(hook_for(m)))
    start = time.perf_counter()
    try:
        for i, seq in enumerate(sequences):
            model(torch.tensor(seq.ids), [Segment(0, len(seq.ids), model.new_cache())], all_logits=False)
            if progress:
                done = sum(len(s.ids) for s in sequences[: i + 1])
                sys.stderr.write(f"\r{name}: {done} tokens, {time.perf_counter() - start:.0f} s")
                sys.stderr.flush()
    finally:
        for h in handles:
            h.remove()
        if progress:
            sys.stderr.write("\n")
    starts = np.cumsum([0] + [len(s.ids) for s in sequences])
    # gate hooks run once per layer and sequence, in order: concatenate per layer
    return Trace(name, model.config.num_experts, k, [np.concatenate(x) for x in per_layer], starts,
                 [s.domain for s in sequences], {key: np.concatenate(v) for key, v in ahead.items()},
                 time.perf_counter() - start)


def uniform_trace(like: Trace, seed: int = 0) -> Trace:
    """A router that picks k distinct experts uniformly at random, independently per token and layer."""
    rng = np.random.default_rng(seed)
    t, e, k = like.tokens, like.num_experts, like.top_k
    experts = [np.argsort(rng.random((t, e)), axis=1)[:, :k] for _ in range(like.layers)]
    ahead = {key: np.argsort(rng.random((t, e)), axis=1)[:, : k + k // 2] for key in like.ahead}
    return Trace("uniform", e, k, experts, like.starts, like.domains, ahead)


# ---- statistics -----------------------------------------------------------------------------
def activation_rates(trace: Trace) -> np.ndarray:
    """[layers, E] % of tokens that activate each expert."""
    return np.stack([np.bincount(x.ravel(), minlength=trace.num_experts) / trace.tokens * 100
                     for x in trace.experts])


def consecutive(trace: Trace, layer: int) -> tuple[float, float]:
    """(first-choice repeat %, top-k overlap %) of consecutive tokens within sequences."""
    x = trace.experts[layer]
    same_seq = np.ones(trace.tokens, dtype=bool)
    same_seq[trace.starts[:-1]] = False  # token t and t-1 in the same sequence
    idx = np.nonzero(same_seq)[0]
    first = (x[idx, 0] == x[idx - 1, 0]).mean() * 100
    overlap = (x[idx][:, :, None] == x[idx - 1][:, None, :]).any(axis=(1, 2)).mean() * 100
    return float(first), float(overlap)


def cache_hit_rates(trace: Trace, layer: int, m_values=M_VALUES, rho: int = RHO,
                    baselines: bool = True) -> dict[str, float]:
    """Hit rates (%) of SCH(m) for each m (and LRU, Belady), with rho*k slots, per sequence."""
    e, k = trace.num_experts, trace.top_k
    size = rho * k
    hits = {f"SCH{m}": 0 for m in m_values} | ({"LRU": 0, "Belady": 0} if baselines else {})
    total = 0
    for s in range(len(trace.domains)):
        x = trace.experts[layer][trace.starts[s]: trace.starts[s + 1]]  # [n, k]
        n = len(x)
        used = np.zeros((n, e), dtype=np.int32)
        used[np.arange(n)[:, None], x] = 1
        cum = np.vstack([np.zeros((1, e), dtype=np.int32), np.cumsum(used, axis=0)])  # [n+1, E]
        next_use = np.full((n + 1, e), n + 1, dtype=np.int64)  # next use strictly after t
        for t in range(n - 1, -1, -1):
            next_use[t] = next_use[t + 1]
            next_use[t, x[t]] = t
        total += n * k
        for policy in hits:
            cache: dict[int, int] = {}  # expert -> last use
            got = 0
            for t in range(n):
                need = x[t]
                for expert in need:
                    if int(expert) in cache:
                        got += 1
                    cache[int(expert)] = t
                if len(cache) > size:
                    victims = [c for c in cache if c not in set(need.tolist())]
                    if policy == "LRU":
                        order = sorted(victims, key=lambda c: cache[c])
                    elif policy == "Belady":
                        order = sorted(victims, key=lambda c: -next_use[t + 1, c])
                    else:
                        m = int(policy[3:])
                        future = cum[min(t + 1 + m, n)] - cum[t + 1]
                        order = sorted(victims, key=lambda c: (future[c], cache[c]))
                    for c in order[: len(cache) - size]:
                        del cache[c]
            hits[policy] += got
    return {p: 100.0 * h / max(total, 1) for p, h in hits.items()}


def cross_layer(trace: Trace, layer: int, j: int = 1) -> tuple[float, float] | None:
    """(recall % of top-k, recall % with k/2 extra prefetched) of layer+j from layer's gate input."""
    pred = trace.ahead.get((layer, j))
    if pred is None:
        return None
    true = trace.experts[layer + j]
    k = trace.top_k
    hit_k = (pred[:, :k, None] == true[:, None, :]).any(axis=1).mean() * 100
    hit_extra = (pred[:, :, None] == true[:, None, :]).any(axis=1).mean() * 100
    return float(hit_k), float(hit_extra)


def position0_distinctness(trace: Trace, layer: int) -> float:
    first = trace.experts[layer][:, 0]
    at0 = np.bincount(first[trace.starts[:-1]], minlength=trace.num_experts).astype(float)
    rest = np.bincount(first, minlength=trace.num_experts).astype(float) - at0
    return float(0.5 * np.abs(at0 / at0.sum() - rest / rest.sum()).sum())


def batch_tail(trace: Trace, batch: int = 2048) -> tuple[float, float]:
    """(median, max) over batches of the worst layer's max/mean expert load."""
    worst = []
    for b in range(0, trace.tokens - batch + 1, batch):
        ratios = []
        for x in trace.experts:
            counts = np.bincount(x[b: b + batch].ravel(), minlength=trace.num_experts)
            ratios.append(counts.max() / counts.mean())
        worst.append(max(ratios))
    return (float(np.median(worst)), float(np.max(worst))) if worst else (float("nan"), float("nan"))


def domain_shift(trace: Trace) -> float:
    """Largest change of one expert's share (of assignments) between one domain and all, any layer."""
    token_domain = np.repeat(np.array(trace.domains), np.diff(trace.starts))
    worst = 0.0
    for x in trace.experts:
        overall = np.bincount(x.ravel(), minlength=trace.num_experts) / x.size
        for domain in sorted(set(trace.domains)):
            sub = x[token_domain == domain]
            share = np.bincount(sub.ravel(), minlength=trace.num_experts) / sub.size
            worst = max(worst, float(np.abs(share - overall).max()))
    return worst


def summarize(trace: Trace) -> dict:
    rates = activation_rates(trace)
    shares = rates / 100 / trace.top_k  # [layers, E] share of assignments
    per_layer = []
    for m in range(trace.layers):
        first, overlap = consecutive(trace, m)
        caches = cache_hit_rates(trace, m)
        cross = cross_layer(trace, m - 1, 1) if m >= 1 else None
        per_layer.append({"first_repeat": first, "topk_overlap": overlap, **caches,
                          "cross_recall": None if cross is None else cross[0],
                          "cross_prefetch": None if cross is None else cross[1],
                          "pos0_tv": position0_distinctness(trace, m),
                          "share_min": float(shares[m].min()), "share_max": float(shares[m].max()),
                          "max_mean": float(shares[m].max() / shares[m].mean())})
    mean = lambda key: float(np.mean([row[key] for row in per_layer if row[key] is not None]))  # noqa: E731
    lb = float(rates.std())
    tail = batch_tail(trace)
    two_ahead = [cross_layer(trace, m, 2) for m in range(trace.layers - 2)]
    return {
        "name": trace.name, "tokens": trace.tokens, "layers": trace.layers, "seconds": round(trace.seconds, 1),
        "LB": lb, "CV": lb / float(rates.mean()),
        **{f"SCH{m}": mean(f"SCH{m}") for m in M_VALUES},
        "LRU": mean("LRU"), "Belady": mean("Belady"), "LRU/Belady": mean("LRU") / mean("Belady"),
        "cross_recall": mean("cross_recall") if trace.layers > 1 else None,
        "cross_prefetch": mean("cross_prefetch") if trace.layers > 1 else None,
        "cross_recall_2": float(np.mean([c[0] for c in two_ahead])) if two_ahead else None,
        "domain_shift": domain_shift(trace), "batch_tail_median": tail[0], "batch_tail_max": tail[1],
        "per_layer": per_layer,
    }


# ---- the report -------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _range(r) -> str:
    return f"{r[0]}-{r[1]}" if isinstance(r, tuple) else str(r)


def report(family: str, preset: str, results: list[dict]) -> str:
    t = TARGETS[family]
    rows = [("LB (pp)", _range(t["LB"]), "LB", 2), ("CV", t["CV"], "CV", 3)]
    for m, target in zip(M_VALUES, t["SCH"], strict=True):
        rows.append((f"SCH rho=2, m={m} (%)", f"{target - 4}-{target + 4}", f"SCH{m}", 1))
    rows += [("LRU / Belady", "0.60-0.75", "LRU/Belady", 2),
             ("LRU hit (%)", "model order as SCH", "LRU", 1),
             ("cross-layer recall, top-k (%)", _range(t["cross"]), "cross_recall", 1),
             ("cross-layer recall, + k/2 prefetched (%)", f">= {t['prefetch']}" if t["prefetch"] else "n/a",
              "cross_prefetch", 1),
             ("cross-layer recall, 2 layers ahead (%)", "below 1-ahead", "cross_recall_2", 1),
             ("largest domain shift of a share", "<= 0.03 (0.07 math)" if family == "mixtral" else "n/a",
              "domain_shift", 3),
             ("batch tail: worst layer max/mean, median / max over 2048-token batches", "~5-10 (loose)",
              None, 1)]
    head = "| statistic | target | " + " | ".join(r["name"] for r in results) + " |"
    lines = [head, "|" + "---|" * (2 + len(results))]
    for label, target, key, digits in rows:
        if key is None:
            cells = [f"{_fmt(r['batch_tail_median'])} / {_fmt(r['batch_tail_max'])}" for r in results]
        else:
            cells = [_fmt(r.get(key), digits) for r in results]
        lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    out = [f"### {preset} ({family})", "",
           "Tokens measured: " + ", ".join(f"{r['name']} {r['tokens']:,} ({r['layers']} MoE layers"
                                            + (f", {r['seconds']:.0f} s" if r['seconds'] else "") + ")"
                                            for r in results) + ".", "", *lines, ""]
    out += ["Per MoE layer (first-choice repeat % / top-k overlap % / SCH m=16 % / cross-layer recall % / "
            "position-0 TV / max-mean share):", ""]
    lines = ["| model | " + " | ".join(f"L{m}" for m in range(max(r["layers"] for r in results))) + " |",
             "|" + "---|" * (1 + max(r["layers"] for r in results))]
    for r in results:
        cells = [f"{_fmt(p['first_repeat'])} / {_fmt(p['topk_overlap'])} / {_fmt(p['SCH16'])} / "
                 f"{_fmt(p['cross_recall'])} / {_fmt(p['pos0_tv'], 2)} / {_fmt(p['max_mean'], 2)}"
                 for p in r["per_layer"]]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if family == "mixtral":
        lines += ["", f"Mixtral targets per layer: first-choice repeat L0 {_range(t['first'][0])}, mid "
                  f"{_range(t['first'][1])}, last {_range(t['first'][2])}; top-2 overlap L0 {_range(t['overlap'][0])}, "
                  f"mid {_range(t['overlap'][1])}, last {_range(t['overlap'][2])}; shares {_range(t['share'])}, "
                  f"max/mean {_range(t['max_mean'])}."]
    return "\n".join(out + lines) + "\n"


def run(preset: str, layers: int | None, tokens: int, seed: int, out: Path, cache_dir: str | None,
        dtype: str = "float32", path: str | None = None) -> dict:
    from .presets import get_preset
    from .writer import ensure_checkpoint

    chosen = get_preset(preset)
    ckpt_path = Path(path) if path else ensure_checkpoint(chosen.name, layers, seed, cache_dir)
    tokenizer = Tokenizer.from_dir(ckpt_path)
    sequences = build_stream(tokenizer, tokens)
    model = Checkpoint(ckpt_path, dtype=getattr(torch, dtype)).load_model()
    synth = record(model, sequences, "synth")
    del model
    bundled_dir = Path(__file__).resolve().parents[1] / "bundled"
    bundled = record(Checkpoint(bundled_dir).load_model(), sequences, "bundled")
    results = [summarize(synth), summarize(bundled), summarize(uniform_trace(synth, seed))]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"routing-{chosen.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"routing-{chosen.name}.md").write_text(report(chosen.family, chosen.name, results))
    write_index(out)
    return {"results": results, "checkpoint": str(ckpt_path)}


def write_index(out: Path) -> Path:
    """routing.md = routing-intro.md (how the router is built) + every routing-<preset>.md in `out`."""
    parts = []
    intro = out / "routing-intro.md"
    if intro.exists():
        parts.append(intro.read_text())
    parts += [f.read_text() for f in sorted(out.glob("routing-*.md")) if f.name != "routing-intro.md"]
    index = out / "routing.md"
    index.write_text("\n".join(parts))
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodes.synth.routing_stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--layers", type=int, help="layers of the synthetic checkpoint (default: the preset's)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of real text to route (512 per sequence)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/synth"))
    ap.add_argument("--cache-dir", help="where checkpoints are generated (default $MOEMESH_CACHE or checkpoints/)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the forward pass (bfloat16 halves the memory)")
    ap.add_argument("--path", help="an existing checkpoint directory instead of the preset's cache entry")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args.preset, args.layers, args.tokens, args.seed, args.out, args.cache_dir, args.dtype, args.path)
    print((args.out / f"routing-{args.preset}.md").read_text())
    print(f"checkpoint: {result['checkpoint']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
