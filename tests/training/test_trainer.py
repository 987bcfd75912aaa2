import json
import shutil

import pytest
import torch

from mambakit import load_pretrained
from mambakit.checkpoints import CheckpointError
from mambakit.cli import main
from mambakit.training import train
from mambakit.training.report import read_metrics
from mambakit.training.state import latest_checkpoint
from tests.training.helpers import tiny_settings, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A finished tiny run: 40 steps, evaluated and checkpointed every 20."""
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_settings(corpus, out, max_steps=40, eval_every=20, log_every=5, sample_tokens=20))
    return out, summary


def test_training_learns_and_writes_metrics_plot_and_a_loadable_model(trained, capsys):
    out, summary = trained
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(5, 45, 5))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in records)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(r["eval_ppl"] == pytest.approx(torch.tensor(r["eval_loss"]).exp().item(), rel=1e-5) for r in evals)
    # The corpus is repetitive: 40 steps take the model well below the unigram baseline.
    assert summary["eval_bpb"] < summary["baseline_bpb"] - 0.5
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    model = load_pretrained(out)
    assert model.config.vocab_size == 256 and type(model.tokenizer).__name__ == "ByteTokenizer"
    assert latest_checkpoint(out).name == "step-00000040"
    assert len(list((out / "training_state").iterdir())) == 1  # older checkpoints removed


def test_generate_samples_from_the_trained_model(trained, capsys):
    out, _ = trained
    main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0"])
    printed = capsys.readouterr().out
    expected = load_pretrained(out).generate([list(b"def ")], max_new_tokens=16, temperature=0)[0]
    assert printed == bytes(expected).decode("utf-8", errors="replace") + "\n"


def test_generate_with_a_draft_prints_the_greedy_output(trained, corpus, tmp_path, capsys):
    out, _ = trained
    draft = tmp_path / "draft"
    train(tiny_settings(corpus, draft, max_steps=4, seed=3))
    capsys.readouterr()  # the draft's training log
    main(["generate", "--model", str(out), "--draft", str(draft), "--prompt", "def ", "--max-new-tokens", "16",
          "--temperature", "0", "--draft-tokens", "3"])
    captured = capsys.readouterr()
    expected = load_pretrained(out).generate([list(b"def ")], max_new_tokens=16, temperature=0)[0]
    assert captured.out == bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert "draft tokens accepted" in captured.err
    with pytest.raises(SystemExit, match="greedy only"):
        main(["generate", "--model", str(out), "--draft", str(draft), "--prompt", "def "])


def test_resumed_run_gives_the_same_losses_bit_for_bit(corpus, tmp_path):
    whole = tmp_path / "whole"
    train(tiny_settings(corpus, whole, max_steps=8, grad_accum=2))
    split = tmp_path / "split"
    train(tiny_settings(corpus, split, max_steps=8, grad_accum=2, stop_at=4))
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4]
    train(tiny_settings(corpus, split, max_steps=8, grad_accum=2, resume=True))
    whole_records, split_records = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in split_records] == [r["step"] for r in whole_records] == list(range(1, 9))
    for a, b in zip(whole_records, split_records):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {k: v for k, v in b.items() if k != "tokens_per_s"}
    whole_weights = torch.load(whole / "pytorch_model.bin", weights_only=True)
    split_weights = torch.load(split / "pytorch_model.bin", weights_only=True)
    assert whole_weights.keys() == split_weights.keys()
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, split_weights[name]), name


def test_existing_runs_need_resume_and_the_same_settings(trained, corpus, tmp_path):
    out, _ = trained
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_settings(corpus, out, max_steps=40, eval_every=20))
    with pytest.raises(ValueError, match="--lr"):
        train(tiny_settings(corpus, out, max_steps=40, eval_every=20, log_every=5, lr=0.5, resume=True))
    with pytest.raises(ValueError, match="no checkpoint"):
        train(tiny_settings(corpus, tmp_path / "empty", resume=True))


@pytest.mark.parametrize("damage, message", [
    ("marker", "incomplete checkpoint"), ("truncate", "truncated or replaced"), ("garbage", "truncated or replaced"),
    ("missing", "missing"),
])
def test_corrupt_checkpoints_are_reported_not_restarted(trained, corpus, tmp_path, damage, message):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    step = latest_checkpoint(out)
    if damage == "marker":
        (step / "COMPLETE").unlink()
    elif damage == "truncate":
        data = (step / "optimizer.pt").read_bytes()
        (step / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        (step / "rng.pt").write_bytes(b"\x80not a tensor file")
    else:
        (step / "state.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        train(tiny_settings(corpus, out, max_steps=40, eval_every=20, log_every=5, resume=True))
    assert latest_checkpoint(out) == step  # nothing was overwritten


def test_same_size_corruption_is_caught_when_reading(trained, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    step = latest_checkpoint(out)
    size = (step / "optimizer.pt").stat().st_size
    (step / "optimizer.pt").write_bytes(b"\0" * size)
    with pytest.raises(CheckpointError, match="weights_only"):
        train(tiny_settings(corpus, out, max_steps=40, eval_every=20, log_every=5, resume=True))


@pytest.mark.parametrize("layer", ["mamba1", "mamba3"])
def test_other_layers_train(corpus, tmp_path, layer):
    summary = train(tiny_settings(corpus, tmp_path, layer=layer, max_steps=2, eval_every=2, seq_len=16, batch_size=2))
    assert summary["steps"] == 2 and summary["eval_loss"] > 0


def test_binary_run_resumes_bit_for_bit_and_loads(corpus, tmp_path):
    whole = tmp_path / "whole"
    train(tiny_settings(corpus, whole, max_steps=8, binary=True))
    split = tmp_path / "split"
    train(tiny_settings(corpus, split, max_steps=8, binary=True, stop_at=4))
    with pytest.raises(ValueError, match="--binary"):  # the flag is part of the trajectory
        train(tiny_settings(corpus, split, max_steps=8, resume=True))
    train(tiny_settings(corpus, split, max_steps=8, binary=True, resume=True))
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(whole)]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(split)]
    model = load_pretrained(split)
    assert model.config.binary_projections
    assert "backbone.layers.0.mixer.in_proj.alpha" in model.state_dict()


def test_moe_mamba_run_logs_expert_utilisation_and_resumes_bit_for_bit(corpus, tmp_path):
    settings = dict(arch="moe-mamba", mlp_size=16, experts=4, max_steps=6, eval_every=3, log_every=1)
    whole = tmp_path / "whole"
    summary = train(tiny_settings(corpus, whole, **settings))
    records = read_metrics(whole)
    assert len(records) == 6
    for record in records:
        assert record["aux_loss"] > 0
        assert sorted(record["expert_load"]) == ["0", "1"]  # the two tiny blocks, JSON keys
        for load in record["expert_load"].values():
            assert len(load) == 4 and abs(sum(load) - 1) < 1e-6
        assert all(0 <= d <= 1 for d in record["expert_dropped"].values())
    assert summary["active_parameters"] < summary["parameters"]
    split = tmp_path / "split"
    train(tiny_settings(corpus, split, stop_at=3, **settings))
    with pytest.raises(ValueError, match="--experts"):  # part of the trajectory
        train(tiny_settings(corpus, split, resume=True, **{**settings, "experts": 8}))
    train(tiny_settings(corpus, split, resume=True, **settings))
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(split)]
    assert load_pretrained(split).config.moe_layer_idx == [0, 1]


def test_jamba_run_trains(corpus, tmp_path):
    summary = train(tiny_settings(corpus, tmp_path, arch="jamba", mlp_size=16, n_layer=8, max_steps=2, eval_every=2,
                                  seq_len=16, batch_size=2))
    assert summary["steps"] == 2 and summary["eval_loss"] > 0
    model = load_pretrained(tmp_path)
    assert model.config.attn_layer_idx == [4] and model.config.moe_layer_idx == [1, 3, 5, 7]
