"""Model registry: files with matching checksums, latest version, immutability, unfinished writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from hub.registry import ModelRegistry
from models import Model, activity_spec
from models.errors import ConfigError, ModelFormatError


def test_a_saved_version_has_every_file_and_matching_sha256(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    model = Model(activity_spec(), version=3, seed=1)

    entry = registry.save(model, round_number=3)

    assert entry.path == tmp_path / "models" / "v00003"
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert (manifest["version"], manifest["round"], manifest["task"]) == (3, 3, "activity")
    assert manifest["created_at"] > 0
    assert set(manifest["files"]) == {"model.safetensors", "model.onnx", "model.tflite"}
    for name, info in manifest["files"].items():
        data = (entry.path / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    onnx.checker.check_model(onnx.load_from_string((entry.path / "model.onnx").read_bytes()))


def test_latest_loads_the_highest_complete_version(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert registry.latest() is None
    for version in (0, 1, 2):
        registry.save(Model(activity_spec(), version=version, seed=version), version)
    (tmp_path / "v00003").mkdir()  # an unfinished write: files but no manifest
    (tmp_path / "v00003" / "model.safetensors").write_bytes(b"partial")

    latest = registry.latest()

    assert latest is not None and latest.version == 2 and registry.versions() == [0, 1, 2]
    loaded = latest.load()
    expected = Model(activity_spec(), version=2, seed=2).network.state_dict()
    for k, v in loaded.network.state_dict().items():
        np.testing.assert_array_equal(v, expected[k])


def test_versions_are_never_rewritten(tmp_path):
    registry = ModelRegistry(tmp_path)
    registry.save(Model(activity_spec()), 0)
    with pytest.raises(ConfigError, match="never rewritten"):
        registry.save(Model(activity_spec()), 0)


def test_a_damaged_package_is_detected(tmp_path):
    registry = ModelRegistry(tmp_path)
    entry = registry.save(Model(activity_spec()), 0, onnx=False, tflite=False)
    data = bytearray((entry.path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (entry.path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="sha256"):
        registry.latest().load()


def test_prune_keeps_the_first_and_the_newest_versions(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    for version in range(6):
        registry.save(Model(activity_spec(), seed=0, version=version), version, onnx=False, tflite=False)
    assert registry.prune(3) == [1, 2]
    assert registry.versions() == [0, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["v00000", "v00003", "v00004", "v00005"]
    assert registry.prune(3) == [] and registry.latest().load().version == 5


def test_the_registry_in_postgresql_keeps_versions_as_the_folder_does(postgres_url):
    """The same registry over the database's files table: save, list, load, refuse a rewrite, prune."""
    from hub.blobs import TableBlobs

    registry = ModelRegistry(TableBlobs(postgres_url, "models"))
    for version in range(4):
        registry.save(Model(activity_spec(), version=version, seed=version), version, onnx=False, tflite=False)
    assert registry.versions() == [0, 1, 2, 3] and registry.latest().load().version == 3
    assert registry.get(2).path is None and registry.get(2).read("model.safetensors")
    with pytest.raises(ConfigError, match="never rewritten"):
        registry.save(Model(activity_spec(), version=3), 3, onnx=False, tflite=False)
    assert registry.prune(keep=2) == [1] and registry.versions() == [0, 2, 3]
