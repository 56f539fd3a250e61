"""The MoE block, split into stages so that dispatch and combine can cross the network.

    x [T, H] ──► Router ──► Routing(weights [T, k], experts [T, k])
                   │
                   ▼
               dispatch ──► Dispatch: the T*k (token, expert) slots sorted by expert,
                   │        rows [T*k, H], counts per expert
                   ▼
               experts  ──► y [T*k, H] unweighted outputs, same row order
                   │        (an ExpertExecutor decides where: in this process, or remote
                   │         functions over ZeroMQ while local experts compute)
                   ▼
               combine  ──► out [T, H] = sum_k weight * y  (+ shared experts)

The maths never depends on where the experts ran: the executor returns the same rows
in the same order. `reference_forward` keeps the HF-style `index_add_` loop that the staged
path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layers import MLP


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, k] combine weight per chosen expert (float32)
    experts: torch.Tensor  # [T, k] int64 chosen expert ids
    logits: torch.Tensor  # [T, E] router logits (float32)


class Router(nn.Module):
    """The gate: scores every expert, picks top-k with the family's normalisation rules."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":  # DeepSeek-V3: load-balancing bias used for choice only
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.top_k, self.num_experts = config.top_k, config.num_experts
        self.scoring, self.topk_method = config.scoring, config.topk_method
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.skew = None  # a ZipfSkew (nodes/model/skew.py) overriding which experts are chosen
        self.skew_layer = 0

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.skew is not None:  # Zipf-skewed choice, the router's own scores as weights
            experts = self.skew.choose(self.skew_layer, self.top_k, x.shape[0]).to(x.device)
            weights = scores.gather(1, experts)
        elif self.topk_method == "greedy":
            weights, experts = scores.topk(self.top_k, dim=-1)
        else:
            choice = scores
            if self.topk_method == "noaux_tc":
                choice = scores + self.e_score_correction_bias
            experts = self._group_limited(choice).topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        return Routing(weights * self.scale, experts, logits)

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts of the best `topk_group` of `n_group` groups (DeepSeek-V2/V3)."""
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, -1)  # [T, groups, E/groups]
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            fill = float("-inf")
        else:
            group_scores = grouped.max(dim=-1).values
            fill = 0.0
        best = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], fill).view(tokens, -1)


@dataclass(frozen=True)
class Dispatch:
    """The routed (token, expert) slots of one MoE layer, grouped by expert.

    x:       [S, H] input rows, S = T * k, sorted by expert (stable: token order within expert)
    token:   [S] int64 source token of each row
    weight:  [S] float32 combine weight of each row
    counts:  [E] int64 rows per expert; expert e owns rows offsets[e] .. offsets[e+1]
    """

    layer: int
    x: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    num_tokens: int

    @cached_property
    def offsets(self) -> list[int]:
        """[E + 1] first row of each expert (computed once: the executor reads it per function)."""
        return [0, *torch.cumsum(self.counts, 0).tolist()]

    def active_experts(self) -> list[int]:
        return torch.nonzero(self.counts).flatten().tolist()


def dispatch(layer: int, x: torch.Tensor, routing: Routing, num_experts: int) -> Dispatch:
    tokens, k = routing.experts.shape
    flat_expert = routing.experts.reshape(-1)  # [T*k]
    order = torch.argsort(flat_expert, stable=True)
    token = torch.arange(tokens, device=x.device).repeat_interleave(k)[order]
    counts = torch.bincount(flat_expert, minlength=num_experts).to("cpu")  # [E] host ints: offsets, loads
    return Dispatch(layer, x[token], token, routing.weights.reshape(-1)[order], counts, tokens)


def counts_by_segment(plan: Dispatch, segment_of_token: torch.Tensor, segments: int) -> torch.Tensor:
    """[segments, E] token-slots routed to each expert from each segment's tokens.

    segment_of_token: [T] int64, which segment (e.g. request) each token of the flat batch is.
    One bincount over (segment, expert) pairs: cheap enough for every layer of every step.
    """
    experts = len(plan.counts)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), plan.counts)  # [S], on the host
    pair = segment_of_token[plan.token.to(segment_of_token.device)] * experts + expert_of_row
    return torch.bincount(pair, minlength=segments * experts).view(segments, experts)


def combine(y: torch.Tensor, plan: Dispatch, dtype: torch.dtype) -> torch.Tensor:
    """y [S, H] unweighted expert outputs in dispatch order -> [T, H] weighted sum per token."""
    out = torch.zeros(plan.num_tokens, y.shape[1], dtype=dtype, device=y.device)
    weighted = (y.float() * plan.weight[:, None]).to(dtype)
    return out.index_add_(0, plan.token, weighted)


def run_experts(experts: ExpertSet | dict, plan: Dispatch, expert_ids: list[int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Compute the given experts' rows in this process, into `out` (default: zeros) [S, H]."""
    y = torch.zeros_like(plan.x) if out is None else out
    offsets = plan.offsets
    for e in plan.active_experts() if expert_ids is None else expert_ids:
        rows = slice(offsets[e], offsets[e + 1])
        if rows.stop > rows.start:
            y[rows] = experts[e](plan.x[rows])
    return y


