"""Ledger entries as both sides see them: their hash, and the check an edge makes on adopting a model.

The hub keeps the ledger (``hub.ledger``); each model message carries the entry of its
version. An edge checks the entry's own hash, that it names this model (version and the
package's sha256), and, when it held the version just before, that the entry links to
the entry it adopted then. So a hub cannot quietly rewrite history an edge has seen.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["GENESIS", "check_entry", "entry_hash"]

GENESIS = "0" * 64
PACKAGE_FILE = "model.safetensors"


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, ``hash`` left out."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_entry(entry: Any, version: int, package_sha256: str, previous: dict[str, Any] | None) -> str | None:
    """Why ``entry`` does not vouch for model ``version`` with this package, or None when it does.

    ``previous`` is ``{"version", "hash"}`` of the entry adopted before (None: none yet).
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
        return "the ledger entry is missing or malformed"
    if entry["hash"] != entry_hash(entry):
        return "the ledger entry does not match its hash"
    if entry.get("version") != version:
        return f"the ledger entry is for v{entry.get('version')!r}, the model is v{version}"
    files = entry.get("files")
    if not isinstance(files, dict) or files.get(PACKAGE_FILE) != package_sha256:
        return "the ledger entry names another model package"
    if previous is not None and previous.get("version") == version - 1 and entry.get("prev") != previous.get("hash"):
        return f"the ledger entry of v{version} does not link to the v{version - 1} entry this edge adopted"
    return None
