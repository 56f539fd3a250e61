"""The in-process engine: prefill + decode with a KV cache, greedy or sampled, batched, streaming.

This is the monolithic baseline every benchmark compares the mesh against, and the decode loop
the coordinator reuses: `step()` runs one forward over every active sequence (prompts that
still need prefill and sequences that decode one token), i.e. continuous batching.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cache import SequenceCache, make_segments
from .model import MoEModel
from .moe import ExpertExecutor, LocalExecutor


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    cache: SequenceCache
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def pending_input(self) -> list[int]:
        """Tokens this sequence feeds to the next forward: its prompt first, then its last token."""
        return self.prompt if self.cache.length == 0 else self.generated[-1:]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] -> one token id."""
    return int(sample_tensor(logits, params, generator))


def sample_tensor(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [V] -> [] or [1] int64 token id, on the logits' device (read it back with the others)."""
    if params.temperature == 0:
        return torch.argmax(logits)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1, generator=generator)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] -> one token id per row, read back to the host in one transfer."""
    picks = [sample_tensor(row, p, g).reshape(1) for row, p, g in zip(logits, params, generators, strict=True)]
    return torch.cat(picks).tolist() if picks else []


class Engine:
    def __init__(self, model: MoEModel, executor: ExpertExecutor | None = None, max_batch: int = 64) -> None:
        self.model = model
        self.executor = executor or LocalExecutor()
        self.max_batch = max_batch
        self.eos = model.config.eos_token_id
        self.active: list[Sequence] = []
        self._ids = itertools.count()

    @property
    def device(self) -> torch.device:
        """Where the model lives, and so the input ids, logits and sampling generators."""
        return self.model.model.embed_tokens.weight.device

    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed if params.seed is not None else 0)
        seq = Sequence(next(self._ids), list(prompt), params, self.model.new_cache(), generator=generator)
        self.active.append(seq)
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        seq.finish_reason = reason
        if seq in self.active:
            self.active.remove(seq)

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward over up to max_batch active sequences; returns the token each produced."""
        batch = self.active[: self.max_batch]
        if not batch:
            return []
        inputs = [seq.pending_input() for seq in batch]
        ids = torch.tensor(list(itertools.chain.from_iterable(inputs)), dtype=torch.long, device=self.device)
        segments = make_segments([len(x) for x in inputs], [seq.cache for seq in batch])
        logits = self.model(ids, segments, self.executor, all_logits=False)  # [S, V]
        out = []
        tokens = sample_rows(logits, [seq.params for seq in batch], [seq.generator for seq in batch])
        for seq, token in zip(batch, tokens, strict=True):
            seq.generated.append(token)
            if seq.params.stop_at_eos and token == self.eos:
                seq.finish_reason = "eos"
            elif len(seq.generated) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
            out.append((seq, token))
        self.active = [s for s in self.active if not s.done]
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, int]]:
        """Stream (prompt index, token id) as tokens are produced, all prompts batched."""
        index = {self.add(p, params).id: i for i, p in enumerate(prompts)}
        while any(seq.id in index for seq in self.active):
            for seq, token in self.step():
                if seq.id in index:
                    yield index[seq.id], token

    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for i, token in self.generate(prompts, params):
            out[i].append(token)
        return out
