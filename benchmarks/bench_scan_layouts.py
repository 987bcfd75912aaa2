"""The Triton selective scan forward + backward with time-contiguous against channel-last inputs,
at a 130M-class Mamba-1 layer's training shape (batch 8, d_inner 1536, 2048 tokens, n 16, bf16,
D, z, delta_bias, softplus), where the layer's projections give u, delta and z channel-last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_scan_layouts.py

Rows: time-contiguous inputs; channel-last inputs read in place (y, du, ddelta, dz written
channel-last); channel-last inputs copied to time-contiguous first and the gradients copied back
(what the layer paid before the kernels took strides). Median ms of triton.testing.do_bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit.ops.selective_scan import selective_scan  # noqa: E402


def main() -> None:
    b, d, l, n = 8, 1536, 2048, 16
    g = torch.Generator(device="cuda").manual_seed(0)

    def rn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    A = -torch.rand(d, n, device="cuda", generator=g) - 0.5
    B, C = rn(b, n, l, dtype=torch.float32), rn(b, n, l, dtype=torch.float32)
    D, bias = torch.ones(d, device="cuda"), 0.1 * rn(d, dtype=torch.float32)
    xz = rn(b, l, 2 * d)  # as in_proj gives x and z
    delta_cl = (0.5 * rn(b, l, d)).transpose(1, 2)
    u_cl, z_cl = xz[..., :d].contiguous().transpose(1, 2), xz[..., d:].transpose(1, 2)
    dy_cl = rn(b, l, d).transpose(1, 2)

    def step(u, delta, z, dy, copy_first):
        u, delta, z = (t.detach().requires_grad_() for t in (u, delta, z))
        if copy_first:
            uc, deltac, zc = u.contiguous(), delta.contiguous(), z.contiguous()
            y = selective_scan(uc, deltac, A, B, C, D=D, z=zc, delta_bias=bias, delta_softplus=True)
            torch.autograd.grad(y, [u, delta, z], dy.contiguous())
        else:
            y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
            torch.autograd.grad(y, [u, delta, z], dy)

    cases = [("time-contiguous inputs", (u_cl.contiguous(), delta_cl.contiguous(), z_cl.contiguous(),
                                         dy_cl.contiguous()), False),
             ("channel-last, read in place", (u_cl, delta_cl, z_cl, dy_cl), False),
             ("channel-last, copied first", (u_cl, delta_cl, z_cl, dy_cl), True)]
    for name, tensors, copy_first in cases:
        ms = do_bench(lambda: step(*tensors, copy_first))
        print(f"{name:32s} forward + backward {ms:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
