"""The model's tokenizer (`tokenizer.json`, read by the `tokenizers` library) with streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, inner: _HFTokenizer) -> None:
        self.inner = inner

    @staticmethod
    def from_dir(path: str | Path) -> Tokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{file}: missing; a model directory needs tokenizer.json "
                                    "(or pass token ids directly)")
        return Tokenizer(_HFTokenizer.from_file(str(file)))

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def token_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more tokens
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
