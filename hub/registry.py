"""The model registry: every global model version the hub made, on disk, with checksums.

Layout, under ``<state>/models/``::

    v00000/model.safetensors   the model package (models.package), the source of truth
    v00000/model.onnx          ONNX export (opset 13) for onnxruntime gateways
    v00000/model.tflite        float32 TFLite export for LiteRT gateways
    v00000/manifest.json       version, round, task, created_at, and each file's sha256 and size

Each file is written atomically (:func:`models.files.write_atomic`: temp file, fsync,
rename, directory fsync) and the manifest last, so a version directory without a manifest
is an unfinished write (a crash, or a disk that filled up: :class:`models.files.StorageError`)
and is ignored, and written again by the next save of that version; a manifest's checksums
always describe complete files. A version, once its manifest exists, is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import ConfigError, ModelFormatError, WearflError
from models.files import write_atomic
from models.model import Model
from models.package import package_bytes, parse_package

__all__ = ["MANIFEST", "ModelRegistry", "ModelVersion"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGE = "model.safetensors"
FORMAT = "wearfl-registry/1"
_VERSION_DIR = re.compile(r"^v(\d{5,})$")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its directory and manifest."""

    version: int
    round: int
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    def load(self) -> Model:
        """The model package, checked against the manifest's sha256 first."""
        data = self.file(PACKAGE).read_bytes()
        expected = self.manifest["files"][PACKAGE]["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelFormatError(f"{self.file(PACKAGE)} does not match the sha256 in its manifest; "
                                   "the registry is damaged, restore it from a backup.")
        model = parse_package(data, where=str(self.file(PACKAGE)))
        if model.version != self.version:
            raise ModelFormatError(f"{self.file(PACKAGE)} holds version {model.version}, its directory says "
                                   f"{self.version}.")
        return model


class ModelRegistry:
    """Model versions in ``root`` (``<state>/models``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @staticmethod
    def dirname(version: int) -> str:
        return f"v{version:05d}"

    def versions(self) -> list[int]:
        """Every complete version (one with a manifest), ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and (entry / MANIFEST).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def get(self, version: int) -> ModelVersion:
        path = self.root / self.dirname(version)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            return ModelVersion(int(manifest["version"]), int(manifest["round"]), path, manifest)
        except FileNotFoundError as exc:
            raise ConfigError(f"model version {version} is not in the registry {self.root}.") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{path / MANIFEST} is not a valid manifest ({exc}).") from exc

    def latest(self) -> ModelVersion | None:
        """The highest complete version, or None for an empty registry."""
        versions = self.versions()
        return self.get(versions[-1]) if versions else None

    def save(self, model: Model, round_number: int, *, onnx: bool = True, tflite: bool = True) -> ModelVersion:
        """Write ``model`` (its own ``version``) with its exports, then the manifest.

        ``round_number`` is the round whose aggregate made this version (0 for the
        initial model). An export that fails is logged and left out of the manifest;
        the package never is.
        """
        version = int(model.version)
        path = self.root / self.dirname(version)
        if (path / MANIFEST).is_file():
            raise ConfigError(f"model version {version} already exists in {self.root}; versions are never rewritten.")
        files: dict[str, bytes] = {PACKAGE: package_bytes(model)}
        if onnx:
            files["model.onnx"] = self._export("ONNX", model)
        if tflite:
            files["model.tflite"] = self._export("TFLite", model)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": version,
            "round": int(round_number),
            "task": model.spec.task,
            "parameters": model.num_parameters(),
            "created_at": time.time(),
            "files": {},
        }
        doing = f"registering model v{version}"
        for name, data in files.items():
            if not data:
                continue
            write_atomic(path / name, data, doing=doing)
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        write_atomic(path / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), doing=doing)
        log.info("registered model v%d (round %d) in %s", version, round_number, path)
        return ModelVersion(version, int(round_number), path, manifest)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions and the first; the versions deleted.

        A version's manifest goes first, so a deletion cut short leaves an unfinished version
        that is ignored. The ledger keeps every released version's hashes.
        """
        versions = self.versions()
        doomed = versions[1:-keep] if keep > 0 else versions[1:]
        for version in doomed:
            path = self.root / self.dirname(version)
            (path / MANIFEST).unlink(missing_ok=True)
            for child in path.iterdir():
                child.unlink(missing_ok=True)
            path.rmdir()
        if doomed:
            log.debug("registry: removed model versions %s (keeping the newest %d)", doomed, keep)
        return doomed

    @staticmethod
    def _export(kind: str, model: Model) -> bytes:
        try:
            if kind == "ONNX":
                from models.onnx_export import export_onnx

                return export_onnx(model)
            from models.tflite_export import export_tflite

            return export_tflite(model)
        except (ImportError, WearflError) as exc:
            log.warning("%s export of model v%d failed, left out of the registry: %s", kind, model.version, exc)
            return b""
