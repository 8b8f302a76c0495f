"""Simulated wearers: the ``sim[:SEED]`` source of wrist PPG, accelerometer and gyroscope at 50 Hz.

Why: federated learning needs many clients whose data differ (non-IID) in known ways, with
exact ground truth (heart rate, activity), far faster than real time. Each wearer has its own
physiology (resting / maximum HR, HR kinetics, HRV, breathing, perfusion, pulse shape, motion
coupling) and habits (activity chain and dwell times, cadences, how the watch sits), all drawn
from ``SeedSequence([seed, wearer index])``: the dataset seed and the wearer index decide everything.

The model, per sample (x: exercise intensity as a fraction of the HR reserve, phases in cycles):

* schedule: Markov chain over :data:`SIM_CLASSES` with per-wearer transition rows; dwell
  ~ Gamma(2, mean_a / 2) clipped to 10 s (30 s running, cycling) .. 5 min; running and stairs
  are forced back when absent for more than 6 / 5 minutes, so every wearer's data contains both.
* kinetics: dx/dt = (x_a - x) / tau, tau = tau_rise if x_a > x else tau_fall (exact per segment).
* breathing: f_b = f_b0 + 0.35 x, phi_b = integral of f_b.
* heart rate: HR = HR_rest + (HR_max - HR_rest) x + HRV (1 - 0.7 x) + RSA (1 - 0.8 x) sin 2 pi phi_b,
  HRV = a 0.1 Hz resonance (Mayer waves) plus a slow drift.
* PPG: phi_c = integral of HR / 60 (smooth through HR changes);
  ppg = perfusion (1 - 0.35 x)(1 + m sin 2 pi phi_b) pulse(phi_c mod 1) + wander + breathing baseline
  + coupling (w_v a_vert + w_s a_fwd) + noise, where pulse is a systolic and a dicrotic Gaussian
  (the notch between them) and a_vert, a_fwd are the same motion that goes into the accelerometer,
  so cadence harmonics leak into the PPG spectrum in proportion to motion intensity.
* motion: phi_g = integral of the cadence; vertical bounce a_vert = A_v sum_k h_k sin(2 pi k phi_g + p_k);
  arm swing theta = S sin(pi phi_g + p) at stride frequency, gyro = dtheta/dt about the lateral
  axis (+ wrist pronation); a_fwd = -theta (1 + r (pi f)^2 / g) (gravity tilt + tangential).
  acc [g] = up (1 + a_vert) + fwd a_fwd + lat a_lat + fidget + noise, where up / fwd / lat are
  the posture's device-frame axes (per-wearer and per-segment rotation jitter) smoothed over
  ~0.7 s across transitions; posture changes add up x d(up)/dt to the gyro [rad/s].

The stream is generated in fixed internal blocks of absolute sample positions, carrying every
state across blocks (phases, ``lfilter`` states, HR kinetics, schedule position); ``chunks``
re-slices the blocks, so the samples never depend on ``max_samples``. The noise filters are
:func:`edge_client.filters.lfilter` (numpy; ``scipy.signal`` would cost a gateway ~65 MB resident).
"""

from __future__ import annotations

import copy
import math
import re
import time
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from edge_client.filters import lfilter
from edge_client.sources.base import CHANNELS, Chunk
from models.errors import ConfigError

__all__ = ["SIM_CLASSES", "SimulatedDataset", "SimulatedWearer", "WearerProfile"]

SIM_CLASSES = ("sitting", "standing", "lying", "walking", "running", "cycling", "stairs")
SIT, STAND, LIE, WALK, RUN, CYCLE, STAIRS = range(7)
FS = 50.0
_BLOCK = 8192  # samples generated at a time (absolute positions, so independent of chunk size)
_G = 9.81

