"""The selective scan reference's chunked algorithm on the CPU in its two layouts, in one run:
time-major blocks scanned token by token (what it takes below ``_PARALLEL_SCAN_LENGTH`` tokens)
against (b, k, n, l) blocks through the parallel chunked linear scan (what it takes from there on),
forward + backward and forward alone, fp32, with D, z, delta_bias and softplus.

    python benchmarks/cpu_scan_layouts.py [--repeats 3] [--threads 2] [--out benchmarks/results]

Writes cpu_scan_layouts.json and cpu_scan_layouts.md (median of --repeats runs after one warm-up;
the two layouts' outputs are compared, so a layout that computes something else fails the run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import wall_seconds  # noqa: E402
from mambakit.checkpoints import atomic_write  # noqa: E402
from mambakit.ops.selective_scan import selective_scan  # noqa: E402

reference = importlib.import_module("mambakit.ops.selective_scan.reference")

# (b, d, l, n, with backward): a Bi-Mamba+ forecasting batch (32 windows x 7 variables, 48 patch
# tokens), a small training batch, a longer one, and 130M-class Mamba-1 layer forwards.
SHAPES = [(224, 64, 48, 8, True), (8, 256, 512, 16, True), (1, 256, 2048, 16, True), (1, 256, 4096, 16, True),
          (1, 1536, 1024, 16, False), (1, 1536, 2048, 16, False), (1, 1536, 4096, 16, False)]


def inputs(b: int, d: int, l: int, n: int, grad: bool) -> dict:
    g = torch.Generator().manual_seed(b * d + l + n)
    kw = dict(u=torch.randn(b, d, l, generator=g), delta=torch.randn(b, d, l, generator=g) - 1,
              A=-torch.rand(d, n, generator=g) - 0.5, B=torch.randn(b, n, l, generator=g),
              C=torch.randn(b, n, l, generator=g), D=torch.ones(d), z=torch.randn(b, d, l, generator=g),
              delta_bias=0.1 * torch.randn(d, generator=g))
    return {k: v.requires_grad_(grad) for k, v in kw.items()}


def time_layout(kw: dict, grad: bool, parallel: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """(median seconds, y) of one layout; ``parallel`` forces the (b, k, n, l) blocks."""
    saved = reference._PARALLEL_SCAN_LENGTH
    reference._PARALLEL_SCAN_LENGTH = 0 if parallel else 1 << 30
    try:
        def run():
            with torch.set_grad_enabled(grad):
                y = selective_scan(**kw, delta_softplus=True, backend="reference")
                if grad:
                    y.sum().backward()
            return y.detach()

        return wall_seconds(run, repeats), run()
    finally:
        reference._PARALLEL_SCAN_LENGTH = saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the trainers do on CPU
    command = "python benchmarks/cpu_scan_layouts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records = []
    for b, d, l, n, grad in SHAPES:
        kw = inputs(b, d, l, n, grad)
        t_major, y_major = time_layout(kw, grad, parallel=False, repeats=args.repeats)
        t_par, y_par = time_layout(kw, grad, parallel=True, repeats=args.repeats)
        torch.testing.assert_close(y_major, y_par, rtol=1e-4, atol=1e-4)
        mode = "fwd+bwd" if grad else "fwd"
        records.append(dict(op="selective_scan reference, chunked", shape=f"b{b} d{d} l{l} n{n}", dtype="fp32",
                            mode=mode, time_major_ms=1e3 * t_major, parallel_ms=1e3 * t_par,
                            speedup=t_par / t_major, default="time-major" if l < reference._PARALLEL_SCAN_LENGTH
                            else "parallel"))
        print(f"b{b} d{d} l{l} n{n} {mode}: time-major {1e3 * t_major:.0f} ms, parallel {1e3 * t_par:.0f} ms "
              f"({t_par / t_major:.2f}x)", flush=True)
    meta = dict(command=command, date=datetime.date.today().isoformat(), torch=torch.__version__,
                threads=args.threads, cpu=platform.processor() or platform.machine(), gpu="none (CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(meta=meta, results=records), indent=2) + "\n"
    atomic_write(out / "cpu_scan_layouts.json", lambda tmp: Path(tmp).write_text(text))
    lines = ["| shape | mode | time-major | parallel | time-major speedup | default at this length |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['shape']} | {r['mode']} | {r['time_major_ms']:.0f} ms | {r['parallel_ms']:.0f} ms | "
              f"{r['speedup']:.2f}x | {r['default']} |" for r in records]
    lines += ["", f"fp32, {args.threads} threads, torch {meta['torch']}, {meta['date']}. Command: `{command}`"]
    md = "\n".join(lines) + "\n"
    atomic_write(out / "cpu_scan_layouts.md", lambda tmp: Path(tmp).write_text(md))


if __name__ == "__main__":
    main()
