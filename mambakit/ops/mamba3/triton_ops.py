"""Mamba-3 SISO on the GPU: elementwise preparation in PyTorch, the state-space core in the SSD
Triton kernels.

The trapezoid unrolls (see the reference's module docstring) to the recurrence on the shifted
state G_t = H_t + c_{t+1} x_t K_t^T:

    G_t = exp(dt_t A_t) G_{t-1} + w_t x_t K_t^T,   w_t = gamma_t + c_{t+1} (c_l = 0),
    y_t = G_t Q_t - c_{t+1} (K_t . Q_t) x_t + D x_t,

which is the SSD recurrence with a per-token log-decay dt_t A_t, input weight w_t, keys K and
queries Q, one group per head (the rotary phase differs per head), and initial state
G_{-1} = H_{-1} + c_0 x_prev K_prev^T; G after the last token equals H. The SSD kernels run it
(``per_token`` mode) forward and backward; everything else, differentiated by autograd, is
elementwise over (b, l, h) or (b, l, h, n); the per-head rotated keys and queries come from one
fused kernel (:mod:`.rotary_triton`) that reads B and C once per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ssd.triton_ops import kernel_chunk, ssd_fwd
from .reference import Mamba3State, trapezoid_weights
from .rotary_triton import rotary_phase_triton, rotate_heads

F32 = torch.float32


def mamba3_siso_triton(x, dt, A, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None, initial_state=None,
                       return_final_state=False, chunk_size=64, rope_layout=None):
    """Triton path of :func:`mambakit.ops.mamba3` for r = 1 (inputs already validated)."""
    b, l, h, p = x.shape
    n_angles = angles.shape[3]
    layout = rope_layout or "interleaved"
    if initial_state is None:
        phi0 = x.new_zeros(b, h, n_angles, dtype=F32)
        H0 = x.new_zeros(b, h, p, B.shape[4], dtype=F32)
        K0 = x.new_zeros(b, 1, h, B.shape[4], dtype=F32)
        x0 = x.new_zeros(b, h, p, dtype=F32)
    else:
        phi0, H0, K0, x0 = (t.to(F32) for t in initial_state)
    dtf = dt.to(F32)
    phi = rotary_phase_triton(angles, dtf, phi0.contiguous())  # (b, l, h, n_angles) float32
    g, n = B.shape[3], B.shape[4]
    phi_rows = phi.reshape(b * l, h, n_angles)

    def rotated(v, bias):  # (b, l, 1, g, n) -> (b, l, h, n) in x's dtype
        bias = None if bias is None else bias[:, 0].to(F32).contiguous()
        out = rotate_heads(v.reshape(b * l, g, n).contiguous(), bias, phi_rows, layout == "halves", x.dtype)
        return out.view(b, l, h, n)

    K, Q = rotated(B, B_bias), rotated(C, C_bias)
    log_decay, gamma, c = trapezoid_weights(dtf, A.to(F32), trap.to(F32))
    c_next = torch.cat([c[:, 1:], c.new_zeros(b, 1, h)], dim=1)
    G0 = H0 + c[:, 0, :, None, None] * x0[..., None] * K0[:, 0, :, None, :]  # K0: the carried (float32) key
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, *(initial_state or ())))
    y_core, H_final, *_ = ssd_fwd(
        x.contiguous(), (gamma + c_next).contiguous(), log_decay.contiguous(), K, Q, None, None, None,
        G0.contiguous(), None, False, 0.0, float("inf"), False, kernel_chunk(chunk_size), grad, True)
    skip = -c_next * (K.to(F32) * Q.to(F32)).sum(-1)  # (b, l, h): the current token's own weight is gamma, not w
    if D is not None:
        skip = skip + D.to(F32)
    y = y_core.to(F32) + skip[..., None] * x.to(F32)
    if z is not None:
        y = y * F.silu(z.to(F32))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, Mamba3State(phi=phi[:, -1], H=H_final, K_prev=K[:, -1, None].to(F32), x_prev=x[:, -1].to(F32))
