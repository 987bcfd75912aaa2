import pytest
import torch

from mambakit.cli import main
from tests.fixtures import tiny_model


def test_generate_streams_a_greedy_continuation(tmp_path, capsys):
    # A byte-level model (vocab 256): the CLI encodes the prompt as UTF-8 bytes.
    model = tiny_model("mamba2", dtype=torch.float32, vocab_size=256)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    main(["generate", "--model", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "0"])
    printed = capsys.readouterr().out
    expected_ids = model.generate([list(b"hello")], max_new_tokens=12, temperature=0)[0]
    assert printed == bytes(expected_ids).decode("utf-8", errors="replace") + "\n"


def test_generate_stops_at_eos_and_reports_bad_models(tmp_path, capsys):
    model = tiny_model("mamba1", dtype=torch.float32, vocab_size=256)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    first = model.generate([list(b"ab")], max_new_tokens=1, temperature=0)[0][-1]
    main(["generate", "--model", str(tmp_path), "--prompt", "ab", "--temperature", "0", "--eos-token-id", str(first)])
    assert capsys.readouterr().out == "ab\n"
    with pytest.raises(ValueError, match="not a directory"):
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
