"""Registers, spills and shared memory of the SSD kernels, compiled for sm_90 without a GPU.

Triton compiles for a named target without a device, and its wheel ships ``ptxas``; given the
constexprs and the divisibility hints a real launch has, the counts match the H200's
(benchmarks/NOTES.md, twentieth session). It must be the GPU machine's Triton (3.6: other
versions allocate differently), in a side environment; torch is not needed:

    python -m venv /tmp/triton36 && /tmp/triton36/bin/pip install triton==3.6.0
    /tmp/triton36/bin/python benchmarks/kernel_registers.py bwd_dc HEADS=4 BLOCK_T=32 BLOCK_S=64 num_warps=8

Pass the kernel's block sizes as its launch has them (``CONFIGS`` in mambakit/ops/ssd/triton_ops.py).

Shapes: the Mamba-2 anchor (h32 g1 p64 n128, chunk 128, bf16 inputs and states, D per head, z
gating on as in the Mamba-2 layer, no seq_idx; ``benchmarks/tune_ssd.py`` times without z:
HAS_Z=False SAVE_PRE=False). Prints (registers per thread, spill store / load bytes, shared memory bytes).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS_FILE = Path(__file__).resolve().parent.parent / "mambakit" / "ops" / "ssd" / "triton_kernels.py"
ANCHOR = dict(H=32, G=1, P=64, N=128, PP=64, NP=128, CHUNK=128, PREC="tf32", NARROW=True, HAS_D=True,
              D_PER_P=False, HAS_SEQ=False, HAS_BIAS=True, SOFTPLUS=True, CLAMP=False, HAS_H0=False, HAS_Z=True,
              SAVE_PRE=True, HAS_DLAST=False, PER_TOKEN=False, SEGMENTS=1, SEGMENT_CHUNKS=32, SPLIT=False,
              h0_ptr=None, seg_ptr=None)
# Pointer element types at the anchor; other pointers are float32.
BF16_POINTERS = {"x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "dout_ptr", "states_ptr", "dstates_ptr",
                 "dx_ptr", "dz_ptr", "y_ptr", "ypre_ptr", "entry_ptr"}
FLOAT_ARGS = {"dt_lo", "dt_hi"}


def _kernels():
    spec = importlib.util.spec_from_file_location("ssd_triton_kernels", KERNELS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resources(kernel: str, meta: dict) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, shared bytes) of ssd_<kernel>_kernel."""
    fn = getattr(_kernels(), f"ssd_{kernel}_kernel")
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 2)
    consts = {k: v for k, v in {**ANCHOR, **meta}.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16_POINTERS else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:  # lengths, chunk counts and strides: multiples of 16 at the anchor
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if registers is None or spills is None:
        raise RuntimeError(f"kernel_registers: unexpected ptxas report:\n{report}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2)), compiled.metadata.shared


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", help="fwd_state, fwd_output, bwd_state, bwd_dx, bwd_dc, ...")
    parser.add_argument("meta", nargs="*", help="NAME=VALUE constexprs and num_warps / num_stages")
    args = parser.parse_args()
    if not triton.__version__.startswith("3.6."):
        raise SystemExit(f"kernel_registers: needs Triton 3.6 (the GPU machine's), got {triton.__version__}")
    meta = {}
    for item in args.meta:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"meta: expected NAME=VALUE, got {item!r}")
        meta[name] = _value(value)
    registers, spill_stores, spill_loads, shared = resources(args.kernel, meta)
    print(f"ssd_{args.kernel}_kernel {meta}: {registers} registers, spills {spill_stores} B stored / "
          f"{spill_loads} B loaded, {shared} B shared")


if __name__ == "__main__":
    main()
