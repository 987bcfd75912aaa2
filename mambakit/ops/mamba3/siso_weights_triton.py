"""The per-token, per-head weights of the SISO Triton Mamba-3 path as one custom op with backward:

    log_decay_t = dt_t A_t,   weight_t = lambda_t dt_t + c_{t+1},   skip_t = D - c_{t+1} score_t,
    lambda_t = sigmoid(trap_t),   c_t = (1 - lambda_t) dt_t   (c_l = 0),
    score_t = (C_t + C_bias) . (B_t + B_bias)   (the key and query before their common rotation).

dt, A, trap (b, l, h); B, C (b, l, g, n), head j reading group j // (h // g); biases (h, n); D (h,).
One kernel each way instead of ~25 small PyTorch ops and their autograd. Forward and backward:
one program per block of tokens of one sequence, looping over the groups and their heads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._compile import compile_ahead, launch

F32 = torch.float32
BLOCK_T = 32  # tokens per program


@triton.jit
def _score(Bt, Ct, cb, bB_ptr, bC_ptr, hh, offs_n, mask_n, N: tl.constexpr, HAS_BB: tl.constexpr,
           HAS_BC: tl.constexpr):
    """Head hh's score (BLOCK_T,) from its group's rows Bt, Ct (BLOCK_T, NP) and cb = C . B;
    also (B + B_bias, C + C_bias) for the gradients."""
    score = cb
    Bb = Bt
    Cb = Ct
    if HAS_BB:
        bB = tl.load(bB_ptr + hh * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Bb = Bt + bB[None, :]
    if HAS_BC:
        bC = tl.load(bC_ptr + hh * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Cb = Ct + bC[None, :]
    if HAS_BB or HAS_BC:
        score = tl.sum(Cb * Bb, 1)
    return score, Bb, Cb


@triton.jit
def _rows(ptr, bi, offs_t, gi, stride_b, stride_l, stride_g, offs_n, mask):
    return tl.load(ptr + bi * stride_b + offs_t.to(tl.int64)[:, None] * stride_l + gi * stride_g + offs_n[None, :],
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def siso_weights_fwd_kernel(
    dt_ptr, A_ptr, trap_ptr, B_ptr, C_ptr, bB_ptr, bC_ptr, D_ptr, ld_ptr, w_ptr, skip_ptr, score_ptr,
    length, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, HAS_BB: tl.constexpr,
    HAS_BC: tl.constexpr, HAS_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < length
    mask_next = offs_t + 1 < length
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_tn = mask_t[:, None] & mask_n[None, :]
    row0 = (bi * length + offs_t) * H  # (token, head 0) in the (b, l, h) tensors
    for gi in range(G):
        Bt = _rows(B_ptr, bi, offs_t, gi, sB_b, sB_l, sB_g, offs_n, mask_tn)
        Ct = _rows(C_ptr, bi, offs_t, gi, sC_b, sC_l, sC_g, offs_n, mask_tn)
        cb = tl.sum(Ct * Bt, 1)
        for j in range(H // G):
            hh = gi * (H // G) + j
            at = row0 + hh
            dt = tl.load(dt_ptr + at, mask=mask_t, other=0.0).to(tl.float32)
            A = tl.load(A_ptr + at, mask=mask_t, other=0.0).to(tl.float32)
            trap = tl.load(trap_ptr + at, mask=mask_t, other=0.0).to(tl.float32)
            dt_next = tl.load(dt_ptr + at + H, mask=mask_next, other=0.0).to(tl.float32)
            trap_next = tl.load(trap_ptr + at + H, mask=mask_next, other=0.0).to(tl.float32)
            c_next = (1.0 - tl.sigmoid(trap_next)) * dt_next
            score, _, _ = _score(Bt, Ct, cb, bB_ptr, bC_ptr, hh, offs_n, mask_n, N, HAS_BB, HAS_BC)
            skip = -c_next * score
            if HAS_D:
                skip += tl.load(D_ptr + hh).to(tl.float32)
            tl.store(ld_ptr + at, dt * A, mask=mask_t)
            tl.store(w_ptr + at, tl.sigmoid(trap) * dt + c_next, mask=mask_t)
            tl.store(skip_ptr + at, skip, mask=mask_t)
            tl.store(score_ptr + at, score, mask=mask_t)


@triton.jit
def siso_weights_bwd_kernel(
    dld_ptr, dw_ptr, dskip_ptr, score_ptr, dt_ptr, A_ptr, trap_ptr, B_ptr, C_ptr, bB_ptr, bC_ptr,
    ddt_ptr, dA_ptr, dtrap_ptr, dB_ptr, dC_ptr, dbB_ptr, dbC_ptr, dD_ptr,
    length, n_blocks, sB_b, sB_l, sB_g, sC_b, sC_l, sC_g,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, HAS_BB: tl.constexpr,
    HAS_BC: tl.constexpr, HAS_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """With dc_t = dweight_{t-1} - dskip_{t-1} score_{t-1} (c_t enters token t-1's weight and
    skip): ddt = dlog_decay A + dweight lambda + dc (1 - lambda), dA = dlog_decay dt,
    dtrap = (dweight - dc) dt lambda (1 - lambda), dscore = -dskip c_{t+1}, and dscore times
    (C + C_bias) / (B + B_bias) into dB / dC (summed over the group's heads) and into the bias
    partials of this program (summed over its tokens), dD partials the sum of dskip."""
    pid_t, bi = tl.program_id(0), tl.program_id(1).to(tl.int64)
    part = bi * n_blocks + pid_t  # this program's row of the partial sums
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < length
    mask_next = offs_t + 1 < length
    mask_prev = mask_t & (offs_t >= 1)
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_tn = mask_t[:, None] & mask_n[None, :]
    row0 = (bi * length + offs_t) * H
    for gi in range(G):
        Bt = _rows(B_ptr, bi, offs_t, gi, sB_b, sB_l, sB_g, offs_n, mask_tn)
        Ct = _rows(C_ptr, bi, offs_t, gi, sC_b, sC_l, sC_g, offs_n, mask_tn)
        cb = tl.sum(Ct * Bt, 1)
        dB = tl.zeros((BLOCK_T, NP), tl.float32)
        dC = tl.zeros((BLOCK_T, NP), tl.float32)
        for j in range(H // G):
            hh = gi * (H // G) + j
            at = row0 + hh
            dt = tl.load(dt_ptr + at, mask=mask_t, other=0.0).to(tl.float32)
            A = tl.load(A_ptr + at, mask=mask_t, other=0.0).to(tl.float32)
            lam = tl.sigmoid(tl.load(trap_ptr + at, mask=mask_t, other=0.0).to(tl.float32))
            dt_next = tl.load(dt_ptr + at + H, mask=mask_next, other=0.0).to(tl.float32)
            trap_next = tl.load(trap_ptr + at + H, mask=mask_next, other=0.0).to(tl.float32)
            c_next = (1.0 - tl.sigmoid(trap_next)) * dt_next
            dld = tl.load(dld_ptr + at, mask=mask_t, other=0.0)
            dw = tl.load(dw_ptr + at, mask=mask_t, other=0.0)
            dskip = tl.load(dskip_ptr + at, mask=mask_t, other=0.0)
            dc = (tl.load(dw_ptr + at - H, mask=mask_prev, other=0.0)
                  - tl.load(dskip_ptr + at - H, mask=mask_prev, other=0.0)
                  * tl.load(score_ptr + at - H, mask=mask_prev, other=0.0))
            tl.store(ddt_ptr + at, dld * A + dw * lam + dc * (1.0 - lam), mask=mask_t)
            tl.store(dA_ptr + at, dld * dt, mask=mask_t)
            tl.store(dtrap_ptr + at, (dw - dc) * dt * lam * (1.0 - lam), mask=mask_t)
            _, Bb, Cb = _score(Bt, Ct, cb, bB_ptr, bC_ptr, hh, offs_n, mask_n, N, HAS_BB, HAS_BC)
            dscore = -dskip * c_next
            from_C = dscore[:, None] * Cb  # d/dB and d/dB_bias
            from_B = dscore[:, None] * Bb  # d/dC and d/dC_bias
            dB += from_C
            dC += from_B
            if HAS_BB:
                tl.store(dbB_ptr + (part * H + hh) * N + offs_n, tl.sum(from_C, 0), mask=mask_n)
            if HAS_BC:
                tl.store(dbC_ptr + (part * H + hh) * N + offs_n, tl.sum(from_B, 0), mask=mask_n)
            if HAS_D:
                tl.store(dD_ptr + part * H + hh, tl.sum(dskip, 0))
        rows = (bi * length + offs_t.to(tl.int64))[:, None] * (G * N) + gi * N + offs_n[None, :]
        tl.store(dB_ptr + rows, dB, mask=mask_tn)
        tl.store(dC_ptr + rows, dC, mask=mask_tn)


def _launch_args(B: Tensor, C: Tensor, h: int, B_bias, C_bias, D) -> dict:
    n = B.shape[3]
    return dict(H=h, G=B.shape[2], N=n, NP=max(16, triton.next_power_of_2(n)), HAS_BB=B_bias is not None,
                HAS_BC=C_bias is not None, HAS_D=D is not None, BLOCK_T=BLOCK_T)


def _siso_weights(dt: Tensor, A: Tensor, trap: Tensor, B: Tensor, C: Tensor, B_bias: Optional[Tensor],
                  C_bias: Optional[Tensor], D: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dt, A, trap (b, l, h) contiguous; B, C (b, l, g, n) unit-stride in n; biases (h, n)
    contiguous; D (h,) -> (log_decay, weight, skip, score), each (b, l, h) float32."""
    b, l, h = dt.shape
    outs = tuple(torch.empty(b, l, h, device=dt.device, dtype=F32) for _ in range(4))
    if b * l:
        launch(siso_weights_fwd_kernel, (triton.cdiv(l, BLOCK_T), b), dt, A, trap, B, C, B_bias, C_bias, D, *outs, l,
               *B.stride()[:3], *C.stride()[:3], **_launch_args(B, C, h, B_bias, C_bias, D))
    return outs


siso_weights_op = torch.library.custom_op("mambakit::mamba3_siso_weights", _siso_weights, mutates_args=())


@siso_weights_op.register_fake
def _(dt, A, trap, B, C, B_bias, C_bias, D):
    return tuple(dt.new_empty(dt.shape, dtype=F32) for _ in range(4))


def _siso_weights_bwd(dld: Tensor, dw: Tensor, dskip: Tensor, score: Tensor, dt: Tensor, A: Tensor, trap: Tensor,
                      B: Tensor, C: Tensor, B_bias: Optional[Tensor], C_bias: Optional[Tensor], D: Optional[Tensor]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (module docstring) of the three weights, float32 (b, l, h) contiguous ->
    (ddt, dA, dtrap (b, l, h), dB, dC (b, l, g, n), dB_bias, dC_bias (h, n), dD (h,)), float32;
    the bias and D gradients empty where the input is None."""
    b, l, h = dt.shape
    g, n = B.shape[2:]
    n_blocks = triton.cdiv(l, BLOCK_T)
    ddt, dA, dtrap = (torch.empty(b, l, h, device=dt.device, dtype=F32) for _ in range(3))
    dB, dC = (torch.empty(b, l, g, n, device=dt.device, dtype=F32) for _ in range(2))
    parts_bB = torch.empty(b * n_blocks, h, n, device=dt.device, dtype=F32) if B_bias is not None else dt.new_empty(0)
    parts_bC = torch.empty(b * n_blocks, h, n, device=dt.device, dtype=F32) if C_bias is not None else dt.new_empty(0)
    parts_D = torch.empty(b * n_blocks, h, device=dt.device, dtype=F32) if D is not None else dt.new_empty(0)
    if b * l:
        launch(siso_weights_bwd_kernel, (n_blocks, b), dld, dw, dskip, score, dt, A, trap, B, C, B_bias, C_bias,
               ddt, dA, dtrap, dB, dC, parts_bB, parts_bC, parts_D, l, n_blocks, *B.stride()[:3],
               *C.stride()[:3], **_launch_args(B, C, h, B_bias, C_bias, D))
    dbB = parts_bB.sum(0) if B_bias is not None else parts_bB
    dbC = parts_bC.sum(0) if C_bias is not None else parts_bC
    dD = parts_D.sum(0) if D is not None else parts_D
    return ddt, dA, dtrap, dB, dC, dbB, dbC, dD


siso_weights_bwd = torch.library.custom_op("mambakit::mamba3_siso_weights_bwd", _siso_weights_bwd, mutates_args=())


@siso_weights_bwd.register_fake
def _(dld, dw, dskip, score, dt, A, trap, B, C, B_bias, C_bias, D):
    g, n = B.shape[2:]
    h = dt.shape[2]

    def maybe(t, *shape):
        return dt.new_empty(shape, dtype=F32) if t is not None else dt.new_empty(0)

    return (*(dt.new_empty(dt.shape, dtype=F32) for _ in range(3)), *(B.new_empty(B.shape, dtype=F32) for _ in range(2)),
            maybe(B_bias, h, n), maybe(C_bias, h, n), maybe(D, h))


def _setup(ctx, inputs, output):
    dt, A, trap, B, C, B_bias, C_bias, D = inputs
    ctx.save_for_backward(output[3], dt, A, trap, B, C, B_bias, C_bias, D)


def _backward(ctx, dld, dw, dskip, _dscore_output):
    score, dt, A, trap, B, C, B_bias, C_bias, D = ctx.saved_tensors
    grads = [torch.zeros_like(score) if d is None else d.contiguous() for d in (dld, dw, dskip)]
    ddt, dA, dtrap, dB, dC, dbB, dbC, dD = siso_weights_bwd(*grads, score, dt, A, trap, B, C, B_bias, C_bias, D)
    inputs = (dt, A, trap, B, C, B_bias, C_bias, D)
    return tuple(None if t is None else d.to(t.dtype) for d, t in zip((ddt, dA, dtrap, dB, dC, dbB, dbC, dD), inputs))


siso_weights_op.register_autograd(_backward, setup_context=_setup)


def _forward_and_backward(dt, A, trap, B, C, B_bias, C_bias, D, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    ld, w, skip, score = _siso_weights(dt, A, trap, B, C, B_bias, C_bias, D)
    if backward:
        _siso_weights_bwd(ld, w, skip, score, dt, A, trap, B, C, B_bias, C_bias, D)


def siso_weights(dt: Tensor, A: Tensor, trap: Tensor, B: Tensor, C: Tensor, B_bias: Optional[Tensor],
                 C_bias: Optional[Tensor], D: Optional[Tensor], backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(log_decay, weight, skip) of the module docstring, each (b, l, h) float32: dt, A, trap
    (b, l, h), B, C (b, l, g, n), biases (h, n) or None, D (h,) or None. Kernels compiled ahead
    on a first call, those of the backward too if ``backward``."""
    dt, A, trap = dt.contiguous(), A.contiguous(), trap.contiguous()
    B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (B, C))
    B_bias, C_bias, D = (None if t is None else t.contiguous() for t in (B_bias, C_bias, D))
    compile_ahead("mamba3_siso_weights", _forward_and_backward, dt, A, trap, B, C, B_bias, C_bias, D, backward)
    log_decay, weight, skip, _ = siso_weights_op(dt, A, trap, B, C, B_bias, C_bias, D)
    return log_decay, weight, skip
