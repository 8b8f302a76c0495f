"""``wearfl simulate`` end to end through a real broker: the report contract, strategies, attacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wearfl.cli import main

pytestmark = pytest.mark.slow  # the quick loop is `pytest -m "not slow"`

ROUND_KEYS = {"round", "model_version", "participants", "updates_accepted", "updates_rejected", "bytes_up",
              "bytes_down", "duration_s", "metrics"}


def simulate(mqtt_broker, out, *extra: str) -> dict:
    code = main(["simulate", "--broker", mqtt_broker.url, "--out", str(out), "--seed", "1", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def run_status(state) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["status", "--state", str(state), "--json"]) == 0
    return buffer.getvalue()


def test_the_report_holds_the_contract_and_the_model_files(mqtt_broker, tmp_path, capsys):
    report = simulate(mqtt_broker, tmp_path / "run", "--clients", "3", "--rounds", "2", "--eval-every", "2",
                      "--explain", "--adapt")
    assert {"task", "dataset", "clients", "strategy", "quantization", "float32_update_bytes", "rounds",
            "final_metrics"} <= set(report)
    assert (report["clients"], report["strategy"], report["quantization"]) == (3, "fedavg", "int8")
    assert report["strategy_config"]["optimizer"] == "sgd"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(set(r) >= ROUND_KEYS and r["updates_accepted"] == 3 for r in report["rounds"])
    assert report["final_metrics"]["accuracy"] > report["initial_metrics"]["accuracy"]
    # federated evaluation every 2nd round only; each edge reports global vs its fine-tuned weights
    assert report["rounds"][0]["federated_metrics"] == {} and report["rounds"][1]["federated_metrics"]["accuracy"] > 0
    personal = report["personalization"]
    assert personal["metric"] == "accuracy" and personal["reported"] == 3 and 0 <= personal["improved"] <= 3
    assert all({"global", "personalized", "round"} <= set(v) for v in personal["clients"].values())
    # --adapt: each edge also reports the model it would use after adapting to its wearer without labels
    assert all(set(v["adapted"]) == {"accuracy", "macro_f1", "loss", "kept_global"} and
               v["adapted"]["kept_global"] in (0.0, 1.0) for v in personal["clients"].values())
    assert personal["adapted_reported"] == 3 and 0 <= personal["mean_adapted"] <= 1
    assert personal["adapted_kept_global"] == sum(v["adapted"]["kept_global"] for v in personal["clients"].values())
    assert 0 <= report["rounds"][1]["federated_metrics"]["adapted_accuracy"] <= 1
    status = json.loads(run_status(tmp_path / "run" / "hub"))
    assert set(status["personalization"]) == set(personal["clients"])
    # --explain: the edges' maps ride on their federated evaluation (round 2 only), the hub combines them
    [explained] = report["explanations"]
    assert (explained["round"], explained["clients"], explained["segments"], explained["dp"]) == (2, 3, 8, None)
    assert explained["model_version"] == report["rounds"][1]["model_version"] - 1
    grid = np.asarray(explained["map"])
    assert grid.shape == (len(explained["classes"]), 6, 8) and grid.min() >= 0 and grid.sum() > 0
    assert explained["channels"] == ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    assert sum(explained["windows"]) > 0 and len(explained["windows"]) == len(explained["classes"])
    assert status["explanation"]["map"] == explained["map"]
    assert main(["status", "--state", str(tmp_path / "run" / "hub")]) == 0
    shown = capsys.readouterr().out
    assert "explanations" in shown and "of the attribution" in shown
    for name in ("report.png", "model.safetensors", "model.onnx", "model.tflite"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert "final accuracy" in shown


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
def test_a_sign_flipping_edge_is_recorded_and_a_median_resists_it(mqtt_broker, tmp_path, strategy):
    report = simulate(mqtt_broker, tmp_path / strategy, "--clients", "5", "--rounds", "2", "--strategy", strategy,
                      "--attack", "sign-flip", "--malicious", "0.2", "--local-steps", "8")
    attack = report["attack"]
    assert attack["kind"] == "sign-flip" and len(attack["malicious_clients"]) == 1 and attack["scale"] == 10.0
    accuracy = report["final_metrics"]["accuracy"]
    if strategy == "fedmedian":
        assert accuracy > 0.6  # four honest edges out of five carry the median
    else:
        assert accuracy < 0.4  # -10x one edge's delta outweighs four honest ones in a mean


def test_strategy_args_reach_the_hub_and_bad_ones_fail_cleanly(mqtt_broker, tmp_path, capsys):
    code = main(["simulate", "--broker", mqtt_broker.url, "--out", str(tmp_path / "bad"), "--clients", "4",
                 "--strategy", "krum", "--strategy-arg", "f=1"])
    assert code == 2
    assert "needs at least 5 updates" in capsys.readouterr().err


def test_a_simulation_in_process_gives_the_store_s_log_lines_back(tmp_path, capsys):
    """``wearfl simulate`` quiets the hub store's per-edge "pinned key" lines, for its own run only."""
    import logging

    store_log = logging.getLogger("hub.store")
    level = store_log.level
    try:
        store_log.setLevel(logging.INFO)
        assert main(["simulate", "--strategy", "nope", "--out", str(tmp_path / "run")]) == 2
        assert "unknown strategy 'nope'" in capsys.readouterr().err
        assert store_log.level == logging.INFO
    finally:
        store_log.setLevel(level)
