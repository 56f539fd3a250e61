"""Trace store: round trip, crash tolerance, versioning, shape checks, deterministic splits."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from predictor.traces import (
    FORMAT_VERSION,
    TraceFormatError,
    TraceMeta,
    TraceStore,
    decode_record,
    encode_record,
    split_records,
)
from tests.predictor.builders import make_record

META = TraceMeta(model_id="tiny", layers=2, experts=4, top_k=2, embedding_dim=3)


def full_record(request_id: str = "r1"):
    return make_record(
        request_id,
        token_ids=[5, 9, 5],
        embedding=[0.5, -1.0, 2.0],
        prefill=[[2, 0, 3, 1], [0, 6, 0, 0]],
        decode=[[1, 1, 0, 0], [0, 0, 2, 0]],
        new_tokens=1,
        token_embeddings=np.arange(9).reshape(3, 3) / 7,
        gate_inputs=[[1, 2, 3], [4, 5, 6]],
        token_routing=[[[0, 2], [1, 3]], [[2, 3], [1, 0]], [[0, 1], [1, 2]]],
    )


def assert_same(first, second):
    assert first.request_id == second.request_id
    assert first.prompt_text == second.prompt_text
    assert first.new_tokens == second.new_tokens
    for name in ("token_ids", "embedding", "prefill", "decode", "token_embeddings", "gate_inputs", "token_routing"):
        a, b = getattr(first, name), getattr(second, name)
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_round_trip_with_and_without_optional_arrays(tmp_path):
    store = TraceStore.create(tmp_path / "traces", META)
    minimal = make_record("r2", [1], [0, 0, 1], [[1, 0, 0, 1], [0, 0, 2, 0]])
    store.append(full_record())
    store.append(minimal)
    reopened = TraceStore.open(tmp_path / "traces")
    assert reopened.meta == META
    assert len(reopened) == 2
    loaded = list(reopened)
    assert_same(loaded[0], full_record())
    assert_same(loaded[1], minimal)
    assert loaded[1].features().token_embeddings.shape == (1, 3)  # embedding stands in


def test_arrays_are_little_endian_base64(tmp_path):
    body = json.loads(encode_record(full_record()))
    assert body["prefill"]["dtype"] == "<i8"
    raw = base64.b64decode(body["prefill"]["data"])
    assert raw[:8] == (2).to_bytes(8, "little")
    big_endian = full_record()
    object.__setattr__(big_endian, "embedding", big_endian.embedding.astype(">f4"))
    assert_same(decode_record(encode_record(big_endian)), full_record())


def test_meta_file_is_plain_json(tmp_path):
    TraceStore.create(tmp_path / "t", META)
    body = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert body["format"] == "moemesh-traces" and body["version"] == FORMAT_VERSION
    assert (body["layers"], body["experts"], body["top_k"], body["embedding_dim"]) == (2, 4, 2, 3)


def test_truncated_last_line_is_skipped_with_warning_and_cut_on_append(tmp_path):
    store = TraceStore.create(tmp_path / "t", META)
    store.append(full_record("a"))
    store.append(full_record("b"))
    records_path = tmp_path / "t" / "records.jsonl"
    data = records_path.read_bytes()
    records_path.write_bytes(data[: len(data) - 40])  # crash in the middle of writing "b"
    reopened = TraceStore.open(tmp_path / "t")
    assert len(reopened) == 1
    with pytest.warns(RuntimeWarning, match="truncated"):
        assert [record.request_id for record in reopened] == ["a"]
    with pytest.warns(RuntimeWarning, match="truncated"):
        reopened.append(full_record("c"))
    assert [record.request_id for record in TraceStore.open(tmp_path / "t")] == ["a", "c"]


def test_version_mismatch_is_rejected(tmp_path):
    TraceStore.create(tmp_path / "t", META)
    meta_path = tmp_path / "t" / "meta.json"
    body = json.loads(meta_path.read_text())
    body["version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(body))
    with pytest.raises(TraceFormatError, match="version"):
        TraceStore.open(tmp_path / "t")


def test_not_a_store_and_double_create(tmp_path):
    with pytest.raises(FileNotFoundError):
        TraceStore.open(tmp_path / "missing")
    TraceStore.create(tmp_path / "t", META)
    with pytest.raises(FileExistsError):
        TraceStore.create(tmp_path / "t", META)


def test_shape_mismatch_is_refused(tmp_path):
    store = TraceStore.create(tmp_path / "t", META)
    wrong_experts = make_record("x", [1], [0, 0, 1], [[1, 0, 0, 1, 0], [0, 0, 2, 0, 0]])
    with pytest.raises(ValueError, match="prefill"):
        store.append(wrong_experts)
    wrong_routing = make_record("y", [1, 2], [0, 0, 1], [[1, 0, 0, 1], [0, 0, 2, 0]], token_routing=np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="token_routing"):
        store.append(wrong_routing)
    assert len(store) == 0 and (tmp_path / "t" / "records.jsonl").read_bytes() == b""


def test_corrupt_middle_line_is_an_error(tmp_path):
    store = TraceStore.create(tmp_path / "t", META)
    store.append(full_record("a"))
    with open(tmp_path / "t" / "records.jsonl", "ab") as handle:
        handle.write(b'{"request_id": "broken"\n')
    store.append(full_record("b"))
    with pytest.raises(TraceFormatError, match=":2"):
        list(TraceStore.open(tmp_path / "t"))


def test_split_is_deterministic_disjoint_and_keeps_repeated_prompts_together(tmp_path):
    store = TraceStore.create(tmp_path / "t", META)
    for index in range(200):
        record = full_record(f"req-{index}")
        object.__setattr__(record, "prompt_text", f"text {index % 50}")
        store.append(record)
    train, test = store.split(by="id hash", test_fraction=0.25, seed=3)
    train_again, test_again = TraceStore.open(tmp_path / "t").split(by="id hash", test_fraction=0.25, seed=3)
    assert [r.request_id for r in test] == [r.request_id for r in test_again]
    assert [r.request_id for r in train] == [r.request_id for r in train_again]
    assert not {r.request_id for r in train} & {r.request_id for r in test}
    assert len(train) + len(test) == 200 and 25 <= len(test) <= 75
    _, other_seed = store.split(by="id hash", test_fraction=0.25, seed=4)
    assert {r.request_id for r in other_seed} != {r.request_id for r in test}
    by_text_train, by_text_test = split_records(list(store), "text hash", 0.25, seed=3)
    assert not {r.prompt_text for r in by_text_train} & {r.prompt_text for r in by_text_test}
    with pytest.raises(ValueError):
        store.split(by="random")


def test_out_of_range_routing_is_refused(tmp_path):
    store = TraceStore.create(tmp_path / "t", META)
    bad = make_record("z", [1], [0, 0, 1], [[1, 0, 0, 1], [0, 0, 2, 0]], token_routing=[[[0, 4], [1, 2]]])
    with pytest.raises(ValueError, match="outside"):
        store.append(bad)
