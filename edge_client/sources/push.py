"""A source fed live by a device callback (BLE, serial, a socket) instead of read from files.

Files-based sources pull; a live wearable pushes: samples arrive on the radio stack's
thread whenever the device sends a notification, while the gateway's pipeline consumes
them on its own thread. :class:`PushSource` is the hand-over between the two: the
device callback calls :meth:`PushSource.push`, the pipeline iterates
:meth:`PushSource.chunks` exactly as it would any other
:class:`~edge_client.sources.base.Source`.

Back-pressure policy: the buffer between the two holds at most ``max_buffered_s``
seconds of samples. When it is full, ``push`` *blocks* for up to ``push_timeout_s``
and then raises :class:`PushBufferFull` (an :class:`~models.errors.InputError`). It
never drops samples silently, because

* a short block absorbs ordinary jitter (a garbage collection, a slow training step)
  at no cost: the radio stack buffers meanwhile;
* dropping the oldest samples would cut an unannounced hole into the stream that
  downstream sees only as a time jump, and misalign labels pushed with it;
* a consumer that stays behind for seconds is a fault (a stalled pipeline) that should
  surface where it happens, and the callback is the one place that knows whether
  losing that packet is acceptable (catch the error and count it) or not.

Example: a BLE IMU feeding the gateway (bleak; bleak runs notification callbacks on its
asyncio loop's thread, so keep ``push_timeout_s`` short to not stall the loop; more in
docs/devices.md, with the standard heart-rate characteristic)::

    import asyncio, struct, threading
    import numpy as np
    from bleak import BleakClient
    from edge_client.sources.push import PushBufferFull, PushSource

    IMU = "0000ffe1-0000-1000-8000-00805f9b34fb"  # the device's IMU notify characteristic
    source = PushSource("wrist-07", ("acc_x", "acc_y", "acc_z"), sampling_rate_hz=50.0, push_timeout_s=0.2)
    dropped = 0

    def on_imu(_char, payload: bytearray) -> None:
        # packet: uint32 device time in ms, then n samples of 3 little-endian int16 in mg
        global dropped
        (ms,) = struct.unpack_from("<I", payload)
        xyz = np.frombuffer(payload, "<i2", offset=4).reshape(-1, 3) / 1000.0
        try:
            source.push(ms / 1000.0 + np.arange(len(xyz)) / 50.0, xyz)
        except PushBufferFull:
            dropped += len(xyz)  # the pipeline is stalled; count and go on

    async def stream(address: str) -> None:
        gone = asyncio.Event()  # set when the device disconnects (or set it to stop)
        try:
            async with BleakClient(address, lambda _: gone.set()) as client:
                await client.start_notify(IMU, on_imu)
                await gone.wait()
        finally:
            source.close()  # ends chunks() in the pipeline

    threading.Thread(target=asyncio.run, args=(stream("C4:7C:8D:6A:3E:21"),), daemon=True).start()
    for chunk in source.chunks():  # the pipeline, on this thread
        ...
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from edge_client.sources.base import CHANNELS, UNKNOWN, Chunk
from models.errors import ConfigError, InputError, PushBufferFull, PushClosed

__all__ = ["PushBufferFull", "PushClosed", "PushSource"]


class _Block(NamedTuple):
    t: np.ndarray
    data: np.ndarray
    activity: np.ndarray
    hr_bpm: np.ndarray

    def split(self, k: int) -> tuple[_Block, _Block]:
        return _Block(*(a[:k] for a in self)), _Block(*(a[k:] for a in self))


class PushSource:
    """A live client stream: one or more producer threads ``push``, one consumer iterates ``chunks``.

    ``channels`` are wearfl channel names in the order of the columns of ``samples``;
    ``classes`` are the names ``activity`` may use (as names or indices).
    ``max_buffered_s`` bounds the samples waiting for the consumer; ``push_timeout_s`` is
    how long ``push`` waits for room before raising :class:`PushBufferFull`.
    """

    def __init__(
        self,
        client_id: str,
        channels: Sequence[str],
        sampling_rate_hz: float,
        classes: Sequence[str] = (),
        *,
        max_buffered_s: float = 60.0,
        push_timeout_s: float = 1.0,
    ) -> None:
        channels = tuple(channels)
        unknown = [c for c in channels if c not in CHANNELS]
        if not channels or unknown or len(set(channels)) != len(channels):
            raise ConfigError(
                f"PushSource channels must be distinct wearfl channel names from {list(CHANNELS)}, "
                f"got {list(channels)}."
            )
        if not (math.isfinite(sampling_rate_hz) and sampling_rate_hz > 0):
            raise ConfigError(f"sampling_rate_hz must be a positive number, got {sampling_rate_hz!r}.")
        if len(set(classes)) != len(tuple(classes)):
            raise ConfigError(f"PushSource classes must be distinct names, got {list(classes)}.")
        if not max_buffered_s > 0 or not push_timeout_s >= 0:
            raise ConfigError(
                f"max_buffered_s must be positive and push_timeout_s not negative, got {max_buffered_s!r} "
                f"and {push_timeout_s!r}."
            )
        self.client_id = client_id
        self.channels = channels
        self.sampling_rate_hz = float(sampling_rate_hz)
        self.classes = tuple(classes)
        self.capacity = max(1, math.ceil(max_buffered_s * sampling_rate_hz))
        """Most samples the buffer holds; ``push`` waits (then raises) beyond it."""
        self.push_timeout_s = float(push_timeout_s)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._blocks: deque[_Block] = deque()
        self._buffered = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Samples pushed and not yet handed out by ``chunks``."""
        return self._buffered

    def __enter__(self) -> PushSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _activity(self, activity: object, n: int) -> np.ndarray:
        if activity is None:
            return np.full(n, UNKNOWN, np.int16)
        values = np.asarray(activity)
        if values.dtype.kind in "US":
            names, inverse = np.unique(values.astype(str), return_inverse=True)
            bad = [str(s) for s in names if s and str(s) not in self._class_index]
            if bad:
                raise InputError(
                    f"{self.client_id}: activity {bad} is not one of this source's classes {list(self.classes)}."
                )
            lookup = np.array([self._class_index.get(str(s), UNKNOWN) for s in names], np.int64)
            values = lookup[inverse.reshape(values.shape)]
        elif values.dtype.kind not in "iu" and not (values.dtype.kind == "f" and np.all(values == np.round(values))):
            raise InputError(f"{self.client_id}: activity must be class names or indices, got {values.dtype} values.")
        values = values.astype(np.int64).reshape(-1)
        if values.size and (values.min() < UNKNOWN or values.max() >= len(self.classes)):
            raise InputError(
                f"{self.client_id}: activity indices must be in {UNKNOWN}..{len(self.classes) - 1} "
                f"(classes {list(self.classes)}, {UNKNOWN} = unknown)."
            )
        if values.size not in (1, n):
            raise InputError(f"{self.client_id}: {values.size} activity values for {n} samples; give one or n.")
        return np.broadcast_to(values, (n,)).astype(np.int16)

    def _numbers(self, values: object, name: str, dtype: type[np.floating]) -> np.ndarray:
        try:
            return np.array(values, dtype=dtype, copy=True)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{self.client_id}: {name} must be numbers ({exc}).") from None

    def _block(self, t: object, samples: object, activity: object, hr_bpm: object) -> _Block:
        """Check and copy one push into arrays the caller can no longer change."""
        c = len(self.channels)
        data = self._numbers(samples, "samples", np.float32)
        if data.ndim == 1 and data.shape[0] == c:
            data = data.reshape(1, c)
        if data.ndim != 2 or data.shape[1] != c:
            raise InputError(
                f"{self.client_id}: samples of shape {data.shape} cannot be pushed; give (n, {c}) or ({c},) "
                f"for channels {list(self.channels)}."
            )
        n = data.shape[0]
        times = self._numbers(t, "t", np.float64).reshape(-1)
        if times.shape != (n,):
            raise InputError(f"{self.client_id}: {times.size} times for {n} samples; give one time per sample.")
        if not np.isfinite(times).all():
            bad = times[~np.isfinite(times)]
            raise InputError(f"{self.client_id}: sample times must be finite seconds, got {bad}.")
        hr = np.full(n, np.nan, np.float32)
        if hr_bpm is not None:
            values = self._numbers(hr_bpm, "hr_bpm", np.float32).reshape(-1)
            if values.size not in (1, n):
                raise InputError(f"{self.client_id}: {values.size} hr_bpm values for {n} samples; give one or n.")
            hr[:] = values
        return _Block(times, data, self._activity(activity, n), hr)

    def push(
        self,
        t: float | Sequence[float] | np.ndarray,
        samples: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
        activity: int | str | Sequence[int] | Sequence[str] | np.ndarray | None = None,
        hr_bpm: float | Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Hand over samples: ``samples`` (n, C) or (C,), ``t`` (n,) or a scalar, in seconds.

        ``activity`` (a class name or index, one or per sample; None = unknown) and
        ``hr_bpm`` (one or per sample; None = unknown) label them. Thread-safe. Blocks
        while the buffer is full, up to ``push_timeout_s``, then raises
        :class:`PushBufferFull`; raises :class:`PushClosed` after :meth:`close`. NaN
        samples are passed on as missing; malformed arguments raise InputError.
        """
        block = self._block(t, samples, activity, hr_bpm)
        n = len(block.t)
        if n == 0:
            return
        if n > self.capacity:
            raise InputError(
                f"{self.client_id}: one push of {n} samples exceeds the buffer of {self.capacity}; push smaller "
                f"blocks or raise max_buffered_s."
            )
        deadline = time.monotonic() + self.push_timeout_s
        with self._cond:
            while not self._closed and self._buffered + n > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PushBufferFull(
                        f"{self.client_id}: the consumer of this source has {self._buffered} samples "
                        f"({self._buffered / self.sampling_rate_hz:.1f} s) not yet taken and did not make room for "
                        f"{self.push_timeout_s:g} s, so these {n} samples were not pushed; check that chunks() is "
                        f"being iterated, or raise max_buffered_s."
                    )
                self._cond.wait(remaining)
            if self._closed:
                raise PushClosed(f"{self.client_id}: push after close(); the stream has ended.")
            self._blocks.append(block)
            self._buffered += n
            self._cond.notify_all()

    def close(self) -> None:
        """End the stream: ``chunks`` yields what is buffered, then stops. Idempotent, thread-safe."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self, max_samples: int) -> _Block | None:
        """Up to max_samples buffered samples, waiting for some; None once closed and drained."""
        with self._cond:
            while not self._blocks and not self._closed:
                self._cond.wait()
            if not self._blocks:
                return None
            taken: list[_Block] = []
            count = 0
            while self._blocks and count < max_samples:
                block = self._blocks[0]
                k = min(len(block.t), max_samples - count)
                if k == len(block.t):
                    taken.append(self._blocks.popleft())
                else:
                    head, self._blocks[0] = block.split(k)
                    taken.append(head)
                count += k
            self._buffered -= count
            self._cond.notify_all()
        if len(taken) == 1:
            return taken[0]
        return _Block(*(np.concatenate(parts) for parts in zip(*taken, strict=True)))

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield pushed samples in push order as they arrive (blocking), until :meth:`close`.

        A chunk holds what was buffered when the consumer asked, at most ``max_samples``;
        it never waits to fill up. Meant for one consumer at a time.
        """
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, got {max_samples}.")
        while (block := self._take(max_samples)) is not None:
            yield Chunk(
                client_id=self.client_id,
                t=block.t,
                data=block.data,
                channels=self.channels,
                activity=block.activity,
                hr_bpm=block.hr_bpm,
                classes=self.classes,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"PushSource({self.client_id!r}, channels={list(self.channels)}, {state}, buffered={self._buffered})"
