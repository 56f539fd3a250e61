"""Score predictors on a held-out split: the engine behind ``moemesh predictor-eval``.

    evaluate(predictors, train_records, test_records, shape) -> EvalReport
    similarity_check(records) -> Remoe's check: prompt similarity vs activation divergence
    sps_scaling(n_list, dim, seed) -> insert/search cost of SPS vs brute force
    main(argv): --traces DIR | --synthetic N, --out DIR, --seed; writes report.json,
                report.md and PNGs (matplotlib, Agg backend)

Every predictor first observes the train records in order, then forecasts each test record
(``online=True`` also lets it observe each test record after forecasting it, as in service).
Metric definitions live in ``predictor/metrics.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.base import (
    DEFAULT_STRAGGLER_THRESHOLD,
    ModelShape,
    Predictor,
    activation_distribution,
    stragglers_from_load,
)
from predictor.baselines import MovingAverage, RecentUse
from predictor.bayes import BayesianPopularity
from predictor.layer_aware import LayerAwarePredictor
from predictor.metrics import (
    calibration_bins,
    js_divergence,
    load_error,
    precision_recall,
    set_matches,
    slot_coverage,
    spearman,
    top_k_precision,
    top_k_recall,
)
from predictor.oracle import OraclePredictor
from predictor.sps import BruteForceIndex, SPSIndex, SPSPredictor, prompt_vector
from predictor.synthetic import SyntheticConfig, SyntheticModel, clustered_embeddings
from predictor.traces import TraceRecord, TraceStore, split_records

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(f"[predictor-eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


@dataclass
class PredictorResult:
    """One predictor's scores. per_layer: metric -> [layers]; per_request: metric -> [test]."""

    name: str
    summary: dict
    per_layer: dict[str, list[float]]
    per_request: dict[str, list[float]]
    calibration: list[dict]


@dataclass
class EvalReport:
    shape: ModelShape
    train_size: int
    test_size: int
    results: list[PredictorResult]
    similarity: dict | None = None
    scaling: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [result.summary for result in self.results]

    def to_json(self) -> dict:
        body = {
            "shape": {"layers": self.shape.layers, "experts": self.shape.experts, "top_k": self.shape.top_k},
            "train_size": self.train_size,
            "test_size": self.test_size,
            "settings": self.settings,
            "summary": self.rows(),
            "results": [
                {
                    "name": result.name,
                    "per_layer": result.per_layer,
                    "per_request": result.per_request,
                    "calibration": result.calibration,
                }
                for result in self.results
            ],
            "similarity_check": None
            if self.similarity is None
            else {key: value for key, value in self.similarity.items() if key in ("spearman", "pairs")},
            "sps_scaling": self.scaling,
        }
        return _json_safe(body)

    def to_markdown(self) -> str:
        parts = [
            f"# Predictor evaluation\n\nModel: {self.shape.layers} MoE layers x {self.shape.experts} "
            f"experts, top-{self.shape.top_k}. Train {self.train_size} requests, test {self.test_size}.\n"
            "JS divergence in nats (0 = identical, ln 2 = 0.693 = disjoint); lower is better.\n",
            markdown_table(self.rows()),
        ]
        for result in self.results:
            parts.append(f"\n### Calibration: {result.name}\n")
            parts.append(markdown_table(result.calibration))
        if self.similarity is not None:
            parts.append(
                f"\n### Remoe check: prompt similarity vs activation divergence\n\n"
                f"Spearman rank correlation over {self.similarity['pairs']} prompt pairs: "
                f"{_format(self.similarity['spearman'])} (negative: similar prompts route alike).\n"
            )
        if self.scaling:
            parts.append("\n### SPS scaling (online insertion, per prompt)\n")
            parts.append(markdown_table(self.scaling))
        return "\n".join(parts) + "\n"


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub-markdown table of ``rows`` (columns from the first row)."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- evaluation ----------------------------------------------------------------------------


