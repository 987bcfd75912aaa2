"""Mamba-2 SSD and the whole Mamba-2 layer: mambakit against the official mamba-ssm, in one run on one GPU.

    PYTHONUNBUFFERED=1 python benchmarks/bench_ssd.py

Options: --shapes b,l,h,p,n,g ... (default 8,4096,32,64,128,1 2,16384,32,64,128,1), --no-layer,
--processes K (default 1), --out FOLDER (default benchmarks/results). Run from the repository root
on the GPU machine.

With --processes K the timings run in K fresh processes one after the other (each autotunes both
sides anew: the official kernels' own times move by up to 60% from one process to the next) and a
record holds the median of the K per-process medians, its speedup the ratio of those, and the
per-process times as ``ours_ms_runs`` / ``peer_ms_runs``.

(a) The SSD op, bf16 x/dt/B/C, fp32 A/D/dt_bias, chunk 256, D + dt_bias + softplus: mambakit
``ssd(..., backend="triton")`` against the official Triton ``mamba_chunk_scan_combined``; both
are called with chunk_size 256, our kernels run chunks of at most 128 tokens (``kernel_chunk``,
recorded as ``ours_kernel_chunk``; the result differs by rounding only).
(b) The layer, ``Mamba2(d_model=2048, d_state=128, headdim=64, ngroups=1)`` in bf16 (64 heads),
input (b, l, 2048) with b, l from --shapes, against ``mamba_ssm.modules.mamba2.Mamba2`` holding
the same weights. Without the ``causal_conv1d`` package the official layer runs only with
``use_mem_eff_path=False``: its fused path (``mamba_split_conv1d_scan_combined``) calls
``causal_conv1d_fwd_function``, which is then None. That path is nn.Conv1d (cuDNN) + SiLU,
``mamba_chunk_scan_combined``, the Triton gated RMSNorm and the two nn.Linear.

Both parts print relative errors against the official outputs (and gradients) before timing,
then ms forward and forward+backward, the speedup and the fraction of the floor reached. The op
is also timed replayed from CUDA graphs (modes "fwd_graph", "fwd+bwd_graph"): eager timing counts
the host's launch work wherever the host falls behind the device, and that moved both sides' eager
forward by up to 60% between processes (benchmarks/NOTES.md); the graph times do not move.
First of all the script times the very first mambakit layer forward+backward (wall clock, Triton
compile and autotune included, in a fresh Triton cache unless TRITON_CACHE_DIR is set), recorded
with mode "first_call". Records go to <out>/ssd.json and <out>/ssd.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A cold Triton cache, so that the first-call figure includes compilation.
if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cache_")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from benchmarks.common import environment, graph_ms, time_ms, write_results  # noqa: E402
from mambakit.layers.mamba2 import Mamba2  # noqa: E402
from mambakit.layers.mixer_common import inverse_softplus_dt  # noqa: E402
from mambakit.ops.ssd import ssd  # noqa: E402
from mambakit.ops.ssd.triton_ops import kernel_chunk  # noqa: E402

# Measured ceilings of the H100 of ANCHORS.md.
COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOP_PER_S = 730e12
CHUNK = 256
D_MODEL = 2048
COLUMNS = ["op", "shape", "mode", "ours_ms", "peer", "peer_ms", "speedup", "floor_ms", "floor_fraction", "processes"]


def ssd_flops(b, l, h, p, n, g, q=CHUNK) -> float:
    """Matmul FLOPs of the chunked SSD forward (the backward does twice as many).

    With qe = (q + 1) / 2, the mean number of tokens of its chunk at or before a token (the
    causal half of the q x q blocks), per token:
      intra-chunk  C B^T (one per group)             2 n qe   per group
                   (L o C B^T) X                     2 p qe   per head
      chunk state  X^T (decay dt B), a (p, n) state  2 p n    per head
      state output C S^T of the incoming state       2 p n    per head
    so 2 b l (g n qe + h p qe + 2 h p n); the state passing between chunks is O(b h p n l / q),
    no matmul. The backward has the transposed products of each: dX = (L o C B^T)^T dY + B dS^T,
    dC B^T = dY X^T with dC, dB from it (2 n qe per group each), dS = C^T dY, dC from dY S,
    dB from X dS, i.e. 2 b l (2 g n qe + 2 h p qe + 4 h p n). Dense q x q tiles (what the kernels
    issue) would use q instead of qe: ~71 GFLOP instead of ~53 at b8 l4096 h32 p64 n128.
    """
    qe = (q + 1) / 2
    return 2 * b * l * (g * n * qe + h * p * qe + 2 * h * p * n)


def ssd_bytes(b, l, h, p, n, g, mode, q=CHUNK) -> float:
    """Bytes that must cross HBM, bf16 activations. Forward: read x, dt, B, C, write y. Backward:
    read dy, x, B, C, dt, write dx, dB, dC, ddt, and the chunk states (b, l/q, h, p, n) once
    (the official stores passed states in bf16)."""
    act, proj, dt = b * l * h * p * 2, b * l * g * n * 2, b * l * h * 2
    states = b * math.ceil(l / q) * h * p * n * 2
    fwd = 2 * act + 2 * proj + dt
    return fwd if mode == "fwd" else fwd + 3 * act + 4 * proj + 2 * dt + states


def ssd_floor_ms(b, l, h, p, n, g, mode) -> float:
    flops = ssd_flops(b, l, h, p, n, g) * (1 if mode == "fwd" else 3)
    return max(ssd_bytes(b, l, h, p, n, g, mode) / COPY_BYTES_PER_S, flops / MATMUL_FLOP_PER_S) * 1e3


def layer_floor_ms(layer: Mamba2, b, l, mode) -> float:
    """Compute floor of the layer: in_proj and out_proj matmuls plus the SSD's (forward); the
    backward doubles both (input and weight gradients, resp. ssd_flops). Bytes are left out:
    the projections' flops dominate (~1.7 TFLOP against ~0.3 GB of input/output at b8 l4096)."""
    proj = 2 * b * l * D_MODEL * (layer.in_proj.out_features + layer.out_proj.in_features)
    scan = ssd_flops(b, l, layer.nheads, layer.headdim, layer.d_state, layer.ngroups)
    return (proj + scan) * (1 if mode == "fwd" else 3) / MATMUL_FLOP_PER_S * 1e3


