"""Launchers of the Triton selective scan, registered as PyTorch custom ops (so ``torch.compile``
traces through them without graph breaks) with their autograd formula."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from . import triton_kernels as kernels

F32 = torch.float32


def block_l(length: int) -> int:
    """Tokens per tile, a function of the length alone: the backward restarts each tile from the
    state the forward stored at its end, so both passes must cut the same tiles."""
    return min(1024, max(16, triton.next_power_of_2(length)))


def _layout(X: Tensor, d: int) -> tuple[bool, bool, int]:
    """(variable, grouped, channels per group) of a B or C tensor."""
    if X.dim() == 2:
        return False, False, d
    if X.dim() == 3 or X.shape[1] == 1:
        return True, False, d
    return True, True, d // X.shape[1]


def _padded(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


@torch.library.custom_op("mambakit::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                       seq_idx: Optional[Tensor], delta_softplus: bool, save_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y (b, d, l) in u's dtype, h_last (b, d, n) fp32, tile-end states (b, d, n_tiles, n)
    fp32, and the output before the z gate (b, d, l), empty unless ``save_states`` and z)."""
    bsz, d, length = u.shape
    n = A.shape[1]
    n_tiles = triton.cdiv(length, block_l(length))
    y = torch.empty_like(u)
    last = torch.empty(bsz, d, n, device=u.device, dtype=F32)
    # The kernel carries the state between tiles through this buffer, so it always exists.
    states = torch.empty(bsz, d, n_tiles, n, device=u.device, dtype=F32)
    y_pre = torch.empty_like(u) if save_states and z is not None else u.new_empty(0)
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_D"]), bsz)

    kernels.selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, y, y_pre, last, states,
        d, length, b_pg, c_pg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None, SAVE_STATES=save_states,
        B_VARIABLE=b_var, C_VARIABLE=c_var, B_GROUPED=b_grp, C_GROUPED=c_grp,
        N=n, NP=_padded(n), BLOCK_L=block_l(length),
    )
    return y, last, states, y_pre


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, save_states):
    bsz, d, length = u.shape
    n = A.shape[1]
    states_shape = (bsz, d, triton.cdiv(length, block_l(length)), n)
    y_pre_shape = u.shape if save_states and z is not None else (0,)
    return (torch.empty_like(u), u.new_empty(bsz, d, n, dtype=F32), u.new_empty(states_shape, dtype=F32),
            u.new_empty(y_pre_shape))


@torch.library.custom_op("mambakit::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dy: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                       seq_idx: Optional[Tensor], states: Tensor, y_pre: Tensor, delta_softplus: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0], absent inputs' gradients empty."""
    bsz, d, length = u.shape
    n = A.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)  # (distinct from the other empties)
    # Reductions over channels, batch or time are accumulated atomically in fp32.
    dA = torch.zeros(A.shape, device=u.device, dtype=F32)
    dB = torch.zeros(B.shape, device=u.device, dtype=F32)
    dC = torch.zeros(C.shape, device=u.device, dtype=F32)
    dD = torch.zeros(d if D is not None else 1, device=u.device, dtype=F32)
    dbias = torch.zeros(d if delta_bias is not None else 1, device=u.device, dtype=F32)
    dh0 = torch.empty(bsz, d, n, device=u.device, dtype=F32) if h0 is not None else u.new_empty(0, dtype=F32)
    # The kernel passes the state gradient between tiles through this (b, d, 2, n) buffer; slot 0
    # starts as the final state's gradient.
    g_carry = torch.zeros(bsz, d, 2, n, device=u.device, dtype=F32)
    if dlast is not None:
        g_carry[:, :, 0] = dlast
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_D"]), bsz)

    kernels.selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states, y_pre, dy, g_carry,
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0,
        d, length, b_pg, c_pg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None,
        B_VARIABLE=b_var, C_VARIABLE=c_var, B_GROUPED=b_grp, C_GROUPED=c_grp,
        N=n, NP=_padded(n), BLOCK_L=block_l(length),
    )
    def empty():  # a fresh tensor each time: custom-op outputs must not alias each other
        return u.new_empty(0)

    return [
        du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.to(D.dtype) if D is not None else empty(), dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else empty(),
        dh0.to(h0.dtype) if h0 is not None else empty(),
    ]


@selective_scan_bwd.register_fake
def _(dy, dlast, u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states, y_pre, delta_softplus):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0)

    return [like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias), like(h0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, save_states = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, output[2], output[3])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dy, dlast, _dstates, _dy_pre):
    u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states, y_pre = ctx.saved_tensors
    if z is not None and y_pre.numel() == 0:
        raise RuntimeError("selective_scan: the forward ran without saving for backward (no input required grad)")
    grads = selective_scan_bwd(dy.contiguous(), None if dlast is None else dlast.contiguous(), u, delta, A, B, C, D,
                               z, delta_bias, h0, seq_idx, states, y_pre, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = grads
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dh0 if h0 is not None else None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mambakit::selective_scan_step", mutates_args=())
def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                        delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """One decode token, u (b, d, 1) -> (y (b, d, 1), new state (b, d, n) fp32); no gradient."""
    bsz, d, _ = u.shape
    n = A.shape[1]
    y = torch.empty_like(u)
    last = torch.empty(bsz, d, n, device=u.device, dtype=F32)
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)
    block_d = 32
    kernels.selective_scan_step_kernel[(triton.cdiv(d, block_d), bsz)](
        u, delta, A, B, C, D, z, delta_bias, h0, y, last, d, b_pg, c_pg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=h0 is not None, B_VARIABLE=b_var, C_VARIABLE=c_var, B_GROUPED=b_grp, C_GROUPED=c_grp,
        N=n, NP=_padded(n), BLOCK_D=block_d,
    )
    return y, last


@selective_scan_step.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=F32)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False, seq_idx=None):
    """Triton path of :func:`mambakit.ops.selective_scan` (real A; inputs already validated).

    A single token without gradients (decoding) takes the one-step kernel; everything else the
    tiled scan."""
    def c(t):
        return None if t is None else t.contiguous()

    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if u.shape[2] == 1 and not save_states:
        y, last = selective_scan_step(c(u), c(delta), c(A), c(B), c(C), c(D), c(z), c(delta_bias),
                                      c(initial_state), delta_softplus)
        return (y, last) if return_final_state else y
    y, last, _, _ = selective_scan_fwd(c(u), c(delta), c(A), c(B), c(C), c(D), c(z), c(delta_bias), c(initial_state),
                                    c(seq_idx), delta_softplus, save_states)
    return (y, last) if return_final_state else y
