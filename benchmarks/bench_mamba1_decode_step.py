"""Mamba-1 decode with the fused mixer step (``mamba1_mixer_step``, two kernels a layer) against
the unfused ops (conv update, x_proj, dt_proj, one-token scan), both inside CUDA graphs, per
batch size: where the fused step stops paying.

    PYTHONUNBUFFERED=1 python benchmarks/bench_mamba1_decode_step.py [--batch 1 4 16 32 64]

130M-class LM (d_model 768, 24 layers, random weights, bf16), greedy, 16-token prompt + 128 new
tokens, timed end to end after one warm-up call (median of 3), as ``e2e_gpu.py``. Two copies of
the model, so that each captures its own graphs. Writes benchmarks/results/mamba1_decode_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, wall_seconds  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.checkpoints import atomic_write  # noqa: E402
from mambakit.layers import Mamba1  # noqa: E402

VOCAB = 50280


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    fused_model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1"}))
    fused_model = fused_model.cuda().to(torch.bfloat16).eval()
    models = {"fused": fused_model, "unfused": copy.deepcopy(fused_model)}
    decides = Mamba1._steps_fused
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for batch in args.batch:
        prompt = torch.randint(0, VOCAB, (batch, 16), device="cuda", generator=g)
        row = {"batch": batch}
        for path, model in models.items():
            Mamba1._steps_fused = decides if path == "fused" else (lambda self, projected: False)
            with torch.no_grad():  # the warm-up call captures this path's graphs
                seconds = wall_seconds(lambda: model.generate(prompt, max_new_tokens=128, temperature=0))
            row[f"{path}_tokens_per_s"] = batch * 128 / seconds
        Mamba1._steps_fused = decides
        row["speedup"] = row["fused_tokens_per_s"] / row["unfused_tokens_per_s"]
        rows.append(row)
        print(f"batch {batch}: fused {row['fused_tokens_per_s']:,.0f} tok/s, unfused "
              f"{row['unfused_tokens_per_s']:,.0f} tok/s ({row['speedup']:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(environment("cuda"), rows=rows,
                  command="python benchmarks/bench_mamba1_decode_step.py --batch " + " ".join(map(str, args.batch)))
    atomic_write(out / "mamba1_decode_step.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    lines = [f"Mamba-1 130M-class decode, fused mixer step vs unfused ops, {record['gpu']}, bf16, CUDA graphs",
             "", "| batch | fused tok/s | unfused tok/s | fused / unfused |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['fused_tokens_per_s']:,.0f} | {r['unfused_tokens_per_s']:,.0f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    text = "\n".join(lines + ["", f"Command: `{record['command']}`"]) + "\n"
    atomic_write(out / "mamba1_decode_step.md", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
