"""Data-parallel training on several GPUs against one GPU, same global batch.

Runs ``mambakit train`` once on one GPU and once per ``--dist`` mode under torchrun on
``--gpus`` GPUs, all with the same settings and seed, then compares the loss curves step by step
and the training throughput (global tokens per second, median over the logged windows after the
first, which holds the kernels' compilation). Writes ``multi_gpu.json`` (records as in the other
benchmark files, ``mode`` "train"), ``multi_gpu.md`` and ``multi_gpu.png`` (loss curves, their
relative difference, throughput) and each run's ``metrics_*.jsonl`` into ``--out``.

    python benchmarks/multi_gpu.py --repeat-single --out benchmarks/results/multi_gpu

Pass criteria printed at the end: every logged train loss and every held-out loss within
``--loss-rtol`` of the one-GPU run, and throughput at least ``--min-scaling`` times one GPU's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import atomic_write, environment  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="processes (one GPU each) of the data-parallel runs")
    p.add_argument("--dist", nargs="+", default=["fsdp", "ddp"], choices=["fsdp", "ddp"])
    p.add_argument("--layer", default="mamba2", choices=["mamba1", "mamba2", "mamba3"])
    p.add_argument("--preset", default="130m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64, help="global sequences per optimizer step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--loss-rtol", type=float, default=1.6e-2,
                   help="allowed |loss - one-GPU loss| / one-GPU loss (default: torch.testing's bfloat16 rtol)")
    p.add_argument("--min-scaling", type=float, default=1.8)
    p.add_argument("--repeat-single", action="store_true",
                   help="run one GPU twice: the second run's differences are the kernels' run-to-run noise")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the table and plot from OUT's multi_gpu.json and metrics files, training nothing")
    p.add_argument("--out", type=Path, required=True, help="results: json, md, png and each run's metrics")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="the training runs' directories (checkpoints included; default OUT/runs)")
    return p.parse_args(argv)


def train_command(args: argparse.Namespace, out: Path, dist: str | None) -> list[str]:
    launcher = [sys.executable, "-m", "mambakit"] if dist is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", "-m", "mambakit"]
    flags = ["train", "--layer", args.layer, "--preset", args.preset, "--seq-len", str(args.seq_len),
             "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
             "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--sample-tokens", "0", "--out", str(out)]
    return launcher + flags + ([] if dist is None else ["--dist", dist])


def run(command: list[str], log: Path) -> float:
    """Run ``command``, its output into ``log`` (and echoed); seconds taken."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if "%|" not in line:  # progress-bar redraws stay in the log
                print("  " + line, end="", flush=True)
        if proc.wait():
            raise SystemExit(f"failed ({proc.returncode}); see {log}")
    return time.perf_counter() - started


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def throughput(records: list[dict]) -> float:
    """Median global tokens/s over the logged windows, the first (compilation) left out."""
    return statistics.median(r["tokens_per_s"] for r in records[1:])


def compare(one: list[dict], many: list[dict]) -> dict:
    """Largest relative differences of the train and held-out losses, step by step."""
    if [r["step"] for r in one] != [r["step"] for r in many]:
        raise SystemExit("the runs logged different steps")
    train = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(one, many)]
    held_out = [abs(b["eval_loss"] - a["eval_loss"]) / a["eval_loss"] for a, b in zip(one, many) if "eval_loss" in a]
    return {"max_train_loss_rdiff": max(train), "max_eval_loss_rdiff": max(held_out), "final_loss": many[-1]["loss"],
            "final_eval_loss": many[-1]["eval_loss"]}


