"""Forecasting reproduction grid: trains each model on an ETT CSV for each seed and writes
benchmarks/results/forecasting.{json,md,png} (one record per model/dataset/lookback/horizon,
seeds accumulating, so several invocations build one table).

    python -m benchmarks.forecasting --data ../shared/data/ett/ETTh1.csv --models s-mamba --seeds 0 1 2
    python -m benchmarks.forecasting --data ../shared/data/ett/ETTh1.csv --models bi-mamba+ --epochs 2 \
        --max-train-batches 100      # a reduced budget, recorded in the record's "budget"
    # the reproduction grid on one GPU, 16 runs at a time, resumable:
    python -m benchmarks.forecasting --data ETTh1.csv ETTh2.csv --horizons 96 192 336 720 \
        --seeds 0 1 2 --jobs 16 --skip-done
    # the authors' run-script settings per dataset and horizon (variant "authors-script"):
    python -m benchmarks.forecasting --data ETTh1.csv --models bi-mamba+ --horizons 720 --seeds 0 1 2 \
        --authors-script
    # settings chosen by validation MSE; the chosen runs go in as variant "val-selected":
    python -m benchmarks.forecasting --data ETTh1.csv --models bi-mamba+ --horizons 720 --seeds 0 1 2 \
        --search patch_len/stride=4/2,12/6,24/12 --search lr=4e-5,1e-4 --record-best --jobs 16
"""

from __future__ import annotations

import argparse
import ast
import datetime
import itertools
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch

from mambakit.checkpoints import atomic_write
from mambakit.forecasting import MODELS, PAPER_TRAINING, ForecastConfig, run_forecast
from mambakit.forecasting.train import TRAINING_DEFAULTS

RESULTS = Path(__file__).parent / "results"
# Published numbers at L = 96: (horizon) -> (MSE, MAE). S-Mamba: the full ETT table of Wang et al.
# (arXiv 2403.11144v3). DLinear at L = 96: the iTransformer paper's table (the DLinear paper itself
# used L = 336). Bi-Mamba+: Liang et al. (arXiv 2404.15772), ETTh1.
PUBLISHED = {
    ("s-mamba", "ETTh1"): {96: (0.386, 0.405), 192: (0.443, 0.437), 336: (0.489, 0.468), 720: (0.502, 0.489)},
    ("s-mamba", "ETTh2"): {96: (0.296, 0.348), 192: (0.376, 0.396), 336: (0.424, 0.431), 720: (0.426, 0.444)},
    ("dlinear", "ETTh1"): {96: (0.386, 0.400)},
    ("bi-mamba+", "ETTh1"): {96: (0.378, 0.395), 192: (0.427, 0.428), 336: (0.471, 0.445), 720: (0.470, 0.457)},
}
KEY = ("model", "variant", "dataset", "lookback", "horizon")

# --authors-script: the settings of the authors' own run script per dataset and horizon, where
# they differ from the paper's (PAPER_CONFIGS / PAPER_TRAINING), with their trainer's effective
# optimizer (see mambakit.forecasting.train.TRAINING_DEFAULTS) and their patching. Bi-Mamba+:
# scripts/BiMamba4TS/ETT.sh of the authors' repository (1 layer, d_model 64, d_ff 128, d_state 8,
# seed 2024 throughout; ETTh1 patch 4, ETTh2 patch 24, stride patch / 2).
_BI_MAMBA_CODE = dict(first_epoch_lr=0.04, beta1=0.95, patch_padding="to-multiple")
AUTHORS_SCRIPT = {
    ("bi-mamba+", "ETTh1"): {h: dict(_BI_MAMBA_CODE, lr=lr, dropout=p) for h, lr, p in
                             [(96, 4e-5, 0.2), (192, 1e-4, 0.2), (336, 2e-4, 0.2), (720, 1e-4, 0.1)]},
    ("bi-mamba+", "ETTh2"): {h: dict(_BI_MAMBA_CODE, lr=lr, dropout=0.1, patch_len=24, stride=12) for h, lr in
                             [(96, 2e-4), (192, 2e-4), (336, 1e-4), (720, 4e-4)]},
}
TRAINER_SETTINGS = ("lr", "first_epoch_lr", "beta1")


