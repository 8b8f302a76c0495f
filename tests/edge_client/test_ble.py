"""Decoding the Bluetooth Heart Rate Measurement characteristic (0x2A37) from hand-built notifications."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edge_client.sources.ble import parse_heart_rate_measurement
from models.errors import InputError


def test_uint8_heart_rate_without_rr_intervals():
    bpm, rr = parse_heart_rate_measurement(bytes([0x00, 72]))
    assert bpm == 72 and rr.shape == (0,) and rr.dtype == np.float64


def test_uint8_value_ignores_the_contact_bits():
    assert parse_heart_rate_measurement(bytes([0b0000_0110, 64])).bpm == 64  # contact supported and detected


def test_uint16_heart_rate_is_little_endian():
    bpm, rr = parse_heart_rate_measurement(bytes([0x01]) + struct.pack("<H", 0x012C))  # 300 bpm: needs the high byte
    assert bpm == 300 and len(rr) == 0


def test_rr_intervals_in_1024ths_of_a_second_oldest_first():
    data = bytes([0x10, 75]) + struct.pack("<HH", 1024, 800)
    bpm, rr = parse_heart_rate_measurement(bytearray(data))
    assert bpm == 75
    np.testing.assert_array_equal(rr, [1.0, 800 / 1024])


def test_energy_expended_is_skipped_before_the_rr_intervals():
    # uint16 value, energy expended (0x0102 kJ), two RR intervals
    data = bytes([0x01 | 0x08 | 0x10]) + struct.pack("<HHHH", 130, 0x0102, 512, 461)
    bpm, rr = parse_heart_rate_measurement(memoryview(data))
    assert bpm == 130
    np.testing.assert_array_equal(rr, [0.5, 461 / 1024])


def test_rr_flag_with_no_intervals_gives_an_empty_array():
    assert parse_heart_rate_measurement(bytes([0x10, 60])).rr_intervals_s.shape == (0,)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (bytes([0x00]), "too short"),
        (bytes([0x01, 72]), "too short"),  # uint16 announced, one byte given
        (bytes([0x08, 72, 1]), "too short"),  # energy expended announced, one of its two bytes
        (bytes([0x10, 72, 0x00, 0x04, 0x01]), "even"),  # an odd byte after the RR intervals
    ],
)
def test_malformed_notifications_are_input_errors(data, match):
    with pytest.raises(InputError, match=match):
        parse_heart_rate_measurement(data)