# Per activity: vertical bounce (g), arm-swing amplitude (rad), arm radius (m), fidget (g), vibration (g).
_VERT = np.array([0.0, 0.0, 0.0, 0.25, 0.9, 0.05, 0.45])
_SWING = np.array([0.0, 0.0, 0.0, 0.25, 0.5, 0.04, 0.18])
_ARM_M = np.array([0.6, 0.6, 0.6, 0.6, 0.35, 0.3, 0.6])
_FIDGET = np.array([0.02, 0.03, 0.008, 0.01, 0.02, 0.01, 0.01])
_VIB = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.06, 0.0])
_GAIT = np.array([False, False, False, True, True, True, True])
# Device-frame "up" (what the accelerometer reads at rest) and forward reference, per activity's posture.
_UP = np.array([
    [0.1, 0.15, 0.98],  # sitting: forearm on the lap, screen up
    [-0.9, 0.2, 0.35],  # standing: arm hanging
    [0.15, 0.95, 0.2],  # lying: on the back, arm alongside, screen sideways
    [-0.9, 0.2, 0.35],  # walking
    [-0.45, 0.6, 0.65],  # running: elbow bent
    [0.35, 0.1, 0.93],  # cycling: hands on the bars
    [-0.9, 0.2, 0.35],  # stairs
])
_FWD = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
_DWELL_S = np.array([120.0, 40.0, 150.0, 70.0, 90.0, 150.0, 30.0])  # means; a segment is at least _MIN_DWELL_S
_MIN_DWELL_S = np.array([10.0, 10.0, 10.0, 10.0, 30.0, 30.0, 10.0])
_CADENCE_HZ = np.array([(1.6, 2.0)] * 4 + [(2.5, 3.0), (1.2, 1.6), (1.2, 1.8)])  # walking's for non-gait ones
_TRANSITIONS = np.array([  # rows: from, columns: to, in SIM_CLASSES order
    [0.0, 0.40, 0.15, 0.30, 0.00, 0.15, 0.00],
    [0.30, 0.0, 0.05, 0.40, 0.05, 0.05, 0.15],
    [0.50, 0.40, 0.0, 0.10, 0.00, 0.00, 0.00],
    [0.15, 0.20, 0.05, 0.0, 0.15, 0.20, 0.25],
    [0.00, 0.30, 0.00, 0.60, 0.0, 0.00, 0.10],
    [0.10, 0.50, 0.00, 0.40, 0.00, 0.0, 0.00],
    [0.00, 0.30, 0.00, 0.60, 0.10, 0.00, 0.0],
])
_DEADLINE_S = {RUN: 360.0, STAIRS: 300.0}
_MONTAGE_DWELL_S = (5.0, 12.0)

# Posture / motion parameters follow the schedule with a first-order lag (tau 0.7 s) across transitions.
_SMOOTH_DECAY = np.exp(np.arange(1, 601) / (-0.7 * FS))  # 12 s: settled to 1e-7


# Noise: unit-variance first-order low-passes and a 0.1 Hz resonance (Mayer waves) for HRV.


