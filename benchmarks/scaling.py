"""Scaling study: one layer's time and peak memory against sequence length, and decode speed
against context length, for Mamba-1, Mamba-2, Mamba-3, an attention layer and an LSTM.

    PYTHONUNBUFFERED=1 python benchmarks/scaling.py --out benchmarks/results/scaling

Each layer has width ``--d-model`` (default 1024) at batch ``--batch`` (default 1), in bf16 on the
GPU. The layers are mambakit's ``Mamba1`` (d_state 16), ``Mamba2`` and ``Mamba3`` (d_state 128,
headdim 64), ``MHA`` (causal, head dim 64: ``F.scaled_dot_product_attention``, whose flash backend
runs for causal bf16 inputs without a mask) and ``nn.LSTM`` (cuDNN). Forward (no grad) and
forward + backward are timed (CUDA events, median of a few calls after one warm-up) at every length
of ``--lengths``; peak memory is what the call allocated beyond the layer and its input. A layer
stops growing at its first out-of-memory or once one call takes longer than ``--max-call-s``.

Decode: the time of one token through the layer with its cache at batch ``--decode-batch``. A
Mamba layer's state does not grow with the context, so its step is timed once and holds for every
context; attention runs ``MHA`` with a key/value cache of the context's length (its decode passes a
boolean mask, so SDPA takes its memory-efficient or math backend there, not flash); an LSTM's state
is fixed-size too. Records go to OUT/scaling.json, a table to OUT/scaling.md and the plots to
OUT/scaling.png; the script ends with the figures that test the source documents' claims
(log-log slope, the length past which Mamba-2 beats attention, decode throughput ratios, and
Mamba-1 layer time over Mamba-2 layer time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import atomic_write, environment, event_ms, wall_seconds  # noqa: E402
from mambakit.cache import InferenceCache  # noqa: E402
from mambakit.layers import MHA, Mamba1, Mamba2, Mamba3  # noqa: E402

LAYERS = ("mamba1", "mamba2", "mamba3", "attention", "lstm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LSTMLayer(nn.Module):
    """nn.LSTM (b, l, d) -> (b, l, d), its output only."""

    def __init__(self, d_model: int, **factory):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, batch_first=True, **factory)

    def forward(self, x):
        return self.lstm(x)[0]


def build(name: str, d_model: int, device, dtype) -> nn.Module:
    factory = dict(device=device, dtype=dtype)
    if name == "mamba1":
        return Mamba1(d_model, d_state=16, layer_idx=0, **factory)
    if name == "mamba2":
        return Mamba2(d_model, d_state=128, headdim=64, layer_idx=0, **factory)
    if name == "mamba3":
        return Mamba3(d_model, d_state=128, headdim=64, layer_idx=0, **factory)
    if name == "attention":
        return MHA(d_model, num_heads=d_model // 64, causal=True, layer_idx=0, **factory)
    return LSTMLayer(d_model, **factory)


def call_ms(fn, device: torch.device, calls: int = 5) -> float:
    """Median milliseconds of ``fn`` after one warm-up call (CUDA events on a GPU)."""
    if device.type == "cuda":
        return event_ms(fn, calls)
    return 1e3 * wall_seconds(fn, calls)


def peak_mib(fn, device: torch.device) -> float | None:
    """MiB that one call of ``fn`` allocated at its peak beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_lengths(name, layer, args, device, dtype, records) -> None:
    """Forward and forward+backward at growing lengths until OOM or the time limit."""
    live = {"fwd": True, "fwd+bwd": True}
    for length in args.lengths:
        for mode in live:
            if not live[mode]:
                continue
            record = dict(layer=name, mode=mode, length=length, batch=args.batch, d_model=args.d_model)
            try:
                x = torch.randn(args.batch, length, args.d_model, device=device, dtype=dtype,
                                requires_grad=mode == "fwd+bwd")
                if mode == "fwd":
                    def fn():
                        with torch.no_grad():
                            layer(x)
                else:
                    dy = torch.randn_like(x)

                    def fn():
                        layer(x).backward(dy)
                        x.grad = None
                        layer.zero_grad(set_to_none=True)
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - started
                calls = 1 if first_s > args.max_call_s / 3 else 5
                record.update(ms=call_ms(fn, device, calls), peak_mib=peak_mib(fn, device), status="ok")
                if record["ms"] / 1e3 > args.max_call_s:
                    live[mode] = False
                    record["status"] = "ok, slower than --max-call-s: longer lengths skipped"
            except torch.OutOfMemoryError:
                live[mode] = False
                record.update(ms=None, peak_mib=None, status="out of memory")
            except RuntimeError as error:  # e.g. a backend without this dtype: recorded, the study goes on
                live[mode] = False
                record.update(ms=None, peak_mib=None, status=f"error: {str(error).splitlines()[0][:160]}")
            finally:
                x = dy = fn = None  # noqa: F841 (free before the next length)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            records.append(record)
            shown = "-" if record["ms"] is None else f"{record['ms']:.3f} ms"
            peak = "" if record["peak_mib"] is None else f", peak {record['peak_mib']:.0f} MiB"
            print(f"{name:9s} {mode:7s} l={length:>8d}: {shown}{peak} ({record['status']})", flush=True)


