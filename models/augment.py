"""Training-time augmentation: small random rotations of three-axis sensors.

A wearable sits a little differently on every wearer and every day, which turns its
axes by a few degrees. Rotating each training window's accelerometer and gyroscope
together by a small random rotation teaches the model that this does not matter,
which is what lets one federated model serve wearers it has never seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["random_rotations", "rotate_windows", "sensor_triads"]

F32 = np.float32


def sensor_triads(channels: Sequence[str]) -> list[tuple[int, int, int]]:
    """Indices of every ``<sensor>_x``, ``<sensor>_y``, ``<sensor>_z`` channel triple."""
    index = {name: i for i, name in enumerate(channels)}
    triads = []
    for name in channels:
        if name.endswith("_x"):
            stem = name[:-2]
            axes = [index.get(f"{stem}_{axis}") for axis in "xyz"]
            if all(i is not None for i in axes):
                triads.append((axes[0], axes[1], axes[2]))
    return triads


def random_rotations(n: int, sigma_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3) about random axes, angles ~ N(0, sigma_deg)."""
    rotvec = rng.normal(0.0, np.deg2rad(sigma_deg), (n, 3))
    theta = np.linalg.norm(rotvec, axis=1)
    axis = rotvec / np.where(theta > 0, theta, 1.0)[:, None]
    k = np.zeros((n, 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k -= k.transpose(0, 2, 1)
    sin, cos = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    return (np.eye(3) + sin * k + (1.0 - cos) * (k @ k)).astype(F32)  # Rodrigues


def rotate_windows(
    x: np.ndarray, triads: Sequence[tuple[int, int, int]], sigma_deg: float, rng: np.random.Generator
) -> np.ndarray:
    """A copy of windows ``x`` (n, channels, time) with every triad turned by one rotation per window."""
    if sigma_deg <= 0 or not triads:
        return x
    rotations = random_rotations(len(x), sigma_deg, rng)
    out = np.array(x, dtype=F32, copy=True)
    for triad in triads:
        idx = list(triad)
        out[:, idx] = np.einsum("nij,njt->nit", rotations, x[:, idx])
    return out
