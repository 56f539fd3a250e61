"""How differently the bundled model routes different kinds of prompt.

    python -m nodes.routing_report [--model nodes/bundled] [--out routing.json]

Runs every prompt of ../shared/data/prompts (MT-bench by category, GSM8K test) through the
model in this process, counts token-slots per (MoE layer, expert) during prefill, and prints a
markdown table: per category the activation distribution's most used experts and its
Jensen-Shannon divergence (nats, mean over layers) to every other category. Learned routing
shows up as divergences well above the noise floor between two halves of one category.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from nodes.corpus import shared_data_dir
from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.moe import LocalExecutor
from nodes.model.tokenizer import Tokenizer


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over layers of JS divergence (nats) between [layers, experts] distributions."""
    p = p / p.sum(1, keepdims=True)
    q = q / q.sum(1, keepdims=True)
    m = (p + q) / 2

    def kl(a, b):
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0).sum(1)

    return float(((kl(p, m) + kl(q, m)) / 2).mean())


def category_prompts(max_per_category: int = 80) -> dict[str, list[str]]:
    root = shared_data_dir()
    out: dict[str, list[str]] = {}
    for line in (root / "mt_bench.jsonl").read_text().splitlines():
        q = json.loads(line)
        out.setdefault(f"mt:{q['category']}", []).append(q["turns"][0])
    gsm = [json.loads(x)["question"] for x in (root / "gsm8k_test.jsonl").read_text().splitlines()]
    out["gsm8k"] = gsm[:max_per_category]
    return out


def activations(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """[layers, experts] prefill token-slot counts summed over prompts."""
    total = np.zeros((model.config.num_moe_layers, model.config.num_experts))
    for text in prompts:
        ids = torch.tensor(tokenizer.encode(text)[:256])
        executor = LocalExecutor(record=True)
        model(ids, [Segment(0, len(ids), model.new_cache())], executor, all_logits=False)
        for layer, counts in executor.counts.items():
            total[layer] += counts.numpy()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).parent / "bundled"))
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Checkpoint(args.model).load_model()
    tokenizer = Tokenizer.from_dir(args.model)
    cats = category_prompts()
    acts = {}
    for i, (name, prompts) in enumerate(sorted(cats.items())):
        print(f"\r[{i + 1}/{len(cats)}] {name:<16}", end="", file=sys.stderr, flush=True)
        acts[name] = activations(model, tokenizer, prompts)
    print(file=sys.stderr)
    # noise floor: two halves of the same category (GSM8K, 40 + 40 prompts)
    gsm = cats["gsm8k"]
    floor = js(activations(model, tokenizer, gsm[::2]), activations(model, tokenizer, gsm[1::2]))
    names = sorted(acts)
    matrix = {a: {b: js(acts[a], acts[b]) for b in names} for a in names}
    print("| category | prompts | top experts, layer 0 (share) | mean JS to others | max JS (to) |")
    print("|---|---|---|---|---|")
    for a in names:
        dist = acts[a][0] / acts[a][0].sum()
        top = np.argsort(dist)[::-1][:3]
        others = {b: v for b, v in matrix[a].items() if b != a}
        far = max(others, key=others.get)
        print(f"| {a} | {len(cats[a])} | " + ", ".join(f"E{e} ({dist[e]:.2f})" for e in top)
              + f" | {np.mean(list(others.values())):.4f} | {others[far]:.4f} ({far}) |")
    print(f"\nnoise floor (GSM8K split in two halves): JS {floor:.4f} nats")
    if args.out:
        Path(args.out).write_text(json.dumps({"js": matrix, "noise_floor": floor,
                                              "activations": {k: v.tolist() for k, v in acts.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
