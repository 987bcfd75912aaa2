"""Forecasting reproduction grid: trains each model on an ETT CSV for each seed and writes
benchmarks/results/forecasting.{json,md,png} (records merged by model/dataset/lookback/horizon,
so several invocations build one table).

    python -m benchmarks.forecasting --data ../shared/data/ett/ETTh1.csv --models s-mamba --seeds 0 1 2
    python -m benchmarks.forecasting --data ../shared/data/ett/ETTh1.csv --models bi-mamba+ --epochs 2 \
        --max-train-batches 100      # a reduced budget, recorded in the record's "budget"
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from mambakit.checkpoints import atomic_write
from mambakit.forecasting import MODELS, PAPER_TRAINING, ForecastConfig, run_forecast

RESULTS = Path(__file__).parent / "results"
# Published ETTh1 numbers at L = 96: (horizon) -> (MSE, MAE).
# DLinear at L = 96: the iTransformer paper's table (the DLinear paper itself used L = 336).
PUBLISHED = {
    ("s-mamba", "ETTh1"): {96: (0.386, 0.405)},
    ("dlinear", "ETTh1"): {96: (0.386, 0.400)},
    ("bi-mamba+", "ETTh1"): {96: (0.378, 0.395), 192: (0.427, 0.428), 336: (0.471, 0.445), 720: (0.470, 0.457)},
}
KEY = ("model", "dataset", "lookback", "horizon")


def merge(records: list[dict], new: dict) -> list[dict]:
    """records with any record of new's key replaced by new."""
    return [r for r in records if tuple(r[k] for k in KEY) != tuple(new[k] for k in KEY)] + [new]


def write_outputs(records: list[dict], directory: Path) -> None:
    """forecasting.json (the records), forecasting.md (a table) and forecasting.png (bars of
    measured and published MSE/MAE), each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: (r["dataset"], r["horizon"], r["model"]))
    text = json.dumps(records, indent=2) + "\n"
    atomic_write(directory / "forecasting.json", lambda tmp: Path(tmp).write_text(text))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | dataset | L | H | seeds | MSE | MAE | published MSE | published MAE | budget | seconds/seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['lookback']} | {r['horizon']} | {len(r['seeds'])} | "
                     f"{fmt(r['mse'])} ± {r['mse_std']:.3f} | {fmt(r['mae'])} ± {r['mae_std']:.3f} | "
                     f"{fmt(r['published_mse'])} | {fmt(r['published_mae'])} | {r['budget']} | "
                     f"{r['seconds_per_seed']} |")
    lines += ["", "MSE/MAE on the standardised test split, mean ± std over seeds; run on "
              f"{records[0]['gpu']}; commands and per-seed values in forecasting.json."]
    md = "\n".join(lines) + "\n"
    atomic_write(directory / "forecasting.md", lambda tmp: Path(tmp).write_text(md))

    # One panel per metric, stacked; the width grows with the records so the labels stay readable.
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.6 * len(records)), 8), dpi=100)
    labels = [f"{r['model']}\n{r['dataset']} H{r['horizon']}" for r in records]
    xs = range(len(records))
    for ax, metric in zip(axes, ("mse", "mae")):
        ax.bar([x - 0.2 for x in xs], [r[metric] for r in records], 0.4, label="measured (CPU)")
        ax.bar([x + 0.2 for x in xs], [r[f"published_{metric}"] or 0 for r in records], 0.4, label="published")
        ax.set_xticks(list(xs), labels, fontsize=8, rotation=60, ha="right")
        ax.set_title(metric.upper())
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(directory / "forecasting.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ETT-format CSV (e.g. ../shared/data/ett/ETTh1.csv)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    p.add_argument("--horizons", nargs="+", type=int, default=[96], help="forecast horizons H")
    p.add_argument("--lookback", type=int, default=96, help="look-back L")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (results are averaged)")
    p.add_argument("--epochs", type=int, default=None, help="override the paper's epochs (a reduced budget)")
    p.add_argument("--max-train-batches", type=int, default=None, help="cap optimizer steps per epoch")
    p.add_argument("--results", default=str(RESULTS), help="directory of forecasting.{json,md,png}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = Path(args.results)
    directory.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.forecasting " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for horizon in args.horizons:
        for model in args.models:
            runs = []
            for seed in args.seeds:
                print(f"== {model} H={horizon} seed {seed}", flush=True)
                runs.append(run_forecast(ForecastConfig(
                    data=args.data, model=model, lookback=args.lookback, horizon=horizon, epochs=args.epochs,
                    seed=seed, out=f"runs/forecast-{model}-H{horizon}-s{seed}", device=device,
                    max_train_batches=args.max_train_batches)))
                last = runs[-1]
                print(f"   test mse {last['mse']:.4f} mae {last['mae']:.4f} ({last['seconds']} s)", flush=True)
                # written after every seed, so an interrupted grid keeps the seeds it finished
                path = directory / "forecasting.json"
                records = json.loads(path.read_text()) if path.exists() else []
                write_outputs(merge(records, make_record(runs, args, command, device)), directory)


def make_record(runs: list[dict], args, command: str, device: str) -> dict:
    """One results record from the per-seed results of one model and horizon."""
    model, dataset, horizon = runs[0]["model"], runs[0]["dataset"], runs[0]["horizon"]
    published = PUBLISHED.get((model, dataset), {}).get(horizon) if args.lookback == 96 else None
    mse, mae = torch.tensor([r["mse"] for r in runs]), torch.tensor([r["mae"] for r in runs])
    paper = PAPER_TRAINING[model]
    reduced = args.epochs is not None or args.max_train_batches is not None
    return dict(
        model=model, dataset=dataset, horizon=horizon, lookback=args.lookback,
        mse=float(mse.mean()), mae=float(mae.mean()),
        mse_std=float(mse.std(unbiased=False)), mae_std=float(mae.std(unbiased=False)),
        seeds=[r["seed"] for r in runs],
        per_seed=[{k: r[k] for k in ("seed", "mse", "mae", "val_mse", "best_epoch", "epochs_run", "seconds")}
                  for r in runs],
        published_mse=published[0] if published else None, published_mae=published[1] if published else None,
        budget=(f"reduced: {runs[0]['epochs']} epochs x {args.max_train_batches or 'all'} batches"
                if reduced else f"full: {paper['epochs']} epochs, patience {paper['patience']}"),
        lr=runs[0]["lr"], batch_size=runs[0]["batch_size"], model_options=runs[0]["model_options"],
        seconds_per_seed=round(sum(r["seconds"] for r in runs) / len(runs)),
        gpu="none (CPU)" if device == "cpu" else torch.cuda.get_device_name(),
        command=command, date=datetime.date.today().isoformat(), torch=torch.__version__,
        **({"coverage_2sigma": sum(r["coverage_2sigma"] for r in runs) / len(runs)}
           if "coverage_2sigma" in runs[0] else {}))


if __name__ == "__main__":
    main()
