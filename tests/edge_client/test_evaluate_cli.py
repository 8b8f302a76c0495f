"""`wearfl evaluate`: the command contract on small generated recordings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_client.sources.recordings import write_recording
from wearfl.cli import main

CLASSES = ("rest", "walk", "run")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Three subjects, 3 minutes each at 50 Hz: activity sets cadence, reference HR follows it."""
    root = tmp_path_factory.mktemp("recordings")
    (root / "dataset.toml").write_text('sampling_rate_hz = 50.0\nlabels = ["rest", "walk", "run"]\n')
    for subject in range(3):
        rng = np.random.default_rng(subject)
        n = 50 * 180
        t = np.arange(n) / 50.0
        label = (np.arange(n) // 1500 + subject) % 3
        cadence = np.array([0.0, 1.8, 2.8])[label]
        bpm = np.array([65.0, 100.0, 150.0])[label] + subject * 3
        motion = np.sin(2 * np.pi * cadence * t) * (label > 0)
        cols = {f"acc_{a}": (1.0 if a == "z" else 0.0) + 0.4 * motion + 0.05 * rng.standard_normal(n) for a in "xyz"}
        cols |= {f"gyro_{a}": 0.5 * motion + 0.05 * rng.standard_normal(n) for a in "xyz"}
        phase = np.cumsum(2 * np.pi * bpm / 60.0 / 50.0)
        cols["ppg"] = np.sin(phase) + 0.3 * motion + 0.1 * rng.standard_normal(n)
        cols["hr_bpm"] = bpm
        cols["activity"] = [CLASSES[i] for i in label]
        write_recording(root / f"subject{subject}.csv", t, **cols)
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_evaluate_and_personalize_activity(recordings, tmp_path, capsys):
    pkg = tmp_path / "act.safetensors"
    code, out, _ = _run(capsys, "evaluate", "--task", "activity", "--dataset", f"recordings:{recordings}",
                        "--train", "--save", pkg, "--json")
    trained = json.loads(out)
    assert code == 0 and set(trained["metrics"]) == {"accuracy", "macro_f1"}
    assert trained["metrics"]["accuracy"] > 0.8
    code, out, _ = _run(capsys, "info", "--model", pkg, "--json")
    info = json.loads(out)
    assert info["classes"] == list(CLASSES) and info["window"] == 128 and info["sampling_rate_hz"] == 50.0
    code, out, _ = _run(capsys, "evaluate", "--task", "activity", "--dataset", f"recordings:{recordings}",
                        "--model", pkg, "--personalize-fraction", "0.5", "--json")
    report = json.loads(out)
    assert code == 0
    assert set(report["metrics_before"]) == set(report["metrics_after"]) == {"accuracy", "macro_f1"}
    assert report["personalized_clients"] == 3


def test_adapt_fraction_reports_global_adapted_and_personalized_per_client(recordings, tmp_path, capsys):
    pkg = tmp_path / "act.safetensors"
    assert _run(capsys, "evaluate", "--task", "activity", "--dataset", f"recordings:{recordings}", "--train",
                "--save", pkg)[0] == 0
    base = ["evaluate", "--task", "activity", "--dataset", f"recordings:{recordings}", "--model", pkg]
    code, out, _ = _run(capsys, *base, "--adapt-fraction", "0.5", "--json")
    report = json.loads(out)
    assert code == 0 and len(report["clients"]) == 3
    assert {"metrics_before", "metrics_adapted", "metrics_after"} <= set(report)
    assert report["metrics_after"] == report["metrics_adapted"]  # nothing personalized
    for c in report["clients"].values():
        assert {"before", "adapted", "after", "kept_global", "check", "adapt_windows", "test_windows"} <= set(c)
        if c["kept_global"]:
            assert c["adapted"] == c["before"]
    assert report["adapted_clients"] + report["kept_global_clients"] == 3
    code, out, _ = _run(capsys, *base, "--adapt-fraction", "0.5", "--personalize-fraction", "0.5", "--json")
    both = json.loads(out)
    assert code == 0 and both["metrics_adapted"] == report["metrics_adapted"]
    assert all(c["personalize_windows"] > 0 for c in both["clients"].values())  # fine-tuned after adapting
    assert all(c["personalize_windows"] == 0 for c in report["clients"].values())

    code, out, _ = _run(capsys, *base, "--adapt-fraction", "0.5")
    assert code == 0 and "global model" in out and "adapted" in out and "improved clients" in out
    for client, c in report["clients"].items():  # a client that kept the global model says why
        (line,) = [line for line in out.splitlines() if line.strip().startswith(client)]
        assert ("(kept global: " in line) == c["kept_global"] and "(kept global: )" not in line, line
    code, _, err = _run(capsys, *base, "--adapt-fraction", "1.5")
    assert code != 0 and "--adapt-fraction must be between 0 and 1" in err


def test_train_heart_rate_reports_mae_and_the_spectral_baseline(recordings, capsys):
    code, out, _ = _run(capsys, "evaluate", "--task", "heart-rate", "--dataset", f"recordings:{recordings}",
                        "--train", "--window-s", "4", "--json")
    result = json.loads(out)
    assert code == 0 and set(result["metrics"]) == {"mae_bpm", "rmse_bpm"}
    assert result["metrics"]["mae_bpm"] < 30
    assert "spectral_peak" in result["baseline"]


def test_evaluate_text_output_and_errors(recordings, tmp_path, capsys):
    code, _, err = _run(capsys, "evaluate", "--task", "activity", "--dataset", f"recordings:{recordings}")
    assert code == 2 and "--train" in err and err.startswith("error: ")
    code, _, err = _run(capsys, "evaluate", "--task", "activity", "--dataset", "nowhere:1", "--train")
    assert code == 2 and "sim[:SEED]" in err
    code, _, err = _run(capsys, "evaluate", "--task", "heart-rate", "--dataset", f"hapt:{tmp_path}", "--train")
    assert code == 2 and err.startswith("error: ")
