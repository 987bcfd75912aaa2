"""Causal depthwise 1D convolution: the reference and the CPU path.

Each channel c of x (b, d, l) is convolved with its own filter weight[c] of width w, looking only
backwards:

    y_t = act(bias + sum_{k=0..w-1} weight[:, k] * x_{t-(w-1)+k})

where x_s for s < 0 is taken from ``initial_state`` (the w - 1 inputs before x_0, zeros by
default). This is ``torch.nn.Conv1d(d, d, w, groups=d, padding=w - 1)`` truncated to its first l
outputs, with ``weight = conv.weight[:, 0, :]``, and the convention of the official
``causal_conv1d_fn`` / ``causal_conv1d_update`` (layout (b, d, l), weight (d, w)).

The decode step keeps the last w - 1 inputs as a state (b, d, w - 1): one step shifts it left by
one, appends the new input and takes the dot product of the window with the filter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import (
    INDEX_DTYPES,
    compute_dtype,
    expect_choice,
    expect_same_device,
    expect_shape,
    expect_tensor,
)
from ..common.segments import canonical_segments

ACTIVATIONS = (None, "silu", "swish")  # "swish" is the official alias of "silu"


def _activate(y, activation):
    return y if activation is None else F.silu(y)


def final_conv_state(padded, segment, l):
    """The last w - 1 entries of ``padded`` = cat([initial_state, x], -1) (b, d, w - 1 + l); with
    canonical segments (b, l), entries of an earlier sequence than the last token's are zeroed."""
    final = padded[..., l:]
    if segment is None:
        return final
    w1 = final.shape[-1]
    seg_padded = torch.cat([segment.new_zeros(segment.shape[0], w1), segment], dim=-1)
    keep = seg_padded[:, l:] == segment[:, -1:]  # (b, w - 1)
    return final * keep[:, None, :].to(final.dtype)


def _expect_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _expect_weight(weight, d):
    expect_tensor("weight", weight, ndim=2)
    if weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(
            f"weight: expected shape (d, w) with d = {d} and a width w >= 1, got {tuple(weight.shape)}"
        )
    return weight.shape[1]


# ----------------------------------------------------------------------------------------------
# Full sequence
# ----------------------------------------------------------------------------------------------


def validate_conv(x, weight, bias, activation, initial_state, return_final_state, seq_idx) -> None:
    """Every input check of :func:`causal_conv1d`, before any compute."""
    expect_tensor("x", x, ndim=3)
    b, d, l = x.shape
    if l == 0:
        raise ValueError("x: expected a sequence length l >= 1, got 0 (shape (b, d, l))")
    w = _expect_weight(weight, d)
    if bias is not None:
        expect_tensor("bias", bias, ndim=1)
        expect_shape("bias", bias, (d,), "(d,)")
    expect_choice("activation", activation, ACTIVATIONS)
    if initial_state is not None:
        expect_tensor("initial_state", initial_state, ndim=3)
        expect_shape("initial_state", initial_state, (b, d, w - 1), "(b, d, w - 1)")
    _expect_bool("return_final_state", return_final_state)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES)
        expect_shape("seq_idx", seq_idx, (b, l), "(b, l)")
    expect_same_device(x=x, weight=weight, bias=bias, initial_state=initial_state, seq_idx=seq_idx)


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """Causal depthwise convolution over the last axis, ``causal_conv1d_fn`` conventions.

    ``y_t = act(bias + sum_k weight[:, k] * x_{t-(w-1)+k})`` per channel, with the w - 1 inputs
    before x_0 taken from ``initial_state``. The math runs in float32 (float64 if any input is
    float64); there is no Python loop over time.

    Args:
        x: (b, d, l) inputs, float16/bfloat16/float32/float64; l >= 1, any length (also shorter
            than w - 1).
        weight: (d, w) one filter per channel, any float dtype, w >= 1; weight[:, -1] multiplies
            the current input x_t.
        bias: (d,) any float dtype, default None (no bias).
        activation: None (default, identity), "silu" or its alias "swish", applied after the bias.
        initial_state: (b, d, w - 1) the inputs x_{-(w-1)} .. x_{-1}, any float dtype, default
            None (zeros).
        return_final_state: bool, default False; also return the last w - 1 inputs, the state a
            decode step (:func:`causal_conv1d_update`) continues from.
        seq_idx: (b, l) int32/int64 ids of sequences packed in one row, default None. A new
            sequence starts wherever the id changes between consecutive tokens; its outputs see
            no input of the previous sequence (those count as zeros), and ``initial_state``
            applies to the first sequence of each row only.

    Returns:
        y (b, d, l) in x's dtype; with ``return_final_state`` the pair (y, final_state
        (b, d, w - 1) in x's dtype), final_state being the last w - 1 entries of
        ``cat([initial_state, x], -1)`` (zeros standing for a missing initial_state). With
        ``seq_idx``, entries that belong to an earlier sequence than the last token's are
        zeroed, so the state is exactly the one that continues the last packed sequence.

    Example:
        >>> b, d, l, w = 2, 8, 10, 4
        >>> x, weight, bias = torch.randn(b, d, l), torch.randn(d, w), torch.randn(d)
        >>> y, state = causal_conv1d_reference(x, weight, bias, activation="silu", return_final_state=True)
        >>> y.shape, state.shape
        (torch.Size([2, 8, 10]), torch.Size([2, 8, 3]))
        >>> torch.allclose(state, x[..., -3:])
        True

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or option values.
    """
    validate_conv(x, weight, bias, activation, initial_state, return_final_state, seq_idx)
    b, d, l = x.shape
    w = weight.shape[1]
    cdtype = compute_dtype(x, weight, bias, initial_state)
    xc, wc = x.to(cdtype), weight.to(cdtype)
    bc = None if bias is None else bias.to(cdtype)
    if initial_state is None:
        state = xc.new_zeros(b, d, w - 1)
    else:
        state = initial_state.to(cdtype)
    padded = torch.cat([state, xc], dim=-1)  # (b, d, w - 1 + l)

    if seq_idx is None:
        # A grouped conv with one group per channel is the depthwise conv; the left padding is
        # the state, so the "valid" output has exactly l columns.
        y = F.conv1d(padded, wc[:, None, :], bc, groups=d)  # (b, d, l)
        final = final_conv_state(padded, None, l)
    else:
        segment = canonical_segments(seq_idx)  # (b, l)
        # The state positions belong to the first sequence (id 0).
        seg_padded = torch.cat([segment.new_zeros(b, w - 1), segment], dim=-1)  # (b, w - 1 + l)
        windows = padded.unfold(-1, w, 1)  # (b, d, l, w): windows[..., t, k] = x_{t-(w-1)+k}
        seen = seg_padded.unfold(-1, w, 1) == segment[:, :, None]  # (b, l, w)
        # [b, d, l, w] * [b, 1, l, w] . [d, w] -> [b, d, l]
        y = torch.einsum("bdlw,blw,dw->bdl", windows, seen.to(cdtype), wc)
        if bc is not None:
            y = y + bc[:, None]
        final = final_conv_state(padded, segment, l)

    y = _activate(y, activation).to(x.dtype)
    return (y, final.to(x.dtype)) if return_final_state else y


