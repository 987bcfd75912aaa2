"""Time the CPU path (the PyTorch references) at real layer sizes.

    python benchmarks/cpu_reference.py [--repeats 5] [--out benchmarks/results]

Writes cpu_reference.json and cpu_reference.md (median of --repeats runs after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mambakit import ops


def cases():
    g = torch.Generator().manual_seed(0)

    def rn(*s):
        return torch.randn(*s, generator=g)

    def ur(*s):
        return torch.rand(*s, generator=g)

    b, d, l, n = 1, 1536, 4096, 16
    ss = dict(u=rn(b, d, l), delta=ur(b, d, l) * 0.1, A=-ur(d, n) - 0.1, B=rn(b, n, l), C=rn(b, n, l),
              D=rn(d), z=rn(b, d, l), delta_bias=rn(d) * 0.1, delta_softplus=True)
    yield "selective_scan b1 d1536 l4096 n16", lambda: ops.selective_scan(**ss)
    b, l, h, p, n = 1, 4096, 24, 64, 128
    sd = dict(x=rn(b, l, h, p), dt=rn(b, l, h), A=-ur(h) * 4, B=rn(b, l, 1, n), C=rn(b, l, 1, n), D=rn(h),
              dt_bias=rn(h) * 0.1, dt_softplus=True, chunk_size=256)
    yield "ssd b1 l4096 h24 p64 n128 chunk256", lambda: ops.ssd(**sd)
    b, l, h, p, n = 1, 4096, 32, 64, 128
    m3 = dict(x=rn(b, l, h, p), dt=ur(b, l, h) * 0.1, A=-ur(b, l, h), B=rn(b, l, 1, 1, n), C=rn(b, l, 1, 1, n),
              trap=rn(b, l, h), angles=rn(b, l, h, n // 4), D=rn(h), z=rn(b, l, h, p), chunk_size=64)
    yield "mamba3 SISO b1 l4096 h32 p64 n128 chunk64", lambda: ops.mamba3(**m3)
    r = 4
    m3m = dict(m3, B=rn(b, l, r, 1, n), C=rn(b, l, r, 1, n), chunk_size=64,
               **{k: rn(h, r, p) for k in ("mimo_x", "mimo_z", "mimo_o")})
    yield "mamba3 MIMO r4 b1 l4096 h32 p64 n128 chunk64", lambda: ops.mamba3(**m3m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    args = parser.parse_args()
    records = []
    for name, fn in cases():
        with torch.no_grad():
            fn()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        records.append({"case": name, "forward_s_median": statistics.median(times), "forward_s_all": times})
        print(f"{name:<48} {statistics.median(times):7.3f} s")
    meta = {
        "command": "python benchmarks/cpu_reference.py --repeats %d" % args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "dtype": "float32",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "cpu_reference.json", json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    table = ["| op and shape (fp32, forward, no grad) | median time |", "| --- | --- |"]
    table += [f"| {r['case']} | {r['forward_s_median']:.2f} s |" for r in records]
    note = f"\n{meta['cores']} cores, torch {meta['torch']}, {meta['threads']} threads. Command: `{meta['command']}`\n"
    _atomic_write(out / "cpu_reference.md", "\n".join(table) + "\n" + note)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
