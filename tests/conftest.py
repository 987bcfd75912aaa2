"""Test-session setup: without a GPU, Triton kernels run through Triton's interpreter, each launch
bounds-checked."""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _interpreted_kernels_stay_in_bounds():
    """Every Triton kernel a test runs in the interpreter is bounds-checked (tests/triton_bounds.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        yield
        return
    from tests.triton_bounds import bounds_checked

    with bounds_checked():
        yield
