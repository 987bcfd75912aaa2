"""Mamba-1 LM training step with the layer's channel-major path against its channel-last one
(``Mamba1.mix_projected`` around ``nn.Linear`` projections), same process, same weights.

    PYTHONUNBUFFERED=1 python benchmarks/bench_mamba1_layout.py [--preset 130m]

Forward + backward + fused AdamW at batch 8 x 2048 under bf16 autocast (as ``e2e_gpu.py``);
prints tokens/s and peak memory of each path and their ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_gpu import PRESETS, VOCAB, train_speed  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.layers import Mamba1  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="130m", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    args = p.parse_args(argv)
    d_model, n_layer = PRESETS[args.preset]
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1"})).cuda()
    channel_major = Mamba1._runs_channel_major
    results = {}
    for path in ("channel-major", "channel-last", "channel-major again"):
        Mamba1._runs_channel_major = channel_major if path != "channel-last" else (lambda self, h, resume: False)
        tps, gib = train_speed(model, args.batch, args.length)
        results[path] = tps
        print(f"{args.preset} {path}: {tps:,.0f} tok/s, {1e3 * args.batch * args.length / tps:.1f} ms a step, "
              f"peak {gib:.1f} GiB", flush=True)
    Mamba1._runs_channel_major = channel_major
    print(f"channel-major / channel-last: {results['channel-major'] / results['channel-last']:.2f}x "
          f"(again: {results['channel-major again'] / results['channel-last']:.2f}x)")


if __name__ == "__main__":
    main()
