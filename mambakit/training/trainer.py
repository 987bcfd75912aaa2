"""The training loop: ``train(TrainConfig())`` trains, evaluates, checkpoints, plots and samples.

One process, or several under torchrun (see :mod:`.distributed`); only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoints import atomic_write
from ..models import MambaLM
from . import distributed
from .config import TRAJECTORY_FIELDS, TrainConfig, model_config
from .data import Corpus, batch_starts, bits_per_byte, eval_starts, load_corpus, unigram_bits, windows
from .optim import build_optimizer, lr_factor, no_decay
from .report import MetricsLog, plot_losses
from .state import latest_checkpoint, read_checkpoint, restore_rng, save_checkpoint


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, corpus: Corpus, cfg: TrainConfig, env: distributed.Env) -> float:
    """Mean held-out cross-entropy in nats/token over the fixed evaluation windows (split over
    the processes; every process runs the same number of forwards, as FSDP needs)."""
    starts = eval_starts(len(corpus.val), cfg.seq_len, cfg.eval_windows)
    starts = starts[: len(starts) // env.world_size * env.world_size]
    if len(starts) == 0:
        raise ValueError(f"--eval-windows: the held-out split has fewer windows than the {env.world_size} processes")
    mine = starts[env.rank::env.world_size]
    per_batch = max(1, cfg.batch_size // cfg.grad_accum // env.world_size)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(mine), per_batch):
        x, y = windows(corpus.val, mine[i:i + per_batch], cfg.seq_len, env.device)
        with _autocast(env.device):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    total, count = distributed.all_reduce_sum([total, float(count)], env)
    return total / count


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    defaults = TrainConfig()  # a setting missing from an older checkpoint had its default
    changed = [f"--{k.replace('_', '-')} {saved.get(k, getattr(defaults, k))!r} -> {getattr(cfg, k)!r}"
               for k in TRAJECTORY_FIELDS if saved.get(k, getattr(defaults, k)) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); "
                         f"resume with the original ones, or start a new run in another --out")


def _log(env: distributed.Env, text: str) -> None:
    if env.is_main:
        tqdm.write(text, file=sys.stdout)


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg``; returns a summary (steps, final held-out loss and bits per byte, baseline,
    seconds). Writes everything into ``cfg.out`` (see :mod:`.state` for the layout)."""
    started = time.perf_counter()
    env = distributed.setup(cfg.device)
    # The first steps of a fresh model produce subnormal floats (tiny gradients, their squares in
    # AdamW, decays near zero in the scans); x86 arithmetic on them made those steps ~10x slower.
    # Flushed to zero while training on CPU, back to torch's default afterwards.
    flush = env.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        return _train(cfg, env, started)
    finally:
        if flush:
            torch.set_flush_denormal(False)
        distributed.teardown(env)


