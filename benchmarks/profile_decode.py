"""Where a decode token's time goes: the kernels of one CUDA-graph decode step of a 130M-class
LM (d_model 768, 24 layers, random weights, bf16), their count and GPU time, and the wall time of
a graph replay against a whole ``generate`` step (sampling and bookkeeping included).

    PYTHONUNBUFFERED=1 python benchmarks/profile_decode.py [--layers Mamba2 Mamba1] [--batch 1 64]

Prints, per layer type and batch size: microseconds per token for the graph replay alone and for
``generate`` and for the prompt plus the first token, then the kernels of 20 replays (CUDA time and
launches per token); ``--cprofile`` adds the host-side functions of one ``generate`` call and
``--prefill-profile`` the host-side ops of one prompt forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import wall_seconds  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.cuda_graphs import graphed_decoder  # noqa: E402

VOCAB = 50280


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=["Mamba2", "Mamba1"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--rows", type=int, default=25, help="kernels to list")
    p.add_argument("--cprofile", action="store_true", help="also the host-side profile of one generate call")
    p.add_argument("--prefill-profile", action="store_true", help="also the host-side ops of one prompt forward")
    args = p.parse_args(argv)
    for layer in args.layers:
        torch.manual_seed(0)
        model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB, ssm_cfg={"layer": layer}))
        model = model.cuda().to(torch.bfloat16).eval()
        for batch in args.batch:
            prompt = torch.randint(0, VOCAB, (batch, 16), device="cuda")
            decoder = graphed_decoder(model)
            with torch.no_grad():
                decoder.cache(batch)
                model(prompt, inference_params=decoder.active.cache, num_last_tokens=1)
                decoder.active.cache.seqlen_offset = 16
                tokens = prompt[:, -1]
                replay = 1e6 * wall_seconds(lambda: [decoder.step(tokens) for _ in range(100)], 1) / 100
                whole = 1e6 * wall_seconds(lambda: model.generate(prompt, max_new_tokens=128, temperature=0), 1) / 128
                first = 1e6 * wall_seconds(lambda: model.generate(prompt, max_new_tokens=1, temperature=0), 1)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        decoder.step(tokens)
                    torch.cuda.synchronize()
            print(f"\n== {layer} batch {batch}: graph replay {replay:.1f} us/token, generate {whole:.1f} us/token "
                  f"({1e6 / whole * batch:,.0f} tok/s); prompt + first token {first:.0f} us", flush=True)
            if args.prefill_profile:
                with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    model(prompt, inference_params=decoder.cache(batch), num_last_tokens=1)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            if args.cprofile:
                import cProfile
                import pstats

                with cProfile.Profile() as cpu:
                    model.generate(prompt, max_new_tokens=128, temperature=0)
                    torch.cuda.synchronize()
                pstats.Stats(cpu).sort_stats("tottime").print_stats(12)
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            events.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in events)
            launches = sum(e.count for e in events)
            print(f"   kernels: {launches / 20:.0f} launches/token, {total / 20:.1f} us/token of GPU time")
            for e in events[: args.rows]:
                print(f"   {e.device_time_total / 20:8.1f} us {e.count / 20:5.0f}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
