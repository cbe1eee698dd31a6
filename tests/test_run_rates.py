"""benchmarks/run_rates.py: steps/s from a metrics.jsonl skip the start-up interval and refuse too few records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_rates import rate  # noqa: E402


def test_rate_skips_the_first_interval(tmp_path: Path) -> None:
    rows = [{"step": 50, "time": 0.0, "loss_window": 0.5}, {"step": 100, "time": 100.0, "loss_window": 0.4},
            {"split": "val", "step": 150, "time": 105.0}, {"step": 300, "time": 110.0, "loss_window": 0.3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = rate(path, batch=512)
    assert r["steps_per_s"] == 20.0 and r["samples_per_s"] == 10240 and r["last_step"] == 300
    assert r["loss_window"] == 0.3


def test_rate_needs_three_training_records(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "time": 0.0}) + "\n")
    with pytest.raises(SystemExit, match="fewer than 3"):
        rate(path, batch=8)
