"""benchmarks.peers: the official package's compiled Mamba-1 module installed after its Triton-only
import in the same process (e2e_gpu.py runs Mamba-2, then Mamba-1). A stand-in package in a temp
folder plays the official source tree: nothing is built or downloaded."""

import sys
import types

import pytest

from benchmarks import peers

INTERFACE = '''import selective_scan_cuda


def selective_scan_fn():
    return selective_scan_cuda.fwd()
'''


@pytest.fixture
def peer_modules_restored():
    """Take the official package's module names out of sys.modules for the test and put back
    exactly what was there afterwards: a stand-in left behind would be imported by transformers."""
    def ours(name):
        return name == "selective_scan_cuda" or name == "mamba_ssm" or name.startswith("mamba_ssm.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [name for name in sys.modules if ours(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_compiled_module_replaces_the_triton_only_placeholder(tmp_path, peer_modules_restored):
    (tmp_path / "mamba_ssm" / "ops").mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "ops" / "selective_scan_interface.py").write_text(INTERFACE)

    peers.official_triton_only(tmp_path)
    from mamba_ssm.ops import selective_scan_interface  # imported against the empty placeholder

    assert not hasattr(selective_scan_interface.selective_scan_cuda, "fwd")
    built = types.ModuleType("selective_scan_cuda")
    built.fwd = lambda: "compiled"
    selective_scan_fn = peers._install_selective_scan(built, tmp_path)
    assert selective_scan_fn() == "compiled"
    assert sys.modules["selective_scan_cuda"] is built
