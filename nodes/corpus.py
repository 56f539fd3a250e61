"""Training text for the bundled model, from what every machine of this project has.

Three domains, so that routing has something to learn:
- math:  GSM8K training problems and worked answers (`../shared/data/prompts/gsm8k_train.jsonl`)
- code:  the Python standard library's own source files (the interpreter running this)
- prose: the Python language reference's prose (`pydoc_data.topics`) and the licence texts in
         /usr/share/common-licenses (when present)

Every document is labelled with its domain; the order is fixed by a seed.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def shared_data_dir() -> Path:
    """../shared/data/prompts beside the repository (tests and CI have it there)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (base, *base.parents):
            candidate = parent / "shared" / "data" / "prompts"
            if candidate.is_dir():
                return candidate
    return SHARED_DATA


@dataclass(frozen=True)
class Document:
    domain: str
    text: str


def math_documents(limit_chars: int) -> list[Document]:
    path = shared_data_dir() / "gsm8k_train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: GSM8K training split not found; the bundled model's "
                                "training needs ../shared/data/prompts beside the repository")
    docs, used = [], 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        text = f"Question: {row['question']}\nAnswer: {row['answer']}\n"
        docs.append(Document("math", text))
        used += len(text)
        if used >= limit_chars:
            break
    return docs


def code_documents(limit_chars: int) -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, used = [], 0
    for file in sorted(stdlib.glob("*.py")):
        text = file.read_text(errors="replace")
        for chunk in text.split("\n\n\n"):  # top-level definitions
            if len(chunk) > 80:
                docs.append(Document("code", chunk.strip() + "\n"))
                used += len(chunk)
        if used >= limit_chars:
            break
    return docs


def prose_documents(limit_chars: int) -> list[Document]:
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    licences = Path("/usr/share/common-licenses")
    if licences.is_dir():
        texts += [f.read_text(errors="replace") for f in sorted(licences.iterdir()) if f.is_file()]
    docs, used = [], 0
    for text in texts:
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 60 and not para.startswith((">>>", "...")):
                docs.append(Document("prose", para + "\n"))
                used += len(para)
        if used >= limit_chars:
            break
    return docs


def build_corpus(chars_per_domain: int = 1_000_000, seed: int = 0) -> list[Document]:
    docs = math_documents(chars_per_domain) + code_documents(chars_per_domain) + prose_documents(chars_per_domain)
    random.Random(seed).shuffle(docs)
    return docs
