"""scripts/bench_explain.py: its torch twin computes wearfl's outputs, Captum agrees with wearfl's attributions
on it, and without Captum the bench runs wearfl's side alone. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from models import Model, activity_spec, heart_rate_spec

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_explain.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_explain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _task(bench, spec, n: int = 3):
    model = Model(spec, seed=1)
    rng = np.random.default_rng(0)
    for _, layer in model.network.layers:  # BatchNorm statistics that are not the identity
        if "running_var" in layer.params:
            c = len(layer.params["running_var"].value)
            layer.params["running_mean"].value[:] = rng.normal(0, 0.3, c)
            layer.params["running_var"].value[:] = rng.uniform(0.5, 2.0, c)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    out = model.predict(x)
    targets = out.argmax(axis=1) if spec.is_classifier else np.zeros(n, np.int64)
    return bench.Task(spec.task, "random", model, x, targets.astype(np.int64))


@pytest.mark.parametrize("make_spec", [activity_spec, heart_rate_spec])
def test_captum_agrees_with_wearfl(bench, make_spec):
    pytest.importorskip("torch")
    pytest.importorskip("captum")
    captum = bench.load_captum()
    assert not isinstance(captum, str), captum
    args = Namespace(span=None, steps=4, repeats=1, methods=list(bench.METHODS), refine=False)
    result = bench.run_task(_task(bench, make_spec()), args, captum)
    scale = 1.0 if make_spec is activity_spec else 100.0  # probabilities, or BPM
    assert result["torch_forward_max_abs_diff"] < 1e-5 * scale
    for method in bench.METHODS:
        row = result["methods"][method]
        assert row["max_rel_diff"] < 1e-4, (method, row)
    ig = result["methods"]["integrated-gradients"]
    assert ig["wearfl_completeness"]["max_abs_gap"] == pytest.approx(ig["captum_completeness"]["max_abs_gap"],
                                                                      rel=1e-3, abs=1e-6 * scale)


def test_without_captum_runs_wearfl_only(bench, monkeypatch, tmp_path, capsys):
    for name in ("torch", "captum"):  # their imports raise ImportError, as when they are not installed
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "explain.json"
    assert bench.main(["--tasks", "activity", "--activity-data", "sim:0", "--windows", "2", "--steps", "2",
                       "--repeats", "1", "--train-clients", "1", "--train-epochs", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pip install torch captum" in printed
    body = json.loads(out.read_text())
    rows = body["tasks"][0]["methods"]
    assert set(bench.METHODS) <= set(rows)
    assert all("captum_ms_per_window" not in row and row["wearfl_ms_per_window"] > 0 for row in rows.values())
    assert rows["integrated-gradients"]["wearfl_completeness"]["max_abs_gap"] >= 0
