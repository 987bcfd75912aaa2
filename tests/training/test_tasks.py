import json

import pytest
import torch

from mambakit.training.tasks import IGNORE, associative_recall, induction_heads, run_task, selective_copying


def test_selective_copying_answers_are_the_data_tokens_in_order():
    g = torch.Generator().manual_seed(0)
    inputs, targets = selective_copying(5, context=20, n_memorize=4, vocab=10, generator=g)
    assert inputs.shape == targets.shape == (5, 24)
    for x, y in zip(inputs, targets):
        data = x[:20][x[:20] != 0]
        assert len(data) == 4 and ((data >= 1) & (data <= 8)).all()
        assert x[20] == 9 and torch.equal(x[21:], data[:3])  # separator, then the answers teacher-forced
        assert torch.equal(y[20:], data) and (y[:20] == IGNORE).all()


def test_induction_heads_answer_follows_the_earlier_trigger():
    g = torch.Generator().manual_seed(1)
    inputs, targets = induction_heads(8, length=32, vocab=16, generator=g)
    assert inputs.shape == targets.shape == (8, 32)
    assert (targets[:, :-1] == IGNORE).all() and (inputs[:, -1] == 15).all()
    for x, y in zip(inputs, targets):
        first = (x[:-1] == 15).nonzero().flatten()
        assert len(first) == 1 and y[-1] == x[first[0] + 1] and 1 <= y[-1] <= 14
    with pytest.raises(ValueError, match="length"):
        induction_heads(1, length=3)


def test_associative_recall_queries_ask_for_the_paired_values():
    g = torch.Generator().manual_seed(2)
    inputs, targets = associative_recall(4, n_pairs=6, n_queries=4, length=40, vocab=32, generator=g)
    assert inputs.shape == targets.shape == (4, 40)
    for x, y in zip(inputs, targets):
        pairs = dict(zip(x[0:12:2].tolist(), x[1:12:2].tolist()))
        assert len(pairs) == 6 and all(1 <= k < 16 and 16 <= v < 32 for k, v in pairs.items())
        asked = (y != IGNORE).nonzero().flatten()
        assert len(asked) == 4 and (asked >= 12).all()
        assert all(pairs[int(x[t])] == int(y[t]) for t in asked)
        assert (x[12:][(y[12:] == IGNORE)] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        associative_recall(1, n_pairs=20, n_queries=4, length=40, vocab=32)


def test_run_task_trains_evaluates_and_writes_results(tmp_path, capsys):
    summary = run_task("induction-heads", out=str(tmp_path), steps=3, max_test_len=128)
    assert set(summary["accuracy"]) == {"64", "128", "256"}
    assert all(0.0 <= v <= 1.0 for v in summary["accuracy"].values())
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == summary["accuracy"]
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 256 (train) |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--max-test-len"):
        run_task("induction-heads", out=str(tmp_path), steps=1, max_test_len=100)
    with pytest.raises(ValueError, match="task"):
        run_task("copying", out=str(tmp_path))
