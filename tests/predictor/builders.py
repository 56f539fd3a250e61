"""Builders for hand-made trace records."""

from __future__ import annotations

import numpy as np

from predictor.traces import TraceRecord


def make_record(
    request_id: str,
    token_ids,
    embedding,
    prefill,
    decode=None,
    new_tokens: int = 0,
    token_embeddings=None,
    gate_inputs=None,
    token_routing=None,
) -> TraceRecord:
    """A hand-made record; arrays are converted to the stored dtypes."""
    prefill = np.asarray(prefill, dtype=np.int64)
    return TraceRecord(
        request_id=request_id,
        prompt_text=f"prompt {request_id}",
        token_ids=np.asarray(token_ids, dtype=np.int64),
        embedding=np.asarray(embedding, dtype=np.float32),
        prefill=prefill,
        decode=np.zeros_like(prefill) if decode is None else np.asarray(decode, dtype=np.int64),
        new_tokens=new_tokens,
        token_embeddings=None if token_embeddings is None else np.asarray(token_embeddings, dtype=np.float32),
        gate_inputs=None if gate_inputs is None else np.asarray(gate_inputs, dtype=np.float32),
        token_routing=None if token_routing is None else np.asarray(token_routing, dtype=np.int16),
    )
