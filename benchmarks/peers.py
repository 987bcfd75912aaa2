"""Set up the peers a benchmark compares against, in the same process, on the GPU machine.

The official ``mamba-ssm`` comes as its PyPI source archive (carried in ``.whl/``; fetch it on a
machine with network by ``python -m benchmarks.peers``, which checks its SHA-256). Its Triton
parts need no build; its Mamba-1 CUDA extension is compiled here for the local GPU only (the
archive's own setup builds a dozen architectures). Nothing of the peer is imported at run time of
the library: only benchmarks and optional tests use this module.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import tarfile
import time
import types
import urllib.request
from pathlib import Path

ARCHIVE_GLOB = ".whl/mamba_ssm-*.tar.gz"
OFFICIAL_VERSION = "2.3.2.post1"
OFFICIAL_SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
PYPI_SIMPLE = "https://pypi.org/simple/mamba-ssm/"


def fetch_official_archive(root: str | os.PathLike = ".") -> Path:
    """Download the pinned official source archive into ``root/.whl`` (written atomically).

    ``pip download`` of the sdist runs its setup script, which needs CUDA; the archive is taken
    straight from PyPI's simple index instead and checked against its pinned SHA-256.
    """
    name = f"mamba_ssm-{OFFICIAL_VERSION}.tar.gz"
    target = Path(root) / ".whl" / name
    if target.exists():
        return target
    with urllib.request.urlopen(PYPI_SIMPLE, timeout=60) as response:
        index = response.read().decode()
    links = [link for link in re.findall(r'href="([^"]+)"', index) if f"/{name}#" in link]
    if not links:
        raise RuntimeError(f"{name} is not listed at {PYPI_SIMPLE}")
    with urllib.request.urlopen(links[0].split("#")[0], timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != OFFICIAL_SHA256:
        raise RuntimeError(f"{name}: SHA-256 {digest}, expected {OFFICIAL_SHA256}")
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def official_source(root: str | os.PathLike = ".", dest: str = "/tmp/mamba_ssm_src") -> Path | None:
    """Unpack the official source archive once; return its top folder, or None if not carried."""
    archives = sorted(glob.glob(str(Path(root) / ARCHIVE_GLOB)))
    if not archives:
        return None
    dest_path = Path(dest)
    if not dest_path.exists():
        with tarfile.open(archives[-1]) as tar:
            tar.extractall(dest_path, filter="data")
    return next(dest_path.iterdir())


def _register_package(src: Path) -> None:
    """Make ``mamba_ssm`` importable without running its __init__ (which pulls TileLang/CuTe)."""
    if "mamba_ssm" not in sys.modules:
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(src / "mamba_ssm")]
        sys.modules["mamba_ssm"] = package


def official_selective_scan(src: Path):
    """Build (for this GPU only) and import the official CUDA selective scan; -> selective_scan_fn.

    If ``MAMBAKIT_OFFICIAL_SO`` names a ``selective_scan_cuda`` extension built by an earlier run
    (carried back from its build folder /tmp/torch_ext/selective_scan_cuda), that one is imported
    instead of building again."""
    import torch
    from torch.utils.cpp_extension import load

    prebuilt = os.environ.get("MAMBAKIT_OFFICIAL_SO")
    if prebuilt:
        import importlib.util

        spec = importlib.util.spec_from_file_location("selective_scan_cuda", prebuilt)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"[peers] imported the prebuilt official selective_scan_cuda from {prebuilt}", flush=True)
        return _install_selective_scan(module, src)

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    csrc = src / "csrc" / "selective_scan"
    sources = [str(csrc / "selective_scan.cpp")] + sorted(str(p) for p in csrc.glob("selective_scan_*.cu"))
    start = time.time()
    module = load(
        name="selective_scan_cuda",
        sources=sources,
        extra_include_paths=[str(csrc)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[
            "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
        ],
        build_directory=_build_dir("selective_scan_cuda"),
        verbose=False,
    )
    print(f"[peers] built the official selective_scan_cuda for sm_{arch} in {time.time() - start:.0f} s", flush=True)
    return _install_selective_scan(module, src)


def _install_selective_scan(module, src: Path):
    """Make ``module`` the official package's selective_scan_cuda; -> selective_scan_fn. An earlier
    :func:`official_triton_only` in the same process left an empty placeholder that the already
    imported interface module holds, so that reference is replaced too."""
    sys.modules["selective_scan_cuda"] = module
    _register_package(src)
    from mamba_ssm.ops import selective_scan_interface

    selective_scan_interface.selective_scan_cuda = module
    return selective_scan_interface.selective_scan_fn


def official_triton_only(src: Path) -> None:
    """Import path for the official Triton ops (SSD, Mamba-3 SISO) without the CUDA extension."""
    if "selective_scan_cuda" not in sys.modules:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    _register_package(src)


def _build_dir(name: str) -> str:
    path = Path("/tmp/torch_ext") / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def mambapy_available() -> bool:
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    print(fetch_official_archive())
