"""Bluetooth LE helpers: decoding the standard Heart Rate Measurement characteristic (0x2A37).

Chest straps and most watches publish their heart rate through the Bluetooth SIG's Heart
Rate Service; its notifications are the reference labels (``hr_bpm``) a heart-rate model
fine-tunes on. The radio side (``bleak``, the optional extra ``wearfl[ble]``) is the
gateway's own code, as in docs/devices.md; the decoding lives here so it is tested:

    byte 0        flags: bit 0 the format of the value (0: uint8, 1: uint16 little-endian),
                  bits 1-2 sensor contact, bit 3 Energy Expended present, bit 4 RR-Intervals present
    bytes 1..     Heart Rate Measurement Value (bpm), then Energy Expended (uint16, kJ) if
                  flagged, then RR-Intervals (uint16 each, in 1/1024 s) if flagged, to the end
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from models.errors import InputError

__all__ = ["HEART_RATE_MEASUREMENT", "HEART_RATE_SERVICE", "HeartRateMeasurement", "parse_heart_rate_measurement"]

HEART_RATE_SERVICE = "0000180d-0000-1000-8000-00805f9b34fb"
"""The Heart Rate Service (0x180D)."""
HEART_RATE_MEASUREMENT = "00002a37-0000-1000-8000-00805f9b34fb"
"""Its notify characteristic, Heart Rate Measurement (0x2A37), as the full UUID bleak takes."""

_UINT16_VALUE = 0x01
_ENERGY_EXPENDED = 0x08
_RR_INTERVALS = 0x10


class HeartRateMeasurement(NamedTuple):
    """One notification: the heart rate and the RR intervals (seconds, oldest first) it carries."""

    bpm: int
    rr_intervals_s: np.ndarray


def parse_heart_rate_measurement(data: bytes | bytearray | memoryview) -> HeartRateMeasurement:
    """Decode one Heart Rate Measurement notification (module docstring for the layout).

    Returns ``(bpm, rr_intervals_s)``; ``rr_intervals_s`` is a float64 array, empty when the
    notification carries none. The energy-expended field is skipped and the sensor-contact
    bits are not checked (a strap without skin contact reports what it reports). A
    notification too short for its flags, or with a stray odd byte, is an InputError.
    """
    raw = bytes(data)
    if not raw:
        raise InputError("an empty Heart Rate Measurement (0x2A37) notification; it needs at least a flags byte "
                         "and the heart rate.")
    flags = raw[0]
    wide = bool(flags & _UINT16_VALUE)
    offset = 1 + (2 if wide else 1) + (2 if flags & _ENERGY_EXPENDED else 0)
    if len(raw) < offset:
        raise InputError(
            f"a Heart Rate Measurement (0x2A37) of {len(raw)} bytes ({raw.hex()}) is too short for its flags "
            f"0x{flags:02x}, which announce {offset} bytes before the RR intervals."
        )
    bpm = int.from_bytes(raw[1:3], "little") if wide else raw[1]
    rest = raw[offset:]
    if not flags & _RR_INTERVALS:
        rr = np.empty(0, np.float64)
    elif len(rest) % 2:
        raise InputError(
            f"a Heart Rate Measurement (0x2A37) ({raw.hex()}) has {len(rest)} bytes of RR intervals; they are "
            f"uint16 each, so the count must be even."
        )
    else:
        rr = np.frombuffer(rest, "<u2").astype(np.float64) / 1024.0
    return HeartRateMeasurement(bpm, rr)
