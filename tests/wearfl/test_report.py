"""report.png: four panels from round 0, whatever the task and whether edges evaluated their own weights."""

from __future__ import annotations

import json

import matplotlib
import pytest

from wearfl.report import write_report

matplotlib.use("Agg")


def _report(task: str, personalization: dict | None) -> dict:
    key = "accuracy" if task == "activity" else "mae_bpm"
    return {
        "task": task, "dataset": "sim:0", "clients": 2, "quantization": "int8", "float32_update_bytes": 46756,
        "update_bytes_ratio": 0.27, "initial_metrics": {key: 0.4 if task == "activity" else 30.0},
        "rounds": [{"round": r, "metrics": {key: 0.8 if task == "activity" else 5.0}, "bytes_up": 25000,
                    "updates_accepted": 2, "updates_rejected": 0, "duration_s": 3.0 + r} for r in (1, 2, 3)],
        "personalization": personalization,
    }


@pytest.mark.parametrize(("task", "personalization"), [
    ("activity", {"clients": {"a": {"global": {"accuracy": 0.9}, "personalized": {"accuracy": 0.95}}}}),
    ("heart-rate", None),
])
def test_the_report_draws_the_initial_model_and_four_panels(tmp_path, task, personalization, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, **kw: figures.append(self))
    write_report(tmp_path, _report(task, personalization))
    assert json.loads((tmp_path / "report.json").read_text())["task"] == task
    (fig,) = figures
    metric, spread, size, durations = fig.axes
    xs, ys = metric.lines[0].get_data()
    assert list(xs) == [0, 1, 2, 3] and ys[0] == (0.4 if task == "activity" else 30.0)  # round 0 is drawn
    assert metric.get_ylim()[0] == 0  # an honest axis
    assert metric.get_ylim()[1] == (1 if task == "activity" else pytest.approx(34.5))
    assert [line.get_linestyle() for line in size.lines] == ["--"]  # the float32 reference
    assert len(durations.patches) == 3
    assert any("no edge evaluated" in t.get_text() for t in spread.texts) == (personalization is None)
    assert len(spread.collections) == (0 if personalization is None else 2)  # global and personalized dots


def test_the_spread_tells_adapted_edges_from_those_whose_checks_kept_the_global_model(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    clients = {"a": {"global": {"accuracy": 0.8}, "personalized": {"accuracy": 0.9},
                     "adapted": {"accuracy": 0.85, "kept_global": 0.0}},
               "b": {"global": {"accuracy": 0.7}, "personalized": {"accuracy": 0.75},
                     "adapted": {"accuracy": 0.7, "kept_global": 1.0}}}
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, **kw: figures.append(self))
    write_report(tmp_path, _report("activity", {"clients": clients}))
    spread = figures[0].axes[1]
    marks = {c.get_label(): c.get_offsets().tolist() for c in spread.collections}
    assert marks["adapted"] == [[0.0, 0.85]]
    assert marks["not adapted (checks kept global)"] == [[1.0, 0.7]]
