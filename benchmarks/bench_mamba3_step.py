"""Mamba-3 decode latency for a 1.5B-class layer (d_model 2048, expand 2, headdim 64, d_state 128:
64 heads), SISO and MIMO rank 4, bf16, at batch 1 and 64, on one GPU.

    PYTHONUNBUFFERED=1 python benchmarks/bench_mamba3_step.py

Times (median, CUDA events) the ``mamba3_step`` kernel alone (called from Python, and replayed from
a CUDA graph: the GPU time without the launch), the PyTorch reference step (the same math as plain
ops, for scale), and the whole layer's one-token forward with a cache, eagerly and replayed from a
CUDA graph. The floors are bytes at the copy bandwidth: the kernel must read and
write the fp32 state (b h p n) and the layer must also read its two projection matrices. The
official decode kernel (CuTe DSL) needs packages that are not on the GPU machine, so there is no
peer here. Records (mode "step") replace the earlier step records in <out>/mamba3.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ssd import COLUMNS, COPY_BYTES_PER_S  # noqa: E402
from benchmarks.common import environment, time_ms, write_results  # noqa: E402
from mambakit.cache import InferenceCache  # noqa: E402
from mambakit.layers import Mamba3  # noqa: E402
from mambakit.ops.mamba3 import Mamba3State, mamba3_step  # noqa: E402

D_MODEL, HEADDIM, D_STATE = 2048, 64, 128


def step_inputs(layer: Mamba3, b: int) -> tuple[dict, Mamba3State]:
    """One token's mamba3_step arguments as the layer computes them, and a random state."""
    dev, bf16 = "cuda", torch.bfloat16
    h, p, n, r, a = layer.nheads, layer.headdim, layer.d_state, layer.mimo_rank, layer.num_rope_angles
    kw = dict(x=torch.randn(b, h, p, device=dev, dtype=bf16), dt=torch.rand(b, h, device=dev) * 0.1,
              A=-torch.rand(b, h, device=dev), B=torch.randn(b, r, 1, n, device=dev, dtype=bf16),
              C=torch.randn(b, r, 1, n, device=dev, dtype=bf16), trap=torch.randn(b, h, device=dev),
              angles=torch.randn(b, 1, a, device=dev).expand(b, h, a), D=layer.D, z=torch.randn(b, h, p, device=dev,
                                                                                               dtype=bf16),
              B_bias=layer.B_bias, C_bias=layer.C_bias)
    if layer.is_mimo:
        kw.update(mimo_x=layer.mimo_x, mimo_z=layer.mimo_z, mimo_o=layer.mimo_o)
    state = Mamba3State(torch.rand(b, h, a, device=dev), torch.randn(b, h, p, n, device=dev),
                        torch.randn(b, r, h, n, device=dev, dtype=bf16), torch.randn(b, h, p, device=dev, dtype=bf16))
    return kw, state


def graphed(fn):
    """fn captured in a CUDA graph (after two warm-up calls on a side stream); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    env = environment("cuda")
    records = []
    for rank in (1, 4):
        torch.manual_seed(0)
        layer = Mamba3(D_MODEL, d_state=D_STATE, headdim=HEADDIM, is_mimo=rank > 1, mimo_rank=rank, layer_idx=0,
                       device="cuda", dtype=torch.bfloat16).eval()
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in (layer.in_proj, layer.out_proj))
        for b in args.batches:
            h, p, n = layer.nheads, layer.headdim, layer.d_state
            shape = f"b{b} d_model{D_MODEL} h{h} p{p} n{n} r{rank}"
            state_floor = 2 * b * h * p * n * 4 / COPY_BYTES_PER_S * 1e3
            kw, state = step_inputs(layer, b)
            with torch.no_grad():
                kernel = time_ms(lambda: mamba3_step(**kw, state=state, backend="triton"))
                kernel_replay = time_ms(graphed(lambda: mamba3_step(**kw, state=state, backend="triton")))
                reference = time_ms(lambda: mamba3_step(**kw, state=state, backend="reference"))
                cache = InferenceCache(max_batch_size=b, max_seqlen=1)
                u = torch.randn(b, 1, D_MODEL, device="cuda", dtype=torch.bfloat16)
                layer(u, inference_params=cache)  # prefill one token: the cache holds states
                cache.seqlen_offset = 1
                eager = time_ms(lambda: layer(u, inference_params=cache))
                replay = time_ms(graphed(lambda: layer(u, inference_params=cache)))
            layer_floor = state_floor + weight_bytes / COPY_BYTES_PER_S * 1e3
            rows = [("mamba3_step kernel", kernel, state_floor),
                    ("mamba3_step kernel, CUDA graph", kernel_replay, state_floor),
                    ("mamba3_step reference (PyTorch ops)", reference, state_floor),
                    ("Mamba3 layer decode, eager", eager, layer_floor),
                    ("Mamba3 layer decode, CUDA graph", replay, layer_floor)]
            for op, ms, floor in rows:
                print(f"{op:38s} {shape}: {ms * 1e3:8.1f} us  floor {floor * 1e3:6.1f} us "
                      f"({floor / ms:.0%} of it)", flush=True)
                records.append(dict(op=op, shape=shape, dtype="bf16", mode="step", ours_ms=ms, peer=None, peer_ms=None,
                                    speedup=None, floor_ms=floor, floor_fraction=floor / ms, **env))
    path = Path(args.out) / "mamba3.json"
    kept = [r for r in json.loads(path.read_text()) if r["mode"] != "step"] if path.exists() else []
    write_results(kept + records, path.with_suffix(""), COLUMNS)


if __name__ == "__main__":
    main()
