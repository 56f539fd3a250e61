"""Expert-activation forecasting: what a prompt will route where, before it runs.

forecast.py     PromptFeatures, Activation, Forecast: the types shared with allocator/ and mesh/
base.py         ModelShape, the Predictor interface, shared helpers (normalisation, load, stragglers)
traces.py       TraceStore: append-only, versioned trace directories (meta.json + records.jsonl)
baselines.py    MovingAverage (EMA of popularity), RecentUse (experts of the last requests)
sps.py          Remoe's Similar Prompts Searching: SPSIndex (clustering tree), SPSPredictor
bayes.py        BayesianPopularity: Dirichlet + token-id tables + epsilon-greedy (Liu et al.)
layer_aware.py  LayerAwarePredictor: MoEless-style per-layer linear heads, stragglers
oracle.py       OraclePredictor: the true activations, the upper bound
metrics.py      JS divergence, recall / precision / coverage, load error, calibration
evaluate.py     evaluate(...), sps_scaling(...), main(argv) behind `moemesh predictor-eval`
synthetic.py    SyntheticModel: topic prompts with prompt-dependent routing, for tests and benchmarks

Submodules are imported explicitly (``from predictor.sps import SPSPredictor``) so that importing
``predictor.forecast`` stays cheap.
"""
