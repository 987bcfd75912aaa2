import json

import pytest

from mambakit.training.report import MetricsLog, plot_losses, read_metrics


def test_resumed_log_drops_records_after_the_checkpoint_and_a_cut_last_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    log = MetricsLog(tmp_path, resume_step=2)
    log.write({"step": 3, "loss": 0.5, "eval_loss": 0.6})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 1"):
        MetricsLog(tmp_path, resume_step=2)
    MetricsLog(tmp_path, resume_step=None)
    assert read_metrics(tmp_path) == []


def test_plot_is_a_png(tmp_path):
    log = MetricsLog(tmp_path, resume_step=None)
    for step in range(1, 5):
        log.write({"step": step, "loss": 3.0 / step, **({"eval_loss": 2.0} if step % 2 == 0 else {})})
    path = plot_losses(tmp_path, baseline_nats=3.2, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