def _lowpass(tau_s: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.exp(-1 / (tau_s * FS))
    return np.array([math.sqrt(1 - a * a)]), np.array([1.0, -a])


_SLOW, _CADN, _FIDN = _lowpass(20.0), _lowpass(5.0), _lowpass(0.25)
_R, _W0 = 0.995, 2 * math.pi * 0.1 / FS
_LF_A = np.array([1.0, -2 * _R * math.cos(_W0), _R * _R])
_a1, _a2 = -_LF_A[1], -_LF_A[2]
_LF_B = np.array([1 / math.sqrt((1 - _a2) / ((1 + _a2) * ((1 - _a2) ** 2 - _a1**2)))])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: the rotation by ``angle`` radians about ``axis``."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


@dataclass(frozen=True)
class WearerProfile:
    """One wearer's physiology and habits (per-activity tuples are in :data:`SIM_CLASSES` order)."""

    resting_hr: float  # BPM
    max_hr: float  # BPM
    tau_rise_s: float  # HR time constant when intensity rises
    tau_fall_s: float  # ... and when it falls
    intensity: tuple[float, ...]  # steady-state fraction of HR reserve per activity
    hrv_bpm: float  # HR variability at rest (std, BPM)
    rsa_bpm: float  # respiratory sinus arrhythmia amplitude at rest
    breath_hz: float  # breathing rate at rest
    perfusion: float  # PPG pulse amplitude
    resp_am: float  # breathing amplitude modulation of the pulse
    resp_baseline: float  # breathing modulation of the PPG baseline
    pulse_width: float  # systolic Gaussian width (fraction of a beat)
    dicrotic_delay: float  # dicrotic wave after the systolic peak (fraction of a beat)
    dicrotic_width: float
    dicrotic_ratio: float
    wander: float  # PPG baseline wander (std)
    ppg_noise: float  # PPG sensor noise (std)
    motion_coupling: float  # PPG motion artifact per g
    vertical_weight: float  # share of vertical bounce in the artifact
    swing_weight: float  # share of arm swing in the artifact
    cadence_hz: tuple[float, ...]  # step / pedal rate per activity (walking's for non-gait ones)
    gait_shape: tuple[float, ...]  # h2, h3, p2, p3, swing phase, lateral phase, pronation phase
    device_rotation: tuple[tuple[float, ...], ...]  # how this wearer's watch sits (3x3)
    dwell_s: tuple[float, ...]  # mean dwell per activity
    transitions: tuple[tuple[float, ...], ...]  # activity Markov chain (rows sum to 1)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> WearerProfile:
        """A random wearer: physiology within healthy-adult ranges, habits around common patterns."""
        u = rng.uniform
        walk = u(1.6, 2.0)
        trans = _TRANSITIONS * rng.lognormal(0.0, 0.5, _TRANSITIONS.shape)
        trans /= trans.sum(axis=1, keepdims=True)
        perfusion = float(rng.lognormal(0.0, 0.35))
        rotation = _rotation(rng.normal(size=3), float(np.clip(rng.normal(0, math.radians(12)), -0.45, 0.45)))
        return cls(
            resting_hr=u(52, 75), max_hr=u(172, 200), tau_rise_s=u(20, 45), tau_fall_s=u(30, 70),
            intensity=(u(0.02, 0.08), u(0.07, 0.15), u(-0.03, -0.005), u(0.22, 0.38), u(0.75, 0.97),
                       u(0.40, 0.65), u(0.50, 0.72)),
            hrv_bpm=u(1.0, 3.0), rsa_bpm=u(1.5, 5.0), breath_hz=u(0.18, 0.3),
            perfusion=perfusion, resp_am=u(0.05, 0.2), resp_baseline=u(0.05, 0.2) * perfusion,
            pulse_width=u(0.06, 0.09), dicrotic_delay=u(0.25, 0.35), dicrotic_width=u(0.08, 0.12),
            dicrotic_ratio=u(0.3, 0.55), wander=u(0.1, 0.4) * perfusion, ppg_noise=u(0.02, 0.08) * perfusion,
            motion_coupling=float(rng.lognormal(math.log(0.5), 0.4)), vertical_weight=u(0.5, 1.0),
            swing_weight=u(0.2, 0.6),
            cadence_hz=(walk, walk, walk, walk, u(2.5, 3.0), u(1.2, 1.6), walk * u(0.75, 0.88)),
            gait_shape=(u(0.2, 0.5), u(0.05, 0.2), *rng.uniform(0, 2 * math.pi, 5).tolist()),
            device_rotation=tuple(tuple(r) for r in rotation.tolist()),
            dwell_s=tuple((_DWELL_S * rng.lognormal(0.0, 0.25, 7)).tolist()),
            transitions=tuple(tuple(r) for r in trans.tolist()),
        )


@dataclass(frozen=True)
class Device:
    """How a sensor device changes what it records of a wearer: the domain shift between two gateways' hardware.

    ``ppg_gain`` scales the pulse amplitude (and the breathing and wander it rides on), ``ppg_noise`` the optical
    sensor's noise, ``motion_coupling`` how strongly movement leaks into the PPG (longer, infrared wavelengths reach
    deeper tissue and pick up more motion than green light), ``swing_share`` how much of that leak is arm swing
    rather than vertical bounce (where the device sits), and ``rotation_deg`` turns the device on the limb (its
    accelerometer and gyroscope axes) about its forward axis.
    """

    name: str
    ppg_gain: float = 1.0
    ppg_noise: float = 1.0
    motion_coupling: float = 1.0
    swing_share: float = 1.0
    rotation_deg: float = 0.0

    def apply(self, p: WearerProfile) -> WearerProfile:
        """``p`` as this device records the wearer."""
        if self == DEVICES["wrist"]:
            return p
        turn = _rotation(np.array([1.0, 0.0, 0.0]), math.radians(self.rotation_deg)) @ np.array(p.device_rotation)
        return replace(p, perfusion=p.perfusion * self.ppg_gain, resp_baseline=p.resp_baseline * self.ppg_gain,
                       wander=p.wander * self.ppg_gain, ppg_noise=p.ppg_noise * self.ppg_noise,
                       motion_coupling=p.motion_coupling * self.motion_coupling,
                       swing_weight=p.swing_weight * self.swing_share,
                       device_rotation=tuple(tuple(r) for r in turn.tolist()))


DEVICES = {
    "wrist": Device("wrist"),
    # An upper-arm band with an infrared PPG: a weaker pulse, a noisier photodiode, three times the motion
    # leak, mostly vertical bounce (little arm swing up there), and the band turned 60 degrees on the arm.
    "arm-ir": Device("arm-ir", ppg_gain=0.45, ppg_noise=2.5, motion_coupling=3.0, swing_share=0.3, rotation_deg=60.0),
}
"""The simulated devices (``sim:SEED:DEVICE``); ``wrist`` is the one every other simulation uses."""


class _Stream:
    """The generator state of one pass over a wearer's stream."""

    def __init__(self, profile: WearerProfile, schedule_seed: np.random.SeedSequence,
                 noise_seed: np.random.SeedSequence, montage: bool = False) -> None:
        self.p = p = profile
        self.montage = montage  # short stretches of any activity, one after another (see SimulatedWearer.span)
        self.srng, self.rng = np.random.default_rng(schedule_seed), np.random.default_rng(noise_seed)
        self.rot = np.array(p.device_rotation)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.rows: list[np.ndarray] = []
        self.last_seen = {RUN: 0, STAIRS: 0}
        self._extend()
        first = self.rows[0]
        self.x = float(first[15])
        self.smooth = first[:15].copy()  # state of the posture / motion lag
        self.prev_up = first[:3].copy()
        self.hr_decay = {tau: np.exp(np.arange(1, _BLOCK + 1) / (-tau * FS)) for tau in (p.tau_rise_s, p.tau_fall_s)}
        self.phase = self.rng.uniform(0, 1, 3) * (1, 1, 2)  # breathing, cardiac, gait (stride = 2 steps)
        self.zi_lf = np.zeros(2)
        self.zi_slow = -_SLOW[1][1] * self.rng.standard_normal((2, 1))
        self.zi_cad = -_CADN[1][1] * self.rng.standard_normal(1)
        self.zi_fid = -_FIDN[1][1] * self.rng.standard_normal((3, 1))
        grid = np.linspace(0.0, 1.0, 1025)

        def bump(mu: float, sigma: float) -> np.ndarray:
            d = grid - mu
            return np.exp(-0.5 * ((d - np.round(d)) / sigma) ** 2)

        pulse = bump(0.2, p.pulse_width) + p.dicrotic_ratio * bump(0.2 + p.dicrotic_delay, p.dicrotic_width)
        pulse -= pulse[:-1].mean()
        self.pulse, self.slope = pulse[:-1], np.diff(pulse)  # one beat in 1024 steps, for linear interpolation

    def _extend(self) -> None:
        """Append one schedule segment: its span and a row of parameters, laid out as
        up(0:3) fwd(3:6) lat(6:9) cadence(9) bounce(10) swing(11) fwd_gain(12) fidget(13) vibration(14),
        which follow with the 0.7 s lag, then target intensity(15) and activity(16)."""
        p, rng = self.p, self.srng
        if self.montage:
            start = self.ends[-1] if self.rows else 0
            prev = int(self.rows[-1][16]) if self.rows else -1
            act = int(rng.choice([a for a in range(len(SIM_CLASSES)) if a != prev]))
            n = int(rng.uniform(*_MONTAGE_DWELL_S) * FS)
        elif self.rows:
            start, prev = self.ends[-1], int(self.rows[-1][16])
            overdue = [(start - seen, k) for k, seen in self.last_seen.items() if start - seen > _DEADLINE_S[k] * FS]
            act = max(overdue)[1] if overdue else int(rng.choice(7, p=p.transitions[prev]))
        else:
            start, act = 0, int(rng.choice([SIT, STAND, WALK]))
        if not self.montage:
            n = int(min(max(rng.gamma(2.0, p.dwell_s[act] / 2), _MIN_DWELL_S[act]), 300.0) * FS)
        if act in self.last_seen:
            self.last_seen[act] = start + n
        speed = float(rng.lognormal(0.0, 0.08)) if _GAIT[act] else 1.0
        turn = _rotation(rng.normal(size=3), float(rng.normal(0, math.radians(5)))) @ self.rot
        up, ref = turn @ _UP[act], turn @ _FWD[act]
        up /= np.linalg.norm(up)
        fwd = ref - (ref @ up) * up
        fwd /= np.linalg.norm(fwd)
        lo, hi = _CADENCE_HZ[act]
        cad = min(max(p.cadence_hz[act] * math.sqrt(speed), lo), hi)
        motion = [cad, _VERT[act] * speed, _SWING[act] * speed, 1 + _ARM_M[act] * (math.pi * cad) ** 2 / _G,
                  _FIDGET[act], _VIB[act], min(p.intensity[act] * speed, 1.0), act]
        lat = [up[1] * fwd[2] - up[2] * fwd[1], up[2] * fwd[0] - up[0] * fwd[2], up[0] * fwd[1] - up[1] * fwd[0]]
        self.rows.append(np.concatenate([up, fwd, lat, motion]))
        self.starts.append(start)
        self.ends.append(start + n)

    def block(self, b0: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples ``b0 .. b0 + n``: data (n, 7) float32, activity (n,) int16, HR (n,) float32."""
        p, b1 = self.p, b0 + n
        while self.ends[-1] < b1:
            self._extend()
        i0, i1 = bisect_right(self.ends, b0), bisect_left(self.starts, b1)
        counts = np.minimum(self.ends[i0:i1], b1) - np.maximum(self.starts[i0:i1], b0)
        table = np.array(self.rows[i0:i1])
        # First-order responses to the piecewise-constant schedule, exact within each segment:
        # posture / motion lag (sm) and HR kinetics (x, tau by direction).
        # (Arrays are channel-major, (k, n), so that every row is contiguous.)
        sm, x, pos, s0, x0 = np.empty((15, n)), np.empty(n), 0, self.smooth, self.x
        for row, cnt in zip(table, counts, strict=True):
            m = min(cnt, _SMOOTH_DECAY.size)
            sm[:, pos:pos + m] = row[:15, None] + (s0 - row[:15])[:, None] * _SMOOTH_DECAY[:m]
            sm[:, pos + m:pos + cnt] = row[:15, None]
            decay = self.hr_decay[p.tau_rise_s if row[15] > x0 else p.tau_fall_s]
            x[pos:pos + cnt] = row[15] + (x0 - row[15]) * decay[:cnt]
            s0, x0, pos = sm[:, pos + cnt - 1], x[pos + cnt - 1], pos + cnt
        self.smooth, self.x = s0.copy(), x0

        # Temporaries are dropped as soon as they are used up and sums are built in place (in the
        # same order, so the same floats): a gateway generates this block next to its other work.
        w = self.rng.standard_normal((7, n))  # sensor noise: acc, gyro, ppg
        # Low-passed noises are near-Gaussian whatever their input, so they are fed cheaper uniforms.
        u = self.rng.random((7, n))
        u -= 0.5
        u *= math.sqrt(12.0)
        lf, self.zi_lf = lfilter(_LF_B, _LF_A, u[0], zi=self.zi_lf)
        slow, self.zi_slow = lfilter(*_SLOW, u[1:3], zi=self.zi_slow)
        cadn, self.zi_cad = lfilter(*_CADN, u[3], zi=self.zi_cad)
        fid, self.zi_fid = lfilter(*_FIDN, u[4:7], zi=self.zi_fid)
        del u

        xc = np.clip(x, 0.0, 1.0)
        pb = self.phase[0] + np.cumsum(p.breath_hz + 0.35 * xc) / FS
        breath = np.sin(2 * np.pi * pb)
        hr = (p.resting_hr + (p.max_hr - p.resting_hr) * x + p.hrv_bpm * (1 - 0.7 * xc) * (0.8 * lf + 0.6 * slow[0])
              + p.rsa_bpm * (1 - 0.8 * xc) * breath)
        del x, lf
        pc = self.phase[1] + np.cumsum(hr) / (60 * FS)
        cad = sm[9] * (1 + 0.03 * cadn)
        del cadn
        pg = self.phase[2] + np.cumsum(cad) / FS
        self.phase = np.array([pb[-1] % 1.0, pc[-1] % 1.0, pg[-1] % 2.0])
        del pb

        h2, h3, p2, p3, p_swing, p_lat, p_pron = p.gait_shape
        step = 2 * np.pi * pg
        del pg
        vert = sm[10] * (np.sin(step) + h2 * np.sin(2 * step + p2) + h3 * np.sin(3 * step + p3))
        stride = 0.5 * step + p_swing
        theta = sm[11] * np.sin(stride)
        dtheta = sm[11] * np.pi * cad * np.cos(stride)
        a_fwd = -theta * sm[12]
        del theta
        a_lat = 0.25 * sm[10] * np.sin(stride + p_lat)
        del stride
        pron = 0.3 * sm[11] * 2 * np.pi * cad * np.cos(step + p_pron)
        del step, cad

        up, fwd, lat, fidget, vib = sm[0:3], sm[3:6], sm[6:9], sm[13], sm[14]
        up_n = up / np.sqrt((up * up).sum(axis=0))
        d_up = np.diff(up, axis=1, prepend=self.prev_up[:, None]) * FS
        self.prev_up = up[:, -1].copy()
        spin = up_n[[1, 2, 0]] * d_up[[2, 0, 1]] - up_n[[2, 0, 1]] * d_up[[1, 2, 0]]  # up x d(up)/dt
        del d_up
        out = np.empty((7, n), dtype=np.float32)
        # acc = up_n (1 + vert) + fwd a_fwd + lat a_lat + fidget fid + (0.01 + vib) w, summed left to right
        acc = up_n * (1 + vert)
        acc += fwd * a_fwd
        acc += lat * a_lat
        acc += fidget * fid
        acc += (0.01 + vib) * w[0:3]
        out[0:3] = acc
        del up_n, a_lat
        # gyro = lat dtheta + fwd pron + spin + 5 fidget fid[1, 2, 0] + (0.01 + 0.5 vib) w
        acc = lat * dtheta
        acc += fwd * pron
        acc += spin
        acc += 5 * fidget * fid[[1, 2, 0]]
        acc += (0.01 + 0.5 * vib) * w[3:6]
        out[3:6] = acc
        del acc, spin, dtheta, pron
        amp = p.perfusion * (1 - 0.35 * xc) * (1 + p.resp_am * breath)
        artifact = p.vertical_weight * vert + p.swing_weight * a_fwd + 2 * fidget * fid[0]
        del vert, a_fwd, fid, xc
        where = (pc % 1.0) * len(self.pulse)
        i = where.astype(np.intp)
        pulse = self.pulse[i] + (where - i) * self.slope[i]
        out[6] = (amp * pulse + p.wander * slow[1] + p.resp_baseline * breath + p.motion_coupling * artifact
                  + p.ppg_noise * w[6])
        return np.ascontiguousarray(out.T), np.repeat(table[:, 16].astype(np.int16), counts), hr.astype(np.float32)


def _device(name: str) -> Device:
    if name not in DEVICES:
        raise ConfigError(f"unknown simulated device {name!r}; use one of {', '.join(DEVICES)}.")
    return DEVICES[name]


def _check(seed: int, minutes: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"simulator seed must be a non-negative integer, not {seed!r}.")
    if not float(minutes) > 0:
        raise ConfigError(f"simulated stream length must be positive minutes (or inf), not {minutes!r}.")


def _wearer_index(client_id: str) -> int:
    """``wearer-07`` -> 7 (so a wearer is the same in any dataset size); other ids by a stable hash."""
    m = re.fullmatch(r"wearer-(\d+)", client_id)
    return int(m.group(1)) if m else (1 << 32) + zlib.crc32(client_id.encode())


class SimulatedWearer:
    """One simulated wearer's stream (a :class:`~edge_client.sources.base.Source`).

    ``minutes`` may be ``math.inf`` for an endless stream; ``realtime=True`` paces chunks so
    that none comes out before wall-clock time has reached its last sample.
    """

    channels: tuple[str, ...] = CHANNELS
    sampling_rate_hz: float = FS
    classes: tuple[str, ...] = SIM_CLASSES

    def __init__(self, client_id: str, seed: int, minutes: float = 30.0, realtime: bool = False, day: int = 0,
                 device: str = "wrist") -> None:
        _check(seed, minutes)
        self.client_id, self.seed, self.minutes, self.realtime = client_id, int(seed), float(minutes), realtime
        self.index, self.day = _wearer_index(client_id), int(day)
        profile_seed, self._schedule_seed, self._noise_seed = np.random.SeedSequence([self.seed, self.index]).spawn(3)
        if self.day:  # another stretch of the same wearer's life: same physiology and habits, new moments
            self._schedule_seed, self._noise_seed = np.random.SeedSequence([self.seed, self.index, self.day]).spawn(2)
        self.device = _device(device)
        self.profile = self.device.apply(WearerProfile.draw(np.random.default_rng(profile_seed)))
        self.n_samples: int | None = None if math.isinf(self.minutes) else max(1, round(self.minutes * 60 * FS))

    def __repr__(self) -> str:
        day = f", day={self.day}" if self.day else ""
        return f"SimulatedWearer({self.client_id!r}, seed={self.seed}, minutes={self.minutes}{day})"

    def span(self, samples: int) -> Chunk:
        """``samples`` samples of this wearer as one chunk, generated in one block (what a simulated edge trains
        on when it is selected: cheaper than :meth:`chunks`, which generates whole internal blocks, and so not
        the same samples as the start of :meth:`chunks`, whose noise is drawn a block at a time). A later ``day``
        is a montage of the wearer's moments: 5-12 s stretches of activities drawn at random (this wearer's
        physiology and gait, none of its habits), so that a span of a minute holds most activities, as the replay
        buffer of a gateway that has run for hours does."""
        if not 0 < samples <= _BLOCK:
            raise ConfigError(f"a span of a simulated stream is 1 .. {_BLOCK} samples, not {samples}.")
        stream = _Stream(self.profile, self._schedule_seed, self._noise_seed, montage=self.day > 0)
        data, act, hr = stream.block(0, samples)
        return Chunk(self.client_id, np.arange(samples) / FS, data, CHANNELS, act, hr, SIM_CLASSES)

    def chunks(self, max_samples: int = 4096) -> Iterator[Chunk]:
        """Yield the stream from its start, at most ``max_samples`` samples a chunk."""
        if max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1, not {max_samples}.")
        stream = _Stream(self.profile, self._schedule_seed, self._noise_seed)
        total, generated, emitted, off = self.n_samples, 0, 0, 0
        data, act, hr = np.empty((0, 7), np.float32), np.empty(0, np.int16), np.empty(0, np.float32)
        wall0 = time.monotonic()
        while True:
            parts, have = [], len(hr) - off
            while have < max_samples and (total is None or generated < total):
                n = _BLOCK if total is None else min(_BLOCK, total - generated)
                block = stream.block(generated, _BLOCK)  # always whole blocks: a longer stream extends a shorter one
                parts.append(tuple(a[:n] for a in block))
                generated, have = generated + n, have + n
            if parts:
                data, act, hr = (np.concatenate(a) for a in zip((data[off:], act[off:], hr[off:]), *parts, strict=True))
                off = 0
            take = min(max_samples, len(hr) - off)
            if take == 0:
                return
            if self.realtime:
                time.sleep(max(0.0, wall0 + (emitted + take) / FS - time.monotonic()))
            t = (emitted + np.arange(take)) / FS
            yield Chunk(self.client_id, t, data[off:off + take], CHANNELS, act[off:off + take], hr[off:off + take],
                        SIM_CLASSES)
            emitted, off = emitted + take, off + take


class SimulatedDataset:
    """``sim:SEED`` (or ``sim:SEED:DEVICE``): ``wearers`` simulated wearers, as ``device`` records them
    (:data:`DEVICES`); the last ``test_wearers`` are held out. The same seed gives the same wearers on every
    device: only the recording changes."""

    channels: tuple[str, ...] = CHANNELS
    sampling_rate_hz: float = FS
    classes: tuple[str, ...] = SIM_CLASSES
    has_heart_rate: bool = True
    holdout_fraction: float = 0.0

    def __init__(self, seed: int = 0, wearers: int = 30, minutes: float = 30.0, test_wearers: int = 6,
                 device: str = "wrist") -> None:
        if wearers < 1 or not 0 <= test_wearers <= wearers:
            raise ConfigError(
                f"sim needs wearers >= 1 and 0 <= test_wearers <= wearers, got {wearers} and {test_wearers}."
            )
        _check(seed, minutes)
        self.seed, self.minutes, self.device = int(seed), float(minutes), _device(device).name
        self.name = f"sim:{self.seed}" + (f":{self.device}" if self.device != "wrist" else "")
        width = max(2, len(str(wearers - 1)))
        self.clients = tuple(f"wearer-{i:0{width}d}" for i in range(wearers))
        self.train_clients = self.clients[: wearers - test_wearers]
        self.test_clients = self.clients[wearers - test_wearers:]
        self._known = frozenset(self.clients)

    def grown(self, train_wearers: int) -> SimulatedDataset:
        """This dataset with ``train_wearers`` training wearers: its own, then new ones numbered after its
        held-out wearers (``wearer-30``, ``wearer-31``, ...), so the held-out wearers, and every wearer's
        stream, are the same whatever the size of the federation. Nothing is generated until it is read."""
        extra = train_wearers - len(self.train_clients)
        if extra <= 0:
            return self
        grown = copy.copy(self)
        start = len(self.clients)
        added = tuple(f"wearer-{i:02d}" for i in range(start, start + extra))
        grown.train_clients = self.train_clients + added
        grown.clients = self.clients + added
        grown._known = frozenset(grown.clients)
        return grown

    def source(self, client_id: str, *, realtime: bool = False, day: int = 0) -> SimulatedWearer:
        """The stream of ``client_id`` (``day`` > 0: another stretch of the same wearer's life); ConfigError lists
        the valid ids for an unknown one."""
        if client_id not in self._known:
            ids = ", ".join(self.clients) if len(self.clients) <= 40 else f"{self.clients[0]} .. {self.clients[-1]}"
            raise ConfigError(f"{self.name} has no client {client_id!r}; use one of its ids: {ids}.")
        return SimulatedWearer(client_id, self.seed, self.minutes, realtime, day, self.device)