def default_predictors(
    shape: ModelShape,
    seed: int = 0,
    test_records: Sequence[TraceRecord] = (),
    gate_weights: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> list[Predictor]:
    """Every predictor, ready to fit; the oracle knows ``test_records``."""
    makers: dict[str, Callable[[], Predictor]] = {
        "moving-average": lambda: MovingAverage(shape, seed),
        "recent-use": lambda: RecentUse(shape, seed),
        "sps": lambda: SPSPredictor(shape, seed),
        "sps-brute": lambda: SPSPredictor(shape, seed, index="brute"),
        "bayes": lambda: BayesianPopularity(shape, seed),
        "layer-aware": lambda: LayerAwarePredictor(shape, seed, gate_weights=gate_weights),
        "oracle": lambda: OraclePredictor.from_records(shape, test_records),
    }
    chosen = list(makers) if names is None else list(names)
    unknown = [name for name in chosen if name not in makers]
    if unknown:
        raise ValueError(f"unknown predictors {unknown}; choose from {list(makers)}")
    return [makers[name]() for name in chosen]


def evaluate(
    predictors: Sequence[Predictor],
    train_records: Sequence[TraceRecord],
    test_records: Sequence[TraceRecord],
    shape: ModelShape,
    *,
    online: bool = False,
    set_size: int | None = None,
    straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    calibration_bin_count: int = 5,
    progress: Progress = _quiet,
) -> EvalReport:
    """Fit each predictor on ``train_records``, score it on ``test_records``.

    set_size: m of "recall / coverage of a set of m experts" (default experts // 2).
    """
    if not test_records:
        raise ValueError("evaluate: no test records")
    set_size = set_size or max(1, shape.experts // 2)
    results = []
    for predictor in predictors:
        progress(f"{predictor.name}: fitting on {len(train_records)} requests")
        started = time.perf_counter()
        step = max(1, len(train_records) // 10)
        for index, record in enumerate(train_records):
            predictor.observe_record(record)
            if (index + 1) % step == 0 and len(train_records) >= 2000:
                progress(f"{predictor.name}: observed {index + 1}/{len(train_records)}")
        fit_seconds = time.perf_counter() - started
        progress(f"{predictor.name}: scoring {len(test_records)} requests")
        results.append(
            _score(predictor, test_records, shape, online, set_size, straggler_threshold, calibration_bin_count, fit_seconds)
        )
    return EvalReport(
        shape,
        len(train_records),
        len(test_records),
        results,
        settings={"online": online, "set_size": set_size, "straggler_threshold": straggler_threshold},
    )


def _score(
    predictor: Predictor,
    test_records: Sequence[TraceRecord],
    shape: ModelShape,
    online: bool,
    set_size: int,
    straggler_threshold: float,
    bins: int,
    fit_seconds: float,
) -> PredictorResult:
    per_layer_sums: dict[str, np.ndarray] = {}
    js_per_request, confidence, load_errors, seconds = [], [], [], []
    straggler_counts = np.zeros(3, dtype=np.int64)  # true positives, predicted, actual
    for record in test_records:
        features, actual = record.features(), record.activation()
        started = time.perf_counter()
        forecast = predictor.forecast(features)
        seconds.append(time.perf_counter() - started)
        total = actual.total
        layer_scores = {
            "js": js_divergence(forecast.distribution, total),
            f"recall@{shape.top_k}": top_k_recall(forecast.distribution, total, shape.top_k),
            f"precision@{shape.top_k}": top_k_precision(forecast.distribution, total, shape.top_k),
            f"recall@{set_size}": top_k_recall(forecast.distribution, total, set_size),
            f"coverage@{set_size}": slot_coverage(forecast.distribution, total, set_size),
        }
        for metric, values in layer_scores.items():
            per_layer_sums[metric] = per_layer_sums.get(metric, 0.0) + values
        js_per_request.append(float(layer_scores["js"].mean()))
        confidence.append(forecast.confidence)
        load_errors.append(load_error(forecast.load, total.astype(np.float64)))
        straggler_counts += set_matches(forecast.stragglers, stragglers_from_load(total, straggler_threshold))
        if online:
            predictor.observe_record(record)
    count = len(test_records)
    per_layer = {metric: (values / count).tolist() for metric, values in per_layer_sums.items()}
    straggler_precision, straggler_recall = precision_recall(*straggler_counts.tolist())
    summary = {"predictor": predictor.name}
    summary.update({metric: float(np.mean(values)) for metric, values in per_layer.items()})
    summary.update(
        {
            "load_error": float(np.mean(load_errors)),
            "straggler_precision": straggler_precision,
            "straggler_recall": straggler_recall,
            "confidence": float(np.mean(confidence)),
            "confidence_vs_js_spearman": spearman(confidence, js_per_request),
            "ms_per_forecast": 1e3 * float(np.mean(seconds)),
            "fit_seconds": fit_seconds,
        }
    )
    return PredictorResult(
        name=predictor.name,
        summary=summary,
        per_layer=per_layer,
        per_request={"js": js_per_request, "confidence": confidence, "load_error": load_errors},
        calibration=calibration_bins(np.array(confidence), np.array(js_per_request), bins),
    )


def similarity_check(records: Sequence[TraceRecord], pairs: int = 2000, seed: int = 0) -> dict:
    """Remoe's Fig. 3 check over random prompt pairs: SCS vs JS divergence of their activations.

    Returns {"spearman", "pairs", "similarities" [pairs], "divergences" [pairs]}.
    """
    if len(records) < 2:
        raise ValueError("similarity_check: need at least two records")
    rng = np.random.default_rng(seed)
    vectors = np.stack([prompt_vector(record.features().token_embeddings) for record in records])
    distributions = np.stack([activation_distribution(record.activation()) for record in records])
    first = rng.integers(len(records), size=pairs)
    second = (first + rng.integers(1, len(records), size=pairs)) % len(records)  # never the same
    similarities = np.einsum("pd,pd->p", vectors[first], vectors[second])
    divergences = js_divergence(distributions[first], distributions[second]).mean(axis=1)
    return {
        "spearman": spearman(similarities, divergences),
        "pairs": int(pairs),
        "similarities": similarities.tolist(),
        "divergences": divergences.tolist(),
    }


def sps_scaling(
    n_list: Sequence[int] = (1000, 10000, 100000),
    dim: int = 64,
    seed: int = 0,
    queries: int = 100,
    alpha: int = 15,
    clusters: int = 64,
    progress: Progress = _quiet,
) -> list[dict]:
    """Insert and search cost per prompt, SPS tree vs brute force, on clustered unit vectors.

    Rows: n, microseconds per insert and per search for both, similarity evaluations per search,
    recall of SPS's alpha neighbours against the exact ones, their mean-similarity ratio, tree
    depth, and the offline (A2) bulk-build time.
    """
    rows = []
    for n in n_list:
        vectors = clustered_embeddings(n + queries, dim, clusters=clusters, seed=seed)
        stored, probes = vectors[:n], vectors[n:]
        progress(f"sps_scaling n={n}: inserting")
        tree, brute = SPSIndex(dim, seed=seed), BruteForceIndex(dim)
        started = time.perf_counter()
        for index in range(n):
            tree.insert(stored[index], index)
        tree_insert = (time.perf_counter() - started) / n
        started = time.perf_counter()
        for index in range(n):
            brute.insert(stored[index], index)
        brute_insert = (time.perf_counter() - started) / n
        progress(f"sps_scaling n={n}: searching {queries} prompts")
        evaluations_before = tree.similarity_evaluations
        started = time.perf_counter()
        tree_found = [tree.search(probe, alpha) for probe in probes]
        tree_search = (time.perf_counter() - started) / queries
        tree_evaluations = (tree.similarity_evaluations - evaluations_before) / queries
        started = time.perf_counter()
        brute_found = [brute.search(probe, alpha) for probe in probes]
        brute_search = (time.perf_counter() - started) / queries
        recall = np.mean(
            [len({i for i, _ in t} & {i for i, _ in b}) / alpha for t, b in zip(tree_found, brute_found)]
        )
        similarity_ratio = np.mean(
            [np.mean([s for _, s in t]) / np.mean([s for _, s in b]) for t, b in zip(tree_found, brute_found)]
        )
        progress(f"sps_scaling n={n}: offline build")
        started = time.perf_counter()
        SPSIndex.build(stored, list(range(n)), seed=seed)
        build_seconds = time.perf_counter() - started
        rows.append(
            {
                "n": n,
                "sps_insert_us": 1e6 * tree_insert,
                "brute_insert_us": 1e6 * brute_insert,
                "sps_search_us": 1e6 * tree_search,
                "brute_search_us": 1e6 * brute_search,
                "sps_evaluations_per_search": tree_evaluations,
                "brute_evaluations_per_search": float(n),
                "recall_vs_brute": float(recall),
                "similarity_ratio": float(similarity_ratio),
                "tree_depth": tree.depth(),
                "offline_build_s": build_seconds,
            }
        )
    return rows


# -- plots ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_similarity(check: dict, path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(5, 4))
    axes.scatter(check["similarities"], check["divergences"], s=4, alpha=0.4)
    axes.set_xlabel("prompt similarity (soft cosine)")
    axes.set_ylabel("activation JS divergence (nats)")
    axes.set_title(f"Remoe check: Spearman {_format(check['spearman'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_calibration(report: EvalReport, path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for result in report.results:
        if result.name == "oracle":
            continue
        xs = [row["mean_confidence"] for row in result.calibration]
        ys = [row["mean_error"] for row in result.calibration]
        axes.plot(xs, ys, marker="o", label=result.name)
    axes.set_xlabel("confidence (bin mean)")
    axes.set_ylabel("JS divergence (bin mean, nats)")
    axes.set_title("Forecast error vs confidence")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_scaling(rows: Sequence[dict], path: Path) -> None:
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(5, 4))
    sizes = [row["n"] for row in rows]
    for key, label in (
        ("sps_search_us", "SPS search"),
        ("brute_search_us", "brute-force search"),
        ("sps_insert_us", "SPS insert"),
    ):
        axes.loglog(sizes, [row[key] for row in rows], marker="o", label=label)
    axes.set_xlabel("stored prompts")
    axes.set_ylabel("microseconds per prompt")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


# -- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moemesh predictor-eval", description="Score expert-activation predictors on a held-out split."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--traces", type=Path, help="trace store directory (predictor/traces.py format)")
    source.add_argument("--synthetic", type=int, default=None, help="use N synthetic requests instead (default 1200)")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md, *.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--split-by", default="id hash", choices=["id hash", "text hash"])
    parser.add_argument("--predictors", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--online", action="store_true", help="observe each test request after forecasting it")
    parser.add_argument("--scaling", default=None, help="also time SPS vs brute force at these sizes, e.g. 1000,10000,100000")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = _quiet if args.quiet else print_progress
    gate_weights = None
    if args.traces is not None:
        store = TraceStore.open(args.traces)
        meta = store.meta
        shape = ModelShape(meta.layers, meta.experts, meta.top_k)
        train, test = store.split(by=args.split_by, test_fraction=args.test_fraction, seed=args.seed)
        progress(f"traces {args.traces}: model {meta.model_id}, {len(train)} train / {len(test)} test")
    else:
        count = args.synthetic or 1200
        model = SyntheticModel(SyntheticConfig(), seed=args.seed)
        shape, gate_weights = model.shape, model.gate_weights
        records = model.records(count)
        progress(f"synthetic: {count} requests")
        train, test = split_records(records, args.split_by, args.test_fraction, args.seed)
    names = args.predictors.split(",") if args.predictors else None
    predictors = default_predictors(shape, args.seed, test, gate_weights, names)
    report = evaluate(predictors, train, test, shape, online=args.online, progress=progress)
    report.settings.update(
        {"seed": args.seed, "source": str(args.traces) if args.traces else "synthetic",
         "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset")}
    )
    progress("Remoe similarity check")
    report.similarity = similarity_check(train + test, seed=args.seed)
    if args.scaling:
        sizes = [int(size) for size in args.scaling.split(",")]
        dim = test[0].embedding.shape[0] if args.traces else 64
        report.scaling = sps_scaling(sizes, dim=dim, seed=args.seed, progress=progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    (args.out / "report.md").write_text(report.to_markdown())
    plot_similarity(report.similarity, args.out / "similarity_vs_divergence.png")
    plot_calibration(report, args.out / "calibration.png")
    if report.scaling:
        plot_scaling(report.scaling, args.out / "sps_scaling.png")
    progress(f"wrote {args.out}/report.json, report.md and plots")
    if not args.quiet:
        print(markdown_table(report.rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
