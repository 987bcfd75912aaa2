"""Four algorithms for the first-order linear recurrence h_t = a_t * h_{t-1} + b_t.

Each function takes ``a, b`` of shape (..., T) with time on the last axis and ``h0`` of shape
(...), and returns h of shape (..., T) (``sequential`` also takes ``reverse``). They run without
autograd (the backward of :func:`mambakit.ops.linear_scan` is itself a reverse scan). The pair (a, b) is an affine map
h -> a h + b; maps compose associatively, "(a1, b1) then (a2, b2)" = (a2 a1, a2 b1 + b2), which
is what makes the parallel algorithms possible (MATH.md section 0).
"""

from __future__ import annotations

import torch


def _then(first_a, first_b, second_a, second_b):
    """Compose two affine maps: apply ``first`` then ``second``."""
    return second_a * first_a, second_a * first_b + second_b


def sequential(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """O(T) steps, one per time step (from the end if ``reverse``): the definition, used as the
    ground truth. It runs on time-major (T, ...) copies of a and b, so that every step reads and
    writes contiguous rows; when a and b are views of time-major tensors (time the slowest
    axis in memory) nothing is copied. h is returned as the same kind of view."""
    a_t, b_t = a.movedim(-1, 0).contiguous(), b.movedim(-1, 0).contiguous()
    h = torch.empty_like(b_t)
    state = h0
    for t in reversed(range(len(b_t))) if reverse else range(len(b_t)):
        state = torch.addcmul(b_t[t], a_t[t], state, out=h[t])
    return h.movedim(0, -1)


def _hillis_steele_maps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix composition of the maps along the last axis, in log2(T) steps.

    Returns (A, B) with h_t = A_t h_{-1} + B_t. Work is O(T log T).
    """
    A, B = a.clone(), b.clone()
    T = a.shape[-1]
    offset = 1
    while offset < T:
        # Each position t >= offset absorbs the composed map ending at t - offset.
        new_A, new_B = _then(A[..., :-offset], B[..., :-offset], A[..., offset:], B[..., offset:])
        A = torch.cat([A[..., :offset], new_A], dim=-1)
        B = torch.cat([B[..., :offset], new_B], dim=-1)
        offset *= 2
    return A, B


def hillis_steele(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    A, B = _hillis_steele_maps(a, b)
    return A * h0.unsqueeze(-1) + B


def blelloch(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Work-efficient scan: up-sweep then down-sweep over a balanced tree, 2 log2(T) steps."""
    T = a.shape[-1]
    size = 1 << max(T - 1, 0).bit_length()
    pad = size - T
    A = torch.cat([a, a.new_ones(a.shape[:-1] + (pad,))], dim=-1)
    B = torch.cat([b, b.new_zeros(b.shape[:-1] + (pad,))], dim=-1)
    lead = A.shape[:-1]

    # Up-sweep: the right child of every pair of subtrees becomes the pair's composed map.
    stride = 1
    while stride < size:
        A_v = A.view(*lead, size // (2 * stride), 2 * stride)
        B_v = B.view(*lead, size // (2 * stride), 2 * stride)
        left_a, left_b = A_v[..., stride - 1], B_v[..., stride - 1]
        right_a, right_b = A_v[..., 2 * stride - 1], B_v[..., 2 * stride - 1]
        new_a, new_b = _then(left_a, left_b, right_a, right_b)
        A_v[..., 2 * stride - 1] = new_a
        B_v[..., 2 * stride - 1] = new_b
        stride *= 2

    # Down-sweep: replace the root by the identity, then push exclusive prefixes down.
    A[..., size - 1] = 1
    B[..., size - 1] = 0
    stride = size // 2
    while stride >= 1:
        A_v = A.view(*lead, size // (2 * stride), 2 * stride)
        B_v = B.view(*lead, size // (2 * stride), 2 * stride)
        left_a, left_b = A_v[..., stride - 1].clone(), B_v[..., stride - 1].clone()
        parent_a, parent_b = A_v[..., 2 * stride - 1].clone(), B_v[..., 2 * stride - 1].clone()
        A_v[..., stride - 1] = parent_a
        B_v[..., stride - 1] = parent_b
        new_a, new_b = _then(parent_a, parent_b, left_a, left_b)
        A_v[..., 2 * stride - 1] = new_a
        B_v[..., 2 * stride - 1] = new_b
        stride //= 2

    # Exclusive prefix maps E_t give h_{t-1} = E_t(h0); one more step gives h_t.
    h_prev = A[..., :T] * h0.unsqueeze(-1) + B[..., :T]
    return a * h_prev + b


def chunked(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """Scan inside chunks of ``chunk_size`` in parallel, carry chunk states by a (recursive)
    chunked scan over the chunks, then correct each chunk with its incoming state."""
    T = a.shape[-1]
    if T <= chunk_size:
        return hillis_steele(a, b, h0)
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T
    lead = a.shape[:-1]
    a_p = torch.cat([a, a.new_ones(lead + (pad,))], dim=-1).view(*lead, n_chunks, chunk_size)
    b_p = torch.cat([b, b.new_zeros(lead + (pad,))], dim=-1).view(*lead, n_chunks, chunk_size)
    A, B = _hillis_steele_maps(a_p, b_p)  # maps from each chunk's start, (..., C, Q)
    chunk_end = chunked(A[..., -1].contiguous(), B[..., -1].contiguous(), h0, chunk_size)  # (..., C)
    incoming = torch.cat([h0.unsqueeze(-1), chunk_end[..., :-1]], dim=-1)
    h = A * incoming.unsqueeze(-1) + B
    return h.reshape(*lead, n_chunks * chunk_size)[..., :T]


METHODS = {
    "sequential": sequential,
    "hillis_steele": hillis_steele,
    "blelloch": blelloch,
    "chunked": chunked,
}
