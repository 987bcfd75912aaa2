"""benchmarks.peers: the official package's compiled Mamba-1 module installed after its Triton-only
import in the same process (e2e_gpu.py runs Mamba-2, then Mamba-1). A stand-in package in a temp
folder plays the official source tree: nothing is built or downloaded."""

import sys
import types

from benchmarks import peers

INTERFACE = '''import selective_scan_cuda


def selective_scan_fn():
    return selective_scan_cuda.fwd()
'''


def test_compiled_module_replaces_the_triton_only_placeholder(tmp_path, monkeypatch):
    (tmp_path / "mamba_ssm" / "ops").mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "ops" / "selective_scan_interface.py").write_text(INTERFACE)
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "selective_scan_cuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    peers.official_triton_only(tmp_path)
    from mamba_ssm.ops import selective_scan_interface  # imported against the empty placeholder

    assert not hasattr(selective_scan_interface.selective_scan_cuda, "fwd")
    built = types.ModuleType("selective_scan_cuda")
    built.fwd = lambda: "compiled"
    selective_scan_fn = peers._install_selective_scan(built, tmp_path)
    assert selective_scan_fn() == "compiled"
    assert sys.modules["selective_scan_cuda"] is built