def measure_decode(name, layer, args, device, dtype, records) -> None:
    """One token through the layer's cache, at every context of ``--decode-contexts``."""
    b, d = args.decode_batch, args.d_model
    u = torch.randn(b, 1, d, device=device, dtype=dtype)
    for context in args.decode_contexts:
        record = dict(layer=name, mode="decode", length=context, batch=b, d_model=d)
        try:
            with torch.no_grad():
                if name == "lstm":
                    state = tuple(torch.randn(1, b, d, device=device, dtype=dtype) for _ in range(2))

                    def fn():
                        layer.lstm(u, state)
                elif name == "attention":
                    cache = InferenceCache(max_batch_size=b, max_seqlen=context + 1)
                    cache.states[0] = (torch.randn(b, context + 1, 2, layer.num_heads_kv, layer.head_dim,
                                                   device=device, dtype=dtype),)
                    cache.seqlen_offset = context

                    def fn():
                        layer(u, inference_params=cache)
                else:
                    cache = InferenceCache(max_batch_size=b, max_seqlen=1)
                    layer(u, inference_params=cache)  # allocates the (context-independent) state
                    cache.seqlen_offset = 1

                    def fn():
                        layer(u, inference_params=cache)
                ms = call_ms(fn, device, 20)
            record.update(ms=ms, tokens_per_s=b / ms * 1e3, status="ok")
        except torch.OutOfMemoryError:
            record.update(ms=None, tokens_per_s=None, status="out of memory")
        except RuntimeError as error:
            record.update(ms=None, tokens_per_s=None, status=f"error: {str(error).splitlines()[0][:160]}")
        records.append(record)
        shown = "-" if record["ms"] is None else f"{record['ms'] * 1e3:.0f} us, {record['tokens_per_s']:,.0f} tok/s"
        print(f"{name:9s} decode  context={context:>8d}: {shown} ({record['status']})", flush=True)
        if name != "attention" and record["status"] == "ok":
            for later in args.decode_contexts[args.decode_contexts.index(context) + 1:]:
                records.append(dict(record, length=later, status="ok (state size independent of the context)"))
            break


