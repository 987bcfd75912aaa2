"""One forward + backward of the Triton selective scan between cudaProfilerStart/Stop, after a
warm-up that autotunes, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python benchmarks/profile_selective_scan.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_selective_scan import make_inputs  # noqa: E402
from mambakit.ops.selective_scan import selective_scan  # noqa: E402


def main() -> None:
    kw = make_inputs(8, 2048, 4096, 16)
    grads = [kw[k] for k in ("u", "delta", "B", "C", "z", "A", "D", "delta_bias")]
    for t in grads:
        t.requires_grad_()
    dy = torch.randn_like(kw["u"])
    for _ in range(2):  # autotune and compile outside the profiled region
        selective_scan(**kw, delta_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    selective_scan(**kw, delta_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
