"""Where the first call's seconds go: a layer's first forward+backward, Triton compiles one by one.

    python benchmarks/profile_first_call.py --layer mamba2 [--serial] [--cprofile N] [--record DIR]

Runs the first forward+backward of one layer (bf16, b8 l4096 by default) in this process with a
cold Triton cache (a fresh TRITON_CACHE_DIR) and prints the wall time, the second call's, and each
Triton compile (kernel, seconds, whether it ran on mambakit's compile pool or elsewhere: the
calling thread, or autograd's for the backward). --serial sets MAMBAKIT_PARALLEL_COMPILE=0
(Triton's default: each kernel compiles on its first launch); --cprofile N prints the N functions
with the most cumulative time; --record DIR adds the run to DIR/first_call.json (and its table,
first_call.md), one record per layer and mode.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, write_results  # noqa: E402
from mambakit.ops._compile import POOL_THREAD_PREFIX  # noqa: E402

COLUMNS = ["op", "shape", "mode", "compile", "ours_ms", "second_call_ms", "compiles", "gpu"]

COMPILES: list[tuple[str, float, bool]] = []  # (kernel, seconds, on mambakit's compile pool)


def _timed_compile(compile_fn):
    def compile(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_fn(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", str(src))
            on_pool = threading.current_thread().name.startswith(POOL_THREAD_PREFIX)
            COMPILES.append((name, time.perf_counter() - start, on_pool))
    return compile


# Before any kernel runs: each JITFunction looks triton.compiler.compile up on its first launch.
triton.compiler.compile = _timed_compile(triton.compiler.compile)


def layer_call(name: str, b: int, l: int):
    """A function running one forward+backward of the layer (bf16, d_model 2048, or 768 for mamba1)."""
    dev, dt = "cuda", torch.bfloat16
    if name == "mamba2":
        from mambakit.layers.mamba2 import Mamba2
        layer = Mamba2(2048, d_state=128, headdim=64, ngroups=1, device=dev, dtype=dt)
    elif name == "mamba1":
        from mambakit.layers.mamba1 import Mamba1
        layer = Mamba1(768, device=dev, dtype=dt)
    elif name == "mamba3":
        from mambakit.layers.mamba3 import Mamba3
        layer = Mamba3(2048, device=dev, dtype=dt)
    else:
        raise ValueError(f"--layer: mamba1, mamba2 or mamba3, got {name!r}")
    u = torch.randn(b, l, layer.d_model, device=dev, dtype=dt, requires_grad=True)
    du = torch.randn_like(u)

    def call():
        layer(u).backward(du)
        torch.cuda.synchronize()
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="mamba2")
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--l", type=int, default=4096)
    parser.add_argument("--serial", action="store_true", help="MAMBAKIT_PARALLEL_COMPILE=0")
    parser.add_argument("--cprofile", type=int, default=0, help="print this many functions by cumulative time")
    parser.add_argument("--record", default=None, help="folder whose first_call.json this run joins")
    args = parser.parse_args()
    if args.serial:
        os.environ["MAMBAKIT_PARALLEL_COMPILE"] = "0"
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # CUDA context and cuBLAS, not ours
    call = layer_call(args.layer, args.b, args.l)
    profile = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profile:
        profile.runcall(call)
    else:
        call()
    first = time.perf_counter() - start
    start = time.perf_counter()
    call()
    second = time.perf_counter() - start
    on_pool = sum(s for _, s, pooled in COMPILES if pooled)
    elsewhere = sum(s for _, s, pooled in COMPILES if not pooled)
    mode = "serial" if args.serial else "parallel"
    print(f"{args.layer} b{args.b} l{args.l} ({mode} compile): first forward+backward {first:.2f} s, second "
          f"{second * 1e3:.1f} ms; {len(COMPILES)} compiles, {elsewhere:.2f} s off the compile pool, {on_pool:.2f} s "
          f"summed over the pool (triton {triton.__version__}, torch {torch.__version__})")
    for name, seconds, pooled in sorted(COMPILES, key=lambda r: -r[1]):
        print(f"  {seconds:6.2f} s  {'pool ' if pooled else 'other'}  {name}")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.cprofile)
    if args.record:
        stem = Path(args.record) / "first_call"
        path = stem.with_suffix(".json")
        records = json.loads(path.read_text()) if path.exists() else []
        shape = f"b{args.b} l{args.l}"
        records = [r for r in records if (r["op"], r["shape"], r["compile"]) != (f"{args.layer}_layer", shape, mode)]
        records.append(dict(op=f"{args.layer}_layer", shape=shape, dtype="bf16", mode="first_call", compile=mode,
                            ours_ms=first * 1e3, second_call_ms=second * 1e3, compiles=len(COMPILES),
                            **environment()))
        write_results(records, stem, COLUMNS)


if __name__ == "__main__":
    main()