class ExpertExecutor(Protocol):
    """Where the experts of a MoE layer run. Returns y [S, H] in the dispatch's row order."""

    def run(self, block: MoEBlock, plan: Dispatch) -> torch.Tensor: ...


class LocalExecutor:
    """Every expert in this process; optionally records per-layer activation counts."""

    def __init__(self, record: bool = False) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.record = record

    def run(self, block: MoEBlock, plan: Dispatch) -> torch.Tensor:
        if self.record:
            self.counts[plan.layer] = self.counts.get(plan.layer, 0) + plan.counts
        return run_experts(block.experts, plan)


class ExpertNotHeld(KeyError):
    """An expert this process does not hold was asked for (the mesh loads it on demand, billed)."""


class ExpertSet(nn.ModuleDict):
    """The routed experts of one MoE block that this process holds, indexed by expert id.

    The in-process engine holds all of them; the mesh's main function only the experts its plan
    keeps local (DESIGN.md: memory held = memory billed), adding and dropping experts as plans
    change. Parameter names stay HF's (`mlp.experts.5.up_proj.weight`), as with a ModuleList.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, held: Iterable[int] | None = None) -> None:
        super().__init__()
        self.hidden, self.intermediate, self.num_experts = hidden, intermediate, num_experts
        for e in range(num_experts) if held is None else sorted(held):
            self.add(e, MLP(hidden, intermediate))

    def __getitem__(self, expert: int) -> MLP:
        try:
            return self._modules[str(expert)]
        except KeyError:
            raise ExpertNotHeld(f"expert {expert} is not held by this process "
                                f"(holds {len(self)} of {self.num_experts})") from None

    def __contains__(self, expert: object) -> bool:
        return str(expert) in self._modules

    def ids(self) -> list[int]:
        return sorted(int(k) for k in self._modules)

    def add(self, expert: int, mlp: MLP) -> None:
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range [0, {self.num_experts})")
        self.add_module(str(expert), mlp)

    def drop(self, expert: int) -> None:
        self._modules.pop(str(expert), None)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class MoEBlock(nn.Module):
    def __init__(self, config: MoEConfig, moe_layer: int, held: Iterable[int] | None = None) -> None:
        """held: the routed experts to allocate (None: all of them)."""
        super().__init__()
        self.moe_layer = moe_layer
        self.num_experts = config.num_experts
        self.gate = Router(config)
        self.experts = ExpertSet(config.hidden_size, config.expert_intermediate_size, config.num_experts, held)
        self.shared_experts = (
            MLP(config.hidden_size, config.shared_intermediate_size) if config.shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x: torch.Tensor, executor: ExpertExecutor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        plan = dispatch(self.moe_layer, x, self.gate(x), self.num_experts)
        out = combine(executor.run(self, plan), plan, x.dtype)
        return out + self.shared(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.shared_experts is None:
            return 0.0
        y = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """HF/Mixtral-style loop: for each expert, index_add_ its weighted outputs."""
        routing = self.gate(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(routing.experts == e)
            if token.numel():
                y = self.experts[e](x[token]) * routing.weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        return out + self.shared(x)
