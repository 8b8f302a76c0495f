"""Training loop, optimizers and clipping: determinism, learning, FedProx, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_activity, synthetic_heart_rate

from models import ConfigError, InputError, Model, TrainConfig, activity_spec, fit, heart_rate_spec
from models.engine import SGD, Adam, AdamW, Parameter, clip_grad_norm


def test_training_is_deterministic_for_a_seed():
    x, y = synthetic_activity(96, seed=3)
    states = []
    for _ in range(2):
        model = Model(activity_spec(), seed=7)
        fit(model, x, y, TrainConfig(epochs=2, seed=11))
        states.append(model.network.state_dict())
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k])


def test_weights_and_outputs_stay_float32():
    model = Model(heart_rate_spec(), seed=0)
    x, y = synthetic_heart_rate(64, seed=0)
    fit(model, x, y, TrainConfig(epochs=1))
    assert all(v.dtype == np.float32 for v in model.network.state_dict().values())
    assert model.predict(x).dtype == np.float32


def test_activity_model_learns_separable_classes():
    x, y = synthetic_activity(600, seed=1)
    xt, yt = synthetic_activity(200, seed=2)
    model = Model(activity_spec(), seed=0)
    before = (model.predict(xt).argmax(1) == yt).mean()
    result = fit(model, x, y, TrainConfig(epochs=6, lr=3e-3))
    after = (model.predict(xt).argmax(1) == yt).mean()
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert after > 0.9 > before


def test_heart_rate_model_reduces_its_error():
    x, y = synthetic_heart_rate(512, seed=1)
    xt, yt = synthetic_heart_rate(128, seed=2)
    model = Model(heart_rate_spec(), seed=0)
    mae_before = np.abs(model.predict(xt) - yt).mean()
    fit(model, x, y, TrainConfig(epochs=8, lr=3e-3))
    mae_after = np.abs(model.predict(xt) - yt).mean()
    assert mae_after < 0.6 * mae_before


def test_fedprox_keeps_weights_closer_to_the_global_model():
    x, y = synthetic_activity(128, seed=4)
    base = Model(activity_spec(), seed=0).network.state_dict()
    distances = []
    for mu in (0.0, 10.0):
        model = Model(activity_spec(), seed=0)
        fit(model, x, y, TrainConfig(epochs=3, lr=3e-3, prox_mu=mu), global_weights=base)
        state = model.network.state_dict()
        trainable = [k for k, p in model.network.parameters().items() if p.trainable]
        distances.append(np.sqrt(sum(float(np.sum((state[k] - base[k]) ** 2)) for k in trainable)))
    assert distances[1] < 0.7 * distances[0]


def test_clip_grad_norm_bounds_the_joint_norm():
    params = [Parameter(np.zeros(3)), Parameter(np.zeros((2, 2)))]
    params[0].grad[:] = [3.0, 0.0, 0.0]
    params[1].grad[:] = 4.0
    norm = clip_grad_norm(params, 1.0)
    assert norm == pytest.approx(np.sqrt(9 + 64))
    assert np.sqrt(sum(float(np.sum(p.grad**2)) for p in params)) == pytest.approx(1.0, rel=1e-5)


def test_sgd_momentum_follows_the_update_rule():
    p = Parameter(np.array([1.0]))
    opt = SGD([p], lr=0.1, momentum=0.9)
    for _ in range(2):
        p.grad[:] = 1.0
        opt.step()
    # v1 = 1, w1 = 0.9; v2 = 1.9, w2 = 0.71
    assert p.value[0] == pytest.approx(0.71)


def test_adam_first_step_moves_by_the_learning_rate():
    p = Parameter(np.array([1.0, -1.0]))
    p.grad[:] = [0.5, -2.0]
    Adam([p], lr=0.01).step()
    np.testing.assert_allclose(p.value, [0.99, -0.99], rtol=1e-5)


def test_adamw_decays_weights_without_gradient():
    p = Parameter(np.array([2.0]))
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    assert p.value[0] == pytest.approx(2.0 * (1 - 0.05))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: SGD(p, lr=0.0),
        lambda p: SGD(p, lr=0.1, momentum=1.0),
        lambda p: Adam(p, betas=(0.9, 1.0)),
        lambda p: Adam(p, eps=0.0),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make):
    with pytest.raises(ConfigError):
        make([Parameter(np.zeros(1))])


def test_bad_training_input_is_rejected_clearly():
    model = Model(activity_spec(), seed=0)
    x, y = synthetic_activity(8, seed=0)
    with pytest.raises(InputError, match="8 training windows but 7 targets"):
        fit(model, x, y[:7])
    x[2, 1, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit(model, x, y)
    with pytest.raises(ConfigError):
        fit(model, x[:2], y[:2], TrainConfig(epochs=0))


def test_train_only_updates_the_named_layers_and_keeps_norm_statistics():
    model = Model(activity_spec(), seed=0)
    before = model.network.state_dict()
    x, y = synthetic_activity(64, seed=5)
    fit(model, x, y, TrainConfig(epochs=1, train_only=("fc",)))
    after = model.network.state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    with pytest.raises(ConfigError, match="unknown layers"):
        fit(model, x, y, TrainConfig(train_only=("nope",)))


def test_local_steps_fix_the_work_whatever_the_number_of_windows():
    """``local_steps`` S runs exactly S optimizer steps: fewer than one pass, or several passes of few windows."""
    spec = activity_spec()
    for n, steps in ((200, 3), (40, 5)):  # 7 steps a pass / 2 steps a pass
        x, y = synthetic_activity(n, seed=1, spec=spec)
        result = fit(Model(spec, seed=0), x, y, TrainConfig(batch_size=32, epochs=9, local_steps=steps))
        assert result.steps == steps and result.examples <= steps * 32
    with pytest.raises(ConfigError, match="local_steps"):
        TrainConfig(local_steps=-1).validate()
