"""Launch-parameter sweep of the Triton selective scan: forward and backward kernels timed alone
for each tiling, at the benchmark shapes (no peer).

    python benchmarks/tune_selective_scan.py [--shapes 8,2048,4096,16 1,2048,65536,16]
        [--fwd 8x32x1 16x16x1 ...] [--bwd 64x8x1 ...]

A forward plan is BLOCK_L x BLOCK_D x warps; a backward plan is chunk x BLOCK_D x warps (the
forward that feeds it stores states every chunk tokens). Prints ms per plan, fastest first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_selective_scan import make_inputs  # noqa: E402
from benchmarks.common import time_ms  # noqa: E402
from mambakit.ops.selective_scan import triton_ops  # noqa: E402

FWD = ["8x32x1", "8x64x2", "8x128x4", "16x16x1", "16x32x2", "32x8x1", "32x16x2", "64x4x1", "64x8x2"]
BWD = ["64x4x1", "64x8x1", "64x8x2", "32x8x1", "32x16x2", "16x16x1", "8x32x1"]


def _plan(fwd=(8, 32, 1), bwd=(64, 8, 1)):
    return triton_ops.Plan(fwd_block_l=fwd[0], fwd_block_d=fwd[1], fwd_warps=fwd[2], save_every=bwd[0],
                           bwd_block_d=bwd[1], bwd_warps=bwd[2])


def _args(kw, save):
    return (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], None, None, True, save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,2048,4096,16", "1,2048,65536,16"])
    parser.add_argument("--fwd", nargs="*", default=FWD)
    parser.add_argument("--bwd", nargs="*", default=BWD)
    args = parser.parse_args()
    for spec in args.shapes:
        b, d, l, n = (int(v) for v in spec.split(","))
        kw = make_inputs(b, d, l, n)
        print(f"== b{b} d{d} l{l} n{n}", flush=True)
        results = []
        for p in args.fwd:
            fwd = tuple(int(v) for v in p.split("x"))
            triton_ops.plan = lambda *_, fwd=fwd: _plan(fwd=fwd)
            ms = time_ms(lambda: triton_ops.selective_scan_fwd(*_args(kw, False)))
            ms_save = time_ms(lambda: triton_ops.selective_scan_fwd(*_args(kw, True)))
            results.append((ms, f"fwd {p}: {ms:.3f} ms (saving states {ms_save:.3f})"))
            print("  " + results[-1][1], flush=True)
        print("  fastest forward: " + min(results)[1])
        results = []
        dy = torch.randn_like(kw["u"])
        for p in args.bwd:
            bwd = tuple(int(v) for v in p.split("x"))
            triton_ops.plan = lambda *_, bwd=bwd: _plan(bwd=bwd)
            _, _, states, y_pre = triton_ops.selective_scan_fwd(*_args(kw, True))

            def backward():
                return triton_ops.selective_scan_bwd(dy, None, kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                                     kw["z"], kw["delta_bias"], None, None, states, y_pre, True)

            ms = time_ms(backward)
            results.append((ms, f"bwd {p}: {ms:.3f} ms"))
            print("  " + results[-1][1], flush=True)
        print("  fastest backward: " + min(results)[1])


if __name__ == "__main__":
    main()
