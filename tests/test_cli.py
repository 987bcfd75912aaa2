import json

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


def test_train_command_runs_a_tiny_model_and_generate_reads_it(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "run"
    main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
          "--max-steps", "3", "--eval-every", "3", "--eval-windows", "2", "--warmup-steps", "1", "--sample-tokens", "8",
          "--sample-prompt", "def"])
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "--- sample" in printed
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3]
    main(["generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.parametrize("argv, message", [
    (["train", "--layer", "mamba4"], "invalid choice"),
    (["train", "--preset", "7b"], "invalid choice"),
    (["train", "--batch-size", "many"], "invalid int value"),
    (["task", "copying"], "invalid choice"),
])
def test_bad_train_and_task_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bad_train_values_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        main(["train", "--batch-size", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--data"):
        main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])
