"""benchmarks/e2e_cpu.py's timing: the two sides take turns, and each gets its own median."""

from benchmarks import e2e_cpu


def test_sides_take_turns_and_keep_their_results(monkeypatch):
    calls, clock = [], iter(range(100))
    monkeypatch.setattr(e2e_cpu.time, "perf_counter", lambda: next(clock))

    def side(name):
        def run():
            calls.append(name)
            return f"{name} {len(calls)}"
        return run

    peer_s, peer_out, ours_s, ours_out = e2e_cpu.median_seconds(side("peer"), side("ours"), repeats=3)
    assert calls == ["peer", "ours"] * 4  # one warm-up each, then turns
    assert (peer_s, ours_s) == (1, 1)  # each timed call spans one tick of the fake clock
    assert (peer_out, ours_out) == ("peer 7", "ours 8")
