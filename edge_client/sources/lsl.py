"""``lsl:NAME``: a Lab Streaming Layer stream as a live source.

Many wearables and their vendor apps (and any bridge of a few lines) publish their
samples as an LSL stream on the local network. :class:`LslSource` finds the stream by
name and hands its samples to the gateway as chunks:

* **Channels** are named by the stream's description, ``desc/channels/channel/label``,
  with the recording format's column names: ``acc_x acc_y acc_z`` (g), ``gyro_x gyro_y
  gyro_z`` (rad/s), ``ppg``, and ``hr_bpm`` (a reference heart rate, the label of the
  samples). Labels are compared after trimming spaces and lower-casing. Channels with
  other labels (a battery level, a temperature) are ignored, with one warning naming
  them. NaN (or an infinity) in a sample is a missing value.
* **Rate**: the stream's nominal rate is the sampling rate; a stream of irregular rate
  (nominal rate 0) is refused.
* **Time**: the samples' LSL timestamps, in seconds, as the outlet stamped them (no
  clock synchronisation or de-jittering; a stream from another machine keeps that
  machine's clock, which only needs to be steady, not shared).
* **Resolution**: the stream is looked up by name for ``timeout_s`` when the source is
  opened; none found is an :class:`~models.errors.InputError` naming the streams seen.
  The inlet is opened at once, so no sample between opening and the first read is lost.
  When the outlet goes away and comes back (the device reconnects), the stream is
  resolved again by name and reading goes on.

pylsl is imported only here, when an ``lsl:`` spec is used; its wheels bundle liblsl.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk
from edge_client.sources.live import PolledSource
from models.errors import ConfigError, InputError

__all__ = ["LABELS", "RESOLVE_TIMEOUT_S", "LslSource", "import_pylsl"]

log = logging.getLogger(__name__)

LABELS = (*CHANNELS, "hr_bpm")
"""The channel labels an LSL stream may use: wearfl's sensor channels and the reference heart rate."""
RESOLVE_TIMEOUT_S = 10.0
"""How long opening an ``lsl:`` source looks for its stream."""
POLL_S = 0.2
"""Longest wait of one read, so that :meth:`LslSource.close` ends ``chunks`` within it."""
_DOCS = "see docs/devices.md"


def import_pylsl() -> Any:
    """The pylsl module; ConfigError saying how to install it when it (or its liblsl) is missing."""
    try:
        import pylsl
    except (ImportError, RuntimeError, OSError) as exc:  # pylsl raises RuntimeError when liblsl cannot be loaded
        raise ConfigError(
            f"lsl: sources need pylsl with its liblsl ({exc}); install it with `pip install pylsl` (its wheels "
            f"bundle liblsl) or point PYLSL_LIB at a liblsl build."
        ) from None
    return pylsl


class _NotThere(InputError):
    """The stream is not (or no longer) on the network, or did not answer."""


def _labels(info: Any) -> list[str]:
    """The channel labels of a full stream info, in channel order ('' where a channel has none)."""
    labels = []
    channel = info.desc().child("channels").child("channel")
    while not channel.empty():
        labels.append(channel.child_value("label").strip().lower())
        channel = channel.next_sibling("channel")
    return labels


