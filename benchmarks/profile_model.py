"""Where a whole-model prefill or training step spends its time on the GPU: wall time against the
summed kernel time (the gap is host time the GPU waits for), the kernels by CUDA time, and the
host-side ops by self CPU time. 130M-class LMs as in ``e2e_gpu.py`` (d_model 768, 24 layers,
vocabulary 50280, random weights).

    PYTHONUNBUFFERED=1 python benchmarks/profile_model.py [--layers Mamba1 Mamba2] [--modes prefill train]

``--cprofile`` adds the Python functions of 20 prefill forwards by own time (where the host time of
the custom ops' launchers goes).

prefill: one bf16 forward over (1, 2048) tokens without autograd. train: forward + backward of
(8, 2048) tokens under bf16 autocast with fp32 weights (the optimizer step left out).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import event_ms  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402

VOCAB = 50280


def workload(layer: str, mode: str):
    """-> a zero-argument callable running one prefill forward or one training forward+backward."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=768, n_layer=24, vocab_size=VOCAB, ssm_cfg={"layer": layer})
    if mode == "prefill":
        model = MambaLM(config).to("cuda", torch.bfloat16).eval()
        ids = torch.randint(0, VOCAB, (1, 2048), device="cuda")

        def run():
            with torch.no_grad():
                model(ids)
        return run
    model = MambaLM(config).to("cuda").train()
    ids = torch.randint(0, VOCAB, (8, 2049), device="cuda")

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=["Mamba1", "Mamba2"])
    p.add_argument("--modes", nargs="+", default=["prefill", "train"], choices=["prefill", "train"])
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cprofile", action="store_true", help="also the host-side Python profile of the prefill")
    args = p.parse_args(argv)
    for layer in args.layers:
        for mode in args.modes:
            run = workload(layer, mode)
            for _ in range(2):
                run()
            wall = event_ms(run, repeats=10)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    run()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernel_us = sum(e.self_device_time_total for e in events) / args.iters
            print(f"\n=== {layer} {mode}: {wall:.2f} ms wall (median of 10), {kernel_us / 1e3:.2f} ms of "
                  f"kernels per iteration ===", flush=True)
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows), flush=True)
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
            if args.cprofile and mode == "prefill":
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(20):
                    run()
                torch.cuda.synchronize()
                profiler.disable()
                print(f"--- {layer} prefill: Python functions of 20 forwards by own time ---", flush=True)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
            del run
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