def _train(cfg: TrainConfig, env: distributed.Env, started: float) -> dict:
    out = Path(cfg.out)
    micro = cfg.batch_size // cfg.grad_accum
    if micro % env.world_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} sequences in {cfg.grad_accum} micro-batches do not split "
                         f"evenly over {env.world_size} processes")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None and cfg.resume:
        raise ValueError(f"--resume: {out} has no checkpoint to resume from")
    if checkpoint is not None and not cfg.resume:
        raise ValueError(f"--out: {out} already holds a run (up to {checkpoint.name}); pass --resume to continue it, "
                         f"or choose another --out")

    corpus = load_corpus(cfg.data, cfg.tokenizer)
    baseline_bits = unigram_bits(corpus.train, corpus.vocab_size)
    baseline_bpb = None if corpus.bytes_per_token is None else baseline_bits / corpus.bytes_per_token
    torch.manual_seed(cfg.seed)
    config = model_config(cfg.preset, cfg.layer, corpus.vocab_size, cfg.binary, cfg.arch, cfg.mlp_size, cfg.experts,
                          cfg.n_layer)
    model = MambaLM(config).to(env.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_active = model.active_parameters()
    exempt = {name for name, p in model.named_parameters() if no_decay(name, p)}
    wrapped = distributed.parallelize(model, env, cfg.dist)
    optimizer = build_optimizer(model, cfg, exempt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))

    start_step = 0
    if checkpoint is not None:
        state, model_state, optim_state, rng = read_checkpoint(checkpoint)
        _check_resumable(state["train_config"], cfg, checkpoint)
        distributed.load_full_state(model, optimizer, model_state, optim_state)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(rng)
        start_step = state["step"]
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.tokenizer is not None and not (out / "tokenizer.json").exists():
            atomic_write(out / "tokenizer.json", lambda tmp: shutil.copyfile(Path(cfg.tokenizer) / "tokenizer.json", tmp))
    log = MetricsLog(out, start_step if checkpoint is not None else None) if env.is_main else None
    forward = torch.compile(wrapped) if cfg.compile else wrapped

    bpb_note = "" if baseline_bpb is None else f" = {baseline_bpb:.3f} bits/byte"
    _log(env, f"data: {corpus.description}")
    active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
    arch = "" if cfg.arch == "mamba" else f" {cfg.arch}"
    _log(env, f"model: {cfg.preset} {cfg.layer}{arch}, d_model {config.d_model}, {config.n_layer} layers, "
              f"{n_params / 1e6:.2f}M parameters{active}, vocab {corpus.vocab_size}; device {env.device} x {env.world_size}"
              f"{' (' + cfg.dist + ')' if env.distributed else ''}")
    _log(env, f"unigram baseline (train split): {baseline_bits:.3f} bits/token{bpb_note}")
    if checkpoint is not None:
        _log(env, f"resumed from {checkpoint} at step {start_step}")

    stop = cfg.stop_at or cfg.max_steps
    tokens_per_step = cfg.batch_size * cfg.seq_len
    progress = tqdm(total=cfg.max_steps, initial=start_step, unit="step", disable=not env.is_main, dynamic_ncols=True,
                    file=sys.stdout)
    last_eval = None
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    for step in range(start_step, stop):
        starts = batch_starts(len(corpus.train), cfg.seq_len, cfg.batch_size, cfg.seed, step)
        loss_sum = torch.zeros((), device=env.device)
        aux_sum = torch.zeros((), device=env.device)
        for k in range(cfg.grad_accum):
            rows = starts[k * micro:(k + 1) * micro]
            rows = rows[env.rank * (micro // env.world_size):(env.rank + 1) * (micro // env.world_size)]
            x, y = windows(corpus.train, rows, cfg.seq_len, env.device)
            with distributed.no_grad_sync(wrapped, env, sync=k == cfg.grad_accum - 1):
                with _autocast(env.device):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
                aux = model.aux_loss()  # mixture-of-experts load balancing (None without experts)
                if aux is not None:
                    aux = aux / cfg.grad_accum
                    aux_sum += aux.detach()
                (loss if aux is None else loss + aux).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_steps += 1
        progress.update(1)
        evaluate_now = done % cfg.eval_every == 0 or done == stop
        if done % cfg.log_every == 0 or evaluate_now:
            loss_value = distributed.all_reduce_sum([loss_sum.item()], env)[0] / env.world_size
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": window_steps * tokens_per_step / elapsed}
            experts = model.expert_stats()  # routing of the last micro-batch, per MoE block
            if experts:
                record.update(aux_loss=distributed.all_reduce_sum([aux_sum.item()], env)[0] / env.world_size,
                              expert_load=experts["load"], expert_dropped=experts["dropped"])
            window_start, window_steps = time.perf_counter(), 0
            if evaluate_now:
                last_eval = evaluate(forward, corpus, cfg, env)
                record.update(eval_loss=last_eval, eval_ppl=math.exp(min(last_eval, 50.0)))
                bpb = bits_per_byte(last_eval, corpus.bytes_per_token)
                if bpb is not None:
                    record["eval_bpb"] = bpb
                model_state, optim_state = distributed.full_state(model, optimizer)
                if env.is_main:
                    save_checkpoint(out, done, config, model_state, optim_state, scheduler.state_dict(), cfg.to_dict())
                    shown = f"bpb {bpb:.3f}" if bpb is not None else f"ppl {record['eval_ppl']:.2f}"
                    _log(env, f"step {done}: train loss {loss_value:.4f}, held-out loss {last_eval:.4f} ({shown})")
                distributed.barrier(env)
                window_start = time.perf_counter()
            if log is not None:
                log.write(record)
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
    progress.close()

    summary = {"steps": stop, "eval_loss": last_eval, "eval_bpb": bits_per_byte(last_eval, corpus.bytes_per_token)
               if last_eval is not None else None, "baseline_bpb": baseline_bpb, "baseline_bits_per_token": baseline_bits,
               "parameters": n_params, "active_parameters": n_active}
    if env.is_main:
        baseline_nats = baseline_bits * math.log(2)
        plot = plot_losses(out, baseline_nats, title=f"{cfg.preset} {cfg.layer}{arch}")
        summary["seconds"] = time.perf_counter() - started
        if summary["eval_bpb"] is not None:
            _log(env, f"held-out {summary['eval_bpb']:.3f} bits/byte vs unigram baseline {baseline_bpb:.3f}")
        _log(env, f"wrote {out}/ (model, {plot.name}, metrics.jsonl) in {summary['seconds']:.0f} s")
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
        if cfg.sample_tokens and start_step < stop:
            _sample(out, cfg, corpus)
    return summary


def _sample(out: Path, cfg: TrainConfig, corpus: Corpus) -> None:
    """Print a sample from the saved model, read back as ``mambakit generate`` reads it."""
    from ..checkpoints import load_pretrained

    model = load_pretrained(out)
    tokenizer = model.tokenizer
    if corpus.vocab_size > 256 and tokenizer.vocab_size == 256:
        tqdm.write("(no sample: token-id data without --tokenizer cannot be decoded)", file=sys.stdout)
        return
    prompt = tokenizer.encode(cfg.sample_prompt) or [0]
    ids = model.generate([prompt], max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed)[0]
    tqdm.write(f"--- sample (temperature 0.8, top-p 0.95) ---\n{tokenizer.decode(ids)}\n---",
               file=sys.stdout)
