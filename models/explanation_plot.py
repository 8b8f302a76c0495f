"""The picture of an :class:`~models.attribution.Explanation`: ``wearfl explain --plot FILE.png``.

One block per window (the first :data:`MAX_WINDOWS`): each channel's signal as a line, and right under it a
one-row heat band of that channel's attribution on the same time axis. Red samples pushed the explained output
(a class's probability, or the BPM) up, blue ones pushed it down; all channels of a window share one colour
scale centred at 0, shown by the window's colour bar. The block's title names the explained output on the window
and on the zero baseline; the figure's title names the method.

matplotlib is imported inside :func:`plot_explanation`, so importing this module stays light.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import InputError

if TYPE_CHECKING:
    from models.attribution import Explanation
    from models.spec import ModelSpec

__all__ = ["MAX_WINDOWS", "plot_explanation"]

MAX_WINDOWS = 6
"""Windows one figure shows at most (the first ones)."""

_CMAP = "RdBu_r"  # diverging: red above 0 (pushed the output up), blue below (pushed it down)


def _value(v: float) -> str:
    """An output as people read it: a probability to 2 decimals, a BPM to 1."""
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def _method_title(method: str, samples: int, span: int | None) -> str:
    if method == "integrated-gradients":
        return "integrated gradients from the zero baseline"
    if method == "gradient":
        return "gradient x input"
    if method == "occlusion":
        from models.attribution import default_span

        k = default_span(samples) if span is None else span
        return f"occlusion, patches of {k} sample{'s' if k != 1 else ''} set to the zero baseline"
    return method


def _labels(explanation: Explanation, spec: ModelSpec | None, i: int) -> tuple[str, str]:
    """(window i's title, its colour bar's label)."""
    target = int(explanation.targets[i])
    out, base = float(explanation.outputs[i]), float(explanation.baseline_outputs[i])
    if spec is not None and not spec.is_classifier:
        return f"window {i}: {_value(out)} BPM (baseline {_value(base)})", "attribution to BPM"
    if spec is not None and 0 <= target < len(spec.classes):
        name = spec.classes[target]
        return (f"window {i}: {name}, P = {_value(out)} (baseline {_value(base)})",
                f"attribution to P({name})")
    return (f"window {i}: output {_value(out)} for class {target} (baseline {_value(base)})",
            f"attribution to output {target}")


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) of window blocks: 1, 2, 3, 2x2, 2x3, 2x3."""
    cols = 1 if n == 1 else 2 if n in (2, 4) else 3
    return math.ceil(n / cols), cols