def ssd_inputs(b, l, h, p, n, g) -> dict:
    """x, B, C ~ N(0, 1) and dt ~ N(0, 0.1^2) in bf16; A = -exp(log U(1, 16)), D = 1 and
    dt_bias = softplus^-1(dt), dt log-uniform in [0.001, 0.1], in fp32 (the layer's init)."""
    dev, bf16 = "cuda", torch.bfloat16
    A = -torch.exp(torch.log(torch.empty(h, device=dev).uniform_(1, 16)))
    return dict(x=torch.randn(b, l, h, p, device=dev, dtype=bf16),
                dt=(0.1 * torch.randn(b, l, h, device=dev)).to(bf16),
                A=A,
                B=torch.randn(b, l, g, n, device=dev, dtype=bf16),
                C=torch.randn(b, l, g, n, device=dev, dtype=bf16),
                D=torch.ones(h, device=dev),
                dt_bias=inverse_softplus_dt(h, 0.001, 0.1, 1e-4, device=dev))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def outputs_and_grads(fn, dy, tensors) -> list[torch.Tensor]:
    """[fn(), grads of tensors] after one backward of dy; the grads are reset to None."""
    for t in tensors:
        t.grad = None
    y = fn()
    y.backward(dy)
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return [y.detach()] + grads


def check(label, ours, peer, dy, names, ours_tensors, peer_tensors) -> None:
    """Print the relative error of ours' output and gradients against the peer's."""
    pairs = zip(outputs_and_grads(ours, dy, ours_tensors), outputs_and_grads(peer, dy, peer_tensors))
    errs = [rel_err(a, r) for a, r in pairs]
    print(f"[check] {label}: " + ", ".join(f"{k} {e:.2e}" for k, e in zip(names, errs)), flush=True)


def time_modes(fn, dy, grads, graph: bool = False) -> dict:
    """{"fwd": ms under no_grad, "fwd+bwd": ms of fn().backward(dy)}; with ``graph`` also
    "fwd_graph" and "fwd+bwd_graph", the same replayed from CUDA graphs (None where a capture
    fails)."""
    with torch.no_grad():
        times = {"fwd": time_ms(fn)}
    times["fwd+bwd"] = time_ms(lambda: fn().backward(dy), grad_to_none=grads)
    if graph:
        with torch.no_grad():
            times["fwd_graph"] = graph_ms(fn)
        times["fwd+bwd_graph"] = graph_ms(lambda: fn().backward(dy), grads=grads)
    return times