def claims(records: list[dict]) -> list[str]:
    """The figures behind the source documents' claims, as printable lines."""
    def times(layer, mode):
        return {r["length"]: r["ms"] for r in records if r["layer"] == layer and r["mode"] == mode and r["ms"]}

    lines = []
    for layer in LAYERS:
        t = times(layer, "fwd+bwd")
        if len(t) >= 2:
            lengths = sorted(t)[-4:]  # the longest lengths measured: the asymptotic slope
            lo, hi = lengths[0], lengths[-1]
            slope = math.log(t[hi] / t[lo]) / math.log(hi / lo) if hi > lo else float("nan")
            lines.append(f"{layer}: fwd+bwd time grows as length^{slope:.2f} from l={lo} to l={hi}")
    mamba2, attention = times("mamba2", "fwd+bwd"), times("attention", "fwd+bwd")
    faster = [l for l in sorted(mamba2) if l in attention and mamba2[l] < attention[l]]
    if faster:
        lines.append(f"mamba2 fwd+bwd is faster than attention from l={faster[0]} "
                     f"({attention[faster[0]] / mamba2[faster[0]]:.2f}x there)")
    for layer in ("mamba1", "mamba2", "mamba3"):
        decode = times(layer, "decode")
        att = times("attention", "decode")
        for context in sorted(set(decode) & set(att)):
            lines.append(f"decode, context {context}: {layer} {att[context] / decode[context]:.1f}x attention's "
                         f"tokens/s")
    mamba1 = times("mamba1", "fwd+bwd")
    for length in sorted(set(mamba1) & set(mamba2)):
        lines.append(f"l={length}: Mamba-1 layer / Mamba-2 layer fwd+bwd time = {mamba1[length] / mamba2[length]:.2f}")
    return lines


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), dpi=110)
    for i, layer in enumerate(LAYERS):
        color = f"C{i}"
        for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
            rows = [r for r in records if r["layer"] == layer and r["mode"] == mode and r["ms"]]
            if rows:
                axes[0].plot([r["length"] for r in rows], [r["ms"] for r in rows], style, c=color, marker="o", ms=3,
                             label=f"{layer} {mode}")
                if mode == "fwd+bwd" and rows[0]["peak_mib"] is not None:
                    axes[1].plot([r["length"] for r in rows], [r["peak_mib"] / 1024 for r in rows], c=color,
                                 marker="o", ms=3, label=layer)
        rows = [r for r in records if r["layer"] == layer and r["mode"] == "decode" and r["ms"]]
        if rows:
            axes[2].plot([r["length"] for r in rows], [r["tokens_per_s"] for r in rows], c=color, marker="o", ms=3,
                         label=layer)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms", title=f"one layer, {title}")
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="GiB", title="peak memory, fwd+bwd")
    axes[2].set(xscale="log", yscale="log", xlabel="context length", ylabel="tokens/s", title="decode throughput")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[2**k for k in range(10, 21)])
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[2**k for k in range(10, 17)])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-call-s", type=float, default=2.0, help="stop growing a layer once a call takes longer")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def write_results(records: list[dict], args: argparse.Namespace, env: dict) -> list[str]:
    """scaling.json, scaling.png and scaling.md under args.out from the records so far; -> the claims' lines."""
    for r in records:
        r.update(dtype=args.dtype, **env)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "scaling.json", json.dumps(records, indent=2) + "\n")
    title = f"d_model {args.d_model}, batch {args.batch}, {args.dtype}"
    plot(records, args.out / "scaling.png", title)
    findings = claims(records)
    lines = [f"# Scaling study: {title}", "", f"{env['gpu']}; versions {env['versions']}; {env['date']}.", "",
             f"Command: `{env['command']}`", "", "| layer | mode | length | ms | peak MiB | tokens/s | status |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        tok = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['layer']} | {r['mode']} | {r['length']} | {ms} | {peak} | {tok} | {r['status']} |")
    lines += ["", "## Figures behind the claims", "", *[f"- {line}" for line in findings], "",
              "![scaling](scaling.png)"]
    atomic_write(args.out / "scaling.md", "\n".join(lines) + "\n")
    return findings


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment(device)
    records = []
    for name in args.layers:
        torch.manual_seed(0)
        layer = build(name, args.d_model, device, dtype)
        measure_lengths(name, layer, args, device, dtype, records)
        measure_decode(name, layer, args, device, dtype, records)
        del layer
        findings = write_results(records, args, env)  # after every layer, so a cut-off run keeps what ran
    print("\n".join(findings), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
