"""Activation traces: what each request routed where, for the predictors to learn from.

    moemesh trace --out traces/bundled                       # replay prompts in this process
    moemesh trace --out traces/mesh --address tcp://...:7555 # ... or through a running mesh

A record holds the prompt (text, token ids), what a predictor may see before the run (the
prompt's input-embedding rows and their mean) and what really happened: `[layers, experts]`
token-slot counts for prefill and for decode separately (decode counts every generated token
that was fed back, i.e. all but the last). In-process traces also keep per-token routing of
the prompt `[n, layers, top_k]` and the mean gate input of each MoE layer `[layers, d]`, which the
Bayesian and layer-aware predictors use. The store format is predictor/traces.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from nodes.corpus import shared_data_dir
from nodes.model.cache import Segment
from nodes.model.model import MoEModel
from nodes.model.moe import LocalExecutor
from predictor.base import ModelShape
from predictor.forecast import PromptFeatures
from predictor.traces import TraceMeta, TraceRecord, TraceStore


def predictor_shape(model: MoEModel) -> ModelShape:
    c = model.config
    return ModelShape(c.num_moe_layers, c.num_experts, c.top_k)


def trace_meta(model: MoEModel, model_id: str) -> TraceMeta:
    c = model.config
    return TraceMeta(model_id=model_id, layers=c.num_moe_layers, experts=c.num_experts, top_k=c.top_k,
                     embedding_dim=c.hidden_size)


@torch.inference_mode()
def prompt_features(model: MoEModel, ids: list[int], new_tokens: int, text: str = "") -> PromptFeatures:
    """What a predictor sees at admission: the prompt's input-embedding rows [n, d] and their mean."""
    weight = model.model.embed_tokens.weight
    rows = model.model.embed_tokens(torch.tensor(ids, device=weight.device)).float().cpu().numpy()
    return PromptFeatures(np.asarray(ids, dtype=np.int64), rows, rows.mean(0), new_tokens, text)


@torch.inference_mode()
def trace_one(model: MoEModel, ids: list[int], new_tokens: int) -> dict:
    """Greedy-generate `new_tokens` after `ids` in process, recording routing as it goes."""
    c = model.config
    gate_inputs = np.zeros((c.num_moe_layers, c.hidden_size), dtype=np.float32)
    routing = np.zeros((len(ids), c.num_moe_layers, c.top_k), dtype=np.int16)
    hooks = []
    for layer, block in enumerate(model.moe_blocks()):
        def capture(_module, inputs, output, layer=layer):
            if output.experts.shape[0] == len(ids):  # the prefill pass
                gate_inputs[layer] = inputs[0].float().mean(0).cpu().numpy()
                routing[:, layer, :] = output.experts.cpu().numpy()
        hooks.append(block.gate.register_forward_hook(capture))
    try:
        cache = model.new_cache()
        prefill = LocalExecutor(record=True)
        logits = model(torch.tensor(ids), [Segment(0, len(ids), cache)], prefill, all_logits=False)
        decode = LocalExecutor(record=True)
        token = int(logits[-1].argmax())
        for _ in range(new_tokens - 1):
            logits = model(torch.tensor([token]), [Segment(0, 1, cache)], decode, all_logits=False)
            token = int(logits[-1].argmax())
    finally:
        for h in hooks:
            h.remove()
    def matrix(executor: LocalExecutor) -> np.ndarray:
        out = np.zeros((c.num_moe_layers, c.num_experts), dtype=np.int64)
        for layer, counts in executor.counts.items():
            out[layer] = counts.numpy()
        return out
    return {"prefill": matrix(prefill), "decode": matrix(decode), "gate_inputs": gate_inputs, "token_routing": routing}


def make_record(model: MoEModel, request_id: str, text: str, ids: list[int], new_tokens: int,
                prefill: np.ndarray, decode: np.ndarray, gate_inputs=None, token_routing=None) -> TraceRecord:
    features = prompt_features(model, ids, new_tokens, text)
    return TraceRecord(
        request_id=request_id, prompt_text=text, token_ids=features.token_ids,
        embedding=features.embedding.astype(np.float32), prefill=np.asarray(prefill, dtype=np.int64),
        decode=np.asarray(decode, dtype=np.int64), new_tokens=new_tokens,
        token_embeddings=features.token_embeddings.astype(np.float32),
        gate_inputs=gate_inputs, token_routing=token_routing,
    )


def prompt_set(spec: str) -> list[tuple[str, str]]:
    """"gsm8k_test:200,mt_bench:80" -> [(id, text)] from ../shared/data/prompts, in file order."""
    root = shared_data_dir()
    out: list[tuple[str, str]] = []
    for part in spec.split(","):
        name, _, count = part.partition(":")
        limit = int(count) if count else None
        path = root / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such prompt set (look in {root})")
        rows = [json.loads(line) for line in path.read_text().splitlines()][:limit]
        for i, row in enumerate(rows):
            if name == "mt_bench":
                out.append((f"mt_bench:{row['question_id']}:{row['category']}", row["turns"][0]))
            else:
                out.append((f"{name}:{i}", f"Question: {row['question']}\nAnswer:"))
    return out


async def _through_mesh(address: str, prompts, new_tokens: int) -> dict[str, dict]:
    from mesh.client import MeshClient

    out: dict[str, dict] = {}
    async with MeshClient(address, timeout_s=120) as client:
        for i, (pid, text) in enumerate(prompts):
            gen = client.generate(text, max_new_tokens=new_tokens, stop_at_eos=False)
            await gen.text()
            out[pid] = gen.done.record["activation"]
            print(f"\r[{i + 1}/{len(prompts)}] {pid:<40}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="trace store directory (created, or appended to)")
    ap.add_argument("--prompts", default="gsm8k_train:300,gsm8k_test:150,mt_bench:80",
                    help="prompt sets of ../shared/data/prompts with counts")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--address", help="replay through this running mesh instead of in process")
    args = ap.parse_args(argv)

    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    path = resolve_model_path(args.model)
    model, tokenizer = Checkpoint(path).load_model(), Tokenizer.from_dir(path)
    meta = trace_meta(model, hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16])
    store = TraceStore.open(args.out) if (args.out / "meta.json").exists() else TraceStore.create(args.out, meta)
    prompts = prompt_set(args.prompts)
    served = asyncio.run(_through_mesh(args.address, prompts, args.new_tokens)) if args.address else {}
    for i, (pid, text) in enumerate(prompts):
        ids = tokenizer.encode(text)[:512]
        if args.address:
            act = served[pid]
            record = make_record(model, pid, text, ids, args.new_tokens, np.array(act["prefill"]), np.array(act["decode"]))
        else:
            t = trace_one(model, ids, args.new_tokens)
            record = make_record(model, pid, text, ids, args.new_tokens, t["prefill"], t["decode"],
                                 t["gate_inputs"], t["token_routing"])
            print(f"\r[{i + 1}/{len(prompts)}] {pid:<40}", end="", file=sys.stderr, flush=True)
        store.append(record)
    print(f"\nwrote {len(prompts)} records to {args.out} ({len(store)} in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
