import numpy as np
import pytest

from models import activity_spec, heart_rate_spec
from models.augment import random_rotations, rotate_windows, sensor_triads
from models.errors import ConfigError
from models.model import Model
from models.training import TrainConfig, fit


def test_triads_are_found_by_axis_names():
    assert sensor_triads(activity_spec().channels) == [(0, 1, 2), (3, 4, 5)]
    assert sensor_triads(heart_rate_spec().channels) == [(1, 2, 3)]
    assert sensor_triads(("acc_x", "acc_y", "ppg")) == []


def test_rotations_are_proper_and_spread_as_asked():
    r = random_rotations(2000, 10.0, np.random.default_rng(0))
    assert np.allclose(r @ r.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(r), 1.0, atol=1e-5)
    angles = np.degrees(np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    # The angle of a rotation vector ~ N(0, s^2 I3) follows a chi distribution with 3 dof: mean s*sqrt(8/pi).
    assert np.mean(angles) == pytest.approx(10.0 * np.sqrt(8 / np.pi), rel=0.05)


def test_rotation_keeps_magnitudes_and_leaves_other_channels_alone():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4, 32)).astype(np.float32)
    triads = sensor_triads(heart_rate_spec().channels)
    out = rotate_windows(x, triads, 15.0, np.random.default_rng(2))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.array_equal(out[:, 0], x[:, 0])
    assert np.allclose(np.linalg.norm(out[:, 1:], axis=1), np.linalg.norm(x[:, 1:], axis=1), atol=1e-5)
    assert not np.allclose(out[:, 1:], x[:, 1:])
    again = rotate_windows(x, triads, 15.0, np.random.default_rng(2))
    assert np.array_equal(out, again)
    assert rotate_windows(x, triads, 0.0, np.random.default_rng(2)) is x


def test_acc_and_gyro_turn_together():
    x = np.zeros((3, 6, 4), np.float32)
    x[:, 0:3] = x[:, 3:6] = np.random.default_rng(3).normal(size=(3, 3, 4))
    out = rotate_windows(x, sensor_triads(activity_spec().channels), 30.0, np.random.default_rng(4))
    assert np.allclose(out[:, 0:3], out[:, 3:6])


def test_training_with_rotation_is_deterministic_and_validated():
    spec = activity_spec()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6, 128)).astype(np.float32)
    y = rng.integers(0, 6, 64)
    weights = []
    for _ in range(2):
        model = Model(spec, seed=0)
        fit(model, x, y, TrainConfig(epochs=1, rotation_deg=10.0, seed=3))
        weights.append(model.network.state_dict())
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    plain = Model(spec, seed=0)
    fit(plain, x, y, TrainConfig(epochs=1, seed=3))
    assert not np.array_equal(plain.network.state_dict()["conv1.weight"], weights[0]["conv1.weight"])
    with pytest.raises(ConfigError):
        TrainConfig(rotation_deg=-1).validate()
