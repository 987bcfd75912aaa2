"""Per-kernel times of the Triton SSD, and a search over each kernel's launch parameters.

    python benchmarks/tune_ssd.py                      # per-kernel times with the shipped CONFIGS
    python benchmarks/tune_ssd.py --search fwd_output  # try the candidates of some kernels (or 'all')
    python benchmarks/tune_ssd.py --walk-programs 3 6 12  # the forward walk split at other targets
    python benchmarks/tune_ssd.py --op mamba3 --search all  # the kernels as Mamba-3 SISO's core
    python benchmarks/tune_ssd.py --chunk 128 --search fwd_output  # at another chunk_size

bf16 inputs as benchmarks/bench_ssd.py (D, dt_bias, softplus, chunk 256) at the anchor shapes, or
with ``--op mamba3`` the whole SISO op of benchmarks/bench_mamba3.py (chunk 64, one head per
group, per-token decay). Kernel times come from the CUDA profiler (mean over the repetitions); a
search ranks candidates by the device time of the whole forward+backward (every kernel); the
shipped parameters live in ``mambakit.ops.ssd.triton_ops.CONFIGS`` (``PER_TOKEN_CONFIGS`` for
Mamba-3).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_mamba3  # noqa: E402
from mambakit.ops.mamba3 import mamba3  # noqa: E402
from mambakit.ops.ssd import ssd  # noqa: E402
from mambakit.ops.ssd import triton_ops  # noqa: E402

KERNELS = {  # CONFIGS key -> Triton kernel name
    "fwd_state": "ssd_fwd_state_kernel", "fwd_entry": "ssd_fwd_entry_kernel", "fwd_output": "ssd_fwd_output_kernel",
    "bwd_state": "ssd_bwd_state_kernel", "bwd_dx": "ssd_bwd_dx_kernel", "bwd_dc": "ssd_bwd_dc_kernel",
    "bwd_dt": "ssd_bwd_dt_kernel", "fwd_complete": "ssd_complete_states_kernel", "bwd_entry": "ssd_bwd_entry_kernel",
    "bwd_fixup": "ssd_bwd_complete_kernel",
}


def grid(**axes):
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


CANDIDATES = {
    "fwd_state": grid(BLOCK_T=[128], BLOCK_P=[32, 64], BLOCK_N=[64, 128], num_warps=[4, 8], num_stages=[1, 2, 3]),
    "fwd_output": grid(BLOCK_M=[64, 128], BLOCK_K=[16, 32], BLOCK_P=[64], HEADS=[2], num_warps=[4, 8],
                       num_stages=[2, 3, 4]),
    "bwd_state": grid(BLOCK_T=[64, 128], BLOCK_P=[32, 64], BLOCK_N=[64, 128], num_warps=[4, 8], num_stages=[2, 3]),
    "bwd_dx": grid(BLOCK_S=[64], BLOCK_T=[32], HEADS=[2, 4, 8, 16, 32], num_warps=[4], num_stages=[1]),
    "bwd_dc": grid(BLOCK_T=[64], BLOCK_S=[32, 64], HEADS=[1, 4, 8, 16, 32], num_warps=[4], num_stages=[1]),
    "bwd_dt": grid(num_warps=[1, 2, 4, 8]),
}
# Mamba-3's core: one head per program (HEADS 1), chunk 64, float32 states.
PER_TOKEN_CANDIDATES = {
    "fwd_state": grid(BLOCK_T=[32, 64], BLOCK_P=[32, 64], BLOCK_N=[64, 128], num_warps=[4, 8], num_stages=[2]),
    "fwd_output": grid(BLOCK_M=[32, 64], BLOCK_K=[16, 32, 64], BLOCK_P=[32, 64], HEADS=[1], num_warps=[4],
                       num_stages=[2, 3]),
    "bwd_state": grid(BLOCK_T=[32, 64], BLOCK_P=[32, 64], BLOCK_N=[64, 128], num_warps=[4, 8], num_stages=[2]),
    "bwd_dx": grid(BLOCK_S=[32, 64], BLOCK_T=[32, 64], HEADS=[1], num_warps=[4, 8], num_stages=[1, 2]),
    "bwd_dc": grid(BLOCK_T=[32, 64], BLOCK_S=[32, 64], HEADS=[1], num_warps=[4, 8], num_stages=[1, 2]),
    "bwd_dt": grid(num_warps=[1, 2, 4, 8]),
}


def inputs(b, l, h, p, n, g):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    A = -torch.empty(h, device="cuda").uniform_(1, 16)
    return dict(x=rn(b, l, h, p), dt=rn(b, l, h) * 0.1, A=A, B=rn(b, l, g, n), C=rn(b, l, g, n),
                D=torch.ones(h, device="cuda"), dt_bias=torch.full((h,), -3.0, device="cuda"))


def mamba3_inputs(b, l, h, p, n, g):
    """Mamba-3 SISO inputs of benchmarks/bench_mamba3.py (one B/C head; the angles' own leaf)."""
    if g != 1:
        raise SystemExit(f"--op mamba3 times one B/C head (g = 1), got g = {g}")
    return {k: v.detach().clone() for k, v in bench_mamba3.inputs(b, l, h, p, n).items()}


def kernel_times(kw, reps=10, op="ssd", chunk=None) -> dict[str, float]:
    """Mean device ms per call of each SSD kernel over ``reps`` forward+backward runs of ``op``
    (chunk: the op's chunk_size, by default the benchmark's, 256 for the SSD and 64 for Mamba-3)."""
    chunk = chunk or (64 if op == "mamba3" else 256)
    leaves = {k: v.detach().requires_grad_() for k, v in kw.items()}
    dy = torch.randn_like(kw["x"])

    def run():
        if op == "mamba3":
            v = leaves
            y = mamba3(v["x"], v["dt"], v["A"], v["B"], v["C"], v["trap"], v["angles"], D=v["D"], z=v["z"],
                       B_bias=v["B_bias"], C_bias=v["C_bias"], chunk_size=chunk, backend="triton")
        else:
            y = ssd(**leaves, chunk_size=chunk, dt_softplus=True, backend="triton")
        y.backward(dy)

    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    times = {"total": 0.0}  # every kernel of the call, PyTorch's (allocations, sums of partials) included
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        times["total"] += event.device_time_total / 1e3 / reps
        for key, name in KERNELS.items():
            if event.key.startswith(name):
                times[key] = event.device_time_total / 1e3 / reps
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["ssd", "mamba3"], default="ssd")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="b,l,h,p,n,g (default: the op's anchor shapes)")
    parser.add_argument("--search", nargs="*", default=[], help="CONFIGS keys, or 'all'")
    parser.add_argument("--walk-programs", nargs="*", type=int, default=[],
                        help="values of triton_ops.WALK_PROGRAMS_PER_SM to time the forward with")
    parser.add_argument("--chunk", type=int, default=None,
                        help="the op's chunk_size (default: the benchmark's, 256 for ssd, 64 for mamba3)")
    args = parser.parse_args()
    anchors = ["8,4096,32,64,128,1"] if args.op == "mamba3" else ["8,4096,32,64,128,1", "2,16384,32,64,128,1"]
    shapes = args.shapes or anchors
    shapes = [tuple(int(v) for v in s.split(",")) for s in shapes]
    cases = {s: (mamba3_inputs if args.op == "mamba3" else inputs)(*s) for s in shapes}
    table = triton_ops.PER_TOKEN_CONFIGS if args.op == "mamba3" else triton_ops.CONFIGS
    candidates = PER_TOKEN_CANDIDATES if args.op == "mamba3" else CANDIDATES
    shipped_walk = triton_ops.WALK_PROGRAMS_PER_SM
    for per_sm in args.walk_programs:
        triton_ops.WALK_PROGRAMS_PER_SM = per_sm
        for shape, kw in cases.items():
            times = kernel_times(kw, op=args.op, chunk=args.chunk)
            print(f"walk {per_sm} programs/SM {shape}: fwd_state {times['fwd_state']:.3f} "
                  f"fwd_entry {times.get('fwd_entry', 0.0):.3f} fwd_output {times['fwd_output']:.3f}", flush=True)
    triton_ops.WALK_PROGRAMS_PER_SM = shipped_walk
    for shape, kw in cases.items():
        times = kernel_times(kw, op=args.op, chunk=args.chunk)
        print(f"shipped {shape}: " + "  ".join(f"{k} {v:.3f}" for k, v in times.items() if k != "total")
              + f"  | fwd {times['fwd_state'] + times.get('fwd_entry', 0.0) + times['fwd_output']:.3f} ms, all kernels {times['total']:.3f} ms",
              flush=True)
    names = list(candidates) if args.search == ["all"] else args.search
    for name in names:
        shipped = dict(table[name])
        results = []
        for cand in candidates[name]:
            table[name] = cand
            try:
                per_shape = [kernel_times(kw, reps=5, op=args.op, chunk=args.chunk) for kw in cases.values()]
            except Exception as err:  # out of resources for this config: skip it
                print(f"  {name} {cand}: failed ({type(err).__name__})", flush=True)
                continue
            # Ranked by the whole call: a kernel's choice can move work into PyTorch ops.
            results.append((sum(t["total"] for t in per_shape), [t["total"] for t in per_shape], cand))
            print(f"  {name} {cand}: kernel " + " ".join(f"{t[name]:.3f}" for t in per_shape)
                  + "  all " + " ".join(f"{t['total']:.3f}" for t in per_shape), flush=True)
        table[name] = shipped
        results.sort(key=lambda r: r[0])
        print(f"BEST {name}: {results[0][2]} -> all kernels " + " ".join(f"{t:.3f}" for t in results[0][1])
              + f" (shipped {shipped})", flush=True)


if __name__ == "__main__":
    main()
