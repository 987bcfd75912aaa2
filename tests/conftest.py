"""Test-session setup: without a GPU, Triton kernels run through Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module is imported (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")
