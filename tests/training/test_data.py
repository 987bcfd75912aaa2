import math

import numpy as np
import pytest

from mambakit.training.data import (batch_starts, bits_per_byte, eval_starts, is_held_out, load_corpus, stdlib_files,
                                    unigram_bits, windows)
from tests.training.helpers import write_corpus


def test_default_corpus_is_the_stdlib_split_by_a_stable_path_hash():
    root, files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    held_out = [f for f in files if is_held_out(f.relative_to(root).as_posix())]
    assert 0.02 < len(held_out) / len(files) < 0.08
    assert is_held_out("os.py") == is_held_out("os.py")  # pure function of the path, no salted hash()
    corpus = load_corpus()
    assert corpus.train.dtype == np.uint8 and corpus.vocab_size == 256 and corpus.bytes_per_token == 1.0
    assert len(corpus.val) == sum(f.stat().st_size for f in held_out)
    assert len(corpus.train) + len(corpus.val) == sum(f.stat().st_size for f in files)


def test_directory_file_and_bin_sources(tmp_path):
    write_corpus(tmp_path / "docs")
    directory = load_corpus(str(tmp_path / "docs"))
    total = sum(p.stat().st_size for p in (tmp_path / "docs").iterdir())
    assert len(directory.train) + len(directory.val) == total and len(directory.val) > 0
    one = load_corpus(str(tmp_path / "docs" / "module_000.py"))
    size = (tmp_path / "docs" / "module_000.py").stat().st_size
    assert len(one.val) == size * 5 // 100 and len(one.train) == size - len(one.val)
    ids = np.arange(2000, dtype=np.uint16) % 1000
    ids.tofile(tmp_path / "tokens.bin")
    tokens = load_corpus(str(tmp_path / "tokens.bin"))
    assert isinstance(tokens.train, np.memmap) and tokens.vocab_size == 1000 and tokens.bytes_per_token is None
    assert np.array_equal(np.concatenate([tokens.train, tokens.val]), ids)
    with pytest.raises(ValueError, match="--data"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="--data"):
        load_corpus(str(tmp_path / "odd.bin"))
    with pytest.raises(ValueError, match="--tokenizer"):
        load_corpus(str(tmp_path / "docs"), tokenizer_dir=str(tmp_path))


def test_text_with_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["def", "return", "(", ")", ":", "+", "alpha", "beta"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("def alpha ( beta ) : return beta + alpha\n" * 50)
    corpus = load_corpus(str(tmp_path / "a.txt"), tokenizer_dir=str(tmp_path))
    assert corpus.vocab_size == 9 and corpus.train.dtype == np.uint16
    assert corpus.bytes_per_token == pytest.approx(42 / 10, rel=0.05)  # 42 bytes per line of 10 words


def test_batches_depend_only_on_seed_and_step():
    a = batch_starts(10_000, 32, 8, seed=1, step=5)
    assert a.shape == (8,) and np.array_equal(a, batch_starts(10_000, 32, 8, seed=1, step=5))
    assert not np.array_equal(a, batch_starts(10_000, 32, 8, seed=1, step=6))
    assert not np.array_equal(a, batch_starts(10_000, 32, 8, seed=2, step=5))
    assert a.min() >= 0 and a.max() <= 10_000 - 33
    tokens = np.arange(100, dtype=np.uint8)
    x, y = windows(tokens, np.array([0, 50]), 10)
    assert x.shape == y.shape == (2, 10) and x.dtype.is_floating_point is False
    assert x[1, 0] == 50 and (y == x + 1).all()
    with pytest.raises(ValueError, match="--seq-len"):
        batch_starts(10, 32, 1, 0, 0)


def test_eval_windows_do_not_overlap_and_cover_the_split():
    starts = eval_starts(1000, 32, 8)
    assert len(starts) == 8 and starts[0] == 0 and (np.diff(starts) >= 32).all() and starts[-1] + 33 <= 1000
    assert len(eval_starts(100, 32, 8)) == 3


def test_unigram_bits_and_bits_per_byte():
    assert unigram_bits(np.array([0, 1, 2, 3] * 10, dtype=np.uint8), 256) == pytest.approx(2.0)
    assert unigram_bits(np.zeros(10, dtype=np.uint8), 256) == 0.0
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 4, 2.0) == pytest.approx(2.0)
    assert bits_per_byte(1.0, None) is None


def test_gensim_wiki_sample_is_found_without_importing_gensim(tmp_path, monkeypatch):
    """A stand-in gensim package (its __init__ would fail if imported) holding the sample file."""
    import bz2
    import sys

    from mambakit.training import data

    package = tmp_path / "gensim"
    sample = package / data._GENSIM_WIKI_FILE
    sample.parent.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('gensim needs scipy')\n")
    text = b"<page><title>Anarchism</title><text>" + bytes(range(32, 127)) * 300 + b"</text></page>"
    sample.write_bytes(bz2.compress(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gensim", raising=False)
    corpus = load_corpus("gensim-wiki")
    cut = len(text) - len(text) * 5 // 100
    assert bytes(corpus.train) == text[:cut] and bytes(corpus.val) == text[cut:]
    assert corpus.vocab_size == 256 and corpus.bytes_per_token == 1.0 and "gensim" in corpus.description
    sample.unlink()
    with pytest.raises(ValueError, match="missing from the installed gensim"):
        load_corpus("gensim-wiki")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install gensim"):
        load_corpus("gensim-wiki")
