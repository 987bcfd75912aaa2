"""Mamba-1 selective scan: mambakit's Triton kernels against the official CUDA kernel (built here
from the carried PyPI source archive) and, where installed, mambapy, in one run on one GPU.

    python benchmarks/bench_selective_scan.py [--shapes 8,2048,4096,16 1,2048,65536,16] [--out benchmarks/results]

bf16 inputs, fp32 parameters, with D, z, delta_bias and softplus, as a Mamba-1 layer calls it.
Prints ms, speedup against each peer, and the fraction of the bytes/SFU floor reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402
from benchmarks.common import environment, time_ms, write_results  # noqa: E402
from mambakit.ops.selective_scan import selective_scan  # noqa: E402

# Measured ceilings of the H100 of ANCHORS.md (copy 3.0 TB/s); the exponential unit's rate is
# 16 results / clock / SM (the MUFU.EX2 throughput) at the boost clock.
COPY_BYTES_PER_S = 3.0e12


def exp_rate() -> float:
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 1_755_000) * 1e3  # kHz -> Hz
    return 16 * props.multi_processor_count * clock_hz


def floor_ms(b, d, l, n, mode) -> tuple[float, float]:
    """(bytes floor, exponential floor) in ms. Forward: read u, delta, z, B, C, write y; one
    exponential per (b, d, l, n). Backward adds reading dy and writing du, ddelta, dz (and B, C
    grads) and at least one more exponential per element (the recomputed decay)."""
    act = b * d * l * 2
    proj = 2 * b * n * l * 2
    fwd_bytes, fwd_exps = 4 * act + proj, b * d * l * n
    if mode == "fwd":
        bytes_, exps = fwd_bytes, fwd_exps
    else:
        bytes_, exps = fwd_bytes + 7 * act + 2 * proj, 2 * fwd_exps
    return bytes_ / COPY_BYTES_PER_S * 1e3, exps / exp_rate() * 1e3


def make_inputs(b, d, l, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16

    def rn(*shape, dtype=bf16):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    A = -torch.exp(torch.log(torch.arange(1, n + 1, device=dev, dtype=torch.float32))).repeat(d, 1)
    return dict(u=rn(b, d, l), delta=rn(b, d, l) * 0.5 - 3.0, A=A.contiguous(), B=rn(b, n, l), C=rn(b, n, l),
                D=torch.ones(d, device=dev), z=rn(b, d, l), delta_bias=rn(d, dtype=torch.float32) * 0.1)


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's selective scan: materialise (b, l, d, n) decays and inputs, then its pscan."""
    from mambapy.pscan import pscan

    dt = torch.nn.functional.softplus(delta.float() + delta_bias[:, None]).transpose(1, 2)  # (b, l, d)
    deltaA = torch.exp(dt.unsqueeze(-1) * A)  # (b, l, d, n)
    BX = (dt * u.float().transpose(1, 2)).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)
    hs = pscan(deltaA, BX)
    y = (hs @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1) + D * u.float().transpose(1, 2)
    return (y.transpose(1, 2) * torch.nn.functional.silu(z.float())).to(u.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,2048,4096,16", "1,2048,65536,16"], help="b,d,l,n per shape")
    parser.add_argument("--out", default="benchmarks/results", help="folder for selective_scan.json/.md")
    args = parser.parse_args()
    env = environment()
    peers_fn = {}
    src = peers.official_source()
    if src is not None:
        peers_fn["mamba_ssm-cuda"] = peers.official_selective_scan(src)
    else:
        print("[peers] official source archive not carried (.whl/mamba_ssm-*.tar.gz): no official timings")
    if peers.mambapy_available():
        peers_fn["mambapy"] = None

    records = []
    for spec in args.shapes:
        b, d, l, n = (int(v) for v in spec.split(","))
        kw = make_inputs(b, d, l, n)
        grads = [kw[k] for k in ("u", "delta", "B", "C", "z")] + [kw["A"], kw["D"], kw["delta_bias"]]

        def ours():
            return selective_scan(**kw, delta_softplus=True, backend="triton")

        impls = {"mambakit": ours}
        if "mamba_ssm-cuda" in peers_fn:
            fn = peers_fn["mamba_ssm-cuda"]
            impls["mamba_ssm-cuda"] = lambda fn=fn: fn(**kw, delta_softplus=True)
        if "mambapy" in peers_fn and b * d * l * n * 4 * 6 < 0.6 * torch.cuda.get_device_properties(0).total_memory:
            impls["mambapy"] = lambda: mambapy_scan(**kw)
        with torch.no_grad():
            reference = ours().float()
            for name, fn in impls.items():
                err = ((fn().float() - reference).norm() / reference.norm()).item()
                print(f"[check] {name} vs mambakit forward rel err {err:.2e}")
        dy = torch.randn_like(kw["u"])
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for name, fn in impls.items():
                for t in grads:
                    t.requires_grad_(mode == "fwd+bwd")
                if mode == "fwd":
                    with torch.no_grad():
                        times[name] = time_ms(fn)
                else:
                    times[name] = time_ms(lambda fn=fn: fn().backward(dy), grad_to_none=grads)
            bytes_ms, exp_ms = floor_ms(b, d, l, n, mode)
            floor = max(bytes_ms, exp_ms)
            for peer, peer_ms in times.items():
                if peer == "mambakit":
                    continue
                records.append(dict(op="selective_scan", shape=f"b{b} d{d} l{l} n{n}", dtype="bf16", mode=mode,
                                    ours_ms=times["mambakit"], peer=peer, peer_ms=peer_ms,
                                    speedup=peer_ms / times["mambakit"], floor_ms=floor,
                                    floor_fraction=floor / times["mambakit"], **env))
            line = "  ".join(f"{k} {v:.3f} ms" for k, v in times.items())
            print(f"b{b} d{d} l{l} n{n} {mode:8s} {line}  floor {floor:.3f} ms (bytes {bytes_ms:.3f}, exp {exp_ms:.3f})"
                  f"  ours at {floor / times['mambakit']:.0%} of floor", flush=True)
            for peer, peer_ms in times.items():
                if peer != "mambakit":
                    print(f"    speedup vs {peer}: {peer_ms / times['mambakit']:.2f}x")
            # Rewritten after every measurement: a run cut short still leaves what it measured.
            write_results(records, Path(args.out) / "selective_scan",
                          ["shape", "mode", "ours_ms", "peer", "peer_ms", "speedup", "floor_fraction"])


if __name__ == "__main__":
    main()
