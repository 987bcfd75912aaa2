"""Where the Triton Mamba-3 path spends its time: one forward and one forward + backward under
torch.profiler after a warm-up that compiles, printing the kernels by CUDA time.

    python benchmarks/profile_mamba3.py [b,l,h,p,n] [r]      (default 8,4096,32,64,128 and SISO, r = 1)

With r > 1 the MIMO inputs of ``bench_mamba3.py`` (r ranks of B, C and their biases, mimo_x/z/o).
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_mamba3 import inputs, mimo_inputs  # noqa: E402
from mambakit.ops.mamba3 import mamba3  # noqa: E402


def main() -> None:
    b, l, h, p, n = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8,4096,32,64,128").split(","))
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if r < 1:
        raise SystemExit(f"r: expected a rank >= 1, got {r}")
    kw = inputs(b, l, h, p, n)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items() if k != "angles"}
    if r > 1:
        leaves = mimo_inputs(leaves, r)
    angles = kw["angles"][:, :, :1].detach().clone().requires_grad_()
    dy = torch.randn_like(kw["x"])

    def run():
        v = leaves
        mimo = {k: v[k] for k in ("mimo_x", "mimo_z", "mimo_o")} if r > 1 else {}
        return mamba3(v["x"], v["dt"], v["A"], v["B"], v["C"], v["trap"], angles.expand(b, l, h, -1), D=v["D"],
                      z=v["z"], B_bias=v["B_bias"], C_bias=v["C_bias"], chunk_size=64, backend="triton", **mimo)

    for _ in range(2):
        run().backward(dy)
    torch.cuda.synchronize()
    for label, step in (("forward", lambda: run()), ("forward + backward", lambda: run().backward(dy))):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== {label}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
