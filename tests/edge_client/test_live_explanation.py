"""Live predictions that say why (edge_client/live_explanation.py, ``wearfl edge --explain-predictions``): the
channel and stretch of the newest window that moved the prediction most, within a CPU budget."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edge_client.config import EdgeConfig
from edge_client.edge_command import add_edge_command, config_from_args
from edge_client.ingest import StreamView
from edge_client.ingest import _latest_prediction as _plain_prediction
from edge_client.live_explanation import LIVE_STEPS, LiveExplainer
from edge_client.sources.simulator import SimulatedWearer
from edge_client.windowing import Windows
from models import Model, activity_spec, heart_rate_spec
from models.attribution import default_span, integrated_gradients
from models.errors import ConfigError
from models.inference import NumpyPredictor
from wearfl.cli import main

EXPLANATION_KEYS = {"method", "channel", "from_s", "to_s", "attribution"}


def windows(spec: Any, n: int = 3, seed: int = 0) -> Windows:
    x = np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)
    activity = np.zeros(n, np.int16) if spec.is_classifier else np.full(n, -1, np.int16)
    t_end = (np.arange(n, dtype=np.float64) + 1) * spec.window / spec.sampling_rate_hz
    return Windows(x, activity, np.full(n, np.nan, np.float32), t_end)


def _latest_prediction(predictor: Any, spec: Any, w: Windows, explainer: LiveExplainer | None = None) -> dict:
    """Live inference on the newest window, explained the way the edge explains the prediction it publishes."""
    prediction = _plain_prediction(predictor, spec, w)
    if explainer is not None:
        explainer.attach(prediction, w.x[-1:], predictor)
    return prediction


@pytest.fixture(scope="module")
def activity() -> tuple[Model, NumpyPredictor, Windows]:
    model = Model(activity_spec(), seed=3)
    return model, NumpyPredictor(model), windows(model.spec)


def test_with_a_full_budget_a_prediction_says_what_moved_it(activity):
    model, predictor, w = activity
    spec = model.spec
    explainer = LiveExplainer(1.0)
    prediction = _latest_prediction(predictor, spec, w, explainer)
    assert prediction["activity"] in spec.classes and prediction["t"] == pytest.approx(float(w.t_end[-1]))
    why = prediction["explanation"]
    assert set(why) == EXPLANATION_KEYS
    assert why["method"] == "integrated-gradients"
    assert why["channel"] in spec.channels
    length_s = spec.window / spec.sampling_rate_hz
    assert 0.0 <= why["from_s"] < why["to_s"] <= length_s
    assert isinstance(why["attribution"], float) and why["attribution"] != 0.0
    assert (explainer.explained, explainer.skipped) == (1, 0)
    assert explainer.spent_s > 0


def test_a_full_budget_explains_every_prediction(activity):
    model, predictor, w = activity
    explainer = LiveExplainer(1.0)  # a thread's CPU time never passes the wall-clock time since the start
    for _ in range(3):
        assert "explanation" in _latest_prediction(predictor, model.spec, w, explainer)
    assert (explainer.explained, explainer.skipped) == (3, 0)


def test_without_an_explainer_there_is_no_explanation_and_the_prediction_is_the_same(activity):
    model, predictor, w = activity
    plain = _latest_prediction(predictor, model.spec, w)
    assert "explanation" not in plain
    explained = _latest_prediction(predictor, model.spec, w, LiveExplainer(1.0))
    assert (explained["activity"], explained["confidence"]) == (plain["activity"], plain["confidence"])
    again = _latest_prediction(predictor, model.spec, w)  # explaining left the model as it was
    assert (again["activity"], again["confidence"]) == (plain["activity"], plain["confidence"])
    np.testing.assert_array_equal(model.predict(w.x), predictor.predict(w.x))


def test_a_predictor_without_a_numpy_model_is_not_explained(activity):
    model, _, w = activity
    exported = SimpleNamespace(spec=model.spec, predict=model.predict)  # as an .onnx or .tflite predictor
    explainer = LiveExplainer(1.0)
    prediction = _latest_prediction(exported, model.spec, w, explainer)
    assert "explanation" not in prediction and prediction["activity"] in model.spec.classes
    assert (explainer.explained, explainer.skipped) == (0, 0)


def test_past_a_tiny_budget_predictions_go_without(activity):
    model, predictor, w = activity
    explainer = LiveExplainer(1e-9)
    assert "explanation" in _latest_prediction(predictor, model.spec, w, explainer)  # nothing spent yet
    for i in range(1, 4):
        prediction = _latest_prediction(predictor, model.spec, w, explainer)
        assert "explanation" not in prediction and "activity" in prediction
        assert (explainer.explained, explainer.skipped) == (1, i)


def test_a_zero_budget_after_the_start_explains_nothing(activity):
    model, _, w = activity
    explainer = LiveExplainer(0.0)
    explainer.spent_s = 1e-12  # any time spent at all is over a budget of none
    assert explainer.explain(model, w.x[-1:]) is None
    assert (explainer.explained, explainer.skipped) == (0, 1)


@pytest.mark.parametrize("make_spec", [activity_spec, heart_rate_spec])
def test_the_explanation_is_the_strongest_stretch_of_16_step_integrated_gradients(make_spec):
    spec = make_spec()
    model = Model(spec, seed=5)
    w = windows(spec, n=2, seed=7)
    prediction = _latest_prediction(NumpyPredictor(model), spec, w, LiveExplainer(1.0))
    why = prediction["explanation"]
    assert LIVE_STEPS == 16
    newest = w.x[-1:]
    reference = integrated_gradients(model, newest, steps=16, refine=False)
    span = default_span(spec.window)
    channel, start, stop, value = reference.strongest(0, span)
    rate = spec.sampling_rate_hz
    assert why["channel"] == spec.channels[channel]
    assert why["from_s"] == pytest.approx(round(start / rate, 3))
    assert why["to_s"] == pytest.approx(round(stop / rate, 3))
    assert why["to_s"] - why["from_s"] == pytest.approx(span / rate, abs=1e-3)
    assert why["attribution"] == pytest.approx(round(value, 4), abs=1e-4)
    if spec.is_classifier:
        assert prediction["activity"] == spec.classes[int(reference.targets[0])]  # the predicted class explained
    else:
        assert "bpm" in prediction


def test_a_direct_explain_returns_the_same_as_on_a_prediction(activity):
    model, predictor, w = activity
    direct = LiveExplainer(1.0).explain(model, w.x[-1:])
    on_prediction = _latest_prediction(predictor, model.spec, w, LiveExplainer(1.0))["explanation"]
    assert direct == on_prediction


# --- configuration ---------------------------------------------------------------------------------------


def config(tmp_path: Path, **kw: Any) -> EdgeConfig:
    return EdgeConfig("mqtt://127.0.0.1:1", "f1", "wearer-01", tmp_path / "state", **kw)


@pytest.mark.parametrize("fraction", [1.5, -0.1, float("nan"), float("inf")])
def test_an_explain_fraction_outside_0_1_is_a_config_error(tmp_path, fraction):
    with pytest.raises(ConfigError, match="explain_predictions"):
        config(tmp_path, explain_predictions=fraction)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 1.0])
def test_an_explain_fraction_in_0_1_is_kept(tmp_path, fraction):
    assert config(tmp_path, explain_predictions=fraction).explain_predictions == fraction


def test_an_edge_explains_only_when_asked_with_one_budget_for_every_view(tmp_path):
    from edge_client.ingest import Ingest
    from edge_client.shared import Wakes

    spec = activity_spec()
    source = SimulatedWearer("wearer-01", 0, minutes=1.0)
    assert config(tmp_path).explain_predictions == 0.0
    assert Ingest(config(tmp_path), source, Wakes(), lambda view: False).explainer is None
    explainer = Ingest(config(tmp_path, explain_predictions=0.05), source, Wakes(), lambda view: False).explainer
    assert isinstance(explainer, LiveExplainer) and explainer.cpu_fraction == 0.05
    view = StreamView(spec, source, config(tmp_path, explain_predictions=0.05))
    batch = view.read(source.chunks(600), NumpyPredictor(Model(spec, seed=0)))
    assert batch is not None and "explanation" not in batch.prediction  # reading explains nothing
    assert explainer.explained == 0


def parse_edge(*argv: str, state: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wearfl")
    add_edge_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["edge", "--broker", "mqtt://127.0.0.1:1", "--federation", "f1", "--state", str(state),
                              "--source", "sim:0/wearer-01", "--client-id", "wearer-01", *argv])


def test_the_edge_command_passes_explain_predictions_on(tmp_path):
    assert config_from_args(parse_edge(state=tmp_path / "s")).explain_predictions == 0.0
    assert config_from_args(parse_edge("--explain-predictions", "0.05",
                                       state=tmp_path / "s")).explain_predictions == 0.05
    with pytest.raises(ConfigError, match="explain_predictions"):
        config_from_args(parse_edge("--explain-predictions", "1.5", state=tmp_path / "s"))


def test_wearfl_edge_help_lists_explain_predictions(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["edge", "--help"])
    assert exited.value.code == 0
    assert "--explain-predictions" in capsys.readouterr().out


def test_the_prediction_a_status_message_takes_is_explained_once_when_it_is_read(tmp_path):
    from edge_client.ingest import Ingest
    from edge_client.shared import Wakes

    spec = activity_spec()
    source = SimulatedWearer("wearer-01", 0, minutes=1.0)
    ingest = Ingest(config(tmp_path, explain_predictions=1.0), source, Wakes(), lambda view: False)
    assert ingest.latest_prediction is None
    model = Model(spec, seed=0)
    view = StreamView(spec, source, config(tmp_path))
    batch = view.read(source.chunks(600), NumpyPredictor(model))
    assert batch is not None and "explanation" not in batch.prediction and batch.window.shape == (1, 6, 128)
    ingest._latest = (batch.prediction, batch.window, NumpyPredictor(model))
    first = ingest.latest_prediction
    assert first is not None and first["explanation"]["channel"] in spec.channels
    assert ingest.latest_prediction is first and ingest.explainer.explained == 1  # read again: not explained again
