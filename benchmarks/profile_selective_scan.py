"""One forward + backward of the Triton selective scan between cudaProfilerStart/Stop, after a
warm-up that compiles, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python benchmarks/profile_selective_scan.py [--shape 8,2048,4096,16]
        [--fwd 8x32x1x512] [--bwd 32x8x1x512]

``--fwd`` / ``--bwd`` override the launch plan as in ``benchmarks/tune_selective_scan.py``.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_selective_scan import make_inputs  # noqa: E402
from benchmarks.tune_selective_scan import make_plan  # noqa: E402
from mambakit.ops.selective_scan import selective_scan, triton_ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,2048,4096,16", help="b,d,l,n")
    parser.add_argument("--fwd", help="forward plan BLxBDxWxCHUNK (default: the library's plan)")
    parser.add_argument("--bwd", help="backward plan SAVExBDxWxCHUNK (default: the library's plan)")
    args = parser.parse_args()
    if args.fwd or args.bwd:
        chosen = make_plan(args.fwd, args.bwd)
        triton_ops.plan = lambda *_: chosen
    kw = make_inputs(*(int(v) for v in args.shape.split(",")))
    grads = [kw[k] for k in ("u", "delta", "B", "C", "z", "A", "D", "delta_bias")]
    for t in grads:
        t.requires_grad_()
    dy = torch.randn_like(kw["u"])
    for _ in range(2):  # compile outside the profiled region
        selective_scan(**kw, delta_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    selective_scan(**kw, delta_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
