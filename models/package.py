"""Model packages: one safetensors file with spec, weights, task and version.

The header's metadata holds the spec as JSON; tensors hold every parameter and
buffer by name. Reading never executes anything from the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from models.errors import ModelFormatError
from models.files import write_atomic
from models.model import Model
from models.spec import ModelSpec

__all__ = ["FORMAT", "MAX_PACKAGE_BYTES", "load_package", "package_bytes", "parse_package", "save_package"]

FORMAT = "wearfl-model/1"
MAX_PACKAGE_BYTES = 64 * 1024 * 1024


def package_bytes(model: Model) -> bytes:
    """The package as bytes, ready to write or publish; the same model gives the same bytes."""
    # One metadata key: safetensors keeps metadata in a hash map, so several keys
    # would come out in a different order each time and break byte-exact signatures.
    meta = json.dumps(
        {"format": FORMAT, "task": model.spec.task, "version": int(model.version), "spec": model.spec.to_json()},
        sort_keys=True,
    )
    return st_save(model.network.state_dict(), metadata={"wearfl": meta})


def _metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise ModelFormatError("the package is too short to be a safetensors file.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ModelFormatError("the package's header is longer than the file; it is truncated or not a package.")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["wearfl"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError("the file is not a wearfl model package (no valid wearfl metadata).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError(f"the file is not a wearfl model package (expected format {FORMAT}).")
    return meta


def parse_package(data: bytes, where: str = "package") -> Model:
    """A :class:`Model` from package bytes; any defect raises :class:`ModelFormatError`."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise ModelFormatError(f"{where} is {len(data)} bytes, over the {MAX_PACKAGE_BYTES}-byte limit.")
    try:
        meta = _metadata(data)
        spec = ModelSpec.from_json(meta["spec"])
        version = int(meta["version"])
        tensors = st_load(data)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc}") from exc
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise ModelFormatError(f"{where} is corrupt or not a wearfl model package ({exc}).") from exc
    bad = [k for k, v in tensors.items() if v.dtype != np.float32 or not np.all(np.isfinite(v))]
    if bad:
        raise ModelFormatError(f"{where} has non-float32 or non-finite weights: {', '.join(sorted(bad))}.")
    model = Model(spec, version=version)
    try:
        model.network.load_state_dict(tensors)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc}") from exc
    return model


def load_package(path: str | os.PathLike[str]) -> Model:
    """Read a model package from disk."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PACKAGE_BYTES:
            raise ModelFormatError(f"{path} is {size} bytes, over the {MAX_PACKAGE_BYTES}-byte package limit.")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelFormatError(f"model package {path} does not exist; create one with `wearfl init`.") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise ModelFormatError(f"cannot read model package {path}: {exc.strerror}.") from exc
    return parse_package(data, where=str(path))


def save_package(model: Model, path: str | os.PathLike[str]) -> None:
    """Write a model package atomically."""
    write_atomic(path, package_bytes(model))
