"""Train the bundled model: a small Mixtral-family MoE whose routing is learned, not random.

    python -m nodes.train_bundled --out nodes/bundled --steps 400 --seed 0

Reproducible from the seed (same corpus, same order, same init), minutes on 2 CPU cores.
Writes the HF layout (config.json, model.safetensors in bf16, tokenizer.json) plus
train_log.json. The loss is next-token cross-entropy plus the Switch-Transformer load-balancing
term, so every expert is used while the router still learns which domain goes where.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nodes.corpus import build_corpus
from nodes.model.cache import SequenceCache, make_segments, positions_of
from nodes.model.checkpoint import save_checkpoint
from nodes.model.config import MoEConfig
from nodes.model.model import MoEModel
from nodes.model.moe import LocalExecutor

EOS = "<|endoftext|>"

SHAPE = dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=2048, hidden_size=128,
    intermediate_size=192, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu", router_aux_loss_coef=0.01,
    torch_dtype="bfloat16",
)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def forward_train(model: MoEModel, batch: torch.Tensor, gate_probs: list) -> torch.Tensor:
    """batch [B, L] -> logits [B*L, V] with gradients (one fresh cache per row)."""
    rows, length = batch.shape
    caches = [SequenceCache(model.config.num_layers) for _ in range(rows)]
    segments = make_segments([length] * rows, caches)
    positions = positions_of(segments)
    x = model.model.embed_tokens(batch.reshape(-1))
    executor = LocalExecutor()
    for layer in model.model.layers:
        x = layer(x, segments, positions, executor)
    return model.lm_head(model.model.norm(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="nodes/bundled", help="output model directory")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = build_corpus(seed=args.seed)
    tok = train_tokenizer([d.text for d in docs], SHAPE["vocab_size"])
    eos = tok.token_to_id(EOS)
    tok.save(str(out / "tokenizer.json"))
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d.text).ids + [eos]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"corpus: {len(docs)} documents, {len(data)} tokens", file=sys.stderr)

    raw = {**SHAPE, "eos_token_id": eos, "bos_token_id": None}
    config = MoEConfig.from_hf_dict(raw)
    model = MoEModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02 if "embed" in name else 1.0 / math.sqrt(p.shape[1]))
    gate_probs: list[torch.Tensor] = []
    for block in model.moe_blocks():
        block.gate.register_forward_hook(lambda _m, _i, out: gate_probs.append(out))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    log, start = [], time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.length - 1, (args.batch,), generator=generator)
        window = torch.stack([data[s : s + args.length + 1] for s in starts.tolist()])
        gate_probs.clear()
        logits = forward_train(model, window[:, :-1], gate_probs)
        lm = F.cross_entropy(logits, window[:, 1:].reshape(-1))
        aux = 0.0
        for routing in gate_probs:  # Switch: E * sum_e (fraction routed to e) * (mean prob of e)
            probs = routing.logits.softmax(-1)
            frac = F.one_hot(routing.experts, config.num_experts).float().sum(1).mean(0) / config.top_k
            aux = aux + config.num_experts * (frac * probs.mean(0)).sum()
        loss = lm + args.aux * aux / len(gate_probs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - start)
            bar = "#" * int(30 * (step + 1) / args.steps)
            print(f"\r[{bar:<30}] step {step + 1}/{args.steps} loss {lm.item():.3f} "
                  f"aux {float(aux.detach()) / len(gate_probs):.3f} {rate:.2f} step/s", end="", file=sys.stderr)
            log.append({"step": step, "loss": round(lm.item(), 4), "seconds": round(time.time() - start, 1)})
    print(file=sys.stderr)
    model.eval()
    save_checkpoint(model, raw, out, dtype=torch.bfloat16)
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
