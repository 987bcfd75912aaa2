"""Speculative decoding (MambaByte-style) against plain greedy decoding of the same target model.

    python benchmarks/bench_speculative.py --target runs/big --draft runs/small --k 2 4 6 8

Prompts are ``--prompts`` windows of ``--prompt-len`` tokens spread evenly over the held-out split
of ``--data`` (default: the Python standard library, as ``mambakit train`` splits it). For each
prompt the target decodes ``--new-tokens`` greedily, alone (``MambaLM.generate``, temperature 0)
and with the draft at each k (``speculative_generate``); wall time per call (CUDA synchronised),
after one warm-up call of each kind. Reports tokens/s, the speedup over plain decoding, the draft's
acceptance rate, tokens per target forward, and how many outputs equal the plain greedy output
token for token (in exact arithmetic all do; in floating point the parallel verification and the
one-token steps can round a near-tie differently). Writes OUT/speculative.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import environment, write_results  # noqa: E402
from mambakit import load_pretrained, speculative_generate  # noqa: E402
from mambakit.checkpoints import atomic_write as atomic_write_file  # noqa: E402
from mambakit.training.data import load_corpus  # noqa: E402


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="checkpoint directory of the target model")
    parser.add_argument("--draft", required=True, help="checkpoint directory of the draft model")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 6, 8], help="draft tokens per round")
    parser.add_argument("--data", default=None, help="corpus for the prompts (as mambakit train --data)")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speculative.{json,md,png}")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target, draft = load_pretrained(args.target, device=device), load_pretrained(args.draft, device=device)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("target", target), ("draft", draft))}
    val = load_corpus(args.data).val
    stride = (len(val) - args.prompt_len) // args.prompts
    prompts = [torch.tensor(val[i * stride:i * stride + args.prompt_len].astype("int64"), device=device)[None]
               for i in range(args.prompts)]

    speculative_generate(target, draft, prompts[0], max_new_tokens=8, k=max(args.k))  # warm-up (compiles kernels)
    # The baseline is eager greedy decoding, as in the committed results; CUDA-graph decoding (the
    # default since) is a faster baseline that speculative decoding has not been measured against.
    target.generate(prompts[0], max_new_tokens=8, temperature=0, cuda_graph=False)
    plain, plain_seconds = [], 0.0
    for ids in prompts:
        out, seconds = _timed(lambda: target.generate(ids, max_new_tokens=args.new_tokens, temperature=0,
                                                      cuda_graph=False), device)
        plain.append(out)
        plain_seconds += seconds
    n_tokens = args.prompts * args.new_tokens
    env = environment(device)
    base = {**env, "target": args.target, "draft": args.draft, "target_parameters": sizes["target"],
            "draft_parameters": sizes["draft"], "prompts": args.prompts, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "plain_tokens_per_s": n_tokens / plain_seconds}
    print(f"target {sizes['target'] / 1e6:.2f}M, draft {sizes['draft'] / 1e6:.2f}M parameters on {env['gpu']}; "
          f"plain greedy {n_tokens / plain_seconds:.1f} tokens/s")
    records = []
    for k in args.k:
        seconds, rounds, drafted, accepted, identical = 0.0, 0, 0, 0, 0
        for ids, expected in zip(prompts, plain):
            (out, stats), took = _timed(
                lambda: speculative_generate(target, draft, ids, max_new_tokens=args.new_tokens, k=k), device)
            seconds += took
            rounds, drafted, accepted = rounds + stats.rounds, drafted + stats.drafted, accepted + stats.accepted
            identical += int(torch.equal(out, expected))
        record = {**base, "k": k, "tokens_per_s": n_tokens / seconds, "speedup": plain_seconds / seconds,
                  "acceptance_rate": accepted / drafted, "tokens_per_target_forward": n_tokens / rounds,
                  "identical_outputs": f"{identical}/{args.prompts}"}
        records.append(record)
        print(f"k={k}: {record['tokens_per_s']:.1f} tokens/s, speedup {record['speedup']:.2f}x, acceptance "
              f"{record['acceptance_rate']:.2f}, {record['tokens_per_target_forward']:.2f} tokens per target forward, "
              f"identical to plain greedy {identical}/{args.prompts}")
    out = Path(args.out)
    write_results(records, out / "speculative", ["k", "plain_tokens_per_s", "tokens_per_s", "speedup", "acceptance_rate",
                                                 "tokens_per_target_forward", "identical_outputs"])
    _plot(out / "speculative.png", records)
    return records


def _plot(path: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in records]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    ax.plot(ks, [r["tokens_per_s"] for r in records], "o-", label="speculative")
    ax.axhline(records[0]["plain_tokens_per_s"], ls="--", c="gray", label="plain greedy")
    ax.set_xlabel("draft tokens per round (k)")
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(ks, [r["acceptance_rate"] for r in records], "s:", c="tab:green", label="acceptance rate")
    twin.set_ylim(0, 1)
    twin.set_ylabel("acceptance rate")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="lower right", fontsize=8)
    r = records[0]
    ax.set_title(f"{r['target_parameters'] / 1e6:.1f}M target, {r['draft_parameters'] / 1e6:.2f}M draft, "
                 f"{r['gpu']}", fontsize=9)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
