"""Mamba-2 decode with a token's gated RMSNorm and out_proj in one kernel
(``gated_rms_norm_linear``) against the two ops (``gated_rms_norm`` + ``F.linear``, cuBLAS), per
batch size: the op alone and the whole model's generation.

    PYTHONUNBUFFERED=1 python benchmarks/bench_mamba2_decode_output.py [--batch 1 2 3 4 8 16 64]

Op: 24 calls (one a layer) replayed from one CUDA graph, microseconds a call, at the 130M-class
shape (d_ssm 1536 -> d_model 768) and 1.3B / 2.7B-class ones (4096 -> 2048, 5120 -> 2560), bf16,
each taking the kernel only within its limit (MAX_FUSED_ROW_VALUES; the two ops above it). Model: a 130M-class
Mamba-2 LM (d_model 768, 24 layers, random weights, bf16), greedy, 16-token prompt + 128 new
tokens, timed end to end after one warm-up call (median of 3), as ``e2e_gpu.py``; two copies of
the model, so that each captures its own graphs. Writes
benchmarks/results/mamba2_decode_output.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, graph_ms, wall_seconds  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.checkpoints import atomic_write  # noqa: E402
from mambakit.layers import Mamba2  # noqa: E402
from mambakit.ops.norm import gated_rms_norm, gated_rms_norm_linear  # noqa: E402

VOCAB = 50280
LAYERS = 24
OP_SHAPES = {"130m": (1536, 768), "1.3b": (4096, 2048), "2.7b": (5120, 2560)}  # (d_ssm, d_model)


def op_microseconds(batch: int, d: int, n_out: int) -> dict:
    """{path: microseconds a call} for LAYERS calls in one graph, each with its own weights."""
    g = torch.Generator(device="cuda").manual_seed(batch + d)
    x, z = (torch.randn(batch, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    layers = [(torch.ones(d, device="cuda", dtype=torch.bfloat16),
               torch.randn(n_out, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5)
              for _ in range(LAYERS)]

    def fused():
        for norm_weight, weight in layers:
            gated_rms_norm_linear(x, z, norm_weight, weight)

    def unfused():
        for norm_weight, weight in layers:
            F.linear(gated_rms_norm(x, norm_weight, z), weight)

    return {path: 1000 * graph_ms(fn) / LAYERS for path, fn in (("fused", fused), ("unfused", unfused))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 64])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    fused_model = MambaLM(MambaConfig(d_model=768, n_layer=LAYERS, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba2"}))
    fused_model = fused_model.cuda().to(torch.bfloat16).eval()
    models = {"fused": fused_model, "unfused": copy.deepcopy(fused_model)}
    decides = Mamba2._fuses_output
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for batch in args.batch:
            row = {"batch": batch}
            for shape, (d, n_out) in OP_SHAPES.items():
                times = op_microseconds(batch, d, n_out)
                row[f"op_{shape}_fused_us"], row[f"op_{shape}_unfused_us"] = times["fused"], times["unfused"]
            prompt = torch.randint(0, VOCAB, (batch, 16), device="cuda", generator=g)
            for path, model in models.items():
                Mamba2._fuses_output = decides if path == "fused" else (lambda self, y, z: False)
                seconds = wall_seconds(lambda: model.generate(prompt, max_new_tokens=128, temperature=0))
                row[f"{path}_tokens_per_s"] = batch * 128 / seconds
            Mamba2._fuses_output = decides
            row["speedup"] = row["fused_tokens_per_s"] / row["unfused_tokens_per_s"]
            rows.append(row)
            ops = ", ".join(f"op {s} {row[f'op_{s}_fused_us']:.2f} vs {row[f'op_{s}_unfused_us']:.2f} us"
                            for s in OP_SHAPES)
            print(f"batch {batch}: {ops}; model fused {row['fused_tokens_per_s']:,.0f} tok/s, unfused "
                  f"{row['unfused_tokens_per_s']:,.0f} tok/s ({row['speedup']:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(environment("cuda"), rows=rows,
                  command="python benchmarks/bench_mamba2_decode_output.py --batch " + " ".join(map(str, args.batch)))
    atomic_write(out / "mamba2_decode_output.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    lines = [f"Mamba-2 decode, gated RMSNorm + out_proj fused vs the two ops, {record['gpu']}, bf16, CUDA graphs",
             "", "| batch | " + " | ".join(f"op {s} fused / unfused us" for s in OP_SHAPES)
             + " | model fused tok/s | model unfused tok/s | model fused / unfused |",
             "| ---: " * (len(OP_SHAPES) + 4) + "|"]
    lines += [f"| {r['batch']} | " + " | ".join(f"{r[f'op_{s}_fused_us']:.2f} / {r[f'op_{s}_unfused_us']:.2f}"
                                                for s in OP_SHAPES)
              + f" | {r['fused_tokens_per_s']:,.0f} | {r['unfused_tokens_per_s']:,.0f} | {r['speedup']:.2f}x |"
              for r in rows]
    text = "\n".join(lines + ["", f"Versions: {record['versions']}; date: {record['date']}",
                              f"Command: `{record['command']}`"]) + "\n"
    atomic_write(out / "mamba2_decode_output.md", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
