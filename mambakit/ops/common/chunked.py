"""Chunked state-space machinery shared by SSD (Mamba-2) and Mamba-3, written once.

Both families are the recurrence, per batch and head, of a (p x n) state

    S_t = exp(log_decay_t) S_{t-1} + key_weight_t * sum_r v_{t,r} k_{t,r}^T
    y_{t,r} = S_t q_{t,r} - (key_weight_t - diag_weight_t) (sum_r' v_{t,r'} k_{t,r'}^T) q_{t,r}

with r = 1 .. R input/output ranks (R = 1 except Mamba-3 MIMO). The second term lets the
current token enter the output with its own weight (Mamba-3's trapezoid; for SSD the two weights
are equal and it vanishes). A segment id per token resets the state where it changes (packed
sequences): the decay into the first token of a new segment is zero.

The chunked algorithm (MATH.md section 3): (a) outputs inside each chunk with the quadratic form,
(b) each chunk's final state from zero, (c) states passed across chunks by a linear scan over the
chunks, (d) each chunk's output contribution from its incoming state. Decays inside a chunk come
from a masked cumulative sum (``segsum``) so no exponential of a positive number is ever taken and
long chunks lose no precision to cancellation.
"""

from __future__ import annotations

import torch

from ..scan import linear_scan
from .decay import decay_exp
from .segments import canonical_segments, segment_resets


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x (..., Q) -> (..., Q, Q) with [i, j] = sum_{m=j+1..i} x_m for j <= i and -inf above the
    diagonal, so that exp(segsum) is the lower-triangular decay mask."""
    Q = x.shape[-1]
    strictly_lower = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril(-1)
    x_rows = x.unsqueeze(-2).expand(*x.shape[:-1], Q, Q).transpose(-1, -2)  # [i, j] = x_i
    summed = torch.cumsum(x_rows.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    return summed.masked_fill(~lower, float("-inf"))


# Up to this many chunks the states are passed with one decay-weighted matrix product (segsum over
# chunks, O(c^2) but a single bmm); beyond it, by the O(c) parallel linear scan.
MATRIX_PASS_MAX_CHUNKS = 128


def pass_states(log_chunk_decay: torch.Tensor, chunk_states: torch.Tensor, initial_state: torch.Tensor) -> torch.Tensor:
    """End state of every chunk: S_c = exp(log_chunk_decay_c) S_{c-1} + chunk_states_c, S_{-1} = initial.

    Args: log_chunk_decay (b, c, h) (may be -inf where a segment starts), chunk_states
    (b, c, h, p, n), initial_state (b, h, p, n). Returns (b, c, h, p, n).
    """
    b, c, h, p, n = chunk_states.shape
    if c <= MATRIX_PASS_MAX_CHUNKS:
        # Prepend the initial state as chunk "-1" so one segsum covers both terms.
        log_decay = torch.cat([log_chunk_decay.new_zeros(b, 1, h), log_chunk_decay], dim=1)
        weights = decay_exp(segsum(log_decay.transpose(1, 2)))[:, :, 1:, :]  # (b, h, c, c + 1)
        states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (b, c + 1, h, p, n)
        return torch.einsum("bhij,bjhpn->bihpn", weights, states)
    decay = decay_exp(log_chunk_decay)[..., None, None].expand_as(chunk_states)
    return linear_scan(decay.contiguous(), chunk_states, initial_state, dim=1, method="chunked")


def recurrent_state_space(q, k, v, log_decay, key_weight, diag_weight=None, initial_state=None, segment=None):
    """Token-by-token form of the recurrence above: the definition, O(l) Python steps.

    Shapes as :func:`chunked_state_space`. Returns (y (b, l, h, R, p), final state (b, h, p, n)).
    """
    b, l, h, R, n = q.shape
    p = v.shape[-1]
    state = q.new_zeros(b, h, p, n) if initial_state is None else initial_state
    diag_weight = key_weight if diag_weight is None else diag_weight
    resets = None if segment is None else segment_resets(segment)
    ys = []
    for t in range(l):
        decay = decay_exp(log_decay[:, t])  # (b, h)
        if resets is not None:
            decay = decay.masked_fill(resets[:, t, None], 0.0)
        update = torch.einsum("bhrp,bhrn->bhpn", v[:, t], k[:, t])
        state = decay[..., None, None] * state + key_weight[:, t, :, None, None] * update
        correction = (key_weight[:, t] - diag_weight[:, t])[..., None, None] * update
        ys.append(torch.einsum("bhpn,bhrn->bhrp", state - correction, q[:, t]))
    return torch.stack(ys, dim=1), state


def chunked_state_space(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    key_weight: torch.Tensor,
    diag_weight: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    segment: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked evaluation of the recurrence in this module's docstring.

    Args (all floating tensors in one compute dtype; no validation, callers validate):
        q: queries (b, l, h, R, n).  k: keys (b, l, h, R, n).  v: values (b, l, h, R, p).
        log_decay: (b, l, h), <= 0.  key_weight: (b, l, h).  diag_weight: (b, l, h) or None
            (= key_weight).  initial_state: (b, h, p, n) or None (zeros).
        segment: (b, l) integer ids, or None; the state resets where the id changes.
        chunk_size: Q, any positive int; l need not be a multiple of it.

    Returns:
        y (b, l, h, R, p) and the final state (b, h, p, n).
    """
    b, l, h, R, n = q.shape
    p = v.shape[-1]
    Q = min(chunk_size, l)  # a sequence shorter than a chunk is one chunk of its own length, not padded
    if segment is not None:
        # Renumber to "changes so far" so that a reused id (0, 0, 1, 1, 0) never reconnects.
        segment = canonical_segments(segment)
    n_chunks = -(-l // Q)
    pad = n_chunks * Q - l
    if pad:
        # Padded tokens neither decay the state (log_decay 0) nor write to it (weight 0).
        def pad_time(x):
            return torch.cat([x, x.new_zeros((b, pad) + x.shape[2:])], dim=1)

        q, k, v, log_decay, key_weight = map(pad_time, (q, k, v, log_decay, key_weight))
        if diag_weight is not None:
            diag_weight = pad_time(diag_weight)
        if segment is not None:
            segment = torch.cat([segment, segment[:, -1:].expand(b, pad)], dim=1)

    def chunks(x):  # (b, l, ...) -> (b, c, Q, ...)
        return x.reshape(b, n_chunks, Q, *x.shape[2:])

    q, k, v = chunks(q), chunks(k), chunks(v)
    log_decay, key_weight = chunks(log_decay), chunks(key_weight)  # (b, c, Q, h)
    log_decay_h = log_decay.permute(0, 1, 3, 2)  # (b, c, h, Q)
    decay_within = decay_exp(segsum(log_decay_h))  # (b, c, h, Q_i, Q_j)
    log_from_start = torch.cumsum(log_decay_h, dim=-1)  # (b, c, h, Q): log prod_{m<=i} decay_m
    log_chunk_decay = log_from_start[..., -1]  # (b, c, h)
    decay_from_start = decay_exp(log_from_start)
    if segment is not None:
        seg = chunks(segment)  # (b, c, Q)
        same = seg[:, :, :, None] == seg[:, :, None, :]  # (b, c, Q_i, Q_j)
        decay_within = decay_within * same[:, :, None]
        seg_before = torch.cat([seg[:, :1, :1], seg[:, :-1, -1:]], dim=1)  # segment of token s0 - 1
        from_start_valid = seg == seg_before  # (b, c, Q)
        decay_from_start = decay_from_start * from_start_valid[:, :, None]
        log_chunk_decay = log_chunk_decay.masked_fill(~from_start_valid[:, :, -1:], float("-inf"))

    # (a) intra-chunk outputs: the quadratic (attention-like) form.
    weight = key_weight.permute(0, 1, 3, 2)  # (b, c, h, Q_j)
    mixing = decay_within * weight[:, :, :, None, :]  # (b, c, h, Q_i, Q_j)
    if diag_weight is not None:
        # The diagonal of decay_within is exp(0) = 1, so swapping weights there is an addition.
        mixing = mixing + torch.diag_embed(chunks(diag_weight).permute(0, 1, 3, 2) - weight)
    scores = torch.einsum("bcihrn,bcjhsn->bchirjs", q, k)  # [Q_i R, Q_j R] per (b, c, h)
    y = torch.einsum("bchirjs,bchij,bcjhsp->bcihrp", scores, mixing, v)

    # (b) each chunk's final state from a zero incoming state.
    decay_to_end = decay_within[..., -1, :]  # (b, c, h, Q_j)
    chunk_states = torch.einsum("bchj,bcjh,bcjhrp,bcjhrn->bchpn", decay_to_end, key_weight, v, k)

    # (c) pass states across chunks: S_end_c = decay_c S_end_{c-1} + chunk_state_c.
    if initial_state is None:
        initial_state = chunk_states.new_zeros(b, h, p, n)
    ends = pass_states(log_chunk_decay, chunk_states, initial_state)
    incoming = torch.cat([initial_state[:, None], ends[:, :-1]], dim=1)  # (b, c, h, p, n)

    # (d) contribution of each chunk's incoming state.
    y = y + torch.einsum("bchpn,bcihrn,bchi->bcihrp", incoming, q, decay_from_start)
    y = y.reshape(b, n_chunks * Q, h, R, p)[:, :l]
    return y, ends[:, -1]
