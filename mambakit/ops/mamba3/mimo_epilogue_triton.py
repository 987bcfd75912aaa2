"""The MIMO output epilogue of the Triton Mamba-3 path as one custom op with backward. Per token
and head, with r ranks k, j and the head's channels p:

    W_k   = sum_j M_kj mimo_x_j                 M (r, r): the same-step correction plus D on the diagonal
    pre_k = y_core_k + x W_k                    y_core: the SSD kernels' output at rank-token (t, k)
    y     = sum_k mimo_o_k silu(z mimo_z_k) pre_k

without z the gate is 1; without mimo_o the output is the ranks' gated values (b, l, h, r, p)
unmixed. x, z (b, l, h, p); mimo_x, mimo_z, mimo_o (h, r, p) float32; M (b, l, h, r, r) float32.

One pass over the (b, l, r, h, p) y_core each way: the unfused form built several float32
tensors of that size (1 GB each at b8 l4096 h32 p64 r4). Forward: one program per block of
tokens of one head. Backward: programs over a head's tokens in strides, each summing its share of
the (h, r, p) weights' gradients, added up afterwards in PyTorch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, next_power_of_2
from .._compile import compile_ahead, launch

F32 = torch.float32
BLOCK_ROWS = 32  # token-rank rows of a program's tiles: BLOCK_T tokens x r ranks
TOKEN_SPLITS = 4096  # backward programs over all heads (each head's tokens in equal strides)


@triton.jit
def _rank_values(yc_ptr, x_ptr, m_ptr, sx_ptr, offs_t, hh, sx_b, sx_l, T, L: tl.constexpr, H: tl.constexpr,
                 R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr, BLOCK_T: tl.constexpr):
    """-> (x (BT, PP), W (BT, RP, PP), pre = y_core + x W (BT, RP, PP), the 3-D mask) for the
    tokens offs_t of head hh; rows past T or ranks past R read as zeros."""
    offs_k = tl.arange(0, RP)
    offs_p = tl.arange(0, PP)
    mask_t = offs_t < T
    mask_p = offs_p < P
    mask_tp = mask_t[:, None] & mask_p[None, :]
    mask_tk = mask_t[:, None] & (offs_k < R)[None, :]
    mask3 = mask_tk[:, :, None] & mask_p[None, None, :]
    x_at = x_ptr + ((offs_t // L) * sx_b + (offs_t % L) * sx_l + hh * P)[:, None] + offs_p[None, :]
    x = tl.load(x_at, mask=mask_tp, other=0.0).to(tl.float32)
    m_rows = m_ptr + ((offs_t * H + hh) * R)[:, None] * R + offs_k[None, :] * R  # (BT, RP): M[t, hh, k, 0]
    W = tl.zeros((BLOCK_T, RP, PP), dtype=tl.float32)
    for j in tl.static_range(R):
        m_j = tl.load(m_rows + j, mask=mask_tk, other=0.0)
        sx_j = tl.load(sx_ptr + (hh * R + j) * P + offs_p, mask=mask_p, other=0.0)
        W += m_j[:, :, None] * sx_j[None, None, :]
    yc_at = (yc_ptr + ((offs_t[:, None] * R + offs_k[None, :]) * H + hh)[:, :, None] * P
             + offs_p[None, None, :])
    pre = tl.load(yc_at, mask=mask3, other=0.0).to(tl.float32) + x[:, None, :] * W
    return x, W, pre, mask3


@triton.jit
def _rank_params(t_ptr, hh, R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr):
    """A (h, r, p) float32 weight's (RP, PP) tile for head hh (zeros past r and p)."""
    offs_k = tl.arange(0, RP)
    offs_p = tl.arange(0, PP)
    mask = (offs_k < R)[:, None] & (offs_p < P)[None, :]
    return tl.load(t_ptr + (hh * R + offs_k[:, None]) * P + offs_p[None, :], mask=mask, other=0.0)