# ----------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------


def validate_update(x, conv_state, weight, bias, activation) -> None:
    """Every input check of :func:`causal_conv1d_update`, before any compute."""
    expect_tensor("x", x, ndim=2)
    b, d = x.shape
    w = _expect_weight(weight, d)
    expect_tensor("conv_state", conv_state, ndim=3)
    expect_shape("conv_state", conv_state, (b, d, w - 1), "(b, d, w - 1)")
    if bias is not None:
        expect_tensor("bias", bias, ndim=1)
        expect_shape("bias", bias, (d,), "(d,)")
    expect_choice("activation", activation, ACTIVATIONS)
    expect_same_device(x=x, conv_state=conv_state, weight=weight, bias=bias)


def causal_conv1d_update_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step of :func:`causal_conv1d_reference`; updates ``conv_state`` in place.

    The window is ``cat([conv_state, x[..., None]], -1)`` (b, d, w); the output is
    ``act(bias + sum_k weight[:, k] * window[..., k])`` and the state becomes ``window[..., 1:]``
    (shifted left by one with x appended). Feeding the tokens of a sequence one at a time from
    ``initial_state`` (or zeros) gives the columns of ``causal_conv1d`` on the whole sequence.
    The math runs in float32 (float64 if any input is float64).

    Args:
        x: (b, d) the new token's inputs, float16/bfloat16/float32/float64.
        conv_state: (b, d, w - 1) the previous w - 1 inputs, oldest first, any float dtype.
            Overwritten in place with the new last w - 1 inputs (rounded to its own dtype).
        weight: (d, w) one filter per channel, any float dtype, w >= 1.
        bias: (d,) any float dtype, default None (no bias).
        activation: None (default, identity), "silu" or its alias "swish".

    Returns:
        y (b, d) in x's dtype.

    Example:
        >>> b, d, l, w = 2, 8, 5, 4
        >>> x, weight = torch.randn(b, d, l), torch.randn(d, w)
        >>> state = torch.zeros(b, d, w - 1)
        >>> ys = torch.stack([causal_conv1d_update_reference(x[..., t], state, weight) for t in range(l)], -1)
        >>> torch.allclose(ys, causal_conv1d_reference(x, weight), atol=1e-6)
        True
        >>> torch.equal(state, x[..., -3:])
        True

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or option values.
    """
    validate_update(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_unchecked(x, conv_state, weight, bias, activation)


def causal_conv1d_update_unchecked(x, conv_state, weight, bias=None, activation=None) -> torch.Tensor:
    """The arithmetic of :func:`causal_conv1d_update_reference` on inputs the caller has
    validated (:func:`validate_update`): for per-token decode loops that check once."""
    cdtype = compute_dtype(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(cdtype), x.to(cdtype)[..., None]], dim=-1)  # (b, d, w)
    y = (window * weight.to(cdtype)).sum(dim=-1)  # (b, d)
    if bias is not None:
        y = y + bias.to(cdtype)
    # The window was copied out of conv_state above, so overwriting it now is safe.
    conv_state.copy_(window[..., 1:])
    return _activate(y, activation).to(x.dtype)
