"""Workloads as files: when each request arrives, what it asks, how long it may answer.

    moemesh workload azure   --out w.jsonl --start-s 600 --duration-s 600 --time-scale 10
    moemesh workload poisson --out w.jsonl --rate 2 --requests 20
    moemesh workload gamma   --out w.jsonl --rate 2 --shape 0.25 --requests 40

A workload file is JSON lines: the first line is the header (what made it: source, window,
time scale, caps, seed, tokenizer), every following line one request::

    {"kind": "moemesh-workload", "version": 1, "source": "azure_llm_2023_conv", "seed": 0, ...}
    {"index": 0, "arrival_s": 0.0, "prompt": "...", "prompt_tokens": 97,
     "prompt_tokens_target": 96, "max_new_tokens": 14, "slo_class": "interactive", "fit": "nearest"}

``arrival_s`` is the offset from the start of the replay, already time-scaled. A replay sends
request i at ``arrival_s`` (open loop), so the same file gives the same arrivals, prompts and
lengths on every run. Every builder is deterministic under its seed (numpy ``default_rng``).

Sources of arrivals:

- **azure** (``../shared/data/traces/azure_llm_2023_conv.csv``: Azure LLM inference trace
  2023, conversation service, CC-BY-4.0: TIMESTAMP, ContextTokens, GeneratedTokens). A window
  ``[start_s, start_s + duration_s)`` from the trace's first timestamp; arrivals divided by
  ``time_scale`` (10: a 10-minute window replays in 60 s); optionally thinned to
  ``keep_fraction`` of the requests (seeded Bernoulli, which keeps the arrival process's shape
  and divides its rate). Lengths: ``prompt_tokens_target = clip(round(ContextTokens *
  prompt_scale), 1, prompt_cap)`` and ``max_new_tokens = clip(round(GeneratedTokens *
  output_scale), 1, output_cap)``: the trace's lengths (median 1020 in, 129 out) do not fit
  the bundled model (1024 positions) on two CPU cores, so both are scaled and capped, and the
  header names scale and cap.
- **poisson**: exponential inter-arrival times at ``rate`` requests/s.
- **gamma**: Gamma inter-arrival times with ``shape`` k (< 1: bursty; coefficient of
  variation ``1/sqrt(k)``) and mean ``1/rate``.

Prompts come from ``../shared/data/prompts`` (GSM8K test problems as ``"Question: ...\\nAnswer:"``
and MT-bench first turns), measured in the bundled tokenizer's tokens. ``PromptPool.fit``
takes the prompt whose length is nearest the target (``fit = "nearest"``, ties broken by the
seed); when the target is longer than every prompt, prompts are concatenated (blank line
between them) and the token sequence is truncated to the target (``fit = "concatenated"``).
Synthetic arrivals (poisson, gamma) draw prompts uniformly from the pool, or fit them to a
fixed ``prompt_tokens`` target when one is given.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

KIND = "moemesh-workload"
VERSION = 1
AZURE_TRACE_NAME = "azure_llm_2023_conv.csv"
REQUEST_KEYS = ("arrival_s", "prompt", "prompt_tokens", "prompt_tokens_target", "max_new_tokens", "slo_class")


class WorkloadError(ValueError):
    """A workload file or a builder's argument is wrong; the message says which and what to do."""


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    arrival_s:            offset from the start of the replay, seconds (time-scaled)
    prompt:               the prompt text
    prompt_tokens:        its length in the bundled tokenizer's tokens
    prompt_tokens_target: the length it was fitted to (trace length, scaled and capped)
    max_new_tokens:       tokens the request may generate
    slo_class:            a class of [slo.classes]
    fit:                  how the prompt was chosen: "nearest", "concatenated" or "sampled"
    source:               where it came from (trace row, timestamp, original lengths)
    """

    arrival_s: float
    prompt: str
    prompt_tokens: int
    prompt_tokens_target: int
    max_new_tokens: int
    slo_class: str = "interactive"
    fit: str = "sampled"
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.arrival_s >= 0 and np.isfinite(self.arrival_s)):
            raise WorkloadError(f"arrival_s must be finite and >= 0, got {self.arrival_s}")
        if self.max_new_tokens < 1 or self.prompt_tokens < 1:
            raise WorkloadError("max_new_tokens and prompt_tokens must be >= 1")
        if not self.prompt:
            raise WorkloadError("a request needs a non-empty prompt")


@dataclass(frozen=True)
class Workload:
    """A header (what made it) and the requests in arrival order."""

    header: dict
    requests: tuple[WorkloadRequest, ...]

    def __post_init__(self) -> None:
        arrivals = [r.arrival_s for r in self.requests]
        if arrivals != sorted(arrivals):
            raise WorkloadError("requests must be in arrival order")

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def summary(self) -> dict:
        """Counts and rates for the record: requests, span, mean rate, inter-arrival CV, lengths."""
        arrivals = np.array([r.arrival_s for r in self.requests])
        gaps = np.diff(arrivals)
        return {
            "requests": len(self.requests),
            "span_s": float(arrivals[-1] - arrivals[0]) if arrivals.size else 0.0,
            "rate_per_s": float(1.0 / gaps.mean()) if gaps.size and gaps.mean() > 0 else None,
            "interarrival_cv": float(gaps.std() / gaps.mean()) if gaps.size and gaps.mean() > 0 else None,
            "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in self.requests])) if self.requests else 0.0,
            "max_new_tokens_mean": float(np.mean([r.max_new_tokens for r in self.requests])) if self.requests else 0.0,
        }


# ----------------------------------------------------------------------------- files


def save(workload: Workload, path: str | Path) -> Path:
    """Write JSON lines: header, then one request per line. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": KIND, "version": VERSION, **workload.header, "requests": len(workload.requests)}
    lines = [json.dumps(header, sort_keys=True)]
    lines += [json.dumps({"index": i, **asdict(r)}, sort_keys=True) for i, r in enumerate(workload.requests)]
    path.write_text("\n".join(lines) + "\n")
    return path


