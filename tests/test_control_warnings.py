"""`evaluate control` says when its accuracy cannot be trusted: few tiles per class, or a collapse into one class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histosynth.cli.app import app
from histosynth.evaluate import control
from histosynth.evaluate.control import MIN_TILES_PER_CLASS, ControlResult, wilson_interval


def result(confusion: list[list[int]], rows=("tumour", "stroma"), columns=("tumour", "stroma")) -> ControlResult:
    return ControlResult("clusters", list(rows), list(columns), np.asarray(confusion), {r: r for r in rows})


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value
    lo, hi = wilson_interval(0, 6)
    assert lo == 0.0 and hi == pytest.approx(0.3903, abs=1e-4)
    assert wilson_interval(6, 6)[1] == pytest.approx(1.0)


def test_few_tiles_per_class_warn_with_the_interval():
    small = result([[5, 1], [0, 6]])  # 6 tiles per class, as in the issue
    warnings = small.warnings()
    assert len(warnings) == 2 and all("only 6 tiles" in w and "95% interval" in w for w in warnings)
    assert "tumour: accuracy from only 6 tiles (95% interval 0.44-0.97)" in warnings[0]
    assert small.to_json()["warnings"] == warnings
    assert small.per_class()["stroma"]["ci95"] == pytest.approx([0.6097, 1.0], abs=1e-4)
    n = MIN_TILES_PER_CLASS
    assert result([[n - 5, 5], [5, n - 5]]).warnings() == []


def test_all_tiles_in_one_class_warn_as_a_collapse():
    n = MIN_TILES_PER_CLASS
    collapsed = result([[n, 0], [n, 0]])
    assert collapsed.accuracy() == 0.5
    (warning,) = collapsed.warnings()
    assert f"all {2 * n} tiles were assigned to 'tumour'" in warning and "collapsed" in warning
    # One generated class only: landing in one column is the right answer, not a collapse.
    single = ControlResult("clusters", ["tumour"], ["tumour", "stroma"], np.asarray([[n, 0]]), {"tumour": "tumour"})
    assert single.warnings() == []


def test_control_command_prints_the_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(control, "evaluate_control", lambda *a, **k: result([[6, 0], [6, 0]]))
    out = tmp_path / "c.json"
    res = CliRunner().invoke(app, ["evaluate", "control", "--samples", str(tmp_path), "--vqgan", "v", "--head", "h",
                                   "--json", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning: tumour: accuracy from only 6 tiles" in text and "collapsed into one class" in text
    assert len(json.loads(out.read_text())["warnings"]) == 3
