"""Compare training runs by held-out loss per step: MoE-Mamba against a plain Mamba of equal active
parameters (the MoE-Mamba paper's measure: steps to reach the same validation loss).

    python benchmarks/compare_runs.py --runs plain=runs/plain moe=runs/moe [jamba=runs/jamba] \\
        --baseline plain --out benchmarks/results/moe_mamba

Reads each run's metrics.jsonl and summary.json (as ``mambakit train`` writes them). The target
is the baseline's final held-out loss; for every run it reports the first step at which its
held-out loss reaches the target (linear interpolation between evaluations) and the step ratio.
Writes OUT/results.json, OUT/results.md and OUT/curves.png (held-out bits per byte per step, and
the experts' share of routed tokens at the last logged step of each MoE run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mambakit.checkpoints import atomic_write  # noqa: E402
from mambakit.training.report import read_metrics  # noqa: E402


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the piecewise-linear curve of (step, loss) reaches ``target``."""
    previous = None
    for step, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def summarise(name: str, out: Path) -> dict:
    records = read_metrics(out)
    summary_path = out / "summary.json"
    if not records or not summary_path.exists():
        raise SystemExit(f"--runs {name}: {out} holds no finished run (metrics.jsonl and summary.json)")
    summary = json.loads(summary_path.read_text())
    curve = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    routed = [r for r in records if "expert_load" in r]
    result = {"name": name, "dir": str(out), "parameters": summary["parameters"],
              "active_parameters": summary.get("active_parameters", summary["parameters"]),
              "final_eval_loss": curve[-1][1], "final_eval_bpb": summary.get("eval_bpb"), "steps": summary["steps"],
              "seconds": summary.get("seconds"), "eval_curve": curve,
              "tokens_per_s": sorted(r["tokens_per_s"] for r in records)[len(records) // 2]}
    if routed:
        last = routed[-1]
        loads = list(last["expert_load"].values())
        result["expert_load_last"] = last["expert_load"]
        result["expert_load_max_over_mean"] = max(max(l) * len(l) for l in loads)
        result["expert_dropped_mean"] = sum(d for r in routed for d in r["expert_dropped"].values()) / sum(
            len(r["expert_dropped"]) for r in routed)
    return result


def plot(path: Path, runs: list[dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe_runs = [r for r in runs if "expert_load_last" in r]
    fig, axes = plt.subplots(1, 1 + len(moe_runs), figsize=(6.5 + 4 * len(moe_runs), 4.2), dpi=110, squeeze=False)
    ax = axes[0, 0]
    for run in runs:
        steps, losses = zip(*run["eval_curve"])
        ax.plot(steps, [v / math.log(2) for v in losses], "o-", ms=3, lw=1.3,
                label=f"{run['name']} ({run['active_parameters'] / 1e6:.2f}M active / {run['parameters'] / 1e6:.2f}M)")
    ax.axhline(target / math.log(2), ls="--", c="gray", lw=1, label="baseline's final loss")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("held-out loss per training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, run in zip(axes[0, 1:], moe_runs):
        layers = sorted(run["expert_load_last"], key=int)
        grid = [run["expert_load_last"][k] for k in layers]
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"block {k}" for k in layers])
        ax.set_xticks(range(0, len(grid[0]), max(1, len(grid[0]) // 8)))
        ax.set_xlabel("expert")
        ax.set_title(f"{run['name']}: share of routed tokens\n(last logged step)", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=DIR of each finished run")
    parser.add_argument("--baseline", required=True, help="the NAME whose final held-out loss is the target")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, curves.png")
    parser.add_argument("--note", default="", help="a line for results.md (hardware, command)")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.runs]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--runs: expected NAME=DIR items, got {args.runs}")
    runs = [summarise(name, Path(d)) for name, d in pairs]
    by_name = {r["name"]: r for r in runs}
    if args.baseline not in by_name:
        raise SystemExit(f"--baseline: expected one of {sorted(by_name)}, got {args.baseline!r}")
    target = by_name[args.baseline]["final_eval_loss"]
    baseline_steps = steps_to_reach(by_name[args.baseline]["eval_curve"], target)
    for run in runs:
        run["steps_to_target"] = steps_to_reach(run["eval_curve"], target)
        run["step_speedup"] = None if run["steps_to_target"] is None else baseline_steps / run["steps_to_target"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"baseline": args.baseline, "target_eval_loss": target, "note": args.note, "runs": runs}
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    lines = [f"Target: the final held-out loss of `{args.baseline}`, {target:.4f} nats "
             f"({target / math.log(2):.3f} bits per byte). {args.note}".strip(), "",
             "| run | parameters | active | final held-out bpb | steps to target | step speedup | tokens/s | "
             "max expert share x E | dropped |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        reach = "not reached" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
        speed = "-" if r["step_speedup"] is None else f"{r['step_speedup']:.2f}x"
        share = f"{r['expert_load_max_over_mean']:.2f}" if "expert_load_max_over_mean" in r else "-"
        dropped = f"{r['expert_dropped_mean']:.3f}" if "expert_dropped_mean" in r else "-"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['active_parameters'] / 1e6:.2f}M | "
                     f"{r['final_eval_loss'] / math.log(2):.3f} | {reach} | {speed} | {r['tokens_per_s']:,.0f} | "
                     f"{share} | {dropped} |")
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    plot(out / "curves.png", runs, target)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
