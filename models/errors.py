"""The one exception tree of wearfl.

::

    WearflError                 anything wearfl raises on purpose
    ├── ConfigError             a setting or command-line value that cannot work
    ├── InputError              input data (a file, an array) that cannot be used
    ├── ModelFormatError        a model package or exported model that cannot be read
    ├── BackendUnavailable      an inference runtime that is not installed
    └── BrokerUnavailable       an MQTT broker that cannot be reached, refuses, or does not answer in time

Messages are whole sentences that say what went wrong, where, and what to do.
The CLI prints ``error: <message>`` and exits 2 for any of them.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BrokerUnavailable",
    "ConfigError",
    "InputError",
    "ModelFormatError",
    "WearflError",
]


class WearflError(Exception):
    """Base of every error wearfl raises on purpose."""


class ConfigError(WearflError, ValueError):
    """A setting or argument that cannot work."""


class InputError(WearflError, ValueError):
    """Input data that cannot be used (missing file, wrong shape, NaN)."""


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
