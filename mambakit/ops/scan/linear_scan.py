"""Public linear scan with a backward that is itself a reverse scan."""

from __future__ import annotations

import torch

from .._checks import expect_choice, expect_positive_int, expect_same_device, expect_tensor
from .algorithms import METHODS, sequential

SCAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


# Rows are scanned in blocks of about this many elements so that the passes of the parallel
# algorithms run out of cache instead of main memory (about 5x faster on a 2-core CPU).
_BLOCK_ELEMENTS = 1 << 20


def _forward_scan(a, b, h0, method, chunk_size, reverse):
    """Scan along the last axis (in the reverse direction if ``reverse``), no autograd."""
    if method == "sequential":  # a loop over time-major rows: no flips, no row blocks
        return sequential(a, b, h0, reverse)
    shape = b.shape
    T = shape[-1]
    a, b, h0 = a.reshape(-1, T), b.reshape(-1, T), h0.reshape(-1)
    if reverse:
        a, b = a.flip(-1), b.flip(-1)
    scan = METHODS[method]
    extra = (chunk_size,) if method == "chunked" else ()
    rows = max(1, _BLOCK_ELEMENTS // T)
    h = torch.cat([scan(a[i:i + rows], b[i:i + rows], h0[i:i + rows], *extra) for i in range(0, a.shape[0], rows)])
    if reverse:
        h = h.flip(-1)
    return h.reshape(shape)


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b, h0) along the last axis; a, b (..., T), h0 (...)."""

    @staticmethod
    def forward(ctx, a, b, h0, method, chunk_size, reverse):
        h = _forward_scan(a, b, h0, method, chunk_size, reverse)
        ctx.save_for_backward(a, h0, h)
        ctx.config = (method, chunk_size, reverse)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h0, h = ctx.saved_tensors
        method, chunk_size, reverse = ctx.config
        # Adjoint: dh_t = g_t + conj(a_next) dh_next, a scan in the opposite direction; then
        # db_t = dh_t, da_t = dh_t conj(h_prev), dh0 = conj(a_first) dh_first. conj() is a no-op
        # for real tensors and gives PyTorch's convention for complex gradients.
        a_c = a.conj()
        if method == "sequential":
            a_next, h_prev, first = _time_major_shifts(a_c, h0, h, reverse)
        elif not reverse:
            a_next = torch.cat([a_c[..., 1:], torch.zeros_like(a_c[..., :1])], dim=-1)
            h_prev = torch.cat([h0.unsqueeze(-1), h[..., :-1]], dim=-1)
            first = 0
        else:
            a_next = torch.cat([torch.zeros_like(a_c[..., :1]), a_c[..., :-1]], dim=-1)
            h_prev = torch.cat([h[..., 1:], h0.unsqueeze(-1)], dim=-1)
            first = -1
        zero = torch.zeros_like(h0)
        dh = _LinearScan.apply(a_next, grad_h, zero, method, chunk_size, not reverse)
        grad_a = dh * h_prev.conj()
        grad_h0 = a_c[..., first] * dh[..., first]
        return grad_a, dh, grad_h0, None, None, None


def _time_major_shifts(a_c, h0, h, reverse):
    """(a_next, h_prev, index of the first step) of the adjoint, built along the time-major axis
    so that they stay time-major views like the sequential method's inputs and output."""
    a_t, h_t = a_c.movedim(-1, 0), h.movedim(-1, 0)
    zero, start = torch.zeros_like(a_t[:1]), h0.unsqueeze(0)
    if not reverse:
        return torch.cat([a_t[1:], zero]).movedim(0, -1), torch.cat([start, h_t[:-1]]).movedim(0, -1), 0
    return torch.cat([zero, a_t[:-1]]).movedim(0, -1), torch.cat([h_t[1:], start]).movedim(0, -1), -1


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    dim: int = -1,
    method: str = "sequential",
    reverse: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t along ``dim`` (elementwise a).

    Args:
        a: decays, any shape, real or complex; same shape, dtype and device as ``b``.
        b: inputs, same shape as ``a``.
        h0: state before the first step, shape of ``b`` without ``dim``; default zeros.
        dim: the time axis.
        method: ``"sequential"`` (O(T) steps; on a CPU the fastest for short T or many rows, most
            of all when ``dim`` is the slowest axis in memory), ``"hillis_steele"`` (log2 T steps,
            O(T log T) work), ``"blelloch"`` (up/down sweep, O(T) work) or ``"chunked"`` (parallel
            scan in chunks of ``chunk_size``, chunk states carried by a recursive chunked scan).
        reverse: run from the end: h_t = a_t * h_{t+1} + b_t, with h0 the state after the last step.
        chunk_size: chunk length for ``method="chunked"``.

    Returns:
        h, same shape and dtype as ``b``. Differentiable in a, b and h0; the backward is a
        reverse scan with the same method.

    Example:
        >>> linear_scan(torch.full((4,), 0.9), torch.tensor([1., 2., 3., 4.]))
        tensor([1.0000, 2.9000, 5.6100, 9.0490])
    """
    expect_tensor("a", a, dtypes=SCAN_DTYPES)
    expect_tensor("b", b, dtypes=SCAN_DTYPES)
    if a.shape != b.shape:
        raise ValueError(f"a: expected the shape of b {tuple(b.shape)}, got {tuple(a.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a: expected the dtype of b ({b.dtype}), got {a.dtype}")
    if b.dim() == 0:
        raise ValueError("b: expected at least one dimension (the time axis), got a scalar")
    if not -b.dim() <= dim < b.dim():
        raise ValueError(f"dim: expected an axis in [{-b.dim()}, {b.dim()}), got {dim}")
    expect_choice("method", method, tuple(METHODS))
    expect_positive_int("chunk_size", chunk_size)
    state_shape = b.shape[:dim % b.dim()] + b.shape[dim % b.dim() + 1:]
    if h0 is None:
        h0 = b.new_zeros(state_shape)
    else:
        expect_tensor("h0", h0, dtypes=SCAN_DTYPES)
        if h0.shape != state_shape:
            raise ValueError(
                f"h0: expected the shape of b without axis {dim}, {tuple(state_shape)}, got {tuple(h0.shape)}"
            )
        if h0.dtype != b.dtype:
            raise TypeError(f"h0: expected the dtype of b ({b.dtype}), got {h0.dtype}")
    expect_same_device(a=a, b=b, h0=h0)
    if b.shape[dim] == 0:
        return b.clone()
    a_last = a.movedim(dim, -1)
    b_last = b.movedim(dim, -1)
    h = _LinearScan.apply(a_last, b_last, h0, method, chunk_size, reverse)
    return h.movedim(-1, dim)
