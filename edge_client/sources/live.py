"""What the live sources (``lsl:``, ``mqtt:``, ``follow:``) share: a one-client dataset, reading, a quiet log.

A live source is a device, not a data set: it has one stream, it never ends, and a gateway
cannot replay it after a restart. :class:`LiveDataset` lets ``open_dataset(spec, live=True)``
hand it out through the same :class:`~edge_client.sources.base.Dataset` door as the file
forms, under the client id the edge runs as. :class:`PolledSource` is the reading loop of
a source that polls its device from the pipeline's thread (LSL, a followed file): one
reader at a time, and ``close()`` from any thread ends it. :class:`SkipLog` reports input a live source
skips (a malformed message, an unreadable row) without flooding the log when a device
keeps sending it. :func:`collect` reads a live source for a while, to check a device
from a shell (docs/devices.md) or in a test.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from edge_client.sources.base import Chunk
from models.errors import ConfigError

__all__ = ["LiveDataset", "PolledSource", "SkipLog", "collect"]


class LiveDataset:
    """The one stream of a live source as a dataset whose single client the edge may rename.

    ``clients`` holds the client the spec names (``lsl:NAME`` -> NAME); :meth:`source` returns
    the stream under whatever client id the edge runs as. Nothing is held out: a live stream
    has no end to hold out from (the edge holds out windows with ``--eval-fraction``).
    """

    holdout_fraction = 0.0

    def __init__(self, spec: str, source: Any) -> None:
        self.name = spec
        self._source = source
        self.clients = (source.client_id,)
        self.train_clients = self.clients
        self.test_clients: tuple[str, ...] = ()
        self.channels: tuple[str, ...] = source.channels
        self.sampling_rate_hz = float(source.sampling_rate_hz)
        self.classes: tuple[str, ...] = source.classes
        self.has_heart_rate = bool(getattr(source, "has_heart_rate", True))

    def source(self, client_id: str) -> Any:
        """The stream, its chunks labelled ``client_id`` (a live stream has one client, named as the edge likes)."""
        self._source.client_id = client_id
        return self._source

    def close(self) -> None:
        """Close the stream (its connection, thread or file)."""
        self._source.close()

    def __repr__(self) -> str:
        return f"LiveDataset({self.name!r}, channels={list(self.channels)}, {self.sampling_rate_hz:g} Hz)"


class PolledSource:
    """The reading loop of a live source polled from the pipeline's thread; subclasses give ``_read`` and ``_release``.

    ``_read(max_samples)`` returns a chunk of what arrived or None after waiting at most
    about :attr:`poll_s`, so that :meth:`close` (from any thread) ends :meth:`chunks`
    within that. The device (inlet, file) is released by whichever of the two comes last,
    never while a read is in progress: liblsl and file objects must not be closed under a
    reader.
    """

    client_id: str
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    poll_s: float = 0.2

    def __init__(self) -> None:
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._reading = False

    def _read(self, max_samples: int) -> Chunk | None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield samples as they arrive (blocking), at most ``max_samples`` a chunk, until :meth:`close`.

        One reader at a time: a second concurrent call, or one after :meth:`close`, yields nothing.
        """
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}.")
        with self._lock:
            if self._closed.is_set() or self._reading:
                return
            self._reading = True
        try:
            while not self._closed.is_set():
                chunk = self._read(max_samples)
                if chunk is None:
                    continue
                for lo in range(0, len(chunk), max_samples):
                    hi = lo + max_samples
                    yield Chunk(self.client_id, chunk.t[lo:hi], chunk.data[lo:hi], self.channels,
                                chunk.activity[lo:hi], chunk.hr_bpm[lo:hi], self.classes)
        finally:
            with self._lock:
                self._reading = False
                if self._closed.is_set():
                    self._release()

    def close(self) -> None:
        """End the stream: ``chunks`` returns within :attr:`poll_s` and the device is released. Idempotent."""
        self._closed.set()
        with self._lock:
            if not self._reading:
                self._release()


class SkipLog:
    """Warn about skipped input: at once, then at most once per ``every_s`` with the count meanwhile.

    A bridge that sends one malformed message usually sends thousands; the first one and a
    periodic count say all there is to say. ``skipped`` counts every call.
    """

    def __init__(self, log: logging.Logger, what: str, every_s: float = 30.0) -> None:
        self._log, self._what, self._every_s = log, what, every_s
        self._last = -float("inf")
        self._quiet = 0
        self.skipped = 0

    def __call__(self, reason: str) -> None:
        self.skipped += 1
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._quiet += 1
            return
        more = f" ({self._quiet} more skipped since the last warning)" if self._quiet else ""
        self._log.warning("%s: skipped %s%s", self._what, reason, more)
        self._last, self._quiet = now, 0


def collect(source: Any, samples: int, timeout_s: float, max_samples: int = 4096) -> list[Chunk]:
    """Read ``source`` on a thread until ``samples`` samples arrived or ``timeout_s`` passed; then close it.

    Returns the chunks read (fewer samples than asked when the device sent fewer). An error
    of the source is raised here. The source is closed either way: a live source reads once.
    """
    chunks: list[Chunk] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        stream = source.chunks(max_samples)
        count = 0
        try:
            for chunk in stream:
                chunks.append(chunk)
                count += len(chunk)
                if count >= samples:
                    break
        except BaseException as exc:  # handed to the caller
            errors.append(exc)
        finally:
            stream.close()
            done.set()

    reader = threading.Thread(target=read, name=f"collect-{getattr(source, 'client_id', '')}", daemon=True)
    reader.start()
    done.wait(timeout_s)
    source.close()
    reader.join(max(timeout_s, 5.0))
    if reader.is_alive():
        raise RuntimeError(f"{source!r} did not end its chunks() after close(); a live source must stop reading.")
    if errors:
        raise errors[0]
    return chunks
