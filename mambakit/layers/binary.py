"""1-bit linear layers (Bi-Mamba): W_hat = alpha * sign(W) + beta, alpha and beta per input column.

Training keeps the latent full-precision W and passes the gradient of sign() straight through
(clipped to |W| <= 1). ``binarize_projections`` swaps a model's Mamba in_proj / out_proj for
binary layers (embeddings, convs, A, D, dt_bias, norms and the head stay full precision);
``pack_binary`` / ``unpack_binary`` store them as 1 bit per weight plus the fp32 scales.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SignSTE(torch.autograd.Function):
    """sign(w) (+1 for w >= 0) forward; gradient passed through where |w| <= 1."""

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * (weight.abs() <= 1).to(grad.dtype)


class BinaryLinear(nn.Module):
    """y = x W_hat^T + bias with W_hat[i, j] = alpha[j] sign(W[i, j]) + beta[j].

    Args: in_features, out_features, bias (default True), device, dtype. ``from_linear`` builds one
    from an ``nn.Linear``, with alpha and beta initialised from the weight statistics per input
    column: beta = mean_i W[i, j], alpha = mean_i |W[i, j] - beta[j]|.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.alpha = nn.Parameter(torch.empty(in_features, **factory))
        self.beta = nn.Parameter(torch.empty(in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_scales()

    @torch.no_grad()
    def reset_scales(self) -> None:
        """alpha and beta from the current latent weight's column statistics."""
        self.beta.copy_(self.weight.mean(0))
        self.alpha.copy_((self.weight - self.beta).abs().mean(0))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BinaryLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_scales()
        return layer

    def binary_weight(self) -> torch.Tensor:
        """W_hat (out_features, in_features)."""
        return self.alpha * _SignSTE.apply(self.weight) + self.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def binarize_projections(model: nn.Module) -> list[str]:
    """Replace, in place, the in_proj and out_proj ``nn.Linear`` of every module that has a
    ``mix_projected`` method (the Mamba mixers) with ``BinaryLinear``; return their names."""
    replaced = []
    for name, module in model.named_modules():
        if not hasattr(module, "mix_projected"):
            continue
        for attr in ("in_proj", "out_proj"):
            linear = getattr(module, attr, None)
            if isinstance(linear, nn.Linear):
                setattr(module, attr, BinaryLinear.from_linear(linear))
                replaced.append(f"{name}.{attr}" if name else attr)
    return replaced


def pack_binary(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``BinaryLinear`` of ``model`` as 1 bit per weight: ``NAME.sign_bits`` (uint8, 8 signs
    per byte, row-major, last byte zero-padded), ``NAME.shape`` (int64 (out, in)), and its
    ``alpha``, ``beta`` and ``bias`` in their own dtype."""
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            bits = (module.weight.detach() >= 0).flatten().to(torch.uint8).cpu()
            bits = F.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
            packed[f"{name}.sign_bits"] = (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
            packed[f"{name}.shape"] = torch.tensor(module.weight.shape, dtype=torch.int64)
            for key in ("alpha", "beta", "bias"):
                if getattr(module, key) is not None:
                    packed[f"{name}.{key}"] = getattr(module, key).detach().cpu().clone()
    return packed


@torch.no_grad()
def unpack_binary(model: nn.Module, packed: dict[str, torch.Tensor]) -> None:
    """Load ``pack_binary``'s output into the ``BinaryLinear`` layers of ``model`` (same
    architecture): latent weights become +-1, which give the same W_hat as the packed model."""
    for name, module in model.named_modules():
        if not isinstance(module, BinaryLinear):
            continue
        if f"{name}.sign_bits" not in packed:
            raise KeyError(f"packed: no entry for binary layer {name!r}")
        shape = tuple(packed[f"{name}.shape"].tolist())
        if shape != tuple(module.weight.shape):
            raise ValueError(f"packed: {name} has shape {shape}, the model expects {tuple(module.weight.shape)}")
        bits = (packed[f"{name}.sign_bits"][:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        signs = bits.flatten()[: module.weight.numel()].view(shape).to(module.weight.dtype) * 2 - 1
        module.weight.copy_(signs)
        for key in ("alpha", "beta", "bias"):
            if getattr(module, key) is not None:
                getattr(module, key).copy_(packed[f"{name}.{key}"])
