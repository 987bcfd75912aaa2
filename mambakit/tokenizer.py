"""Tokenizers: a checkpoint's own (``tokenizers`` package, optional) or a built-in byte-level one."""

from __future__ import annotations

import codecs
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (no download, no vocabulary file)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function token_id -> newly completed text; partial UTF-8 sequences are held back until
        complete, and ``token_id=None`` flushes what is left."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def push(token_id) -> str:
            if token_id is None:
                return decoder.decode(b"", final=True)
            return decoder.decode(bytes([int(token_id)])) if 0 <= int(token_id) < 256 else ""

        return push


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def stream_decoder(self):
        ids: list[int] = []
        emitted = ""

        def push(token_id) -> str:
            nonlocal emitted
            if token_id is not None:
                ids.append(int(token_id))
            text = self._tok.decode(ids)
            if token_id is not None and text.endswith("\ufffd"):  # incomplete character: wait for more
                return ""
            new, emitted = text[len(emitted):], text
            return new

        return push


def load_tokenizer(directory) -> ByteTokenizer | HFTokenizer:
    """The directory's tokenizer.json if present and ``tokenizers`` is installed, else bytes."""
    path = Path(directory) / "tokenizer.json"
    if path.exists():
        try:
            return HFTokenizer(path)
        except ImportError:
            pass
    return ByteTokenizer()
