"""Streaming IIR filtering with carried state: the PPG band-pass, in numpy alone.

Why no scipy: ``import scipy.signal`` pulls in scipy.stats, optimize, sparse, ... and
costs a gateway ~100 MB resident and ~0.8 s, against a 60 MB budget for the whole edge
process. What the edge needs from it is small: a Butterworth design (done once per
stream) and a cascade of second-order sections run over the stream.

Design: :func:`bandpass_sos` follows ``scipy.signal.butter(..., output="sos")`` step by
step (analog prototype poles, low-pass -> band-pass, bilinear transform with pre-warped
band edges, "nearest" pairing of poles and zeros into sections), so its coefficients
agree with scipy's to rounding; tests check this against scipy itself.

Filtering: :class:`StreamingSOS` runs the whole cascade as one linear state-space
system, on the states of the transposed direct form II that ``scipy.signal.sosfilt``
uses, in blocks of ``BLOCK`` samples aligned to the segment's sample index::

    y_block = O s + H x_block        s_next = A^B s + G x_block

``H`` is the lower-triangular Toeplitz matrix of the impulse response, ``O`` the
observability stack (rows ``C A^k``) and ``G`` the controllability block (columns
``A^(B-1-j) Bu``), all precomputed in float64. The work is vectorised across channels
and across all the full blocks of a chunk; only the state hand-over from block to block
is a Python loop (one step per ``BLOCK`` samples, never one per sample).

Chunk invariance to the bit: every output is computed from the state at the start of
its block and the inputs of its block, by the same elementwise multiplies and adds in
the same order, whatever the chunking (no BLAS or reductions, whose summation order may
depend on array shapes). The samples of an unfinished block are filtered at once (their
outputs need only inputs up to themselves) and kept in a small buffer; the state moves
on only when the block is complete. One sample at a time or a thousand at a time, the
floats are identical.

:func:`lfilter` runs any rational filter ``b / a`` over a whole array with the same
block machinery, on the states ``scipy.signal.lfilter`` keeps (its ``zi``), for the
simulator's noise generators: the numpy stand-in for ``scipy.signal.lfilter``.
"""

from __future__ import annotations

import functools

import numpy as np

from models.errors import ConfigError

__all__ = ["BLOCK", "StreamingSOS", "bandpass_sos", "lfilter", "sosfilt_zi"]

BLOCK = 32
"""Samples per block of :class:`StreamingSOS`: trades the per-block Python step against the O(B) work per sample."""
LFILTER_BLOCK = 8
"""Samples per block of :func:`lfilter`: it takes ``block`` steps over slabs of n / block samples, then a scan."""
SLAB = 256 * BLOCK
"""Longest input :class:`StreamingSOS` filters in one go (keeps its temporaries under 1 MB per channel)."""


def bandpass_sos(low_hz: float, high_hz: float, rate_hz: float, order: int = 2) -> np.ndarray:
    """Butterworth band-pass as second-order sections (e.g. 0.5-4 Hz keeps 30-240 BPM).

    Same as ``scipy.signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=rate_hz,
    output="sos")``: an (order, 6) array of rows ``[b0, b1, b2, 1, a1, a2]``.
    """
    nyquist = rate_hz / 2
    if not 0 < low_hz < high_hz < nyquist:
        raise ConfigError(f"band-pass {low_hz}-{high_hz} Hz needs 0 < low < high < {nyquist} Hz (Nyquist).")
    if int(order) != order or order < 1:
        raise ConfigError(f"band-pass order must be an integer >= 1, got {order}.")
    z, p, k = _butter_bandpass_zpk(int(order), np.array([low_hz, high_hz], dtype=np.float64) / nyquist)
    return _zpk2sos_nearest(z, p, k)


