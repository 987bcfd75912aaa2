"""End-to-end CPU speed against transformers' pure-PyTorch Mamba: greedy generation and a long
prefill of 130M-class Mamba-1 and Mamba-2 language models with the same random weights.

    python -m benchmarks.e2e_cpu [--threads 2] [--prompt-len 32] [--new-tokens 64] [--prefill-len 1024]

Each model is built in transformers (``MambaForCausalLM`` / ``Mamba2ForCausalLM``, seeded random
weights), saved, and loaded into mambakit with ``load_pretrained``, so both run the same weights in
fp32. Decode: ``generate`` from a ``--prompt-len``-token prompt for ``--new-tokens`` tokens, greedy,
on both sides (transformers with its cache), timed end to end (prompt included), median of
``--repeats`` calls, the two sides taking turns; the two continuations are compared token by
token. Prefill: one forward over ``--prefill-len`` tokens without gradients. Records go to
benchmarks/results/e2e.json (merged by op/shape/mode/gpu/peer, so GPU records from other scripts
stay) with a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mambakit import load_pretrained
from mambakit.checkpoints import atomic_write

RESULTS = Path(__file__).parent / "results"
KEY = ("op", "shape", "mode", "gpu", "peer")


def hf_model(kind: str, seed: int):
    """A 130M-class transformers model (the sizes of state-spaces/mamba-130m and mamba2-130m)
    with seeded random weights, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if kind == "mamba1":
        config = transformers.MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                                          expand=2, conv_kernel=4)
        return transformers.MambaForCausalLM(config).eval()
    config = transformers.Mamba2Config(vocab_size=50288, hidden_size=768, state_size=128, num_hidden_layers=24,
                                       expand=2, head_dim=64, num_heads=24, n_groups=1, chunk_size=256,
                                       conv_kernel=4)
    return transformers.Mamba2ForCausalLM(config).eval()


def median_seconds(peer, ours, repeats: int) -> tuple[float, object, float, object]:
    """(peer's median wall seconds, its last result, the same for ours) over ``repeats`` calls
    each after one warm-up call each, the two taking turns: on a shared machine a slow spell then
    falls on both sides rather than on one."""
    results, times = [peer(), ours()], ([], [])
    for _ in range(repeats):
        for side, fn in enumerate((peer, ours)):
            start = time.perf_counter()
            results[side] = fn()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), results[0], statistics.median(times[1]), results[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", choices=["mamba1", "mamba2"], default=["mamba1", "mamba2"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="directory of e2e.json / e2e.md")
    args = p.parse_args(argv)
    for name in ("threads", "prompt_len", "new_tokens", "prefill_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.e2e_cpu " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = f"none (CPU: {platform.processor() or platform.machine()}, {args.threads} threads)"
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    records = []
    g = torch.Generator().manual_seed(args.seed + 1)
    for kind in args.kinds:
        reference = hf_model(kind, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            reference.save_pretrained(tmp)
            ours = load_pretrained(tmp).eval()
        vocab = reference.config.vocab_size
        op = f"{'Mamba-1' if kind == 'mamba1' else 'Mamba-2'} LM 130M-class (d768, 24 layers)"

        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g)
        n = args.new_tokens
        print(f"{kind}: decode {n} tokens from a {args.prompt_len}-token prompt", flush=True)
        with torch.no_grad():
            peer_s, peer_out, ours_s, ours_out = median_seconds(
                lambda: reference.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False),
                lambda: ours.generate(prompt, max_new_tokens=n, temperature=0), args.repeats)
        same = int((peer_out[0, args.prompt_len:] == ours_out[0, args.prompt_len:]).sum())
        print(f"   transformers {n / peer_s:.1f} tok/s, mambakit {n / ours_s:.1f} tok/s "
              f"({peer_s / ours_s:.2f}x); {same}/{n} tokens identical", flush=True)
        records.append(dict(op=op, shape=f"b1 prompt{args.prompt_len} new{n}", dtype="fp32", mode="decode",
                            ours_ms=1e3 * ours_s / n, peer="transformers", peer_ms=1e3 * peer_s / n,
                            speedup=peer_s / ours_s, ours_tokens_per_s=n / ours_s, peer_tokens_per_s=n / peer_s,
                            identical_tokens=f"{same}/{n}"))

        ids = torch.randint(0, vocab, (1, args.prefill_len), generator=g)
        print(f"{kind}: prefill forward over {args.prefill_len} tokens", flush=True)
        with torch.no_grad():
            peer_s, peer_logits, ours_s, ours_logits = median_seconds(
                lambda: reference(ids).logits, lambda: ours(ids)[..., :vocab], args.repeats)
        gap = (peer_logits - ours_logits).abs().max().item()
        print(f"   transformers {peer_s:.2f} s, mambakit {ours_s:.2f} s ({peer_s / ours_s:.2f}x); "
              f"max logit difference {gap:.2e}", flush=True)
        records.append(dict(op=op, shape=f"b1 l{args.prefill_len}", dtype="fp32", mode="prefill",
                            ours_ms=1e3 * ours_s, peer="transformers", peer_ms=1e3 * peer_s,
                            speedup=peer_s / ours_s, max_logit_difference=gap))
    for r in records:
        r.update(gpu=device, command=command, date=datetime.date.today().isoformat(), versions=versions)
    write(records, Path(args.out))


def write(new: list[dict], directory: Path) -> None:
    """Merge ``new`` into directory/e2e.json (same op/shape/mode/gpu/peer replaced) and rewrite e2e.md."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "e2e.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {tuple(r[k] for k in KEY) for r in new}
    records = [r for r in old if tuple(r[k] for k in KEY) not in keys] + new
    text = json.dumps(records, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    lines = ["| model | shape | mode | device | ours | peer | peer time | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r["mode"] == "decode" and "ours_tokens_per_s" in r:
            ours, theirs = f"{r['ours_tokens_per_s']:.1f} tok/s", f"{r['peer_tokens_per_s']:.1f} tok/s"
        else:
            ours, theirs = f"{r['ours_ms']:.1f} ms", f"{r['peer_ms']:.1f} ms"
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['gpu']} | {ours} | {r['peer']} | {theirs} | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", "Commands, versions and dates are in e2e.json."]
    md = "\n".join(lines) + "\n"
    atomic_write(directory / "e2e.md", lambda tmp: Path(tmp).write_text(md))


if __name__ == "__main__":
    main()
