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
With ``--state postgresql://...`` the same files live in the database (:mod:`hub.blobs`),
a version's files and manifest written in one transaction.
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

from hub.blobs import Blobs, FolderBlobs
from models.errors import ConfigError, ModelFormatError, WearflError
from models.model import Model
from models.package import package_bytes, parse_package

__all__ = ["MANIFEST", "ModelRegistry", "ModelVersion"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PACKAGE = "model.safetensors"
FORMAT = "wearfl-registry/1"
_VERSION_MANIFEST = re.compile(r"^v(\d{5,})/manifest\.json$")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its files (``blobs`` under ``prefix``) and manifest."""

    version: int
    round: int
    blobs: Blobs
    prefix: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path | None:
        """The version's folder on disk (None in a database)."""
        return self.blobs.path(self.prefix)

    def file(self, name: str) -> Path | None:
        return self.blobs.path(f"{self.prefix}/{name}")

    def read(self, name: str) -> bytes:
        data = self.blobs.read(f"{self.prefix}/{name}")
        if data is None:
            raise ModelFormatError(f"{self.where(name)} is missing; the registry is damaged, restore it from a "
                                   "backup.")
        return data

    def where(self, name: str) -> str:
        return f"{self.blobs.where}/{self.prefix}/{name}"

    def load(self) -> Model:
        """The model package, checked against the manifest's sha256 first."""
        data = self.read(PACKAGE)
        expected = self.manifest["files"][PACKAGE]["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ModelFormatError(f"{self.where(PACKAGE)} does not match the sha256 in its manifest; "
                                   "the registry is damaged, restore it from a backup.")
        model = parse_package(data, where=self.where(PACKAGE))
        if model.version != self.version:
            raise ModelFormatError(f"{self.where(PACKAGE)} holds version {model.version}, its directory says "
                                   f"{self.version}.")
        return model


class ModelRegistry:
    """Model versions in ``root`` (``<state>/models``), or in ``Blobs`` (a database's)."""

    def __init__(self, root: str | os.PathLike[str] | Blobs) -> None:
        self.blobs = root if isinstance(root, Blobs) else FolderBlobs(root)
        self.root = self.blobs.where

    @staticmethod
    def dirname(version: int) -> str:
        return f"v{version:05d}"

    def versions(self) -> list[int]:
        """Every complete version (one with a manifest), ascending."""
        found = (_VERSION_MANIFEST.match(name) for name in self.blobs.names("v"))
        return sorted(int(m.group(1)) for m in found if m)

    def get(self, version: int) -> ModelVersion:
        prefix = self.dirname(version)
        raw = self.blobs.read(f"{prefix}/{MANIFEST}")
        if raw is None:
            raise ConfigError(f"model version {version} is not in the registry {self.root}.")
        try:
            manifest = json.loads(raw)
            return ModelVersion(int(manifest["version"]), int(manifest["round"]), self.blobs, prefix, manifest)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{self.root}/{prefix}/{MANIFEST} is not a valid manifest ({exc}).") from exc

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
        prefix = self.dirname(version)
        if self.blobs.read(f"{prefix}/{MANIFEST}") is not None:
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
        written = {f"{prefix}/{name}": data for name, data in files.items() if data}
        for name, data in files.items():
            if data:
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        written[f"{prefix}/{MANIFEST}"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()  # last
        self.blobs.write_many(written, doing=f"registering model v{version}")
        log.info("registered model v%d (round %d) in %s/%s", version, round_number, self.root, prefix)
        return ModelVersion(version, int(round_number), self.blobs, prefix, manifest)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions and the first; the versions deleted.

        A version's manifest goes first, so a deletion cut short leaves an unfinished version
        that is ignored. The ledger keeps every released version's hashes.
        """
        versions = self.versions()
        doomed = versions[1:-keep] if keep > 0 else versions[1:]
        for version in doomed:
            prefix = self.dirname(version)
            manifest = f"{prefix}/{MANIFEST}"
            self.blobs.delete([manifest, *(n for n in self.blobs.names(prefix + "/") if n != manifest)])
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