def plot(runs: dict[str, list[dict]], speeds: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    reference = runs["1 GPU"]
    colors = {name: f"C{i}" for i, name in enumerate(runs)}
    for name, records in runs.items():
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], lw=1, label=name, c=colors[name])
        if name != "1 GPU":
            ax_diff.plot(steps, [(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(reference, records)], lw=1,
                         label=name, c=colors[name])
    ax_loss.set(xlabel="step", ylabel="train loss (nats/byte)", title=title)
    ax_diff.set(xlabel="step", ylabel="relative difference to 1 GPU", title="loss, relative to the 1-GPU run")
    ax_diff.axhline(0, c="gray", lw=0.5)
    names = list(speeds)
    ax_speed.bar(names, [speeds[n] / 1e3 for n in names], color=[colors[n] for n in names])
    for i, n in enumerate(names):
        ax_speed.text(i, speeds[n] / 1e3, f"{speeds[n] / speeds[names[0]]:.2f}x", ha="center", va="bottom")
    ax_speed.set(ylabel="global throughput (k tokens/s)", title="training throughput")
    for ax in (ax_loss, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    plt.close(fig)


def measure(args: argparse.Namespace) -> tuple[list[dict], dict[str, list[dict]]]:
    """Train every setup; (records, each run's metrics by run name)."""
    import torch

    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus: {args.gpus} requested, {torch.cuda.device_count()} visible")
    env = environment("cuda")
    runs_dir = args.runs_dir or args.out / "runs"
    setups = [("1 GPU", None)] + [("1 GPU, again", None)] * args.repeat_single
    setups += [(f"{args.gpus} GPUs {d.upper()}", d) for d in args.dist]
    runs, records = {}, []
    for name, dist in setups:
        out = runs_dir / metrics_key(name, dist)
        command = train_command(args, out, dist)
        seconds = run(command, args.out / f"{metrics_key(name, dist)}.log")
        runs[name] = read_metrics(out)
        atomic_write(args.out / f"metrics_{metrics_key(name, dist)}.jsonl", (out / "metrics.jsonl").read_text())
        record = {"op": f"train {args.preset} {args.layer}", "mode": "train", "run": name,
                  "gpus": 1 if dist is None else args.gpus, "dist": dist,
                  "shape": f"global batch {args.batch_size} x {args.seq_len}", "dtype": "bf16 autocast",
                  "steps": args.steps, "tokens_per_s": throughput(runs[name]), "seconds": seconds, **env,
                  "command": " ".join(command), "benchmark_command": env["command"]}
        if name != "1 GPU":
            single = records[0]["tokens_per_s"]
            record.update(compare(runs["1 GPU"], runs[name]), scaling=record["tokens_per_s"] / single,
                          peer="mambakit 1 GPU", peer_tokens_per_s=single)
        else:
            record.update(final_loss=runs[name][-1]["loss"], final_eval_loss=runs[name][-1]["eval_loss"])
        records.append(record)
    atomic_write(args.out / "multi_gpu.json", json.dumps(records, indent=2) + "\n")
    return records, runs


def metrics_key(name: str, dist: str | None) -> str:
    """File-name part of a run: "single", "single_again", "fsdp" or "ddp"."""
    return dist or ("single_again" if name.endswith("again") else "single")


def report(args: argparse.Namespace, records: list[dict], runs: dict[str, list[dict]]) -> None:
    """multi_gpu.md (table and verdicts) and multi_gpu.png from the records and metrics."""
    first = records[0]
    title = f"{args.preset} {args.layer}, {first['shape']}"
    plot(runs, {r["run"]: r["tokens_per_s"] for r in records}, args.out / "multi_gpu.png", title)
    gpus = max(r["gpus"] for r in records)
    lines = [f"# Data-parallel training: {title}", "",
             f"{first['gpu']} x {gpus}; versions {first['versions']}; {first['date']}.", "",
             f"Command: `{first.get('benchmark_command', first['command'])}`", "",
             "| run | tokens/s | scaling | max train-loss rel. diff | max held-out rel. diff | final held-out loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    verdicts = []
    for r in records:
        name = r["run"]
        if name == "1 GPU":
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | 1.00x | - | - | {r['final_eval_loss']:.4f} |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['scaling']:.2f}x | {r['max_train_loss_rdiff']:.2e} | "
                     f"{r['max_eval_loss_rdiff']:.2e} | {r['final_eval_loss']:.4f} |")
        if r["dist"] is None:
            continue
        ok_loss = max(r["max_train_loss_rdiff"], r["max_eval_loss_rdiff"]) <= args.loss_rtol
        ok_speed = r["scaling"] >= args.min_scaling
        verdicts.append(f"{name}: losses within {args.loss_rtol:g} of 1 GPU: {'yes' if ok_loss else 'NO'}; "
                        f"throughput {r['scaling']:.2f}x >= {args.min_scaling}: {'yes' if ok_speed else 'NO'}")
    lines += ["", *[f"- {v}" for v in verdicts], "", "![loss curves and throughput](multi_gpu.png)"]
    atomic_write(args.out / "multi_gpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        records = json.loads((args.out / "multi_gpu.json").read_text())
        runs = {}
        for r in records:
            runs[r["run"]] = [json.loads(line) for line in
                              (args.out / f"metrics_{metrics_key(r['run'], r['dist'])}.jsonl").read_text().splitlines()]
    else:
        records, runs = measure(args)
    report(args, records, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
