"""Mamba-3 SISO: mambakit's Triton path against the official Triton ``mamba3_siso_combined``, in one
run on one GPU.

    PYTHONUNBUFFERED=1 python benchmarks/bench_mamba3.py

Options: --shapes b,l,h,p,n ... (default 8,4096,32,64,128; one B/C head), --chunk (default 64),
--mimo-rank R (default 4: also our MIMO of rank R at each shape, against our SISO; 1 skips it),
--out FOLDER (default benchmarks/results). Run from the repository root on the GPU machine.

Inputs as the official ``Mamba3`` module feeds its kernel: x, z, B, C in bf16 (B, C
RMS-normalised scale), dt = softplus(N(0, 1) - 4) and A = -softplus(N(0, 1)) in fp32 (the decay
per token is dt A), trapezoid logits and rotary angle logits (rope fraction 0.5: n / 4 angles, one
set shared by all heads as the module's expand) in fp32, D, B_bias, C_bias in fp32. Both sides
get the same values; mambakit takes the logits in the layout of :func:`mambakit.ops.mamba3`, the
official kernel in its own ((b, h, l) for dt A, dt, trap). The script first prints the relative
error of mambakit's output and gradients against the official ones, then ms forward and forward +
backward (median, CUDA events) and the speedup; first of all the wall time of mambakit's very
first forward + backward (compilation included, in a fresh Triton cache unless TRITON_CACHE_DIR
is set). Records go to <out>/mamba3.json and <out>/mamba3.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from benchmarks.bench_ssd import COLUMNS, COPY_BYTES_PER_S, report, rel_err, time_modes  # noqa: E402
from benchmarks.common import environment, write_results  # noqa: E402
from mambakit.ops.mamba3 import mamba3  # noqa: E402


def inputs(b, l, h, p, n) -> dict:
    dev, bf16 = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    return dict(x=rn(b, l, h, p, dtype=bf16), z=rn(b, l, h, p, dtype=bf16), B=rn(b, l, 1, 1, n, dtype=bf16),
                C=rn(b, l, 1, 1, n, dtype=bf16), dt=F.softplus(rn(b, l, h) - 4), A=-F.softplus(rn(b, l, h)),
                trap=rn(b, l, h), angles=rn(b, l, 1, n // 4).expand(b, l, h, n // 4), D=torch.ones(h, device=dev),
                B_bias=rn(h, 1, n) * 0.1, C_bias=rn(h, 1, n) * 0.1)


def mimo_inputs(kw: dict, r: int) -> dict:
    """The SISO inputs with r ranks of B, C and their biases (the first rank the SISO one) and
    mimo_x, mimo_o = 1 / r, mimo_z = 1 (the official initialisation), all leaves with gradients."""
    b, l, h, p = kw["x"].shape
    n = kw["B"].shape[-1]
    g = torch.Generator(device="cuda").manual_seed(1)

    def ranks(t, dim):
        extra = torch.randn(*t.shape[:dim], r - 1, *t.shape[dim + 1:], device="cuda", generator=g).to(t.dtype)
        return torch.cat([t, extra * t.float().std().to(t.dtype)], dim=dim)

    out = {k: kw[k] for k in ("x", "z", "dt", "A", "trap", "D")}
    out.update(B=ranks(kw["B"], 2), C=ranks(kw["C"], 2), B_bias=ranks(kw["B_bias"], 1), C_bias=ranks(kw["C_bias"], 1),
               mimo_x=torch.full((h, r, p), 1 / r, device="cuda"), mimo_z=torch.ones(h, r, p, device="cuda"),
               mimo_o=torch.full((h, r, p), 1 / r, device="cuda"))
    return {k: v.detach().clone().requires_grad_() for k, v in out.items()}


def floor_ms(b, l, h, p, n, mode) -> float:
    """Bytes that must cross HBM at the copy bandwidth. Forward: read x, z (bf16), dt, A, trap (fp32
    per head), the shared angles, B, C; write y. Backward: read them again with dy, write dx, dz,
    ddt, dA, dtrap, dB, dC and the per-head angle gradient."""
    act, per_head, shared = b * l * h * p * 2, b * l * h * 4, b * l * (n // 4) * 4 + 2 * b * l * n * 2
    fwd = 3 * act + 3 * per_head + shared
    bwd = fwd + act + 2 * act + 3 * per_head + shared + b * l * h * (n // 4) * 4
    return (fwd if mode == "fwd" else bwd) / COPY_BYTES_PER_S * 1e3


def official_fn():
    src = peers.official_source(REPO)
    if src is None:
        print("[peers] official source archive not carried (.whl/mamba_ssm-*.tar.gz): timing mambakit only")
        return None
    peers.official_triton_only(src)
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    except ImportError as e:
        print(f"[peers] official mamba3_siso_combined not importable ({e}): timing mambakit only")
        return None
    return mamba3_siso_combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,4096,32,64,128"], help="b,l,h,p,n per shape")
    parser.add_argument("--chunk", type=int, default=64, help="chunk size of both")
    parser.add_argument("--out", default="benchmarks/results", help="folder for mamba3.json/.md")
    parser.add_argument("--mimo-rank", type=int, default=4,
                        help="also time our MIMO of this rank at each shape against our SISO (1: skip)")
    args = parser.parse_args()
    env = environment()
    peer = official_fn()
    records = []
    for spec in args.shapes:
        b, l, h, p, n = (int(v) for v in spec.split(","))
        kw = inputs(b, l, h, p, n)
        names = ["x", "z", "B", "C", "dt", "A", "trap", "D", "B_bias", "C_bias"]
        leaves = {k: kw[k].detach().clone().requires_grad_() for k in names}
        angles = kw["angles"][:, :, :1].detach().clone().requires_grad_()  # (b, l, 1, a), shared by the heads
        dy = torch.randn_like(kw["x"])
        shape = f"b{b} l{l} h{h} p{p} n{n} g1 chunk{args.chunk}"

        def ours():
            v = leaves
            return mamba3(v["x"], v["dt"], v["A"], v["B"], v["C"], v["trap"], angles.expand(b, l, h, -1), D=v["D"],
                          z=v["z"], B_bias=v["B_bias"], C_bias=v["C_bias"], chunk_size=args.chunk, backend="triton")

        if not records:  # the first call of the process: compile time included
            torch.cuda.synchronize()
            start = time.perf_counter()
            ours().backward(dy)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            print(f"[first call] mambakit mamba3 {shape} forward+backward: {seconds:.1f} s "
                  f"(Triton cache {os.environ['TRITON_CACHE_DIR']})", flush=True)
            records.append(dict(op="mamba3_siso", shape=shape, dtype="bf16", mode="first_call", ours_ms=seconds * 1e3,
                                peer=None, peer_ms=None, speedup=None, floor_ms=None, floor_fraction=None, **env))
        tensors = list(leaves.values()) + [angles]
        peer_times = None
        if peer is not None:
            def official():
                v = leaves
                adt = (v["A"] * v["dt"]).transpose(1, 2)
                return peer(Q=v["C"][:, :, 0], K=v["B"][:, :, 0], V=v["x"], ADT=adt, DT=v["dt"].transpose(1, 2),
                            Trap=v["trap"].transpose(1, 2), Q_bias=v["C_bias"][:, 0], K_bias=v["B_bias"][:, 0],
                            Angles=angles.expand(b, l, h, -1), D=v["D"], Z=v["z"], chunk_size=args.chunk)

            errors = []
            results = {}
            for name, fn in (("ours", ours), ("official", official)):
                for t in tensors:
                    t.grad = None
                y = fn()
                y.backward(dy)
                results[name] = [y.detach()] + [t.grad.clone() for t in tensors]
            for t in tensors:
                t.grad = None
            for label, a, r in zip(["y"] + [f"d{k}" for k in names] + ["dangles"], results["ours"], results["official"]):
                errors.append(f"{label} {rel_err(a, r):.2e}")
            print(f"[check] mamba3 {shape} mambakit vs official: " + ", ".join(errors), flush=True)
            peer_times = time_modes(official, dy, tensors)
        floors = {m: floor_ms(b, l, h, p, n, m) for m in ("fwd", "fwd+bwd")}
        siso_times = time_modes(ours, dy, tensors)
        report(records, env, "mamba3_siso", shape, siso_times, "mamba_ssm-triton", peer_times, floors)
        if args.mimo_rank > 1:
            mimo = mimo_inputs(kw, args.mimo_rank)

            def ours_mimo():
                v = mimo
                return mamba3(v["x"], v["dt"], v["A"], v["B"], v["C"], v["trap"], angles.expand(b, l, h, -1),
                              D=v["D"], z=v["z"], B_bias=v["B_bias"], C_bias=v["C_bias"], mimo_x=v["mimo_x"],
                              mimo_z=v["mimo_z"], mimo_o=v["mimo_o"], chunk_size=args.chunk, backend="triton")

            # Against our SISO at the same (h, p, n): "speedup" below 1 is MIMO's cost (target >= 1 / 1.5).
            report(records, env, f"mamba3_mimo_r{args.mimo_rank}", shape, time_modes(ours_mimo, dy, list(mimo.values())),
                   "mambakit-siso", siso_times, floors)
    path = Path(args.out) / "mamba3.json"  # the decode-step records (bench_mamba3_step.py) stay
    steps = [r for r in json.loads(path.read_text()) if r["mode"] == "step"] if path.exists() else []
    write_results(records + steps, path.with_suffix(""), COLUMNS)


if __name__ == "__main__":
    main()
