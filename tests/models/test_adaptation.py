"""Unsupervised adaptation: BatchNorm statistics re-estimated on a wearer's windows, and the gateway's check."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.adaptation import adapt_for_wearer
from models import Model, activity_spec, heart_rate_spec
from models.adaptation import adapt_statistics, mean_entropy
from models.engine import BatchNorm1D


def _windows(spec, n: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, *spec.input_shape)) + shift).astype(np.float32)


def test_the_first_batchnorm_takes_the_wearer_s_statistics_blended_with_the_global_ones():
    spec = activity_spec()
    model = Model(spec, seed=0)
    before = model.network.state_dict()
    x = _windows(spec, 32, shift=0.7)
    adapted = adapt_statistics(model, x, prior_windows=32)
    for name, value in model.network.state_dict().items():  # the global model is left as it was
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    (conv_name, conv), (bn_name, bn) = model.network.layers[0], model.network.layers[1]
    assert isinstance(bn, BatchNorm1D)
    features = conv.forward(x).astype(np.float64)
    mean, var = features.mean(axis=(0, 2)), features.var(axis=(0, 2))
    old_mean = before[f"{bn_name}.running_mean"].astype(np.float64)
    old_var = before[f"{bn_name}.running_var"].astype(np.float64)
    state = adapted.network.state_dict()
    np.testing.assert_allclose(state[f"{bn_name}.running_mean"], 0.5 * mean + 0.5 * old_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state[f"{bn_name}.running_var"],
                               0.5 * var + 0.5 * old_var + 0.25 * (mean - old_mean) ** 2, rtol=1e-4, atol=1e-5)
    for name in (f"{conv_name}.weight", "fc.weight"):  # only statistics move
        np.testing.assert_array_equal(state[name], before[name])
    everything = adapt_statistics(model, x, prior_windows=0)
    np.testing.assert_allclose(everything.network.state_dict()[f"{bn_name}.running_mean"], mean, rtol=1e-4,
                               atol=1e-5)


def test_mean_entropy_is_that_of_the_predictions():
    model = Model(activity_spec(), seed=0)
    x = _windows(model.spec, 8)
    p = model.predict(x).astype(np.float64)
    assert mean_entropy(model, x) == np.float64(-(p * np.log(p)).sum(axis=1).mean()).item()


def test_the_gateway_keeps_the_global_model_when_adapting_makes_it_less_certain(monkeypatch):
    import edge_client.adaptation as adaptation

    model = Model(activity_spec(), seed=0)
    x = _windows(model.spec, 40, seed=3)
    uncertain = Model(model.spec, seed=0)
    for _, layer in uncertain.network.layers:  # a model whose every prediction is uniform: maximal entropy
        for p in layer.params.values():
            if p.trainable:
                p.value[...] = 0.0
    monkeypatch.setattr(adaptation, "class_mix", lambda p: 1.0)  # as if the windows held every activity
    monkeypatch.setattr(adaptation, "adapt_statistics", lambda m, w, prior_windows=32: uncertain)
    chosen, report = adapt_for_wearer(model, x)
    assert chosen is model and report["kept_global"] and report["reason"] == "less certain"
    assert report["check"]["adapted"] > report["check"]["global"]
    monkeypatch.undo()
    monkeypatch.setattr(adaptation, "class_mix", lambda p: 1.0)
    chosen, report = adapt_for_wearer(model, x)
    assert report["check"] is not None and report["kept_global"] == (report["check"]["adapted"] >
                                                                      report["check"]["global"])
    hr = Model(heart_rate_spec(), seed=0)
    chosen, report = adapt_for_wearer(hr, _windows(hr.spec, 40))
    assert chosen is hr and report == {"kept_global": True, "reason": "regressor", "check": None}
    chosen, report = adapt_for_wearer(model, x[:6])
    assert chosen is model and report["reason"] == "too few windows"


def test_every_reason_to_keep_the_global_model_has_words_for_the_operator(monkeypatch):
    import edge_client.adaptation as adaptation

    model = Model(activity_spec(), seed=0)
    x = _windows(model.spec, 40, seed=3)
    reasons = {adapt_for_wearer(Model(heart_rate_spec(), seed=0), _windows(heart_rate_spec(), 8))[1]["reason"],
               adapt_for_wearer(model, x[:6])[1]["reason"], adapt_for_wearer(model, x)[1]["reason"]}
    monkeypatch.setattr(adaptation, "class_mix", lambda p: 1.0)
    monkeypatch.setattr(adaptation, "mean_entropy", lambda m, w: 10.0)  # the adapted model: above log(6)
    reasons.add(adapt_for_wearer(model, x)[1]["reason"])
    assert reasons == set(adaptation.KEPT_GLOBAL_REASONS)
    assert all(adaptation.KEPT_GLOBAL_REASONS.values())


def test_class_mix_is_the_normalized_entropy_of_the_predicted_classes():
    from edge_client.adaptation import class_mix

    def predicting(classes):
        return np.eye(6, dtype=np.float32)[classes]

    assert class_mix(predicting([0] * 12)) == 0.0
    assert class_mix(predicting(list(range(6)) * 2)) == pytest.approx(1.0)
    assert class_mix(predicting([2, 5] * 6)) == pytest.approx(np.log(2) / np.log(6))


def test_the_gateway_keeps_the_global_model_when_its_windows_hold_few_activities(monkeypatch):
    import edge_client.adaptation as adaptation

    model = Model(activity_spec(), seed=0)
    x = _windows(model.spec, 40, seed=3)
    mix = adaptation.class_mix(model.predict(x))  # an untrained model puts nearly every window in one class

    def must_not_adapt(*args, **kwargs):
        raise AssertionError("adapted on a narrow class mix")

    monkeypatch.setattr(adaptation, "adapt_statistics", must_not_adapt)
    assert mix < adaptation.MIN_CLASS_MIX
    chosen, report = adapt_for_wearer(model, x)
    assert chosen is model and report == {"kept_global": True, "reason": "narrow class mix",
                                          "check": {"class_mix": round(mix, 6)}}


def test_adapting_and_personalizing_clients_never_changes_the_global_model():
    from edge_client.evaluation import ClientData, adapt

    model = Model(activity_spec(), seed=0)
    before = model.network.state_dict()
    rng = np.random.default_rng(0)
    data = [ClientData(f"c{i}", _windows(model.spec, 24, seed=i), rng.integers(0, 6, 24)) for i in range(3)]
    report = adapt(model, data, 0.5, 0.5)
    assert len(report["clients"]) == 3 and all(c["personalize_windows"] == 12 for c in report["clients"].values())
    for name, value in model.network.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_live_inference_takes_the_adapted_model_only_over_the_global_one():
    from types import SimpleNamespace

    from edge_client.federated_eval import use_adapted
    from models.inference import NumpyPredictor

    model = Model(activity_spec(), seed=0)
    adapted = adapt_statistics(model, _windows(model.spec, 16))
    ingest = SimpleNamespace(predictor=NumpyPredictor(model))
    assert use_adapted(ingest, model, adapted) and ingest.predictor.model is adapted
    fine_tuned = NumpyPredictor(Model(model.spec, seed=1))  # this edge's own fine-tuned weights stay
    ingest = SimpleNamespace(predictor=fine_tuned)
    assert not use_adapted(ingest, model, adapted) and ingest.predictor is fine_tuned
    newer = Model(model.spec, seed=2)  # a newer global model came meanwhile
    ingest = SimpleNamespace(predictor=NumpyPredictor(newer))
    assert not use_adapted(ingest, model, adapted) and ingest.predictor.model is newer
    ingest = SimpleNamespace(predictor=NumpyPredictor(model))  # the check kept the global model
    assert not use_adapted(ingest, model, model) and ingest.predictor.model is model
