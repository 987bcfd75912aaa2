"""`mambakit demo`: run every op on random data, check the algorithms against each other, time the
CPU path at real layer sizes, and print what was checked."""

from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm import tqdm

from . import ops

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _within(err: float, tol: float = 1e-9) -> float:
    """Return err, failing the demo if the algorithms disagree beyond float64 rounding."""
    if not err <= tol:
        raise RuntimeError(f"check failed: relative error {err:.3e} > {tol:.0e}")
    return err


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def check_scan(g: torch.Generator) -> str:
    worked = {m: ops.linear_scan(torch.full((4,), 2.0), torch.tensor([1.0, 3.0, 5.0, 7.0]), method=m).tolist() for m in ("sequential", "hillis_steele", "blelloch", "chunked")}
    assert all(v == [1.0, 5.0, 15.0, 37.0] for v in worked.values()), worked
    a = torch.rand(64, 1001, generator=g, dtype=F64)
    b = torch.randn(64, 1001, generator=g, dtype=F64)
    ref = ops.linear_scan(a, b, method="sequential")
    err = _within(max(_rel(ops.linear_scan(a, b, method=m), ref) for m in ("hillis_steele", "blelloch", "chunked")))
    return f"worked example [1, 5, 15, 37] exact for 4 methods; parallel methods vs sequential, T=1001: rel err {err:.1e}"


def check_discretization(g: torch.Generator) -> str:
    M = torch.randn(4, 4, generator=g, dtype=F64)
    A = -(M @ M.T) / 4 - 0.5 * torch.eye(4, dtype=F64)
    B = torch.randn(4, 1, generator=g, dtype=F64)
    h0 = torch.randn(4, generator=g, dtype=F64)
    A_bar, B_bar = ops.zoh_matrix(0.1, A, B)
    h = h0
    for _ in range(30):
        h = A_bar @ h + B_bar[:, 0]
    E = torch.linalg.matrix_exp(3.0 * A)
    exact = E @ h0 + torch.linalg.solve(A, (E - torch.eye(4, dtype=F64)) @ B[:, 0])
    return f"ZOH, 30 steps of a constant-input 4x4 system vs the matrix-exponential solution: rel err {_within(_rel(h, exact)):.1e}"


def check_selective_scan(g: torch.Generator) -> str:
    b, d, l, n = 2, 8, 37, 4
    u, delta = torch.randn(b, d, l, generator=g, dtype=F64), torch.rand(b, d, l, generator=g, dtype=F64)
    A = -torch.rand(d, n, generator=g, dtype=F64) - 0.1
    Bv, Cv = torch.randn(b, n, l, generator=g, dtype=F64), torch.randn(b, n, l, generator=g, dtype=F64)
    kwargs = dict(D=torch.randn(d, generator=g, dtype=F64), z=torch.randn(b, d, l, generator=g, dtype=F64), delta_bias=torch.randn(d, generator=g, dtype=F64), delta_softplus=True)
    err = _within(_rel(ops.selective_scan(u, delta, A, Bv, Cv, **kwargs), ops.selective_scan(u, delta, A, Bv, Cv, **kwargs, algorithm="recurrent")))
    Ac = torch.complex(A, torch.randn(d, n, generator=g, dtype=F64))
    Bc, Cc = torch.randn(b, n, 2 * l, generator=g, dtype=F64), torch.randn(b, n, 2 * l, generator=g, dtype=F64)
    err_c = _within(_rel(ops.selective_scan(u, delta, Ac, Bc, Cc), ops.selective_scan(u, delta, Ac, Bc, Cc, algorithm="recurrent")))
    args = [torch.randn(1, 1536, 4096), torch.rand(1, 1536, 4096) * 0.1, -torch.rand(1536, 16), torch.randn(1, 16, 4096), torch.randn(1, 16, 4096)]
    seconds = _timed(lambda: ops.selective_scan(*args, D=torch.ones(1536), delta_softplus=True))
    return f"chunked vs recurrent, real A: {err:.1e}, complex A: {err_c:.1e}; forward b1 d1536 l4096 n16 fp32: {seconds:.2f} s"


