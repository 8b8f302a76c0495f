"""The one exception tree of wearfl: every public error, with where it is raised.

::

    WearflError                     anything wearfl raises on purpose
    ├── ConfigError                 a setting or command-line value that cannot work (also a ValueError)
    ├── InputError                  input data (a file, an array) that cannot be used (also a ValueError)
    │   ├── PushBufferFull          PushSource.push waited and the gateway still had no room
    │   └── PushClosed              PushSource.push on a closed source
    ├── ModelFormatError            a model package or exported model that cannot be read
    ├── BackendUnavailable          an inference runtime that is not installed
    ├── BrokerUnavailable           an MQTT broker that cannot be reached, refuses, or does not answer in time
    ├── StorageError                a state file or database that cannot be written (also an OSError)
    ├── OutboxFull                  the edge's outbox is at its bound; training pauses
    ├── LedgerError                 the model ledger is broken at an entry (also a ValueError)
    └── MessageError                a network message refused; ``reason`` is a short code (also a ValueError)
        ├── SigningError            not a well-formed signed safetensors message, or a bad signature
        ├── CodecError              an update's tensors that do not decode
        ├── SecAggError             a refused secure-aggregation step
        └── UpdateRejected          the hub's intake refused an update; ``reason`` goes in the receipt

Messages are whole sentences that say what went wrong, where, and what to do; facts go on
attributes. The CLI prints ``error: <message>`` and exits 2 for any of them. The modules
that raise an error re-export it (``models.protocol.signed.SigningError`` is this class).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

__all__ = [
    "BackendUnavailable",
    "BrokerUnavailable",
    "CodecError",
    "ConfigError",
    "InputError",
    "LedgerError",
    "MessageError",
    "ModelFormatError",
    "OutboxFull",
    "PushBufferFull",
    "PushClosed",
    "SecAggError",
    "SigningError",
    "StorageError",
    "StorageKind",
    "UpdateRejected",
    "WearflError",
]

StorageKind = Literal["full", "read-only", "io"]


class WearflError(Exception):
    """Base of every error wearfl raises on purpose."""


class ConfigError(WearflError, ValueError):
    """A setting or argument that cannot work."""


class InputError(WearflError, ValueError):
    """Input data that cannot be used (missing file, wrong shape, NaN)."""


class PushBufferFull(InputError):
    """``push`` waited ``push_timeout_s`` and the consumer still had not made room."""


class PushClosed(InputError):
    """``push`` on a source that was closed."""


class ModelFormatError(WearflError):
    """A model package or exported model that cannot be read."""


class BackendUnavailable(WearflError):
    """An inference runtime that is not installed on this machine."""


class BrokerUnavailable(WearflError):
    """An MQTT broker that cannot be reached, refuses a request, or does not answer in time.

    ``url`` is the broker's address (``mqtt://host:port``) when known.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class StorageError(WearflError, OSError):
    """A state file or database that cannot be written: no space left, read-only, or a failing disk.

    ``kind`` is ``"full"``, ``"read-only"`` or ``"io"``; ``where`` the file or directory.
    It is an :class:`OSError` as well, so code that handles failed writes keeps working.
    Raised through :func:`models.files.storage_error`.
    """

    def __init__(self, message: str, *, kind: StorageKind = "io", where: str | os.PathLike[str] = "",
                 errno_code: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.where = kind, Path(where)
        self.errno = errno_code


class OutboxFull(WearflError):
    """The outbox is at its bound; nothing was added. Training should pause until receipts free space.

    ``entries`` and ``bytes`` are what it holds, ``max_entries`` and ``max_bytes`` its bounds.
    """

    def __init__(self, message: str, *, entries: int, bytes: int, max_entries: int, max_bytes: int) -> None:
        super().__init__(message)
        self.entries, self.bytes, self.max_entries, self.max_bytes = entries, bytes, max_entries, max_bytes


class LedgerError(WearflError, ValueError):
    """The ledger is broken at ``index`` (0-based line), for ``reason``."""

    def __init__(self, index: int, reason: str, path: Path | None = None) -> None:
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}ledger entry {index} {reason}")
        self.index, self.reason = index, reason


class MessageError(WearflError, ValueError):
    """A message from the network that is refused; ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SigningError(MessageError):
    """A message that is not a well-formed signed safetensors file, or whose signature fails."""


class CodecError(MessageError):
    """An update payload that does not decode; ``reason`` is a short code for receipts."""


class SecAggError(MessageError):
    """A refused secure-aggregation step; ``client`` is the id concerned.

    ``needed`` and ``got`` carry the counts of a ``too_few_survivors`` abort.
    """

    def __init__(
        self, reason: str, detail: str, *, client: str | None = None, needed: int | None = None,
        got: int | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.client = client
        self.needed, self.got = needed, got


class UpdateRejected(MessageError):
    """The hub's intake refused an update: ``reason`` (one of the receipt reasons) goes back to the edge.

    ``sequence`` is the update's sequence number, -1 when it could not be read.
    """

    def __init__(self, reason: str, detail: str, sequence: int = -1) -> None:
        super().__init__(reason, detail)
        self.sequence = sequence
