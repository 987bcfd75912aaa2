"""Sweep of the channel-last causal conv1d tile (BLOCK_D channels x BLOCK_L tokens, warps) for the
forward and the backward, at the two 130M-class layer shapes of ``bench_conv1d.py`` (bf16, SiLU,
bias, width 4, batch 8 x 2048): Mamba-1's x (a 1536-column slice of a 3072-wide projection) and
Mamba-2's xBC (1792 columns of 3352).

    PYTHONUNBUFFERED=1 python benchmarks/tune_conv1d.py

Prints each tile's microseconds (median of triton.testing.do_bench) per shape and pass and the
best tile per pass by the sum over the two shapes; ``CHANNEL_LAST_TILES`` in
mambakit/ops/conv1d/triton_ops.py takes the winners.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit.ops.conv1d import triton_ops  # noqa: E402

SHAPES = [(1536, 3072), (1792, 3352)]  # (channels, projection width)
BLOCK_D = [32, 64, 128, 256]
BLOCK_L = [8, 16, 32, 64]
WARPS = [4, 8]


def main() -> None:
    b, l = 8, 2048
    inputs = []
    for d, width in SHAPES:
        x = torch.randn(b, l, width, device="cuda", dtype=torch.bfloat16)[..., :d].transpose(1, 2)
        dy = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        inputs.append((x, dy, torch.randn(d, 4, device="cuda"), torch.randn(d, device="cuda")))
    totals = {"fwd": {}, "bwd": {}}
    for block_d, block_l, warps in itertools.product(BLOCK_D, BLOCK_L, WARPS):
        if block_d * block_l // (32 * warps) < 1 or block_d * block_l > 16384:
            continue
        tile = dict(BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps)
        times = {}
        for pass_ in ("fwd", "bwd"):
            triton_ops.CHANNEL_LAST_TILES[pass_] = tile
            times[pass_] = []
            for x, dy, w, bias in inputs:
                if pass_ == "fwd":
                    ms = do_bench(lambda: triton_ops.causal_conv1d_fwd(x, w, bias, None, None, True))
                else:
                    ms = do_bench(lambda: triton_ops.causal_conv1d_bwd(dy, x, w, bias, None, None, True))
                times[pass_].append(ms * 1e3)
            totals[pass_][(block_d, block_l, warps)] = sum(times[pass_])
        print(f"BLOCK_D {block_d:3d} BLOCK_L {block_l:2d} warps {warps}: forward "
              f"{' / '.join(f'{t:5.0f}' for t in times['fwd'])} us, backward "
              f"{' / '.join(f'{t:5.0f}' for t in times['bwd'])} us", flush=True)
    for pass_, table in totals.items():
        best = min(table, key=table.get)
        print(f"best {pass_}: BLOCK_D {best[0]}, BLOCK_L {best[1]}, warps {best[2]} "
              f"({table[best]:.0f} us for both shapes)")


if __name__ == "__main__":
    main()
