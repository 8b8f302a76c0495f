"""Model packages: bit-exact round trips and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from models import Model, ModelFormatError, activity_spec, default_spec, load_package, package_bytes, save_package
from models.package import parse_package


def test_package_round_trips_bit_exactly(tmp_path, trained_activity):
    model, x, _ = trained_activity
    model.version = 7
    path = tmp_path / "m.safetensors"
    save_package(model, path)
    loaded = load_package(path)
    assert loaded.version == 7
    assert loaded.spec == model.spec
    for k, v in model.network.state_dict().items():
        assert loaded.network.state_dict()[k].tobytes() == v.tobytes()
    np.testing.assert_array_equal(loaded.predict(x[:16]), model.predict(x[:16]))
    assert package_bytes(loaded) == path.read_bytes()


def test_package_is_plain_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_package(Model(activity_spec(), seed=0), path)
    tensors = load_file(path)
    assert "conv1.weight" in tensors and tensors["conv1.weight"].dtype == np.float32


def test_custom_input_spec_survives_the_round_trip(tmp_path):
    spec = default_spec("activity", channels=["acc_x", "acc_y", "acc_z"], window=100, classes=["rest", "walk", "run"])
    path = tmp_path / "m.safetensors"
    save_package(Model(spec, seed=1), path)
    loaded = load_package(path)
    assert loaded.spec.channels == ("acc_x", "acc_y", "acc_z")
    assert loaded.spec.window == 100 and loaded.spec.classes == ("rest", "walk", "run")
    assert loaded.predict(np.zeros((2, 3, 100), np.float32)).shape == (2, 3)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"\x00" * 4,
        lambda b: b"not a package at all, just text",
        lambda b: b[:9] + b"#" + b[10:],
    ],
)
def test_corrupt_packages_raise_model_format_error(corrupt):
    data = package_bytes(Model(activity_spec(), seed=0))
    with pytest.raises(ModelFormatError):
        parse_package(corrupt(data))


def test_non_finite_weights_are_refused():
    model = Model(activity_spec(), seed=0)
    model.network.parameters()["fc.bias"].value[0] = np.inf
    with pytest.raises(ModelFormatError, match=r"fc\.bias"):
        parse_package(package_bytes(model))


def test_missing_package_says_how_to_make_one(tmp_path):
    with pytest.raises(ModelFormatError, match="wearfl init"):
        load_package(tmp_path / "none.safetensors")