def _butter_bandpass_zpk(order: int, wn: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Digital zeros, poles and gain of a Butterworth band-pass; ``wn`` are the edges / Nyquist."""
    # Analog low-pass prototype: poles on the left half of the unit circle, no zeros.
    m = np.arange(-order + 1, order, 2, dtype=np.float64)
    p = -np.exp(1j * np.pi * m / (2 * order))
    # Pre-warp the band edges so the bilinear transform puts them where asked (fs = 2).
    warped = 4.0 * np.tan(np.pi * wn / 2.0)
    bw = float(warped[1] - warped[0])
    wo = float(np.sqrt(warped[0] * warped[1]))
    # Low-pass -> band-pass: each pole splits in two; `order` zeros land at s = 0.
    p_lp = (p * bw / 2).astype(np.complex128)
    p_bp = np.concatenate((p_lp + np.sqrt(p_lp**2 - wo**2), p_lp - np.sqrt(p_lp**2 - wo**2)))
    z_bp = np.zeros(order)
    k_bp = bw**order
    # Bilinear transform (fs = 2, so 2 * fs = 4): s = 0 -> z = 1, s = infinity -> z = -1.
    fs2 = 4.0
    z_z = np.concatenate(((fs2 + z_bp) / (fs2 - z_bp), -np.ones(order)))
    p_z = (fs2 + p_bp) / (fs2 - p_bp)
    k_z = float(k_bp * np.real(np.prod(fs2 - z_bp) / np.prod(fs2 - p_bp)))
    return z_z, p_z, k_z


def _cplxreal(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complex-conjugate pairs (one per pair, positive imaginary part) and real values, as scipy sorts them."""
    tol = 100 * np.finfo(np.float64).eps
    z = z[np.lexsort((abs(z.imag), z.real))]
    real = abs(z.imag) <= tol * abs(z)
    zr = z[real].real
    z = z[~real]
    zp, zn = z[z.imag > 0], z[z.imag < 0]
    if len(zp) != len(zn):
        raise ValueError("complex values without matching conjugates")
    # Within runs of equal real parts, order by |imag| so the conjugates line up.
    same_real = np.diff(zp.real) <= tol * abs(zp[:-1])
    diffs = np.diff(np.concatenate(([0], same_real, [0])))
    for start, stop in zip(np.flatnonzero(diffs > 0), np.flatnonzero(diffs < 0) + 1, strict=True):
        for run in (zp[start:stop], zn[start:stop]):
            run[...] = run[np.lexsort([abs(run.imag)])]
    if np.any(abs(zp - zn.conj()) > tol * abs(zn)):
        raise ValueError("complex values without matching conjugates")
    return (zp + zn.conj()) / 2, zr


def _zpk2sos_nearest(z: np.ndarray, p: np.ndarray, k: float) -> np.ndarray:
    """Second-order sections with scipy's "nearest" pairing, for the real zeros and the even
    number of poles of a Butterworth band-pass: the pole closest to the unit circle goes last,
    with its conjugate (or the next real pole) and the two real zeros nearest to it."""
    n_sections = (max(len(p), len(z)) + 1) // 2
    zc, zr = _cplxreal(z)
    if len(zc) or len(p) % 2:
        raise ValueError("expected real zeros and an even number of poles")
    pc, pr = _cplxreal(p)
    z = zr.astype(np.complex128)
    p = np.concatenate((pc, pr)).astype(np.complex128)
    sos = np.zeros((n_sections, 6))
    for si in range(n_sections - 1, -1, -1):
        i = np.argmin(np.abs(1 - np.abs(p)))
        p1 = p[i]
        p = np.delete(p, i)
        if np.isreal(p1):
            real_idx = np.flatnonzero(np.isreal(p))
            if len(real_idx) == 0:
                raise ValueError("a real pole without a real partner")
            i = real_idx[np.argmin(np.abs(1 - np.abs(p[real_idx])))]
            p2 = p[i]
            p = np.delete(p, i)
        else:
            p2 = p1.conj()
        i = np.argsort(np.abs(z - p1))[0]
        z1 = z[i]
        z = np.delete(z, i)
        i = np.argsort(np.abs(z - p1))[0]
        z2 = z[i]
        z = np.delete(z, i)
        sos[si, :3] = np.real(np.poly(np.array([z1, z2])))
        sos[si, 3:] = np.real(np.poly(np.array([p1, p2])))
    sos[0, :3] *= k
    return sos


def sosfilt_zi(sos: np.ndarray) -> np.ndarray:
    """(sections, 2) steady state of the sections for a unit step, as ``scipy.signal.sosfilt_zi``.

    Scaled by ``x[0]``, it starts a filter as if the stream had always been at ``x[0]``.
    Each section's state solves ``zi = A zi + Bu`` (``A`` its transposed companion matrix),
    scaled by the DC gain of the sections before it.
    """
    sos = np.asarray(sos, dtype=np.float64)
    zi = np.empty((len(sos), 2))
    scale = 1.0
    for i, section in enumerate(sos):
        b, a = section[:3] / section[3], section[3:] / section[3]
        i_minus_a = np.eye(2) - np.array([[-a[1], 1.0], [-a[2], 0.0]])
        zi[i] = scale * np.linalg.solve(i_minus_a, b[1:] - a[1:] * b[0])
        scale *= b.sum() / a.sum()
    return zi


def _cascade_state_space(sos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(A, Bu, C, D) of the cascade, its state the sections' (z0, z1) in order, as sosfilt keeps them.

    A section in transposed direct form II: ``y = b0 x + z0``, ``z0' = z1 + b1 x - a1 y``,
    ``z1' = b2 x - a2 y``; the next section's input is this section's output.
    """
    a_mat, bu, c, d = np.zeros((0, 0)), np.zeros(0), np.zeros(0), 1.0
    for section in sos:
        b0, b1, b2, _, a1, a2 = section / section[3]
        a_i = np.array([[-a1, 1.0], [-a2, 0.0]])
        b_i = np.array([b1 - a1 * b0, b2 - a2 * b0])
        n = len(bu)
        grown = np.zeros((n + 2, n + 2))
        grown[:n, :n] = a_mat
        grown[n:, :n] = np.outer(b_i, c)
        grown[n:, n:] = a_i
        a_mat = grown
        bu = np.concatenate((bu, b_i * d))
        c = np.concatenate((b0 * c, [1.0, 0.0]))
        d = b0 * d
    return a_mat, bu, c, d


class _BlockSystem:
    """The block matrices of a state-space system ``s' = A s + Bu x``, ``y = C s + D x`` for blocks of B samples.

    ``y[i] = O[i] s + sum_{d <= i} h[d] x[i - d]`` and ``s_next = A^B s + sum_j G[j] x[j]``, with
    ``obs`` = O (B, states), ``impulse`` = h (B,), ``ctrl`` = G (B, states) and ``powers`` =
    A^0 .. A^B, all in float64 (B = ``block``, :data:`BLOCK` unless given).
    """

    def __init__(self, a_mat: np.ndarray, bu: np.ndarray, c: np.ndarray, d: float, block: int = BLOCK) -> None:
        self.bu, self.d, self.block = bu, float(d), block
        powers = [np.eye(len(bu))]
        for _ in range(block):
            powers.append(powers[-1] @ a_mat)
        self.powers = powers
        self.obs = np.array([c @ powers[k] for k in range(block)])
        self.impulse = np.array([d] + [c @ powers[k] @ bu for k in range(block - 1)])
        self.ctrl = np.array([powers[block - 1 - j] @ bu for j in range(block)])
        self.a_block_rows = powers[block].tolist()  # A^B as rows of Python floats
        # The nonzero terms of y = C s + D x and s' = A s + Bu x, as Python numbers, for :meth:`run`.
        self._terms = ([(int(k), float(c[k])) for k in np.flatnonzero(c)],
                       [(int(k), int(j), float(a_mat[k, j])) for k, j in zip(*np.nonzero(a_mat), strict=True)],
                       [float(v) for v in bu])

    def handover(self, s0: np.ndarray, u: np.ndarray) -> np.ndarray:
        """States (states, blocks + 1, channels) at each block start and after the last, from ``s0``
        (states, channels) and each block's input part ``u`` = G x (states, blocks, channels).

        The step s' = A^B s + G x is sequential. On a few states, Python floats (IEEE doubles, each
        operation rounded exactly as numpy's) are ~3x faster than numpy calls on tiny arrays.
        """
        states = np.empty((len(s0), u.shape[1] + 1, u.shape[2]))
        rows = self.a_block_rows
        for c in range(u.shape[2]):
            s = s0[:, c].tolist()
            column = [s]
            for u_b in u[:, :, c].T.tolist():
                s = [_ordered_dot(row, s) + u_i for row, u_i in zip(rows, u_b, strict=True)]
                column.append(s)
            states[:, :, c] = np.array(column).T
        return states

    def scan(self, s0: np.ndarray, u: np.ndarray) -> np.ndarray:
        """What :meth:`handover` returns, by a doubling scan in whole-array numpy steps (log2(blocks) of them).

        After the step with shift k, entry b holds ``sum (A^B)^(b - j) w_j`` over the 2k entries j
        up to b, where ``w`` is ``s0`` followed by the blocks' ``u``. Faster than the hand-over on
        long inputs, but its sums are grouped by the input's length: not for chunk-invariant use.
        """
        w = np.concatenate((s0[:, None], u), axis=1)
        m, k = self.powers[self.block], 1
        while k < w.shape[1]:
            step = m[:, 0, None, None] * w[0, None, :-k]
            for j in range(1, len(m)):
                step += m[:, j, None, None] * w[j, None, :-k]
            w[:, k:] += step
            m, k = m @ m, 2 * k
        return w

    def run(self, xb: np.ndarray, n: int, s0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outputs (B, blocks, channels) of the first ``n`` inputs of ``xb`` (B, blocks, channels,
        zero-padded after them) from state ``s0`` (states, channels), and the state after them.

        Every block is first run from a zero state, all blocks at once: B steps of the filter's
        own recursion, each over a (blocks, channels) slab, give each block's forced output and
        its end state ``G x``. :meth:`scan` turns those into the true state at each block's start,
        whose free response ``O s`` is then added. No Python loop runs per sample or per block.
        """
        block, (states, blocks, channels) = self.block, (len(s0), *xb.shape[1:])
        full, rest = divmod(n, block)
        output_terms, state_terms, inputs = self._terms
        s, following = np.zeros((2, states, blocks, channels))
        y = np.empty((block, blocks, channels))
        scratch = np.empty((blocks, channels))
        partial = None  # the forced state of the unfinished last block after its last sample
        for i in range(block):
            xi = xb[i]
            np.multiply(self.d, xi, out=y[i])
            for k, weight in output_terms:
                y[i] += np.multiply(weight, s[k], out=scratch)
            for k in range(states):
                np.multiply(inputs[k], xi, out=following[k])
            for k, j, weight in state_terms:
                following[k] += np.multiply(weight, s[j], out=scratch)
            s, following = following, s
            if i == rest - 1:
                partial = s[:, full].copy()
        starts = self.scan(s0, s[:, :full])  # (states, full + 1, channels)
        for m in range(states):
            y += self.obs[:, m, None, None] * starts[m, None, :blocks]
        end = starts[:, full]
        if partial is not None:  # after an unfinished last block: A^r s + its forced state
            end = self.powers[rest] @ end + partial
        return y, end


def _direct_form_state_space(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(A, Bu, C, D) of ``b / a`` (same length, ``a[0] == 1``) in transposed direct form II, as lfilter keeps it.

    ``y = b0 x + z0``, ``z_i' = z_(i+1) + b_(i+1) x - a_(i+1) y`` (``z_order = 0``).
    """
    order = len(a) - 1
    a_mat = np.zeros((order, order))
    a_mat[:, 0] = -a[1:]
    a_mat[np.arange(order - 1), np.arange(1, order)] = 1.0
    c = np.zeros(order)
    c[0] = 1.0
    return a_mat, b[1:] - a[1:] * b[0], c, float(b[0])


@functools.lru_cache(maxsize=64)
def _direct_form_system(b: tuple[float, ...], a: tuple[float, ...]) -> _BlockSystem:
    """The block system of ``b / a`` (normalised, same length), kept: the simulator filters every block with a few."""
    return _BlockSystem(*_direct_form_state_space(np.array(b), np.array(a)), block=LFILTER_BLOCK)


def lfilter(
    b: np.ndarray, a: np.ndarray, x: np.ndarray, zi: np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``scipy.signal.lfilter(b, a, x, axis=-1, zi=zi)`` in numpy: the output, and the final state with ``zi``.

    ``x`` is filtered along its last axis; ``zi`` (``x.shape[:-1] + (order,)``, or broadcastable
    to it) is the transposed-direct-form-II state scipy uses, so a stream filtered block by block
    with the returned state carries on as one long call. Float64 out. The block form adds the
    terms in another order than scipy's sample loop: the results agree to ~1e-15 of the output's
    scale, ~1e-11 for poles close to z = 1 (the simulator's 0.1 Hz resonance), where the direct
    form is ill-conditioned. No Python loop runs per sample or per block.
    """
    b = np.atleast_1d(np.asarray(b, dtype=np.float64))
    a = np.atleast_1d(np.asarray(a, dtype=np.float64))
    if b.ndim != 1 or a.ndim != 1 or len(b) == 0 or len(a) == 0 or a[0] == 0:
        raise ValueError("lfilter needs 1-D b and a with a[0] != 0.")
    size = max(len(a), len(b))
    b = np.concatenate((b, np.zeros(size - len(b)))) / a[0]
    a = np.concatenate((a, np.zeros(size - len(a)))) / a[0]
    x = np.asarray(x, dtype=np.float64)
    lead, n, order = x.shape[:-1], x.shape[-1], size - 1
    if zi is not None:
        zi = np.broadcast_to(np.asarray(zi, dtype=np.float64), (*lead, order))
    if order == 0 or x.size == 0:
        y = b[0] * x
        return y if zi is None else (y, np.array(zi))
    rows = x.reshape(-1, n)  # (channels, n)
    block, full = LFILTER_BLOCK, n // LFILTER_BLOCK
    # (block, blocks, channels), zero-padded: every step below runs on whole (blocks, channels) slabs.
    xb = np.zeros((block, -(-n // block), len(rows)))
    xb[:, :full] = rows[:, : full * block].reshape(len(rows), full, block).transpose(2, 1, 0)
    xb[: n - full * block, full:] = rows[:, full * block :].T[:, None]
    s0 = np.zeros((order, len(rows))) if zi is None else zi.reshape(-1, order).T
    yb, zf = _direct_form_system(tuple(b.tolist()), tuple(a.tolist())).run(xb, n, s0)
    y = yb.transpose(2, 1, 0).reshape(len(rows), -1)[:, :n].reshape(x.shape)
    return y if zi is None else (y, np.ascontiguousarray(zf.T).reshape(*lead, order))


def _ordered_dot(row: list[float], s: list[float]) -> float:
    """``row . s`` summed strictly left to right (unlike ``sum``, whose float algorithm may change)."""
    acc = row[0] * s[0]
    for r, v in zip(row[1:], s[1:], strict=True):
        acc = acc + r * v
    return acc


class StreamingSOS:
    """Filters (n, channels) blocks along time, carrying the filter state between blocks.

    The state starts at the steady state for the first sample (no start-up step) and
    is dropped by :meth:`reset` at a gap, so a filter never runs across missing data.
    Returns one output per input, identical to the bit however the stream is chunked,
    and equal to ``scipy.signal.sosfilt`` with ``zi = sosfilt_zi(sos) * x[0]`` to rounding.
    """

    def __init__(self, sos: np.ndarray, channels: int) -> None:
        self.sos = np.asarray(sos, dtype=np.float64)
        self.channels = channels
        self._blocks = _BlockSystem(*_cascade_state_space(self.sos))
        self._obs, self._impulse, self._ctrl = self._blocks.obs, self._blocks.impulse, self._blocks.ctrl
        self._zi_unit = sosfilt_zi(self.sos).reshape(-1)  # (states,)
        self._state: np.ndarray | None = None  # (states, channels) at the start of the pending block
        self._pending = np.zeros((0, channels))  # inputs of the unfinished block

    def reset(self) -> None:
        self._state = None
        self._pending = np.zeros((0, self.channels))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (n, channels) -> filtered (n, channels) float32."""
        return self.filter_float64(x).astype(np.float32)

    def filter_float64(self, x: np.ndarray) -> np.ndarray:
        """Like calling the filter, but returns the float64 outputs before the float32 cast."""
        x64 = np.asarray(x, dtype=np.float64)
        if len(x64) == 0:
            return x64
        if x64.ndim != 2 or x64.shape[1] != self.channels:
            raise ValueError(f"expected (n, {self.channels}) samples, got shape {x64.shape}.")
        if self._state is None:
            self._state = self._zi_unit[:, None] * x64[0][None, :]
        if len(x64) <= SLAB:
            return self._filter(x64)
        # Long inputs in slabs keep the temporaries small; chunk invariance makes this exact.
        return np.concatenate([self._filter(x64[i : i + SLAB]) for i in range(0, len(x64), SLAB)])

    def _filter(self, x64: np.ndarray) -> np.ndarray:
        """Float64 outputs for x64 (n, channels), n >= 1, advancing the state over completed blocks."""
        done = len(self._pending)  # samples of the pending block already emitted
        total = done + len(x64)
        full, blocks = total // BLOCK, -(-total // BLOCK)
        padded = np.zeros((blocks * BLOCK, self.channels))
        padded[:done] = self._pending
        padded[done:total] = x64
        # Time within the block first: xb[i, b, c] is sample i of block b, so the work below runs
        # on contiguous (blocks, channels) slabs.
        xb = np.ascontiguousarray(padded.reshape(blocks, BLOCK, self.channels).transpose(1, 0, 2))
        states = self._block_states(self._state, xb[:, :full])  # (states, full + 1, channels)
        y = self._block_outputs(states[:, :blocks], xb)  # (BLOCK, blocks, channels)
        self._state = states[:, full].copy()
        self._pending = padded[full * BLOCK : total].copy()
        return y.transpose(1, 0, 2).reshape(-1, self.channels)[done:total]

    def _block_states(self, s0: np.ndarray, xb: np.ndarray) -> np.ndarray:
        """States (states, blocks + 1, channels) at the start of each full block of ``xb``
        (BLOCK, blocks, channels) and after the last, from ``s0`` (states, channels)."""
        # Input part of each block's step, G x, for all blocks at once. accumulate adds strictly
        # in the order j = 0..B-1 (each partial sum is an output), whatever the array shapes.
        u = np.add.accumulate(self._ctrl[:, :, None, None] * xb[:, None], axis=0)[-1]  # (states, blocks, ch)
        return self._blocks.handover(s0, u)

    def _block_outputs(self, states: np.ndarray, xb: np.ndarray) -> np.ndarray:
        """Outputs (BLOCK, blocks, channels) of blocks starting in ``states`` with inputs ``xb``.

        Sample i of a block adds ``O[i, m] s[m]`` for m = 0, 1, .. then ``h[d] x[i - d]`` for
        d = 0..i, always in that order, so its value does not depend on later samples being known.
        """
        obs, impulse = self._obs, self._impulse
        y = obs[:, 0, None, None] * states[0]
        for m in range(1, len(states)):
            y += obs[:, m, None, None] * states[m]
        for d in range(BLOCK):
            y[d:] += impulse[d] * xb[: BLOCK - d]
        return y
