"""One forward + backward of the Triton SSD between cudaProfilerStart/Stop, after a warm-up that
compiles, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python benchmarks/profile_ssd.py [b,l,h,p,n,g]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tune_ssd import inputs  # noqa: E402
from mambakit.ops.ssd import ssd  # noqa: E402


def main() -> None:
    shape = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8,4096,32,64,128,1").split(","))
    kw = {k: v.requires_grad_() for k, v in inputs(*shape).items()}
    dy = torch.randn_like(kw["x"])
    for _ in range(2):  # compile outside the profiled region
        ssd(**kw, chunk_size=256, dt_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    ssd(**kw, chunk_size=256, dt_softplus=True, backend="triton").backward(dy)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