def check_ssd(g: torch.Generator) -> str:
    b, l, h, p, n, grp = 2, 45, 4, 8, 6, 2
    x = torch.randn(b, l, h, p, generator=g, dtype=F64)
    dt = torch.randn(b, l, h, generator=g, dtype=F64)
    A = -torch.rand(h, generator=g, dtype=F64) * 3
    B, C = torch.randn(b, l, grp, n, generator=g, dtype=F64), torch.randn(b, l, grp, n, generator=g, dtype=F64)
    kw = dict(chunk_size=16, D=torch.randn(h, generator=g, dtype=F64), dt_bias=torch.randn(h, generator=g, dtype=F64), dt_softplus=True)
    ref = ops.ssd(x, dt, A, B, C, **kw, algorithm="recurrent")
    errs = {alg: _within(_rel(ops.ssd(x, dt, A, B, C, **kw, algorithm=alg), ref)) for alg in ("chunked", "quadratic")}
    seq_idx = torch.tensor([[0] * 20 + [1] * 25, [0] * 45])
    packed = ops.ssd(x, dt, A, B, C, **kw, seq_idx=seq_idx)
    alone = ops.ssd(x[:1, 20:], dt[:1, 20:], A, B[:1, 20:], C[:1, 20:], **kw)
    err_pack = _within(_rel(packed[:1, 20:], alone))
    args = [torch.randn(1, 4096, 24, 64), torch.randn(1, 4096, 24), -torch.rand(24) * 4, torch.randn(1, 4096, 1, 128), torch.randn(1, 4096, 1, 128)]
    seconds = _timed(lambda: ops.ssd(*args, dt_softplus=True))
    return (f"chunked {errs['chunked']:.1e} and quadratic {errs['quadratic']:.1e} vs recurrent; packed seq_idx vs alone "
            f"{err_pack:.1e}; forward b1 l4096 h24 p64 n128 fp32: {seconds:.2f} s")


def check_mamba3(g: torch.Generator) -> str:
    results = []
    for r in (1, 4):
        b, l, h, p, n = 2, 29, 4, 8, 16
        args = dict(
            x=torch.randn(b, l, h, p, generator=g, dtype=F64), dt=torch.rand(b, l, h, generator=g, dtype=F64) * 0.5,
            A=-torch.rand(b, l, h, generator=g, dtype=F64), B=torch.randn(b, l, r, 1, n, generator=g, dtype=F64),
            C=torch.randn(b, l, r, 1, n, generator=g, dtype=F64), trap=torch.randn(b, l, h, generator=g, dtype=F64),
            angles=torch.randn(b, l, h, n // 4, generator=g, dtype=F64), D=torch.randn(h, generator=g, dtype=F64),
            z=torch.randn(b, l, h, p, generator=g, dtype=F64),
        )
        if r > 1:
            args.update({k: torch.randn(h, r, p, generator=g, dtype=F64) for k in ("mimo_x", "mimo_z", "mimo_o")})
        results.append(_within(_rel(ops.mamba3(**args, chunk_size=8), ops.mamba3(**args, algorithm="recurrent"))))
    b, l, h, p, n = 1, 4096, 32, 64, 128
    big = [torch.randn(b, l, h, p), torch.rand(b, l, h) * 0.1, -torch.rand(b, l, h), torch.randn(b, l, 1, 1, n),
           torch.randn(b, l, 1, 1, n), torch.randn(b, l, h), torch.randn(b, l, h, n // 4)]
    seconds = _timed(lambda: ops.mamba3(*big))
    return f"chunked vs recurrent, SISO {results[0]:.1e}, MIMO r=4 {results[1]:.1e}; SISO forward b1 l4096 h32 p64 n128 fp32: {seconds:.2f} s"


CHECKS = [
    ("linear_scan", check_scan),
    ("discretization", check_discretization),
    ("selective_scan (Mamba-1)", check_selective_scan),
    ("ssd (Mamba-2)", check_ssd),
    ("mamba3 (Mamba-3)", check_mamba3),
]


def run_demo(seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    print(f"mambakit demo: torch {torch.__version__}, {torch.get_num_threads()} CPU threads; float64 checks, float32 timings\n")
    lines = []
    for name, check in tqdm(CHECKS, desc="checks", unit="op"):
        lines.append((name, check(g)))
    width = max(len(n) for n, _ in lines)
    for name, line in lines:
        print(f"{name:<{width}}  {line}")
    print("\nall checks passed")