@triton.jit
def mimo_epilogue_fwd_kernel(
    yc_ptr, x_ptr, m_ptr, sx_ptr, z_ptr, sz_ptr, so_ptr, y_ptr, T, sx_b, sx_l, sz_b, sz_l,
    L: tl.constexpr, H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_O: tl.constexpr, BLOCK_T: tl.constexpr,
):
    hh = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = tl.arange(0, RP)
    offs_p = tl.arange(0, PP)
    _, _, out, mask3 = _rank_values(yc_ptr, x_ptr, m_ptr, sx_ptr, offs_t, hh, sx_b, sx_l, T, L, H, R, P, RP, PP, BLOCK_T)
    if HAS_Z:
        z_at = z_ptr + ((offs_t // L) * sz_b + (offs_t % L) * sz_l + hh * P)[:, None] + offs_p[None, :]
        z = tl.load(z_at, mask=(offs_t < T)[:, None] & (offs_p < P)[None, :], other=0.0).to(tl.float32)
        u = z[:, None, :] * _rank_params(sz_ptr, hh, R, P, RP, PP)[None, :, :]
        out *= u * tl.sigmoid(u)
    if HAS_O:
        y = tl.sum(out * _rank_params(so_ptr, hh, R, P, RP, PP)[None, :, :], axis=1)
        y_at = y_ptr + ((offs_t * H + hh) * P)[:, None] + offs_p[None, :]
        tl.store(y_at, y.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & (offs_p < P)[None, :])
    else:  # the ranks unmixed, (b, l, h, r, p)
        y_at = y_ptr + (((offs_t * H + hh) * R)[:, None] + offs_k[None, :])[:, :, None] * P + offs_p[None, None, :]
        tl.store(y_at, out.to(y_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def mimo_epilogue_bwd_kernel(
    dy_ptr, yc_ptr, x_ptr, m_ptr, sx_ptr, z_ptr, sz_ptr, so_ptr,
    dyc_ptr, dx_ptr, dm_ptr, dz_ptr, dsx_ptr, dsz_ptr, dso_ptr, T, tokens_per_program, sx_b, sx_l, sz_b, sz_l,
    L: tl.constexpr, H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_O: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """With out_k = g_k pre_k (g_k = silu(u_k), u_k = z mimo_z_k) and d(out_k) = dy mimo_o_k
    (or dy_k unmixed): d(pre_k) = g_k d(out_k) is dy_core_k; dx = sum_k d(pre_k) W_k;
    dM_kj = sum_p d(pre_k) x mimo_x_j; d(mimo_x_j) += sum_k d(pre_k) M_kj x; du_k = d(out_k) pre_k
    silu'(u_k) with silu'(u) = sigmoid(u) (1 + u (1 - sigmoid(u))); dz = sum_k du_k mimo_z_k,
    d(mimo_z_k) += du_k z; d(mimo_o_k) += dy out_k. The weight gradients are this program's sums
    over its tokens, at dsx_ptr[pid, hh] and so on."""
    split = tl.program_id(0)
    hh = tl.program_id(1)
    offs_k = tl.arange(0, RP)
    offs_p = tl.arange(0, PP)
    mask_p = offs_p < P
    mask_kp = (offs_k < R)[:, None] & mask_p[None, :]
    if HAS_Z:
        sz = _rank_params(sz_ptr, hh, R, P, RP, PP)
    if HAS_O:
        so = _rank_params(so_ptr, hh, R, P, RP, PP)
    dsx = tl.zeros((RP, PP), dtype=tl.float32)
    dsz = tl.zeros((RP, PP), dtype=tl.float32)
    dso = tl.zeros((RP, PP), dtype=tl.float32)
    for start in range(0, tokens_per_program, BLOCK_T):
        offs_t = (split * tokens_per_program + start + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < T
        mask_tp = mask_t[:, None] & mask_p[None, :]
        mask_tk = mask_t[:, None] & (offs_k < R)[None, :]
        x, W, pre, mask3 = _rank_values(yc_ptr, x_ptr, m_ptr, sx_ptr, offs_t, hh, sx_b, sx_l, T, L, H, R, P, RP, PP, BLOCK_T)
        rank_rows = (((offs_t * H + hh) * R)[:, None] + offs_k[None, :])[:, :, None] * P + offs_p[None, None, :]
        if HAS_O:
            dy = tl.load(dy_ptr + ((offs_t * H + hh) * P)[:, None] + offs_p[None, :], mask=mask_tp, other=0.0)
            dout = dy.to(tl.float32)[:, None, :] * so[None, :, :]
        else:
            dout = tl.load(dy_ptr + rank_rows, mask=mask3, other=0.0).to(tl.float32)
        if HAS_Z:
            z_at = z_ptr + ((offs_t // L) * sz_b + (offs_t % L) * sz_l + hh * P)[:, None] + offs_p[None, :]
            z = tl.load(z_at, mask=mask_tp, other=0.0).to(tl.float32)
            u = z[:, None, :] * sz[None, :, :]
            sig = tl.sigmoid(u)
            gate = u * sig
            du = dout * pre * sig * (1.0 + u * (1.0 - sig))
            tl.store(dz_ptr + ((offs_t * H + hh) * P)[:, None] + offs_p[None, :],
                     tl.sum(du * sz[None, :, :], axis=1).to(dz_ptr.dtype.element_ty), mask=mask_tp)
            dsz += tl.sum(du * z[:, None, :], axis=0)
            dpre = dout * gate
            if HAS_O:
                dso += tl.sum(dy.to(tl.float32)[:, None, :] * gate * pre, axis=0)
        else:
            dpre = dout
            if HAS_O:
                dso += tl.sum(dy.to(tl.float32)[:, None, :] * pre, axis=0)
        yc_rows = ((offs_t[:, None] * R + offs_k[None, :]) * H + hh)[:, :, None] * P + offs_p[None, None, :]
        tl.store(dyc_ptr + yc_rows, dpre.to(dyc_ptr.dtype.element_ty), mask=mask3)
        tl.store(dx_ptr + ((offs_t * H + hh) * P)[:, None] + offs_p[None, :],
                 tl.sum(dpre * W, axis=1).to(dx_ptr.dtype.element_ty), mask=mask_tp)
        dW = dpre * x[:, None, :]
        m_rows = ((offs_t * H + hh) * R)[:, None] * R + offs_k[None, :] * R  # M[t, hh, k, 0]
        for j in tl.static_range(R):
            sx_j = tl.load(sx_ptr + (hh * R + j) * P + offs_p, mask=mask_p, other=0.0)
            tl.store(dm_ptr + m_rows + j, tl.sum(dW * sx_j[None, None, :], axis=2), mask=mask_tk)
            m_j = tl.load(m_ptr + m_rows + j, mask=mask_tk, other=0.0)
            dsx_j = tl.sum(tl.sum(dpre * m_j[:, :, None], axis=1) * x, axis=0)  # (PP,)
            dsx += tl.where(offs_k[:, None] == j, dsx_j[None, :], 0.0)
    partial = ((split * H + hh) * R + offs_k[:, None]) * P + offs_p[None, :]
    tl.store(dsx_ptr + partial, dsx, mask=mask_kp)
    if HAS_Z:
        tl.store(dsz_ptr + partial, dsz, mask=mask_kp)
    if HAS_O:
        tl.store(dso_ptr + partial, dso, mask=mask_kp)


def _token_strides(t: Optional[Tensor]) -> tuple[int, int]:
    """(batch, token) strides of a (b, l, h, p) input whose heads and channels are dense; zeros for None."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _heads_dense(t: Tensor) -> Tensor:
    """t (b, l, h, p) itself when each token's (h, p) block is dense, else a contiguous copy."""
    h, p = t.shape[2:]
    return t if t.stride(3) == 1 and (t.stride(2) == p or h == 1) else t.contiguous()


def _meta(x: Tensor, r: int) -> dict:
    b, l, h, p = x.shape
    rp = next_power_of_2(r)
    return dict(L=l, H=h, R=r, P=p, RP=rp, PP=next_power_of_2(p), BLOCK_T=max(1, BLOCK_ROWS // rp))


def _mimo_epilogue(y_core: Tensor, x: Tensor, M: Tensor, mimo_x: Tensor, z: Optional[Tensor],
                   mimo_z: Optional[Tensor], mimo_o: Optional[Tensor]) -> Tensor:
    """y_core (b, l r, h, p) contiguous, x and z (b, l, h, p) with dense (h, p) blocks, M
    (b, l, h, r, r) float32 contiguous, mimo_* (h, r, p) float32 contiguous -> y (b, l, h, p),
    or (b, l, h, r, p) without mimo_o, contiguous in x's dtype."""
    b, l, h, p = x.shape
    r = M.shape[-1]
    T = b * l
    y = x.new_empty((b, l, h, p) if mimo_o is not None else (b, l, h, r, p))
    meta = _meta(x, r)
    if T:
        launch(mimo_epilogue_fwd_kernel, (cdiv(T, meta["BLOCK_T"]), h),
            y_core, x, M, mimo_x, z, mimo_z, mimo_o, y, T, *_token_strides(x), *_token_strides(z),
            HAS_Z=z is not None, HAS_O=mimo_o is not None, **meta)
    return y


mimo_epilogue_op = torch.library.custom_op("mambakit::mamba3_mimo_epilogue", _mimo_epilogue, mutates_args=())


@mimo_epilogue_op.register_fake
def _(y_core, x, M, mimo_x, z, mimo_z, mimo_o):
    b, l, h, p = x.shape
    return x.new_empty((b, l, h, p) if mimo_o is not None else (b, l, h, M.shape[-1], p))


def _splits(T: int, h: int, block_t: int) -> tuple[int, int]:
    """(programs per head, tokens per program, a multiple of block_t) of the backward."""
    splits = max(1, min(cdiv(T, block_t), TOKEN_SPLITS // h))
    per_program = max(1, cdiv(cdiv(T, splits), block_t)) * block_t
    return cdiv(T, per_program), per_program


def _mimo_epilogue_bwd(dy: Tensor, y_core: Tensor, x: Tensor, M: Tensor, mimo_x: Tensor, z: Optional[Tensor],
                       mimo_z: Optional[Tensor], mimo_o: Optional[Tensor]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dy like the output, contiguous -> (dy_core like y_core, dx (b, l, h, p) in x's dtype, dM
    float32 like M, d mimo_x (h, r, p) float32, dz (z's dtype), d mimo_z, d mimo_o (float32; empty
    for an absent input))."""
    b, l, h, p = x.shape
    r = M.shape[-1]
    T = b * l
    meta = _meta(x, r)
    splits, per_program = _splits(T, h, meta["BLOCK_T"])
    dyc = torch.empty_like(y_core)
    dx = x.new_empty(b, l, h, p)
    dM = torch.empty_like(M)
    dz = z.new_empty(b, l, h, p) if z is not None else x.new_empty(0)
    partial = [x.new_empty((splits, h, r, p) if present else (0,), dtype=F32)
               for present in (True, z is not None, mimo_o is not None)]
    if T:
        launch(mimo_epilogue_bwd_kernel, (splits, h),
            dy, y_core, x, M, mimo_x, z, mimo_z, mimo_o, dyc, dx, dM, dz, *partial, T, per_program,
            *_token_strides(x), *_token_strides(z), HAS_Z=z is not None, HAS_O=mimo_o is not None, **meta)
    # Summed over the programs (none for an empty sequence: zeros); an absent input's stays empty.
    dsx, dsz, dso = (t.sum(0) if present else t
                     for t, present in zip(partial, (True, z is not None, mimo_o is not None)))
    return dyc, dx, dM, dsx, dz, dsz, dso


mimo_epilogue_bwd = torch.library.custom_op("mambakit::mamba3_mimo_epilogue_bwd", _mimo_epilogue_bwd,
                                            mutates_args=())


@mimo_epilogue_bwd.register_fake
def _(dy, y_core, x, M, mimo_x, z, mimo_z, mimo_o):
    b, l, h, p = x.shape
    return (torch.empty_like(y_core), x.new_empty(b, l, h, p), torch.empty_like(M), torch.empty_like(mimo_x),
            z.new_empty(z.shape) if z is not None else x.new_empty(0),
            torch.empty_like(mimo_z) if z is not None else x.new_empty(0, dtype=F32),
            torch.empty_like(mimo_o) if mimo_o is not None else x.new_empty(0, dtype=F32))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    y_core, x, M, mimo_x, z, mimo_z, mimo_o = ctx.saved_tensors
    dyc, dx, dM, dsx, dz, dsz, dso = mimo_epilogue_bwd(dy.contiguous(), y_core, x, M, mimo_x, z, mimo_z, mimo_o)
    return (dyc, dx, dM, dsx, dz if z is not None else None, dsz if z is not None else None,
            dso if mimo_o is not None else None)


mimo_epilogue_op.register_autograd(_backward, setup_context=_setup)


def _forward_and_backward(y_core, x, M, mimo_x, z, mimo_z, mimo_o, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    y = _mimo_epilogue(y_core, x, M, mimo_x, z, mimo_z, mimo_o)
    if backward:
        _mimo_epilogue_bwd(y, y_core, x, M, mimo_x, z, mimo_z, mimo_o)


def mimo_epilogue(y_core: Tensor, x: Tensor, M: Tensor, mimo_x: Tensor, z: Optional[Tensor],
                  mimo_z: Optional[Tensor], mimo_o: Optional[Tensor], backward: bool) -> Tensor:
    """The MIMO epilogue (module docstring): y_core (b, l r, h, p) or (b, l, r, h, p), x and z
    (b, l, h, p), M (b, l, h, r, r), mimo_* (h, r, p) -> y (b, l, h, p), or (b, l, h, r, p)
    without mimo_o, contiguous in x's dtype. Every float32 input is differentiable; mimo_z is
    given exactly when z is. Kernels compiled ahead on a first call, the backward's too if
    ``backward``."""
    b, l, h, p = x.shape
    r = M.shape[-1]
    y_core = y_core.reshape(b, l * r, h, p).contiguous()
    M = M.to(F32).contiguous()
    mimo_x, mimo_z, mimo_o = (None if t is None else t.to(F32).contiguous() for t in (mimo_x, mimo_z, mimo_o))
    x = _heads_dense(x)
    z = None if z is None else _heads_dense(z)
    compile_ahead("mamba3_mimo_epilogue", _forward_and_backward, y_core, x, M, mimo_x, z, mimo_z, mimo_o, backward)
    return mimo_epilogue_op(y_core, x, M, mimo_x, z, mimo_z, mimo_o)