def report(records, env, op, shape, ours, peer_name, peer, floors, extra=None) -> None:
    """Print one line per mode and append the records (peer None: ours only; extra: more fields)."""
    for mode in ours:
        if ours[mode] is None:
            continue
        floor = floors[mode]
        line = f"{op} {shape} {mode:8s} mambakit {ours[mode]:.3f} ms"
        speedup = None
        if peer is not None and peer.get(mode) is not None:
            speedup = peer[mode] / ours[mode]
            line += f"  {peer_name} {peer[mode]:.3f} ms  speedup {speedup:.2f}x"
        print(f"{line}  floor {floor:.3f} ms, ours at {floor / ours[mode]:.0%} of it", flush=True)
        records.append(dict(op=op, shape=shape, dtype="bf16", mode=mode, ours_ms=ours[mode],
                            peer=peer_name if speedup is not None else None,
                            peer_ms=peer[mode] if speedup is not None else None, speedup=speedup,
                            floor_ms=floor, floor_fraction=floor / ours[mode], **(extra or {}), **env))


def first_call(b, l, env) -> dict:
    """Wall time of the first mambakit layer forward+backward in this process."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # CUDA context and cuBLAS, not ours
    layer = Mamba2(D_MODEL, d_state=128, headdim=64, ngroups=1, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(b, l, D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    layer(u).backward(torch.randn_like(u))
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    shape = f"b{b} l{l} d_model{D_MODEL}"
    print(f"[first call] mambakit Mamba2 {shape} forward+backward: {ms / 1e3:.1f} s "
          f"(Triton cache {os.environ['TRITON_CACHE_DIR']})", flush=True)
    return dict(op="mamba2_layer", shape=shape, dtype="bf16", mode="first_call", ours_ms=ms, peer=None,
                peer_ms=None, speedup=None, floor_ms=None, floor_fraction=None, **env)


def official_peers():
    """(mamba_chunk_scan_combined, Mamba2 class) of the official archive; None where unavailable."""
    src = peers.official_source(REPO)
    if src is None:
        print("[peers] official source archive not carried (.whl/mamba_ssm-*.tar.gz): timing mambakit only")
        return None, None
    peers.official_triton_only(src)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    try:
        from mamba_ssm.modules.mamba2 import Mamba2 as OfficialMamba2
    except ImportError as e:
        print(f"[peers] official Mamba2 layer not importable ({e}): layer timed for mambakit only")
        OfficialMamba2 = None
    return mamba_chunk_scan_combined, OfficialMamba2


def bench_op(spec, peer_fn, records, env) -> None:
    b, l, h, p, n, g = spec
    kw = ssd_inputs(b, l, h, p, n, g)
    tensors = [kw[k] for k in ("x", "dt", "B", "C", "A", "D", "dt_bias")]
    for t in tensors:
        t.requires_grad_(True)
    dy = torch.randn_like(kw["x"])
    shape = f"b{b} l{l} h{h} p{p} n{n} g{g} chunk{CHUNK}"

    def ours():
        return ssd(**kw, chunk_size=CHUNK, dt_softplus=True, backend="triton")

    peer = None
    if peer_fn is not None:
        def official():
            return peer_fn(**kw, chunk_size=CHUNK, dt_softplus=True)

        check(f"ssd {shape} mambakit vs official", ours, official, dy,
              ["y", "dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias"], tensors, tensors)
    ours_times = time_modes(ours, dy, tensors, graph=True)  # first: a capture that fails cannot disturb ours
    if peer_fn is not None:
        peer = time_modes(official, dy, tensors, graph=True)
    floors = {m: ssd_floor_ms(b, l, h, p, n, g, m) for m in ("fwd", "fwd+bwd")}
    floors.update({"fwd_graph": floors["fwd"], "fwd+bwd_graph": floors["fwd+bwd"]})
    report(records, env, "ssd", shape, ours_times, "mamba_ssm-triton", peer, floors,
           extra={"ours_kernel_chunk": kernel_chunk(CHUNK)})


def bench_layer(b, l, peer_cls, records, env) -> None:
    ours_layer = Mamba2(D_MODEL, d_state=128, headdim=64, ngroups=1, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(b, l, D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(u)
    shape = f"b{b} l{l} d_model{D_MODEL}"
    peer = None
    if peer_cls is not None:
        peer_layer = peer_cls(D_MODEL, d_state=128, headdim=64, ngroups=1, use_mem_eff_path=False,
                              device="cuda", dtype=torch.bfloat16)
        peer_layer.load_state_dict(ours_layer.state_dict())
        check(f"mamba2 layer {shape} mambakit vs official (use_mem_eff_path=False)", lambda: ours_layer(u),
              lambda: peer_layer(u), dy, ["out", "du", "d in_proj", "d A_log"],
              [u, ours_layer.in_proj.weight, ours_layer.A_log], [u, peer_layer.in_proj.weight, peer_layer.A_log])
        peer = time_modes(lambda: peer_layer(u), dy, [u] + list(peer_layer.parameters()))
    ours = time_modes(lambda: ours_layer(u), dy, [u] + list(ours_layer.parameters()))
    floors = {m: layer_floor_ms(ours_layer, b, l, m) for m in ("fwd", "fwd+bwd")}
    report(records, env, "mamba2_layer", shape, ours, "mamba_ssm-Mamba2", peer, floors)


def timed_records(specs, layer: bool, env: dict) -> list[dict]:
    """The op (and layer) records of this process."""
    records = []
    peer_fn, peer_cls = official_peers()
    for spec in specs:
        bench_op(spec, peer_fn, records, env)
    if layer:
        for spec in specs:
            bench_layer(spec[0], spec[1], peer_cls, records, env)
    return records


def median_over_processes(runs: list[list[dict]], env: dict) -> list[dict]:
    """One record per (op, shape, mode): the median over the processes' records of it, with this
    (the parent) process's environment and command."""
    merged = []
    for position, first in enumerate(runs[0]):
        same = [run[position] for run in runs]
        if any((r["op"], r["shape"], r["mode"]) != (first["op"], first["shape"], first["mode"]) for r in same):
            raise RuntimeError("bench_ssd: the worker processes timed different cases")
        ours = [r["ours_ms"] for r in same]
        record = dict(first, **env, ours_ms=statistics.median(ours), ours_ms_runs=ours, processes=len(runs))
        if all(r["peer_ms"] is not None for r in same):
            peer = [r["peer_ms"] for r in same]
            record.update(peer_ms=statistics.median(peer), peer_ms_runs=peer,
                          speedup=statistics.median(peer) / record["ours_ms"])
        elif any(r["peer_ms"] is not None for r in same):  # only some processes could time the peer (a graph capture failed)
            record.update(peer=None, peer_ms=None, speedup=None, peer_ms_runs=[r["peer_ms"] for r in same])
        record["floor_fraction"] = record["floor_ms"] / record["ours_ms"]
        merged.append(record)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8,4096,32,64,128,1", "2,16384,32,64,128,1"],
                        help=f"b,l,h,p,n,g per SSD shape (chunk {CHUNK}); the layer takes b, l of each")
    parser.add_argument("--layer", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the whole Mamba-2 layer (default on)")
    parser.add_argument("--processes", type=int, default=1,
                        help="time in this many fresh processes and report the medians (default 1)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)  # one of --processes' runs
    parser.add_argument("--out", default="benchmarks/results", help="folder for ssd.json/.md")
    args = parser.parse_args()
    specs = [tuple(int(v) for v in spec.split(",")) for spec in args.shapes]
    if any(len(spec) != 6 for spec in specs):
        parser.error(f"--shapes: expected b,l,h,p,n,g per shape, got {args.shapes}")
    if args.processes < 1:
        parser.error(f"--processes: expected at least 1, got {args.processes}")
    env = environment()
    if args.worker:
        Path(args.worker).write_text(json.dumps(timed_records(specs, args.layer, env)))
        return
    records = [first_call(specs[0][0], specs[0][1], env)]
    if args.processes == 1:
        records += timed_records(specs, args.layer, env)
    else:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(args.processes):
                print(f"[processes] run {k + 1} of {args.processes}", flush=True)
                out = Path(tmp) / f"run{k}.json"
                subprocess.run([sys.executable, __file__, "--shapes", *args.shapes, "--worker", str(out),
                                "--layer" if args.layer else "--no-layer"], check=True)
                runs.append(json.loads(out.read_text()))
        records += median_over_processes(runs, env)
        for r in records[1:]:
            if r["speedup"] is not None:
                print(f"[median of {args.processes}] {r['op']} {r['shape']} {r['mode']}: mambakit {r['ours_ms']:.3f} ms "
                      f"(runs {', '.join(f'{v:.3f}' for v in r['ours_ms_runs'])}), peer {r['peer_ms']:.3f} ms "
                      f"(runs {', '.join(f'{v:.3f}' for v in r['peer_ms_runs'])}), speedup {r['speedup']:.2f}x",
                      flush=True)
    write_results(records, Path(args.out) / "ssd", COLUMNS)


if __name__ == "__main__":
    main()
