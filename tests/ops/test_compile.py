"""Compiling an op's kernels ahead, in parallel, on its first call (mambakit/ops/_compile.py).

CPU: the argument summaries it keys on, that it stays out of the way when off and under the
interpreter, and (forcing it on under the interpreter) that its pass asks for exactly the kernel
specializations the real forward + backward then launches. GPU: in a fresh process (cold Triton
cache), a model's first forward + backward compiles exactly the kernels a serial first call
compiles, all of them on the compile pool.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mambakit.ops import _compile

REPO = Path(__file__).resolve().parents[2]


def test_argument_kind_follows_dtype_rank_and_integer_classes():
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert _compile.argument_kind(x) == (torch.bfloat16, 2)
    assert _compile.argument_kind(x.float()) != _compile.argument_kind(x)
    assert _compile.argument_kind(x[None]) != _compile.argument_kind(x)
    assert [_compile.argument_kind(v)[1] for v in (1, 32, 4096, 7, 0)] == [1, 16, 16, 0, 16]
    assert _compile.argument_kind(True) is True and _compile.argument_kind(None) is None
    assert _compile.argument_kind(0.5) == 0.5


def test_compile_ahead_does_nothing_when_off(monkeypatch):
    calls = []
    monkeypatch.setenv("MAMBAKIT_PARALLEL_COMPILE", "0")
    monkeypatch.setattr(_compile, "interpreting", lambda: False)
    _compile.compile_ahead("test-off", lambda *a: calls.append(a), torch.zeros(2))
    monkeypatch.setenv("MAMBAKIT_PARALLEL_COMPILE", "1")
    monkeypatch.setattr(_compile, "interpreting", lambda: True)
    _compile.compile_ahead("test-interpreted", lambda *a: calls.append(a), torch.zeros(2))
    assert calls == []


def _specialization(args, kwargs):
    """What Triton keys a compiled kernel on, approximately: tensors by dtype and 16-byte
    alignment, integers by == 1 and % 16, constexprs and options by value."""
    def kind(v):
        if isinstance(v, torch.Tensor):
            return "tensor", v.dtype, v.data_ptr() % 16 == 0
        if isinstance(v, bool) or v is None or isinstance(v, (str, torch.dtype)):
            return v
        if isinstance(v, int):
            return "int", v == 1, v % 16 == 0
        return type(v).__name__
    return tuple(map(kind, args)), tuple(sorted((k, kind(v)) for k, v in kwargs.items()))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in Triton's interpreter")
@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "mamba2-g2", "mamba3", "mamba3-mimo"])
def test_compile_pass_asks_for_exactly_the_kernels_the_call_launches(monkeypatch, kind):
    from triton.runtime.interpreter import InterpretedFunction

    from tests.fixtures import tiny_model

    records = []  # (warm-up, kernel, specialization)
    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        records.append((warmup, self.fn.__name__, _specialization(args, kwargs)))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setattr(_compile, "enabled", lambda: True)
    monkeypatch.setattr(_compile, "_kinds_seen", set())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the pool's device (no thread starts here)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    model = tiny_model(kind, dtype=torch.float32).train()
    tokens = torch.randint(0, 61, (2, 21))
    model(tokens).sum().backward()
    asked = {(name, spec) for warm, name, spec in records if warm}
    launched = {(name, spec) for warm, name, spec in records if not warm}
    assert launched and asked == launched


# Run in a fresh process: records every Triton compile (kernel name, whether on mambakit's compile
# pool) of one bf16 forward + backward and prints them as JSON.
_FIRST_CALL = r"""
import json, sys, threading
import torch, triton.compiler
records = []
real_compile = triton.compiler.compile
def compile(src, *args, **kwargs):
    records.append((src.fn.__name__, threading.current_thread().name.startswith(POOL_THREAD_PREFIX)))
    return real_compile(src, *args, **kwargs)
triton.compiler.compile = compile
from mambakit import MambaConfig, MambaLM
from mambakit.ops._compile import POOL_THREAD_PREFIX
kind = sys.argv[1]
torch.manual_seed(0)
ssm = {"mamba1": dict(layer="Mamba1", d_state=16), "mamba2": dict(layer="Mamba2", d_state=32, headdim=32),
       "mamba3": dict(layer="Mamba3", d_state=32, headdim=32)}[kind]
model = MambaLM(MambaConfig(d_model=128, n_layer=2, vocab_size=64, ssm_cfg=ssm)).cuda().to(torch.bfloat16)
tokens = torch.randint(0, 64, (2, 300), device="cuda")
model(tokens).float().sum().backward()
torch.cuda.synchronize()
print(json.dumps(records))
"""


def _first_call_compiles(kind: str, parallel: bool) -> list:
    env = dict(os.environ, MAMBAKIT_PARALLEL_COMPILE="1" if parallel else "0",
               TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton_cache_"))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL, kind], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{kind}, parallel={parallel}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "mamba3"])
def test_first_call_compiles_every_kernel_ahead_on_the_pool(kind):
    serial = _first_call_compiles(kind, parallel=False)
    parallel = _first_call_compiles(kind, parallel=True)
    assert serial and not any(pooled for _, pooled in serial)
    assert [name for name, pooled in parallel if not pooled] == []
    assert sorted(name for name, _ in parallel) == sorted(name for name, _ in serial)
