"""[model] routing_zipf: a real mesh routes by Zipf(s) exactly as the in-process engine does with
the same skew (greedy tokens identical), and its meter sees the skewed loads."""

from __future__ import annotations

import asyncio

import numpy as np

from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from nodes.model.skew import apply_zipf
from tests.mesh.conftest import PROMPTS, dump, running_mesh
from tests.mesh.test_mesh_e2e import NEW_TOKENS, generate_all, status


def test_mesh_under_zipf_routing_matches_the_in_process_engine(tiny_model, tmp_path):
    model = Checkpoint(tiny_model).load_model()
    apply_zipf(model, 1.5)
    skewed = Engine(model).complete(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "static-split", "policy.remote": [[0, 0], [1, 1]],
                                               "model.routing_zipf": 1.5}) as mesh:
        got = asyncio.run(generate_all(mesh.endpoints["client"]))
        assert [t for t, _ in got] == skewed, dump(mesh)
        counts = np.array(asyncio.run(status(mesh.endpoints["client"]))["load"]["counts"], dtype=float)
    shares = np.sort(counts / counts.sum(axis=1, keepdims=True), axis=1)[:, ::-1]
    assert (shares[:, 0] > 0.35).all(), shares  # 4 experts, top-2, s = 1.5: the hottest takes > 35 %
