"""The token stream the routing statistics are measured on: real text, multi-domain, 512-token sequences.

Domains (as the LRC corpus mixes web, code, math and chat): GSM8K training problems (math),
the Python standard library (code), the Python reference and licence texts (prose), MT-bench
questions (chat), all from nodes/corpus.py's sources and ../shared/data/prompts, tokenized by
the bundled tokenizer. Each sequence is documents of one domain concatenated up to `seq_len`
tokens; domains alternate, so every measured window mixes them like a serving batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nodes.corpus import code_documents, math_documents, prose_documents, shared_data_dir
from nodes.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Sequence:
    domain: str
    ids: list[int]


def chat_texts() -> list[str]:
    path = shared_data_dir() / "mt_bench.jsonl"
    if not path.exists():
        return []
    return ["\n".join(json.loads(line)["turns"]) + "\n" for line in path.read_text().splitlines()]


def build_stream(tokenizer: Tokenizer, tokens: int, seq_len: int = 512) -> list[Sequence]:
    """About `tokens` tokens in sequences of `seq_len` (the last of a domain may be shorter)."""
    per_domain_chars = max(20_000, tokens * 6)
    sources = {
        "math": [d.text for d in math_documents(per_domain_chars)],
        "code": [d.text for d in code_documents(per_domain_chars)],
        "prose": [d.text for d in prose_documents(per_domain_chars)],
        "chat": chat_texts(),
    }
    packed: dict[str, list[list[int]]] = {}
    for domain, texts in sources.items():
        seqs, current = [], []
        for text in texts:
            current.extend(tokenizer.encode(text))
            while len(current) >= seq_len:
                seqs.append(current[:seq_len])
                current = current[seq_len:]
        packed[domain] = seqs
    out, used, index = [], 0, 0
    while used < tokens:
        progressed = False
        for domain, seqs in packed.items():
            if index < len(seqs) and used < tokens:
                out.append(Sequence(domain, seqs[index]))
                used += len(seqs[index])
                progressed = True
        if not progressed:
            break
        index += 1
    return out


CALIBRATION = Path(__file__).resolve().parent / "calibration_tokens.u16"
CALIBRATION_SEQUENCES, CALIBRATION_LEN = 64, 512


def calibration_tokens() -> torch.Tensor:
    """[64, 512] int64 token ids the router is balanced on (design.py), shipped with the package.

    Made by `python -m nodes.synth.stream` from the *last* documents of each domain, so they do
    not overlap the first documents that `build_stream` measures on: little-endian uint16.
    """
    raw = np.frombuffer(CALIBRATION.read_bytes(), dtype="<u2")
    return torch.from_numpy(raw.astype(np.int64)).view(CALIBRATION_SEQUENCES, CALIBRATION_LEN)


def write_calibration(tokenizer: Tokenizer) -> Path:
    per = CALIBRATION_SEQUENCES // 4
    tails = {
        "math": [d.text for d in math_documents(10**9)][-400:],
        "code": [d.text for d in code_documents(3_000_000)][-600:],
        "prose": [d.text for d in prose_documents(10**9)][-400:],
        "chat": chat_texts()[::-1],
    }
    rows = []
    for texts in tails.values():
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text))
        got = [ids[i: i + CALIBRATION_LEN] for i in range(0, len(ids) - CALIBRATION_LEN + 1, CALIBRATION_LEN)][:per]
        while len(got) < per:  # a short domain (chat) repeats
            got.append(got[len(got) % max(1, len(got))])
        rows.extend(got)
    CALIBRATION.write_bytes(np.asarray(rows, dtype="<u2").tobytes())
    return CALIBRATION


if __name__ == "__main__":
    from nodes.synth.design import BUNDLED

    print(write_calibration(Tokenizer.from_dir(BUNDLED)))