def load(path: str | Path) -> Workload:
    """Read a workload file written by :func:`save` (JSON lines, or one JSON object
    ``{"header": {...}, "requests": [...]}``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such workload file; make one with `moemesh workload`") from None
    try:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and "header" in whole:
            header, rows = whole["header"], whole["requests"]
        else:
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            header, rows = lines[0], lines[1:]
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise WorkloadError(f"{path}: not a workload file ({exc}); make one with `moemesh workload`") from None
    if header.get("kind") != KIND:
        raise WorkloadError(f"{path}: header kind is {header.get('kind')!r}, expected {KIND!r}")
    if header.get("version") != VERSION:
        raise WorkloadError(f"{path}: version {header.get('version')!r}, this moemesh reads {VERSION}")
    requests = []
    for n, row in enumerate(rows):
        missing = [k for k in REQUEST_KEYS if k not in row]
        if missing:
            raise WorkloadError(f"{path}: request {n} lacks {missing}")
        row = {k: v for k, v in row.items() if k != "index"}
        requests.append(WorkloadRequest(**row))
    header = {k: v for k, v in header.items() if k not in ("kind", "version", "requests")}
    return Workload(header, tuple(requests))


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptPool:
    """Prompts with their lengths in a tokenizer's tokens, sorted by length.

    texts: [n] prompts; lengths: [n] their token counts (ascending); encode/decode: the tokenizer
    """

    texts: list[str]
    lengths: list[int]
    encode: object
    decode: object
    name: str = ""

    @classmethod
    def build(cls, texts: Sequence[str], encode, decode, name: str = "") -> PromptPool:
        if not texts:
            raise WorkloadError("PromptPool: no prompts")
        measured = sorted(((len(encode(t)), i, t) for i, t in enumerate(texts)))
        return cls([t for _, _, t in measured], [n for n, _, _ in measured], encode, decode, name)

    @classmethod
    def bundled(cls, prompts_dir: str | Path | None = None) -> PromptPool:
        """GSM8K test problems and MT-bench first turns, in the bundled tokenizer's tokens."""
        from mesh.config import ModelConfig
        from nodes.corpus import shared_data_dir
        from nodes.model.tokenizer import Tokenizer

        root = Path(prompts_dir) if prompts_dir is not None else shared_data_dir()
        texts = []
        try:
            for line in (root / "gsm8k_test.jsonl").read_text().splitlines():
                texts.append(f"Question: {json.loads(line)['question']}\nAnswer:")
            for line in (root / "mt_bench.jsonl").read_text().splitlines():
                texts.append(json.loads(line)["turns"][0])
        except FileNotFoundError as exc:
            raise WorkloadError(f"{exc.filename}: missing; pass --prompts-dir (../shared/data/prompts)") from None
        tokenizer = Tokenizer.from_dir(ModelConfig().resolved_path())
        return cls.build(texts, tokenizer.encode, tokenizer.decode, name=f"{root} (bundled tokenizer)")

    def sample(self, rng: np.random.Generator) -> tuple[str, int, str]:
        i = int(rng.integers(len(self.texts)))
        return self.texts[i], self.lengths[i], "sampled"

    def fit(self, target: int, rng: np.random.Generator) -> tuple[str, int, str]:
        """(text, tokens, how) for a prompt of about ``target`` tokens (module docstring)."""
        if target < 1:
            raise WorkloadError(f"prompt target must be >= 1 token, got {target}")
        if target > self.lengths[-1]:
            ids: list[int] = []
            pieces: list[str] = []
            while len(ids) < target:
                pieces.append(self.texts[int(rng.integers(len(self.texts)))])
                ids = self.encode("\n\n".join(pieces))
            text = self.decode(ids[:target])
            return text, len(self.encode(text)), "concatenated"
        pos = bisect.bisect_left(self.lengths, target)
        best = min(abs(self.lengths[j] - target) for j in (pos - 1, pos) if 0 <= j < len(self.lengths))
        lo = bisect.bisect_left(self.lengths, target - best)
        hi = bisect.bisect_right(self.lengths, target + best)
        choices = [j for j in range(lo, hi) if abs(self.lengths[j] - target) == best]
        j = choices[int(rng.integers(len(choices)))]
        return self.texts[j], self.lengths[j], "nearest"


