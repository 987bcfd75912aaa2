"""Mamba-3 (SISO and MIMO) on the GPU: elementwise preparation in PyTorch, the state-space core in
the SSD Triton kernels.

The trapezoid unrolls (see the reference's module docstring) to the recurrence on the shifted
state G_t = H_t + c_{t+1} U_t, with U_t = sum_k v_{t,k} K_{t,k}^T over the r ranks:

    G_t = exp(dt_t A_t) G_{t-1} + w_t U_t,   w_t = gamma_t + c_{t+1} (c_l = 0),
    y_{t,k} = H_t Q_{t,k} + D v_{t,k} = G_t Q_{t,k} - c_{t+1} U_t Q_{t,k} + D v_{t,k}.

The SSD kernels (``per_token`` mode: a log-decay and an input weight per token, one group per head
because the rotary phase differs per head) run it on a sequence of l r rank-tokens, token (t, k)
at position t r + k: decay dt_t A_t on its first rank-token and none on the others, weight w_t on
all. The kernel's output at (t, k) has seen only ranks j <= k of its own step, each with weight
w_t, where the definition wants all r ranks with weight gamma_t: the same-step correction

    sum_j (K_{t,j} . Q_{t,k}) v_{t,j} (gamma_t [j > k] - c_{t+1} [j <= k])

is an r x r product per token and head, elementwise here (for r = 1 it is the SISO skip
-c_{t+1} (K_t . Q_t) x_t). Initial state G_{-1} = H_{-1} + c_0 U_prev from the carried K_prev,
x_prev; G after the last token equals H. Packed sequences (``seq_idx``) reset the kernels' state
where the id changes, which also drops the previous-token term there (it lives in the carried G),
and restart the phase. Autograd differentiates everything around the kernels;
the per-head rotated keys and queries come from one kernel launch per rank (:mod:`.rotary_triton`)
that reads B and C once per group and turns both by one cos/sin per angle. The same-step scores
K . Q come from the unrotated rows, and the skip, the gate (and for MIMO the same-step correction
and the rank mixing) are one more kernel (:mod:`.skip_gate_triton`, :mod:`.mimo_epilogue_triton`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import grad_needed
from ..common import canonical_segments
from ..ssd.triton_ops import kernel_chunk, ssd_fwd
from .mimo_epilogue_triton import mimo_epilogue
from .reference import Mamba3State, rope_layout_for, rotary_phase, trapezoid_weights
from .rotary_triton import rotary_phase_triton, rotate_heads
from .skip_gate_triton import skip_gate

F32 = torch.float32


def same_step_scores(B, C, B_bias, C_bias, h: int) -> torch.Tensor:
    """Q_{t,k} . K_{t,j} for every token, head and pair of ranks: B, C (b, l, r, g, n), biases
    (h, r, n) or None -> (b, l, h, r, r) float32, [..., k, j] = Q_k . K_j.

    A token's keys and queries turn by the same phase, and a rotation keeps dot products, so the
    scores come from the unrotated rows (C_k + C_bias) . (B_j + B_bias), without the per-head
    rotated tensors."""
    b, l, r, g, n = B.shape
    Bf, Cf = B.to(F32), C.to(F32)
    # The row products as a broadcast multiply and sum: an einsum's backward here is an outer product
    # (a K = 1 matrix product), 0.26 ms of a SISO training step on the H200.
    rows = (Cf.permute(0, 1, 3, 2, 4)[:, :, :, :, None] * Bf.permute(0, 1, 3, 2, 4)[:, :, :, None]).sum(-1)
    scores = rows[:, :, :, None].expand(b, l, g, h // g, r, r)
    bias_B = None if B_bias is None else B_bias.to(F32).view(g, h // g, r, n)
    bias_C = None if C_bias is None else C_bias.to(F32).view(g, h // g, r, n)
    if bias_B is not None:
        scores = scores + torch.einsum("blkgn,gejn->blgekj", Cf, bias_B)
    if bias_C is not None:
        scores = scores + torch.einsum("gekn,bljgn->blgekj", bias_C, Bf)
    if bias_B is not None and bias_C is not None:
        scores = scores + torch.einsum("gekn,gejn->gekj", bias_C, bias_B)
    return scores.reshape(b, l, h, r, r)


def mamba3_triton(x, dt, A, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None,
                  mimo_z=None, mimo_o=None, initial_state=None, return_final_state=False, chunk_size=64,
                  rope_layout=None, seq_idx=None):
    """Triton path of :func:`mambakit.ops.mamba3` (inputs already validated)."""
    b, l, h, p = x.shape
    r, g, n = B.shape[2:]
    n_angles = angles.shape[3]
    layout = rope_layout_for(rope_layout, r)
    if initial_state is None:  # the kernels start from a zero state (no G0)
        phi0 = x.new_zeros(b, h, n_angles, dtype=F32)
    else:
        phi0, H0, K0, x0 = (t.to(F32) for t in initial_state)
    dtf = dt.to(F32)
    tensors = (x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, *(initial_state or ()))
    grad = grad_needed(*tensors)
    segment = None if seq_idx is None else canonical_segments(seq_idx)
    if segment is None:
        phi = rotary_phase_triton(angles, dtf, phi0.contiguous(), grad)  # (b, l, h, n_angles) float32
    else:  # packed sequences restart their phase: the reference's segment-aware sum (PyTorch, autograd)
        phi = rotary_phase(angles.to(F32), dtf, phi0, segment).contiguous()
    phi_rows = phi.reshape(b * l, h, n_angles)

    biases = [None if bias is None else bias.to(F32).contiguous() for bias in (B_bias, C_bias)]  # (h, r, n)
    rows_B, rows_C = (v.reshape(b * l, r, g, n).contiguous() for v in (B, C))
    K, Q = (t.view(b, l, r, h, n) for t in rotate_heads(rows_B, rows_C, *biases, phi_rows, layout == "halves",
                                                        x.dtype, grad))  # per head, in x's dtype
    log_decay, gamma, c = trapezoid_weights(dtf, A.to(F32), trap.to(F32))
    c_next = torch.cat([c[:, 1:], c.new_zeros(b, 1, h)], dim=1)
    if r == 1:
        v = x[:, :, None]  # (b, l, 1, h, p)
        step_decay, weight = log_decay, gamma + c_next
    else:
        scale = mimo_x.transpose(0, 1)  # (r, h, p)
        v = x[:, :, None] * scale.to(x.dtype)
        step_decay = torch.cat([log_decay[:, :, None], log_decay.new_zeros(b, l, r - 1, h)], dim=2).view(b, l * r, h)
        weight = (gamma + c_next)[:, :, None].expand(b, l, r, h).reshape(b, l * r, h)
    G0 = None
    if initial_state is not None:
        v_prev = x0[:, None] if r == 1 else x0[:, None] * scale.to(F32)  # (b, r, h, p)
        G0 = (H0 + c[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, K0)).contiguous()
    y_core, H_final, *_ = ssd_fwd(
        v.reshape(b, l * r, h, p).contiguous(), weight.contiguous(), step_decay.contiguous(),
        K.view(b, l * r, h, n), Q.view(b, l * r, h, n), None, None, None, G0,
        None if segment is None else segment.repeat_interleave(r, dim=1), False, 0.0,
        float("inf"), False, kernel_chunk(chunk_size), grad, True)

    scores = same_step_scores(B, C, B_bias, C_bias, h)  # (b, l, h, r, r)
    if r == 1:  # y = (y_core + (D - c_next K.Q) x) silu(z) in one pass
        skip = -c_next * scores[..., 0, 0]
        if D is not None:
            skip = skip + D.to(F32)
        y = skip_gate(y_core.view(b, l, h, p), x, skip, z, grad)
    else:
        # Same-step correction (module docstring): M[k, j] = (K_j . Q_k) (gamma [j > k] - c_next [j <= k]),
        # plus D on the diagonal; the rest of the epilogue is one kernel each way.
        later = torch.ones(r, r, device=x.device, dtype=torch.bool).triu(1)
        M = scores * torch.where(later, gamma[..., None, None], -c_next[..., None, None])
        if D is not None:
            M = M + D.to(F32)[:, None, None] * torch.eye(r, device=x.device, dtype=F32)
        y = mimo_epilogue(y_core, x, M, mimo_x, z, mimo_z, mimo_o, grad)
    if not return_final_state:
        return y
    return y, Mamba3State(phi=phi[:, -1], H=H_final, K_prev=K[:, -1].to(F32), x_prev=x[:, -1].to(F32))
