"""VisionMamba: shapes, the class token in the middle, input checks, and learning a toy task."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.models import VisionMamba


@pytest.mark.parametrize("layer", ["mamba1", "mamba2", "mamba3"])
def test_logits_shape(layer):
    kwargs = {"d_state": 4} if layer == "mamba1" else {"d_state": 8, "headdim": 8, "chunk_size": 4}
    model = VisionMamba((8, 12), 4, 3, 5, d_model=16, n_layers=2, layer=layer, layer_kwargs=kwargs)
    assert model(torch.rand(2, 3, 8, 12)).shape == (2, 5)
    assert model.class_position == 3  # 6 patches: the class token goes at index 3 of 7


def test_class_token_reads_patches_on_both_sides():
    """Patches before and after the class token both reach the logits."""
    torch.manual_seed(0)
    model = VisionMamba(8, 2, 1, 4, d_model=16, n_layers=1, layer_kwargs={"d_state": 4})
    images = torch.rand(1, 1, 8, 8)
    base = model(images)
    for rows in (slice(0, 2), slice(6, 8)):  # the first and the last row of patches
        changed = images.clone()
        changed[..., rows, :] += 1.0
        assert not torch.allclose(model(changed), base)


def test_input_errors():
    model = VisionMamba(8, 2, 1, 4, d_model=16, n_layers=1, layer_kwargs={"d_state": 4})
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 8, 6))
    with pytest.raises(TypeError, match="images"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="image_size"):
        VisionMamba(9, 2, 1, 4)
    with pytest.raises(ValueError, match="layer"):
        VisionMamba(8, 2, 1, 4, layer="lstm")


def test_learns_where_the_bright_quadrant_is():
    """Four classes: which quadrant of an 8x8 noise image holds a bright square."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (256,), generator=generator)
    images = 0.3 * torch.rand(256, 1, 8, 8, generator=generator)
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.7
    torch.manual_seed(0)
    model = VisionMamba(8, 2, 1, 4, d_model=16, n_layers=1, layer_kwargs={"d_state": 4})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model(images).argmax(-1) == labels).float().mean() > 0.95
