"""benchmarks/bench_ssd.py --processes: the records of several processes merged into medians."""

import pytest

from benchmarks import bench_ssd


PARENT = dict(gpu="GPU", versions={"torch": "2"}, date="2026-12-02", command="python bench_ssd.py --processes 3")


def record(mode, ours, peer):
    return dict(op="ssd", shape="b1 l64", mode=mode, ours_ms=ours, peer="mamba_ssm-triton", peer_ms=peer,
                speedup=None if peer is None else peer / ours, floor_ms=0.5, floor_fraction=0.5 / ours,
                gpu="GPU", versions={"torch": "2"}, date="2026-12-02", command="python bench_ssd.py --worker run.json")


def test_medians_over_processes_per_case():
    runs = [[record("fwd", 1.0, 4.0), record("fwd+bwd", 5.0, None)],
            [record("fwd", 3.0, 1.0), record("fwd+bwd", 7.0, None)],
            [record("fwd", 2.0, 9.0), record("fwd+bwd", 6.0, None)]]
    fwd, both = bench_ssd.median_over_processes(runs, PARENT)
    assert (fwd["ours_ms"], fwd["peer_ms"], fwd["processes"]) == (2.0, 4.0, 3)
    assert fwd["ours_ms_runs"] == [1.0, 3.0, 2.0] and fwd["peer_ms_runs"] == [4.0, 1.0, 9.0]
    assert fwd["speedup"] == pytest.approx(2.0)  # ratio of the medians, not a median of ratios (1.5)
    assert fwd["floor_fraction"] == pytest.approx(0.25)
    assert both["ours_ms"] == 6.0 and both["peer_ms"] is None and "peer_ms_runs" not in both
    assert fwd["command"] == both["command"] == PARENT["command"]  # the worker's command is not the one to rerun


def test_a_peer_timed_in_only_some_processes_gives_no_ratio():
    runs = [[record("fwd_graph", 1.0, 4.0)], [record("fwd_graph", 3.0, None)], [record("fwd_graph", 2.0, 9.0)]]
    (merged,) = bench_ssd.median_over_processes(runs, PARENT)
    assert merged["ours_ms"] == 2.0
    assert merged["peer_ms"] is None and merged["speedup"] is None and merged["peer"] is None
    assert merged["peer_ms_runs"] == [4.0, None, 9.0]


def test_processes_that_timed_different_cases_are_refused():
    with pytest.raises(RuntimeError, match="different cases"):
        bench_ssd.median_over_processes([[record("fwd", 1.0, 1.0)], [record("fwd+bwd", 1.0, 1.0)]], PARENT)
