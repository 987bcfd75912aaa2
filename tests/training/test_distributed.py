"""Two CPU processes over gloo give the losses of one process with the same global batch."""

import os
import socket

import pytest
import torch.multiprocessing as mp

from mambakit.training import train
from mambakit.training.report import read_metrics
from tests.training.helpers import tiny_settings, write_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from mambakit.training import TrainConfig

    train(TrainConfig(**settings))


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, dist):
    corpus = write_corpus(tmp_path / "corpus", n_files=10)
    single = tiny_settings(corpus, tmp_path / "single", max_steps=4, eval_every=2, grad_accum=2, device="cpu")
    train(single)
    double = tiny_settings(corpus, tmp_path / "double", max_steps=4, eval_every=2, grad_accum=2, device="cpu", dist=dist)
    mp.spawn(_worker, args=(2, _free_port(), double.to_dict()), nprocs=2, join=True)
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b.get("eval_loss", 0) == pytest.approx(a.get("eval_loss", 0), rel=1e-5)
    # The checkpoint gathered from the shards resumes in a single process.
    train(tiny_settings(corpus, tmp_path / "double", max_steps=4, eval_every=2, grad_accum=2, device="cpu", dist=dist,
                        resume=True))
    assert (tmp_path / "double" / "pytorch_model.bin").exists()
