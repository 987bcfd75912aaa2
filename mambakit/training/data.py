"""Training data: a token stream split into train and held-out parts, and the batches drawn from it.

Sources: the Python standard library's own ``*.py`` files as bytes (the default: on every machine,
nothing to download), ``gensim-wiki`` (the 6 MB English Wikipedia XML sample that ships in
``gensim``'s test data, read as bytes; gensim need only be installed, not importable), a text
file, a directory of text files (bytes, or ids from a ``tokenizer.json``), or a ``.bin`` of uint16
token ids (memory-mapped, never read whole).

Batch ``step`` is a pure function of (seed, step): random windows drawn by a generator seeded
with both. A resumed run therefore needs only the step to continue the same data order.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_PERCENT = 5  # share of files (by path hash) or of the token stream held out
_UNIGRAM_MAX_TOKENS = 1 << 27  # count at most this many tokens for the unigram baseline
GENSIM_WIKI = "gensim-wiki"
_GENSIM_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass
class Corpus:
    """Token ids as 1-D numpy arrays (uint8 for bytes, uint16 or int32 for token ids).

    Attributes:
        train, val: the two splits, (n_train,) and (n_val,).
        vocab_size: ids lie in [0, vocab_size).
        bytes_per_token: UTF-8 bytes per token in the held-out text (1.0 for bytes); None when
            unknown (``.bin`` data), in which case no bits-per-byte is reported.
        description: one line for the log.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    bytes_per_token: float | None
    description: str


def is_held_out(relative_path: str) -> bool:
    """Whether a file belongs to the held-out split: a stable hash of its relative path (the same
    on every machine and Python version, unlike ``hash``)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % 100 < VAL_PERCENT


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted *.py files) of this Python's standard library, third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if not files:
        raise ValueError(f"--data: the standard library at {root} has no .py files; pass --data PATH")
    return root, files


def gensim_wiki_bytes() -> tuple[Path, bytes]:
    """-> (path, the decompressed XML) of gensim's English Wikipedia test sample. The package is
    located without being imported (its own dependencies need not be installed)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--data {GENSIM_WIKI}: needs the gensim package installed (pip install gensim), "
                         "whose test data holds the Wikipedia sample")
    path = Path(list(spec.submodule_search_locations)[0]) / _GENSIM_WIKI_FILE
    if not path.is_file():
        raise ValueError(f"--data {GENSIM_WIKI}: {path} is missing from the installed gensim")
    return path, bz2.decompress(path.read_bytes())


def _text_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise ValueError(f"--data: {directory} holds no files")
    return files


def _split_files(root: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    train = [f for f in files if not is_held_out(f.relative_to(root).as_posix())]
    val = [f for f in files if is_held_out(f.relative_to(root).as_posix())]
    return train, val


def _encode(texts: list[bytes], tokenizer) -> np.ndarray:
    if tokenizer is None:
        return np.frombuffer(b"".join(texts), dtype=np.uint8)
    ids = [i for t in texts for i in tokenizer.encode(t.decode("utf-8", errors="replace"))]
    return np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32)


def load_corpus(data: str | None = None, tokenizer_dir: str | None = None) -> Corpus:
    """Read ``data`` (see the module docstring) and split it.

    Files of a directory go to the held-out split by :func:`is_held_out`; a single file or a
    ``.bin`` holds out its last 5%, as does a directory whose files all land on one side.
    """
    tokenizer = None
    if tokenizer_dir is not None:
        from ..tokenizer import HFTokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"--tokenizer: {path} does not exist")
        tokenizer = HFTokenizer(path)
    if data is not None and str(data).endswith(".bin"):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"--data: {path} does not exist")
        if path.stat().st_size % 2 or path.stat().st_size < 4:
            raise ValueError(f"--data: {path} is not a file of uint16 token ids (size {path.stat().st_size} bytes)")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        cut = len(tokens) - max(1, len(tokens) * VAL_PERCENT // 100)
        vocab = tokenizer.vocab_size if tokenizer else int(tokens[:_UNIGRAM_MAX_TOKENS].max()) + 1
        return Corpus(tokens[:cut], tokens[cut:], vocab, None, f"{path}: {len(tokens):,} uint16 token ids")
    if data == GENSIM_WIKI:
        path, stream = gensim_wiki_bytes()
        cut = len(stream) - len(stream) * VAL_PERCENT // 100
        train, val = _encode([stream[:cut]], tokenizer), _encode([stream[cut:]], tokenizer)
        unit = "tokens" if tokenizer else "bytes"
        return Corpus(train, val, tokenizer.vocab_size if tokenizer else 256, (len(stream) - cut) / len(val),
                      f"Wikipedia XML sample of gensim ({path}): {len(train):,} train / {len(val):,} held-out {unit}")
    if data is None:
        root, files = stdlib_files()
        name = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root = Path(data)
        if root.is_dir():
            files = _text_files(root)
        elif root.is_file():
            root, files = root.parent, [root]
        else:
            raise ValueError(f"--data: {data} is neither a file nor a directory")
        name = str(data)
    train_files, val_files = _split_files(root, files)
    if train_files and val_files:
        train_bytes = [f.read_bytes() for f in train_files]
        val_bytes = [f.read_bytes() for f in val_files]
    else:
        stream = b"".join(f.read_bytes() for f in files)
        cut = len(stream) - len(stream) * VAL_PERCENT // 100
        train_bytes, val_bytes = [stream[:cut]], [stream[cut:]]
    train, val = _encode(train_bytes, tokenizer), _encode(val_bytes, tokenizer)
    if len(val) < 2 or len(train) < 2:
        raise ValueError(f"--data: {data} is too small to split into train and held-out parts")
    n_val_bytes = sum(len(b) for b in val_bytes)
    vocab = tokenizer.vocab_size if tokenizer else 256
    unit = "tokens" if tokenizer else "bytes"
    description = f"{name}: {len(files):,} files, {len(train):,} train / {len(val):,} held-out {unit}"
    return Corpus(train, val, vocab, n_val_bytes / len(val), description)


def unigram_bits(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in bits per token of the token frequencies in ``tokens`` (its first 2^27 tokens):
    the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens[:_UNIGRAM_MAX_TOKENS]), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """(batch_size,) start offsets of the windows of step ``step``: uniform in
    [0, n_tokens - seq_len - 1], from a generator seeded with (seed, step)."""
    if n_tokens < seq_len + 1:
        raise ValueError(f"--seq-len: {seq_len} needs at least {seq_len + 1} training tokens, the data has {n_tokens}")
    return np.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, size=batch_size)


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(starts), seq_len) int64, on ``device``."""
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    batch = torch.from_numpy(rows)
    if device is not None and torch.device(device).type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def eval_starts(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Start offsets of up to ``count`` non-overlapping held-out windows, spread evenly over the split."""
    available = (n_tokens - 1) // seq_len
    if available < 1:
        raise ValueError(f"--seq-len: {seq_len} is longer than the held-out split ({n_tokens} tokens)")
    count = min(count, available)
    return np.linspace(0, (available - 1) * seq_len, count).astype(np.int64) // seq_len * seq_len


def bits_per_byte(loss_nats: float, bytes_per_token: float | None) -> float | None:
    """Cross-entropy in nats per token -> bits per byte of text (None if bytes/token is unknown)."""
    return None if bytes_per_token is None else loss_nats / math.log(2) / bytes_per_token
