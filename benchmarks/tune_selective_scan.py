"""Launch-parameter sweep of the Triton selective scan: forward and backward timed alone for each
plan, at the benchmark shapes (no peer).

    python benchmarks/tune_selective_scan.py [--shapes 8,2048,4096,16 1,2048,65536,16]
        [--fwd 8x32x1x1024 ...] [--bwd 64x8x1x1024 ...] [--bc variable|invariant] [--jobs 8] [--out tune.json]

A forward plan is BLOCK_L x BLOCK_D x warps x tokens-per-program [x groups of state entries, a
warp each, default 1]; a backward plan is tile (= saved-state spacing) x BLOCK_D x warps x
tokens-per-program [x pipeline stages of the loop over state entries, default 1]; "all" for tokens
per program means one program over the whole sequence. The forward of a backward plan uses
8 x 32 x 1 tiles; a forward plan is timed with 32-token saved-state spacing. Every plan is compiled
first, in ``--jobs`` worker processes (ptxas is the slow part), then timed one after the other.
Prints ms per plan, fastest first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_selective_scan import make_inputs  # noqa: E402
from benchmarks.common import atomic_write, time_ms  # noqa: E402
from mambakit.ops.selective_scan import triton_ops  # noqa: E402

FWD = ["8x32x1xall", "8x32x1x2048", "8x32x1x1024", "8x32x1x512", "16x16x1x1024", "4x32x1x1024", "2x32x1x1024",
       "2x64x2x1024"]
BWD = ["64x4x1xall", "64x4x1x1024", "64x4x1x512", "64x2x1x512", "64x8x1x512", "32x8x1x512", "16x16x1x512",
       "8x32x1x512"]


def _ints(spec: str) -> tuple[int, ...]:
    return tuple(1 << 30 if v == "all" else int(v) for v in spec.split("x"))


def make_plan(fwd: str | None = None, bwd: str | None = None) -> triton_ops.Plan:
    fl, fd, fw, fc, *groups = _ints(fwd) if fwd else (8, 32, 1, 1 << 30)
    save, bd, bw, bc, *stages = _ints(bwd) if bwd else (32, 8, 1, 1 << 30, 3)
    return triton_ops.Plan(fwd_block_l=fl, fwd_block_d=fd, fwd_warps=fw, save_every=save, bwd_block_d=bd,
                           bwd_warps=bw, fwd_chunk=fc, bwd_chunk=bc, bwd_stages=stages[0] if stages else 1,
                           fwd_groups=groups[0] if groups else 1)


def _args(kw, save):
    return (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"], None, None, True, save)


def run_forward(kw, plan, save):
    triton_ops.plan = lambda *_: plan
    return triton_ops.selective_scan_fwd(*_args(kw, save))


def backward_fn(kw, plan):
    """A closure running the backward alone, after one forward that saved its states."""
    _, _, states, y_pre = run_forward(kw, plan, True)
    dy = torch.randn_like(kw["u"])

    def backward():
        return triton_ops.selective_scan_bwd(dy, None, kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                                             kw["z"], kw["delta_bias"], None, None, states, y_pre, True)
    return backward


def inputs(shape, bc: str) -> dict:
    """The benchmark's inputs; with ``bc="invariant"`` B and C are (d, n) instead of (b, n, l)."""
    kw = make_inputs(*shape)
    if bc == "invariant":
        _, d, _, n = shape
        kw["B"], kw["C"] = (torch.randn(d, n, device="cuda") for _ in range(2))
    return kw


def _compile(job):
    """Worker: run one plan once at the shape, which compiles it into Triton's on-disk cache."""
    shape, kind, spec, bc = job
    kw = inputs(shape, bc)
    if kind == "fwd":
        run_forward(kw, make_plan(fwd=spec), False)
        run_forward(kw, make_plan(fwd=spec), True)
    else:
        backward_fn(kw, make_plan(bwd=spec))()
    torch.cuda.synchronize()
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,2048,4096,16", "1,2048,65536,16"])
    parser.add_argument("--fwd", nargs="*", default=FWD)
    parser.add_argument("--bwd", nargs="*", default=BWD)
    parser.add_argument("--bc", choices=["variable", "invariant"], default="variable",
                        help="time-varying (b, n, l) B and C as in Mamba-1, or time-invariant (d, n)")
    parser.add_argument("--jobs", type=int, default=8, help="worker processes compiling plans in parallel")
    parser.add_argument("--out", help="JSON file for the timings")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in spec.split(",")) for spec in args.shapes]
    jobs = [(s, kind, p, args.bc) for kind, specs in (("fwd", args.fwd), ("bwd", args.bwd)) for s in shapes for p in specs]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for _ in tqdm(pool.imap_unordered(_compile, jobs), total=len(jobs), desc="compiling plans"):
            pass
    records = []
    for shape in shapes:
        kw = inputs(shape, args.bc)
        print(f"== b{shape[0]} d{shape[1]} l{shape[2]} n{shape[3]}, {args.bc} B/C", flush=True)
        for kind, specs in (("fwd", args.fwd), ("bwd", args.bwd)):
            results = []
            for spec in specs:
                if kind == "fwd":
                    plan = make_plan(fwd=spec)
                    ms = time_ms(lambda: run_forward(kw, plan, False))
                    ms_save = time_ms(lambda: run_forward(kw, plan, True))
                    text = f"fwd {spec}: {ms:.3f} ms (saving states {ms_save:.3f})"
                else:
                    ms = time_ms(backward_fn(kw, make_plan(bwd=spec)))
                    text = f"bwd {spec}: {ms:.3f} ms"
                results.append((ms, text))
                records.append({"shape": list(shape), "bc": args.bc, "kind": kind, "plan": spec, "ms": ms})
                if kind == "fwd":
                    records.append({"shape": list(shape), "bc": args.bc, "kind": "fwd_saving_states", "plan": spec,
                                    "ms": ms_save})
                print("  " + text, flush=True)
            if results:
                print(f"  fastest {kind}: " + min(results)[1], flush=True)
    if args.out:
        atomic_write(Path(args.out), json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