def plot_explanation(explanation: Explanation, x: np.ndarray, spec: ModelSpec | None,
                     path: str | os.PathLike[str], *, span: int | None = None) -> int:
    """Draw the first :data:`MAX_WINDOWS` windows of ``x`` (n, channels, samples) over their attributions and
    write the PNG atomically to ``path``. ``spec`` None (an exported model) plots against sample indices with
    generic output names. ``span`` is occlusion's patch length (default: the one ``explain`` uses).
    Returns how many windows the figure shows."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    a = np.asarray(explanation.attributions, dtype=np.float32)
    if x.ndim != 3 or x.shape != a.shape:
        raise InputError(f"the windows to plot have shape {x.shape}, their attributions {a.shape}; "
                         "give the windows that were explained.")
    n, c, t = x.shape
    if n == 0:
        raise InputError("there are no windows to plot.")
    shown = min(n, MAX_WINDOWS)
    channels = list(explanation.channels) if len(explanation.channels) == c else [f"channel {k}" for k in range(c)]
    rate = float(spec.sampling_rate_hz) if spec is not None and spec.sampling_rate_hz > 0 else None
    step = 1.0 / rate if rate else 1.0
    time = np.arange(t) * step
    extent = (-0.5 * step, (t - 0.5) * step, 0.0, 1.0)  # each band cell centred on its sample
    xlabel = "time (s)" if rate else "sample"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows, cols = _grid(shown)
    block_w = 4.6 + 1.2 * min(t, 512) / 128
    width = max(block_w * cols, 8.0)
    more = f"; first {shown} of {n} windows" if n > shown else ""
    per_line = int(width * 11)  # characters of 11-point text an inch holds, about
    heading = "\n".join([
        *textwrap.wrap(f"What moved the model's output: {_method_title(explanation.method, t, span)}{more}", per_line),
        *textwrap.wrap("each channel's signal, under it its attribution: red pushed the output up, blue pushed it "
                       "down (one colour scale per window)", per_line)])
    block_h = 1.3 + 0.95 * c
    fig = plt.figure(figsize=(width, block_h * rows + 0.2 * (heading.count("\n") + 2)), dpi=100,
                     layout="constrained")
    fig.get_layout_engine().set(h_pad=0.015)  # the spacer rows part the channels, not the layout's padding
    try:
        fig.suptitle(heading, fontsize=11)
        blocks = fig.subfigures(rows, cols, squeeze=False)
        for i in range(shown):
            block = blocks[i // cols, i % cols]
            title, bar_label = _labels(explanation, spec, i)
            title = textwrap.fill(title, int(width / cols * 10))
            _draw_window(block, x[i], a[i], channels, time, extent, xlabel, title, bar_label, MaxNLocator)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    from models.files import write_atomic

    write_atomic(path, buffer.getvalue(), doing="writing the explanation plot")
    return shown


def _signal_ticks(axis: Any, signal: np.ndarray, locator: Any) -> None:
    """A few round y ticks inside the signal's range, with room above and below so no label reaches the band."""
    finite = signal[np.isfinite(signal)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    r = hi - lo if hi > lo else max(abs(hi), 1.0)
    axis.set_ylim(lo - 0.25 * r, hi + 0.25 * r)
    ticks = [v for v in locator(nbins=3).tick_values(lo, hi) if lo - 0.08 * r <= v <= hi + 0.08 * r]
    axis.set_yticks(ticks)


def _draw_window(block: Any, x: np.ndarray, a: np.ndarray, channels: list[str], time: np.ndarray,
                 extent: tuple[float, float, float, float], xlabel: str, title: str, bar_label: str,
                 locator: Any) -> None:
    """One window: per channel a signal axis and, under it, a heat band; one colour bar below them all."""
    c = len(channels)
    finite = np.abs(a[np.isfinite(a)])
    vmax = float(finite.max()) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    # rows: signal, its band, a spacer (none after the last): each band sits right under its own signal
    grid = block.add_gridspec(3 * c - 1, 1, height_ratios=([3, 1, 0.55] * c)[:-1], hspace=0.0)
    first = None
    bands = []
    image = None
    for k, name in enumerate(channels):
        line = block.add_subplot(grid[3 * k], sharex=first)
        first = first or line
        band = block.add_subplot(grid[3 * k + 1], sharex=first)
        line.plot(time, x[k], color="0.15", linewidth=0.8)
        line.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        _signal_ticks(line, x[k], locator)
        line.tick_params(axis="y", labelsize=6, length=2, pad=1)
        line.tick_params(axis="x", labelbottom=False, length=0)
        image = band.imshow(a[k][None, :], cmap=_CMAP, vmin=-vmax, vmax=vmax, aspect="auto", extent=extent,
                            interpolation="nearest")
        band.set_yticks([])
        band.tick_params(axis="x", labelbottom=k == c - 1, labelsize=8, length=2 if k == c - 1 else 0)
        bands.append(band)
    first.set_xlim(extent[0], extent[1])
    bands[-1].set_xlabel(xlabel, fontsize=9)
    block.suptitle(title, fontsize=10.5, fontweight="bold")
    bar = block.colorbar(image, ax=[*block.axes], location="bottom", shrink=0.8, aspect=40, pad=0.02)
    bar.set_label(bar_label, fontsize=9)
    bar.ax.tick_params(labelsize=7)