class LslSource(PolledSource):
    """A live LSL stream found by ``name`` (module docstring); ``close()`` ends ``chunks()`` within :data:`POLL_S`."""

    classes: tuple[str, ...] = ()
    poll_s = POLL_S

    def __init__(self, name: str, client_id: str | None = None, *, timeout_s: float | None = None) -> None:
        if not name.strip():
            raise ConfigError(f"lsl: names no stream; use lsl:NAME with the name of the LSL stream ({_DOCS}).")
        super().__init__()
        self._pylsl = import_pylsl()
        self.name = name
        self.client_id = client_id or name
        self.timeout_s = RESOLVE_TIMEOUT_S if timeout_s is None else float(timeout_s)
        self._inlet: Any = None
        inlet, labels, rate = self._connect(self.timeout_s)
        try:
            self.channels = self._layout(labels)
        except InputError:
            inlet.close_stream()
            raise
        self.labels = tuple(labels)
        self.sampling_rate_hz = rate
        self.has_heart_rate = "hr_bpm" in labels
        self._columns = np.array([labels.index(c) for c in self.channels], np.intp)
        self._hr_column = labels.index("hr_bpm") if "hr_bpm" in labels else None
        self._inlet = inlet

    def _layout(self, labels: list[str]) -> tuple[str, ...]:
        """The wearfl channels of a stream's labels, in wearfl order; InputError when they cannot work."""
        known = [label for label in labels if label in LABELS]
        if len(set(known)) != len(known):
            twice = sorted({label for label in known if known.count(label) > 1})
            raise InputError(f"LSL stream {self.name!r} labels more than one channel {twice}; label each channel once.")
        sensors = tuple(c for c in CHANNELS if c in known)
        if not sensors:
            raise InputError(
                f"LSL stream {self.name!r} has no sensor channel: its channel labels are {labels}, and wearfl reads "
                f"the channels labelled {list(CHANNELS)} (desc/channels/channel/label; {_DOCS})."
            )
        ignored = [label or f"#{i}" for i, label in enumerate(labels) if label not in LABELS]
        if ignored:
            log.warning("LSL stream %r: ignoring channels %s (not wearfl columns %s)", self.name, ignored, list(LABELS))
        return sensors

    def _connect(self, timeout_s: float, *, explain: bool = True) -> tuple[Any, list[str], float]:
        """Resolve the stream by name, open an inlet and its data connection.

        :class:`_NotThere` when no stream answers (with ``explain``, naming the streams that
        are there), InputError when the stream cannot be read.
        """
        pylsl = self._pylsl
        found = pylsl.resolve_byprop("name", self.name, minimum=1, timeout=timeout_s)
        if not found:
            if not explain:
                raise _NotThere(self.name)
            seen = sorted({s.name() for s in pylsl.resolve_streams(wait_time=min(1.0, timeout_s))})
            raise _NotThere(
                f"no Lab Streaming Layer stream named {self.name!r} was found within {timeout_s:g} s (streams seen "
                f"on this network: {seen or 'none'}); start the device's LSL app or bridge and check the name, or "
                f"the multicast settings of lsl_api.cfg when the stream comes from another host ({_DOCS})."
            )
        if len(found) > 1:
            log.warning("%d LSL streams are named %r; reading the one of %s (source id %r)", len(found), self.name,
                        found[0].hostname(), found[0].source_id())
        inlet = pylsl.StreamInlet(found[0], max_buflen=360, recover=True, processing_flags=0)
        try:
            info = inlet.info(timeout=max(timeout_s, 1.0))
            if info.channel_format() in (pylsl.cf_string, pylsl.cf_undefined):
                raise InputError(
                    f"LSL stream {self.name!r} carries strings; wearfl reads numeric sample streams ({_DOCS})."
                )
            rate = float(info.nominal_srate())
            if not (math.isfinite(rate) and rate > 0):
                raise InputError(
                    f"LSL stream {self.name!r} has an irregular rate (nominal rate {rate:g}); wearfl needs the "
                    f"sampling rate: create the outlet with the device's nominal rate ({_DOCS})."
                )
            labels = _labels(info)
            if len(labels) != info.channel_count():
                raise InputError(
                    f"LSL stream {self.name!r} labels {len(labels)} of its {info.channel_count()} channels; give "
                    f"every channel a label (desc/channels/channel/label) with a wearfl column name such as "
                    f"acc_x or ppg ({_DOCS})."
                )
            inlet.open_stream(timeout=max(timeout_s, 1.0))
        except InputError:
            inlet.close_stream()
            raise
        except Exception as exc:  # pylsl's TimeoutError, LostError
            inlet.close_stream()
            raise _NotThere(
                f"LSL stream {self.name!r} was found but did not answer ({type(exc).__name__}: {exc}); check the "
                f"device's app and try again ({_DOCS})."
            ) from None
        return inlet, labels, rate

    def _reconnect(self) -> None:
        """After the outlet was lost: resolve the stream again until it is back or the source closes."""
        log.warning("LSL stream %r was lost; waiting for it to come back", self.name)
        self._release()
        while not self._closed.is_set():
            try:
                inlet, labels, rate = self._connect(POLL_S, explain=False)
            except _NotThere:
                continue
            if tuple(labels) != self.labels or rate != self.sampling_rate_hz:
                inlet.close_stream()
                raise InputError(
                    f"LSL stream {self.name!r} came back with channels {labels} at {rate:g} Hz, but it had "
                    f"{list(self.labels)} at {self.sampling_rate_hz:g} Hz; restart the edge for the new layout."
                )
            self._inlet = inlet
            log.info("LSL stream %r is back", self.name)
            return

    def _chunk(self, data: np.ndarray, stamps: np.ndarray) -> Chunk:
        n = len(stamps)
        values = data[:, self._columns].astype(np.float32)
        values[~np.isfinite(values)] = np.nan
        hr = np.full(n, np.nan, np.float32)
        if self._hr_column is not None:
            hr[:] = data[:, self._hr_column]
            hr[~np.isfinite(hr)] = np.nan
        activity = np.full(n, UNKNOWN, np.int16)
        return Chunk(self.client_id, np.asarray(stamps, np.float64), values, self.channels, activity, hr, ())

    def _read(self, max_samples: int) -> Chunk | None:
        """What arrived, waiting up to :data:`POLL_S` for the first sample; after a lost outlet, resolve again."""
        from pylsl.util import LostError

        try:
            data, stamps = self._inlet.pull_chunk(timeout=POLL_S, max_samples=max_samples, min_samples=1,
                                                  as_numpy=True)
        except LostError:
            self._reconnect()
            return None
        return self._chunk(data, stamps) if len(stamps) else None

    def _release(self) -> None:
        inlet, self._inlet = self._inlet, None
        if inlet is not None:
            inlet.close_stream()  # the inlet itself goes with its last reference

    def __repr__(self) -> str:
        return f"LslSource({self.name!r}, channels={list(self.channels)}, {self.sampling_rate_hz:g} Hz)"
