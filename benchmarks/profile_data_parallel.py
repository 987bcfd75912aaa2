"""Where a training step's time goes, on one GPU or data-parallel: forward, backward, gradient
clipping and the optimizer, each timed after a synchronisation (median of 20 steps after 5), then
the step free-running (10 steps, no synchronisation between phases).

    python benchmarks/profile_data_parallel.py --per-gpu 16                      # one GPU
    torchrun --standalone --nproc_per_node 2 benchmarks/profile_data_parallel.py --dist fsdp --per-gpu 8

Random byte sequences of 2048 tokens, bf16 autocast, the trainer's FSDP2 / DDP wrapping. Prints one
line (rank 0): the phases in ms, peak memory and the global tokens/s. ``--profile`` also prints
the torch profiler's table of the ops with the most CPU time over two steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit import MambaLM  # noqa: E402
from mambakit.training import distributed  # noqa: E402
from mambakit.training.config import model_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dist", default="fsdp", choices=["fsdp", "ddp"], help="wrapping under torchrun")
    p.add_argument("--preset", default="130m")
    p.add_argument("--layer", default="mamba2", choices=["mamba1", "mamba2", "mamba3"])
    p.add_argument("--per-gpu", type=int, default=8, help="sequences per GPU")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--foreach", action="store_true", help="per-tensor (foreach) AdamW instead of the fused kernel")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--all-reduce", action="store_true",
                   help="also time an fp32 all-reduce of a buffer the size of the model's gradients")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = distributed.setup("cuda")
    torch.manual_seed(0)
    model = MambaLM(model_config(args.preset, args.layer, 256)).to(env.device)
    wrapped = distributed.parallelize(model, env, args.dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not args.foreach)
    tokens = torch.randint(0, 256, (args.per_gpu, args.seq_len), device=env.device)

    def forward_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = wrapped(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())

    def synced() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    phases = {"fwd": [], "bwd": [], "clip": [], "opt": [], "step": []}
    for i in range(25):
        t0 = synced()
        loss = forward_loss()
        t1 = synced()
        loss.backward()
        t2 = synced()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = synced()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = synced()
        if i >= 5:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[name].append(seconds * 1e3)

    if args.all_reduce and env.distributed:
        buffer = torch.ones(sum(p.numel() for p in model.parameters()), device=env.device)
        for _ in range(3):
            torch.distributed.all_reduce(buffer)
        started = synced()
        for _ in range(10):
            torch.distributed.all_reduce(buffer)
        ms = (synced() - started) / 10 * 1e3
        if env.is_main:
            print(f"all-reduce of {buffer.numel() * 4 / 1e6:.0f} MB fp32: {ms:.2f} ms = "
                  f"{buffer.numel() * 4 / ms / 1e6:.0f} GB/s algorithmic bandwidth", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                forward_loss().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        if env.is_main:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))

    started = synced()
    for _ in range(10):
        forward_loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_ms = (synced() - started) / 10 * 1e3
    if env.is_main:
        setup = f"{args.dist} x{env.world_size}" if env.distributed else "1 GPU"
        adamw = "foreach" if args.foreach else "fused"
        print(f"{args.preset} {args.layer}, {setup}, {args.per_gpu} x {args.seq_len} per GPU, {adamw} AdamW: "
              + " ".join(f"{name} {statistics.median(ms):.1f}" for name, ms in phases.items())
              + f" ms | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB | free-running step {step_ms:.1f} ms = "
              f"{args.per_gpu * env.world_size * args.seq_len / step_ms * 1e3:,.0f} tok/s", flush=True)
    distributed.teardown(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
