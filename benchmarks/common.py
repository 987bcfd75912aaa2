"""Shared benchmark plumbing: median CUDA-event and wall-clock timing, environment record, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def time_ms(fn, grad_to_none=None, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn, grads=None, warmup_ms: float = 50, rep_ms: float = 300) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (CUDA events, as ``time_ms``): the
    device time without the host's launch work, which ``time_ms`` counts wherever the host falls
    behind the device. ``grads``: leaf tensors whose .grad ``fn`` fills (a forward + backward);
    they are cleared before the capture, so each replay writes them anew rather than adding.
    None (and a printed reason) when ``fn`` cannot be captured."""
    from triton.testing import do_bench

    def clear():
        for t in grads or ():
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            clear()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    clear()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"[graph] capture failed: {err}", flush=True)
        return None
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def event_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` by CUDA events, one call each, after one warm-up call (for
    calls too long for ``time_ms``'s repetition budget)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_seconds(fn, repeats: int = 3) -> float:
    """Median wall seconds of ``fn`` after one warm-up call, the GPU (if in use) synchronised
    around each call: for whole loops such as ``generate``, host work included."""
    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def environment(device: torch.device | str = "cuda") -> dict:
    """GPU name (or the CPU and its threads), versions, date and the command line of this run."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.device(device).type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        hardware = props.name
        versions.update(triton=triton.__version__, cuda=torch.version.cuda)
    else:
        hardware = f"CPU ({torch.get_num_threads()} threads)"
    return {
        "gpu": hardware,
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(records: list[dict], stem: Path, columns: list[str]) -> None:
    """``stem``.json (the records) and ``stem``.md (a table of ``columns``)."""
    atomic_write(stem.with_suffix(".json"), json.dumps(records, indent=2) + "\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in records:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if records:
        env = records[0]
        lines += ["", f"GPU: {env['gpu']}; versions: {env['versions']}; date: {env['date']}",
                  f"Command: `{env['command']}`"]
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