def authors_script(model: str, dataset: str, horizon: int) -> tuple[dict, dict]:
    """(trainer settings, model settings) of AUTHORS_SCRIPT for one run; raises when it has none."""
    settings = AUTHORS_SCRIPT.get((model, dataset), {}).get(horizon)
    if settings is None:
        known = sorted((m, d, h) for (m, d), by_h in AUTHORS_SCRIPT.items() for h in by_h)
        raise ValueError(f"--authors-script: no settings for {model} on {dataset} at H = {horizon}; known: {known}")
    trainer = {k: v for k, v in settings.items() if k in TRAINER_SETTINGS}
    return trainer, {k: v for k, v in settings.items() if k not in TRAINER_SETTINGS}


def merge(records: list[dict], new: dict) -> list[dict]:
    """records with any record of new's key replaced by new."""
    return [r for r in records if tuple(r[k] for k in KEY) != tuple(new[k] for k in KEY)] + [new]


def label(record: dict) -> str:
    """The model's name, with the variant of its settings unless they are the paper's."""
    return record["model"] if record["variant"] == "paper" else f"{record['model']} ({record['variant']})"


def write_outputs(records: list[dict], directory: Path) -> None:
    """forecasting.json (the records), forecasting.md (a table) and forecasting.png (bars of
    measured and published MSE/MAE), each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: (r["dataset"], r["horizon"], label(r)))
    text = json.dumps(records, indent=2) + "\n"
    atomic_write(directory / "forecasting.json", lambda tmp: Path(tmp).write_text(text))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| model | dataset | L | H | seeds | MSE | MAE | published MSE | published MAE | lr, options | budget | "
             "device | seconds/seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        trainer = [f"{k}={r[k]:g}" for k in ("first_epoch_lr", "beta1")
                   if r.get(k, TRAINING_DEFAULTS[k]) != TRAINING_DEFAULTS[k]]
        options = ", ".join([f"{r['lr']:g}"] + trainer + [f"{k}={v}" for k, v in r["model_options"].items()])
        lines.append(f"| {label(r)} | {r['dataset']} | {r['lookback']} | {r['horizon']} | {len(r['seeds'])} | "
                     f"{fmt(r['mse'])} ± {r['mse_std']:.3f} | {fmt(r['mae'])} ± {r['mae_std']:.3f} | "
                     f"{fmt(r['published_mse'])} | {fmt(r['published_mae'])} | {options} | {r['budget']} | "
                     f"{r['gpu']} | {r['seconds_per_seed']} |")
    lines += ["", "MSE/MAE on the standardised test split, mean ± std over seeds; commands and per-seed values "
              "in forecasting.json."]
    md = "\n".join(lines) + "\n"
    atomic_write(directory / "forecasting.md", lambda tmp: Path(tmp).write_text(md))

    # One panel per dataset and horizon: test MSE per model, published MSE as a black tick.
    datasets = sorted({r["dataset"] for r in records})
    horizons = sorted({r["horizon"] for r in records})
    models = sorted({label(r) for r in records})
    fig, axes = plt.subplots(len(datasets), len(horizons), figsize=(3.2 * len(horizons) + 1, 3.4 * len(datasets)),
                             dpi=100, squeeze=False, sharey="row")
    for row, dataset in enumerate(datasets):
        for col, horizon in enumerate(horizons):
            ax = axes[row, col]
            by_model = {label(r): r for r in records if r["dataset"] == dataset and r["horizon"] == horizon}
            xs = range(len(models))
            ax.bar(xs, [by_model[m]["mse"] if m in by_model else 0 for m in models],
                   yerr=[by_model[m]["mse_std"] if m in by_model else 0 for m in models], color="tab:blue")
            published = [(x, by_model[m]["published_mse"]) for x, m in zip(xs, models)
                         if m in by_model and by_model[m]["published_mse"] is not None]
            if published:
                ax.scatter(*zip(*published), marker="_", s=300, c="black", zorder=3, label="published")
            ax.set_xticks(list(xs), models, fontsize=7, rotation=70, ha="right")
            ax.set_title(f"{dataset}, H = {horizon}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        axes[row, 0].set_ylabel("test MSE (standardised)")
        row_mse = [r["mse"] for r in records if r["dataset"] == dataset]
        axes[row, 0].set_ylim(0.9 * min(row_mse), 1.03 * max(row_mse))  # shared by the row: differences show
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    atomic_write(directory / "forecasting.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _run_one(task: tuple[int, ForecastConfig]) -> tuple[int, dict]:
    """A worker's task (index, config) -> (index, results) for one seed of one model (module level
    so a spawned pool can pickle it). A failure comes back as {"error": traceback, ...} so the
    rest of the grid goes on."""
    index, cfg = task
    try:
        return index, run_forecast(cfg)
    except Exception:  # noqa: BLE001 - reported by the parent with the run's name
        return index, dict(error=traceback.format_exc(), model=cfg.model, dataset=Path(cfg.data).stem,
                           horizon=cfg.horizon, seed=cfg.seed)


def run_each(tasks: list[ForecastConfig], jobs: int, threads: int | None) -> Iterator[tuple[int, dict]]:
    """(task index, results) for every task as it finishes, ``jobs`` at a time in spawned worker
    processes (each with ``threads`` torch threads, default the cores shared out)."""
    if jobs == 1:
        yield from map(_run_one, enumerate(tasks))
        return
    import multiprocessing

    from tqdm import tqdm

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with multiprocessing.get_context("spawn").Pool(jobs, torch.set_num_threads, (threads,)) as pool:
        yield from tqdm(pool.imap_unordered(_run_one, enumerate(tasks)), total=len(tasks), desc="forecast runs")


def report_failure(run: dict) -> bool:
    """Print a failed run's traceback; whether it failed."""
    if "error" in run:
        print(f"   FAILED {run['model']} {run['dataset']} H={run['horizon']} seed {run['seed']}:\n{run['error']}",
              flush=True)
    return "error" in run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="ETT-format CSVs (e.g. ../shared/data/ett/ETTh1.csv)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    p.add_argument("--horizons", nargs="+", type=int, default=[96], help="forecast horizons H")
    p.add_argument("--lookback", type=int, default=96, help="look-back L")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (results are averaged)")
    p.add_argument("--epochs", type=int, default=None, help="override the paper's epochs (a reduced budget)")
    p.add_argument("--max-train-batches", type=int, default=None, help="cap optimizer steps per epoch")
    p.add_argument("--results", default=str(RESULTS), help="directory of forecasting.{json,md,png}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (small models leave a GPU mostly idle)")
    p.add_argument("--skip-done", action="store_true",
                   help="skip seeds already recorded on this device with the same budget (resume a grid)")
    p.add_argument("--lr", type=float, default=None, help="learning rate instead of the paper's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting instead of the paper's (repeatable), e.g. --set patch_len=12")
    p.add_argument("--variant", default=None,
                   help="name of these settings in the results (records of different variants are kept apart); "
                        "default 'paper', or 'authors-script' with --authors-script")
    p.add_argument("--authors-script", action="store_true",
                   help="each run with the settings of the model's authors' run script for its dataset and horizon "
                        "(AUTHORS_SCRIPT: learning rate, dropout, patching, their trainer's optimizer)")
    p.add_argument("--record-best", action="store_true",
                   help="with --search: add the selected settings' runs to forecasting.json (variant "
                        "'val-selected' unless --variant names another)")
    p.add_argument("--search", action="append", default=[], metavar="KEYS=VALUES",
                   help="hyper-parameter search instead of a grid (repeatable): every combination is trained "
                        "and ranked by validation MSE into search-*.json; 'lr' is the learning rate, tied keys "
                        "take tied values, e.g. --search lr=4e-5,1e-4 --search patch_len/stride=4/2,12/6")
    args = p.parse_args(argv)
    if args.variant is None:
        args.variant = "authors-script" if args.authors_script else "paper"
    if args.jobs < 1:
        raise ValueError(f"--jobs: expected a positive int, got {args.jobs}")
    overrides = parse_settings(args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = Path(args.results)
    directory.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.forecasting " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = "none (CPU)" if device == "cpu" else torch.cuda.get_device_name()
    path = directory / "forecasting.json"
    records = json.loads(path.read_text()) if path.exists() else []
    budget = budget_text(args)
    if args.search:
        if args.authors_script:
            raise ValueError("--authors-script: not with --search (a search sets its own settings)")
        return search(args, overrides, device, command, gpu, budget)

    tasks = []
    for horizon in args.horizons:
        for data in args.data:
            for model in args.models:
                for seed in args.seeds:
                    if args.skip_done and seed in done_seeds(records, model, Path(data).stem, args.lookback,
                                                              horizon, args.variant, gpu, budget(model)):
                        continue
                    trainer, options = authors_script(model, Path(data).stem, horizon) if args.authors_script \
                        else ({}, {})
                    if args.lr is not None:
                        trainer["lr"] = args.lr
                    tasks.append(ForecastConfig(
                        data=data, model=model, lookback=args.lookback, horizon=horizon, epochs=args.epochs,
                        seed=seed, out=f"runs/forecast-{Path(data).stem}-{model}-H{horizon}-s{seed}", device=device,
                        max_train_batches=args.max_train_batches, progress=args.jobs == 1,
                        model_overrides={**options, **overrides}, **trainer))
    print(f"{len(tasks)} runs, {args.jobs} at a time", flush=True)

    failures = 0
    for _, run in run_each(tasks, args.jobs, args.threads):
        if report_failure(run):
            failures += 1
            continue
        print(f"   {run['model']} {run['dataset']} H={run['horizon']} seed {run['seed']}: test mse {run['mse']:.4f} "
              f"mae {run['mae']:.4f} ({run['seconds']} s)", flush=True)
        # written after every run, so an interrupted grid keeps what it finished
        records = add_run(records, {**run, "variant": args.variant}, command, gpu, budget(run["model"]))
        write_outputs(records, directory)
    if failures:
        raise SystemExit(f"{failures} of {len(tasks)} runs failed (tracebacks above)")


def parse_settings(items: list[str]) -> dict:
    """["key=value", ...] -> {key: value}, values read as Python literals (numbers, True, tuples)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {key}: expected a Python literal, got {value!r}") from None
    return settings


def search_space(items: list[str]) -> list[dict]:
    """--search arguments -> every combination, as {setting: value} dicts."""
    axes = []
    for item in items:
        keys, sep, values = item.partition("=")
        if not sep or not keys or not values:
            raise ValueError(f"--search: expected KEYS=VALUES, got {item!r}")
        names = keys.split("/")
        choices = []
        for value in values.split(","):
            parts = value.split("/")
            if len(parts) != len(names):
                raise ValueError(f"--search {keys}: value {value!r} does not give one part per key")
            choices.append({n: ast.literal_eval(v) for n, v in zip(names, parts)})
        axes.append(choices)
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def search(args, overrides: dict, device: str, command: str, gpu: str, budget: Callable[[str], str]) -> None:
    """Train every combination of the --search space (for each seed) on the one --data, --models
    and --horizons entry; write search-MODEL-DATASET-HH.json ranked by mean validation MSE; with
    --record-best, add the selected combination's runs to forecasting.json."""
    if len(args.data) != 1 or len(args.models) != 1 or len(args.horizons) != 1:
        raise ValueError("--search: expected exactly one --data, one --models and one --horizons value")
    data, model, horizon = args.data[0], args.models[0], args.horizons[0]
    combos = search_space(args.search)
    tasks, combo_of = [], []
    for i, combo in enumerate(combos):
        settings = {**overrides, **combo}
        lr = settings.pop("lr", args.lr)
        for seed in args.seeds:
            combo_of.append(i)
            tasks.append(ForecastConfig(
                data=data, model=model, lookback=args.lookback, horizon=horizon, epochs=args.epochs, seed=seed,
                out=f"runs/search-{Path(data).stem}-{model}-H{horizon}-c{i}-s{seed}", device=device, lr=lr,
                max_train_batches=args.max_train_batches, progress=args.jobs == 1, model_overrides=settings))
    print(f"{len(combos)} settings x {len(args.seeds)} seeds", flush=True)
    runs_of: list[list[dict]] = [[] for _ in combos]
    for index, run in run_each(tasks, args.jobs, args.threads):
        if not report_failure(run):
            runs_of[combo_of[index]].append(run)
    ranked = []
    for combo, mine in zip(combos, runs_of):
        if mine:
            ranked.append(dict(settings=combo, val_mse=sum(r["val_mse"] for r in mine) / len(mine),
                               test_mse=sum(r["mse"] for r in mine) / len(mine),
                               test_mae=sum(r["mae"] for r in mine) / len(mine),
                               seeds=[r["seed"] for r in mine], epochs_run=[r["epochs_run"] for r in mine],
                               runs=mine))
    ranked.sort(key=lambda r: r["val_mse"])
    best_runs = ranked[0].pop("runs") if ranked else []
    for r in ranked[1:]:
        del r["runs"]
    result = dict(model=model, dataset=Path(data).stem, horizon=horizon, lookback=args.lookback,
                  fixed=overrides, ranked=ranked, selection="lowest mean validation MSE",
                  command=command, gpu=gpu, date=datetime.date.today().isoformat())
    path = Path(args.results) / f"search-{model.replace('+', '-plus')}-{Path(data).stem}-H{horizon}.json"
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    for r in ranked:
        print(f"val {r['val_mse']:.4f}  test {r['test_mse']:.4f}/{r['test_mae']:.4f}  {r['settings']}")
    print(f"selected by validation: {ranked[0]['settings'] if ranked else None} ({path})")
    if args.record_best and ranked:
        variant = "val-selected" if args.variant == "paper" else args.variant
        records_path = Path(args.results) / "forecasting.json"
        records = json.loads(records_path.read_text()) if records_path.exists() else []
        for run in best_runs:
            records = add_run(records, {**run, "variant": variant}, command, gpu, budget(model))
        write_outputs(records, Path(args.results))


def budget_text(args) -> Callable[[str], str]:
    """model -> the training budget of this invocation, as recorded."""
    reduced = args.epochs is not None or args.max_train_batches is not None

    def budget(model: str) -> str:
        paper = PAPER_TRAINING[model]
        if reduced:
            return f"reduced: {args.epochs or paper['epochs']} epochs x {args.max_train_batches or 'all'} batches"
        return f"full: {paper['epochs']} epochs, patience {paper['patience']}, lr {paper.get('schedule', 'type1')}"
    return budget


def done_seeds(records: list[dict], model: str, dataset: str, lookback: int, horizon: int, variant: str,
               gpu: str, budget: str) -> set[int]:
    """Seeds recorded for this key on this device with this budget."""
    for r in records:
        if tuple(r[k] for k in KEY) == (model, variant, dataset, lookback, horizon) \
                and r["gpu"] == gpu and r["budget"] == budget:
            return set(r["seeds"])
    return set()


PER_SEED = ("seed", "mse", "mae", "val_mse", "best_epoch", "epochs_run", "seconds", "coverage_2sigma")


def add_run(records: list[dict], run: dict, command: str, gpu: str, budget: str) -> list[dict]:
    """records with ``run`` (one seed's results) added to its model/dataset/lookback/horizon record.

    Seeds accumulate in a record measured on the same device with the same budget (a rerun seed
    replaces its old value); a record from another device or budget is replaced."""
    key = tuple(run[k] for k in KEY)
    old = next((r for r in records if tuple(r[k] for k in KEY) == key), None)
    seeds = [] if old is None or old["gpu"] != gpu or old["budget"] != budget else old["per_seed"]
    seeds = sorted([s for s in seeds if s["seed"] != run["seed"]] + [{k: run[k] for k in PER_SEED if k in run}],
                   key=lambda s: s["seed"])
    return merge(records, make_record(run, seeds, command, gpu, budget))


def make_record(run: dict, per_seed: list[dict], command: str, gpu: str, budget: str) -> dict:
    """One results record: the settings of ``run`` and the mean/std over ``per_seed``."""
    model, dataset, horizon = run["model"], run["dataset"], run["horizon"]
    published = PUBLISHED.get((model, dataset), {}).get(horizon) if run["lookback"] == 96 else None
    mse, mae = torch.tensor([s["mse"] for s in per_seed]), torch.tensor([s["mae"] for s in per_seed])
    return dict(
        model=model, variant=run["variant"], dataset=dataset, horizon=horizon, lookback=run["lookback"],
        mse=float(mse.mean()), mae=float(mae.mean()),
        mse_std=float(mse.std(unbiased=False)), mae_std=float(mae.std(unbiased=False)),
        seeds=[s["seed"] for s in per_seed], per_seed=per_seed,
        published_mse=published[0] if published else None, published_mae=published[1] if published else None,
        budget=budget, lr=run["lr"], batch_size=run["batch_size"], first_epoch_lr=run["first_epoch_lr"],
        beta1=run["beta1"], model_options=run["model_options"],
        seconds_per_seed=round(sum(s["seconds"] for s in per_seed) / len(per_seed)),
        gpu=gpu, command=command, date=datetime.date.today().isoformat(), torch=torch.__version__,
        **({"coverage_2sigma": sum(s["coverage_2sigma"] for s in per_seed) / len(per_seed)}
           if "coverage_2sigma" in run else {}))


if __name__ == "__main__":
    main()