# ----------------------------------------------------------------------------- arrivals


def poisson_arrivals(rate_per_s: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count] arrival offsets (s), the first at 0: exponential gaps of mean 1/rate."""
    if not rate_per_s > 0 or count < 1:
        raise WorkloadError(f"poisson: need rate > 0 and count >= 1, got {rate_per_s}, {count}")
    gaps = rng.exponential(1.0 / rate_per_s, count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def gamma_arrivals(rate_per_s: float, shape: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count] arrival offsets (s), the first at 0: Gamma(shape, 1/(rate*shape)) gaps, mean
    1/rate, coefficient of variation 1/sqrt(shape) (shape < 1: burstier than Poisson)."""
    if not rate_per_s > 0 or not shape > 0 or count < 1:
        raise WorkloadError(f"gamma: need rate > 0, shape > 0, count >= 1, got {rate_per_s}, {shape}, {count}")
    gaps = rng.gamma(shape, 1.0 / (rate_per_s * shape), count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _slo_picker(slo_classes: str, rng: np.random.Generator):
    """"interactive" or "interactive:0.7,batch:0.3" -> a function drawing one class name."""
    parts = [p.split(":") for p in slo_classes.split(",") if p.strip()]
    names = [p[0].strip() for p in parts]
    weights = np.array([float(p[1]) if len(p) > 1 else 1.0 for p in parts])
    if not names or np.any(weights < 0) or weights.sum() <= 0:
        raise WorkloadError(f"slo classes {slo_classes!r}: expected NAME or NAME:WEIGHT,NAME:WEIGHT")
    if len(names) == 1:
        return lambda: names[0]
    p = weights / weights.sum()
    return lambda: names[int(rng.choice(len(names), p=p))]


def synthetic(
    kind: str,
    pool: PromptPool,
    *,
    rate_per_s: float,
    count: int,
    seed: int = 0,
    shape: float = 0.25,
    max_new_tokens: int = 16,
    prompt_tokens: int | None = None,
    slo_classes: str = "interactive",
) -> Workload:
    """Poisson (``kind="poisson"``) or Gamma (``"gamma"``, ``shape``) arrivals at ``rate_per_s``."""
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        arrivals = poisson_arrivals(rate_per_s, count, rng)
    elif kind == "gamma":
        arrivals = gamma_arrivals(rate_per_s, shape, count, rng)
    else:
        raise WorkloadError(f"unknown arrival kind {kind!r}; use poisson or gamma")
    pick = _slo_picker(slo_classes, rng)
    requests = []
    for t in arrivals:
        text, n, how = pool.fit(prompt_tokens, rng) if prompt_tokens else pool.sample(rng)
        requests.append(WorkloadRequest(float(round(t, 6)), text, n, prompt_tokens or n, max_new_tokens,
                                        pick(), how))
    header = {"source": kind, "seed": seed, "rate_per_s": rate_per_s, "count": count,
              "max_new_tokens": max_new_tokens, "prompt_tokens": prompt_tokens, "slo_classes": slo_classes,
              "prompts": pool.name, "time_scale": 1.0}
    if kind == "gamma":
        header["shape"] = shape
    return Workload(header, tuple(requests))


# ----------------------------------------------------------------------------- the Azure trace


@dataclass(frozen=True)
class TraceRow:
    offset_s: float  # seconds since the trace's first request
    timestamp: str
    context_tokens: int
    generated_tokens: int


def read_azure_trace(path: str | Path) -> list[TraceRow]:
    """The Azure LLM trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens) as rows with offsets."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            raw = list(csv.DictReader(f))
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such trace; pass --trace (../shared/data/traces/{AZURE_TRACE_NAME})") from None
    if not raw or not {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= raw[0].keys():
        raise WorkloadError(f"{path}: expected columns TIMESTAMP, ContextTokens, GeneratedTokens")

    def when(stamp: str) -> datetime:
        day, _, clock = stamp.partition(" ")
        whole, _, frac = clock.partition(".")
        return datetime.fromisoformat(f"{day} {whole}.{(frac + '000000')[:6]}")

    first = when(raw[0]["TIMESTAMP"])
    rows = [TraceRow((when(r["TIMESTAMP"]) - first).total_seconds(), r["TIMESTAMP"],
                     int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in raw]
    rows.sort(key=lambda r: r.offset_s)
    return rows


def default_trace_path() -> Path:
    from nodes.corpus import shared_data_dir

    return shared_data_dir().parent / "traces" / AZURE_TRACE_NAME


def from_azure_trace(
    pool: PromptPool,
    *,
    trace: str | Path | None = None,
    start_s: float = 0.0,
    duration_s: float = 600.0,
    time_scale: float = 10.0,
    keep_fraction: float = 1.0,
    prompt_scale: float = 0.125,
    prompt_cap: int = 256,
    output_scale: float = 0.125,
    output_cap: int = 32,
    seed: int = 0,
    slo_classes: str = "interactive",
    max_requests: int | None = None,
) -> Workload:
    """A window of the Azure trace, time-scaled and length-fitted (module docstring).

    The window is ``[start_s, start_s + duration_s)`` seconds after the trace's first request;
    arrival i replays at ``(t_i - t_first_in_window) / time_scale``. ``max_requests`` keeps the
    first requests of the (thinned) window only.
    """
    if not time_scale > 0 or duration_s <= 0 or start_s < 0:
        raise WorkloadError("azure: need time_scale > 0, duration_s > 0, start_s >= 0")
    if not 0 < keep_fraction <= 1:
        raise WorkloadError(f"azure: keep_fraction must be in (0, 1], got {keep_fraction}")
    if prompt_cap < 1 or output_cap < 1 or not prompt_scale > 0 or not output_scale > 0:
        raise WorkloadError("azure: scales must be > 0 and caps >= 1")
    path = Path(trace) if trace is not None else default_trace_path()
    rows = [r for r in read_azure_trace(path) if start_s <= r.offset_s < start_s + duration_s]
    rng = np.random.default_rng(seed)
    if keep_fraction < 1:
        rows = [r for r, u in zip(rows, rng.random(len(rows))) if u < keep_fraction]
    if max_requests is not None:
        rows = rows[:max_requests]
    if not rows:
        raise WorkloadError(f"azure: no requests in the window [{start_s}, {start_s + duration_s}) s")
    pick = _slo_picker(slo_classes, rng)
    origin = rows[0].offset_s
    requests = []
    for r in rows:
        target = int(np.clip(round(r.context_tokens * prompt_scale), 1, prompt_cap))
        new = int(np.clip(round(r.generated_tokens * output_scale), 1, output_cap))
        text, n, how = pool.fit(target, rng)
        requests.append(WorkloadRequest(
            float(round((r.offset_s - origin) / time_scale, 6)), text, n, target, new, pick(), how,
            {"timestamp": r.timestamp, "context_tokens": r.context_tokens, "generated_tokens": r.generated_tokens},
        ))
    header = {
        "source": "azure_llm_2023_conv", "trace": str(path), "seed": seed,
        "window": {"start_s": start_s, "duration_s": duration_s}, "time_scale": time_scale,
        "keep_fraction": keep_fraction, "max_requests": max_requests,
        "prompt_tokens": {"scale": prompt_scale, "cap": prompt_cap},
        "max_new_tokens": {"scale": output_scale, "cap": output_cap},
        "prompt_fit": "nearest length in the pool's tokens; concatenated and truncated above the longest",
        "slo_classes": slo_classes, "prompts": pool.name,
    }
    return Workload(header, tuple(requests))


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh workload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("azure", "poisson", "gamma", "show"),
                    help="source of arrivals (show: print a file's header and summary)")
    ap.add_argument("--out", type=Path, help="workload file to write (JSON lines); with show: the file to read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-dir", type=Path, help="default: ../shared/data/prompts")
    ap.add_argument("--slo-classes", default="interactive", help='NAME or "NAME:WEIGHT,NAME:WEIGHT"')
    g = ap.add_argument_group("azure")
    g.add_argument("--trace", type=Path, help=f"default: ../shared/data/traces/{AZURE_TRACE_NAME}")
    g.add_argument("--start-s", type=float, default=0.0)
    g.add_argument("--duration-s", type=float, default=600.0)
    g.add_argument("--time-scale", type=float, default=10.0, help="trace seconds per replayed second")
    g.add_argument("--keep-fraction", type=float, default=1.0, help="thin the window to this share (seeded)")
    g.add_argument("--prompt-scale", type=float, default=0.125)
    g.add_argument("--prompt-cap", type=int, default=256)
    g.add_argument("--output-scale", type=float, default=0.125)
    g.add_argument("--output-cap", type=int, default=32)
    g.add_argument("--max-requests", type=int)
    g = ap.add_argument_group("poisson / gamma")
    g.add_argument("--rate", type=float, default=1.0, help="requests per second")
    g.add_argument("--requests", type=int, default=20)
    g.add_argument("--shape", type=float, default=0.25, help="gamma shape k (< 1: bursty)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--prompt-tokens", type=int, help="fit every prompt to this length (default: sample)")
    args = ap.parse_args(argv)
    if args.out is None:
        ap.error("--out is required")
    try:
        if args.kind == "show":
            workload = load(args.out)
        else:
            pool = PromptPool.bundled(args.prompts_dir)
            if args.kind == "azure":
                workload = from_azure_trace(
                    pool, trace=args.trace, start_s=args.start_s, duration_s=args.duration_s,
                    time_scale=args.time_scale, keep_fraction=args.keep_fraction,
                    prompt_scale=args.prompt_scale, prompt_cap=args.prompt_cap,
                    output_scale=args.output_scale, output_cap=args.output_cap, seed=args.seed,
                    slo_classes=args.slo_classes, max_requests=args.max_requests)
            else:
                workload = synthetic(args.kind, pool, rate_per_s=args.rate, count=args.requests, seed=args.seed,
                                     shape=args.shape, max_new_tokens=args.max_new_tokens,
                                     prompt_tokens=args.prompt_tokens, slo_classes=args.slo_classes)
            save(workload, args.out)
    except WorkloadError as exc:
        print(f"moemesh workload: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"file": str(args.out), "header": workload.header, "summary": workload.summary()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
