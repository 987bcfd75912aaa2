"""The Triton causal conv1d (SiLU, bias, width 4) forward and backward in the layouts the layers
hand it, against the bytes floor: a 130M-class layer's conv at batch 8 x 2048 tokens, bf16.

    PYTHONUNBUFFERED=1 python benchmarks/bench_conv1d.py

Layouts of x (b, d, l) and of the gradient dy: time-contiguous (memory (b, d, l)), channel-last
(memory (b, l, d)), and channel-last column slices of a wider projection (Mamba-1's x of the
(b, l, 2 d_inner) in_proj output; Mamba-2's xBC of its 3352-wide one, a row stride not divisible
by 16). Floor: x read and y written (forward); x and dy read, dx written (backward), at 3.35 TB/s.
Times are the median of triton.testing.do_bench.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit.ops.conv1d import triton_ops  # noqa: E402

BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s


def main() -> None:
    b, l = 8, 2048
    for d, width, label in [(1536, 3072, "Mamba-1 x (d 1536)"), (1792, 3352, "Mamba-2 xBC (d 1792)")]:
        w = torch.randn(d, 4, device="cuda")
        bias = torch.randn(d, device="cuda")

        def channel_last(row=d):
            return torch.randn(b, l, row, device="cuda", dtype=torch.bfloat16)[..., :d].transpose(1, 2)

        def time_contiguous():
            return torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)

        layouts = [("time-contiguous", time_contiguous, time_contiguous),
                   ("channel-last", channel_last, channel_last),
                   (f"channel-last slice of {width}", lambda: channel_last(width), channel_last),
                   ("channel-last x, time-contiguous dy", channel_last, time_contiguous)]
        element_bytes = b * d * l * 2
        print(f"{label}: floor forward {2 * element_bytes / BANDWIDTH * 1e6:.0f} us, "
              f"backward {3 * element_bytes / BANDWIDTH * 1e6:.0f} us", flush=True)
        for name, make_x, make_dy in layouts:
            x, dy = make_x(), make_dy()
            fwd = do_bench(lambda: triton_ops.causal_conv1d_fwd(x, w, bias, None, None, True))
            bwd = do_bench(lambda: triton_ops.causal_conv1d_bwd(dy, x, w, bias, None, None, True))
            print(f"  {name:40s} forward {fwd * 1e3:6.0f} us   backward {bwd * 1e3:6.0f} us", flush=True)


if __name__ == "__main__":
    main()
