"""``wearfl explain --plot``: the figure of an explanation (models/explanation_plot.py)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import Model, activity_spec, heart_rate_spec
from models.attribution import explain
from models.errors import InputError
from models.explanation_plot import MAX_WINDOWS, plot_explanation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def windows(spec: Any, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.input_shape)).astype(np.float32)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the last saved figure showed: its texts and its heat bands' colour limits and colormaps."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    seen: dict[str, Any] = {}
    save = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        save(fig, *args, **kwargs)  # draws first, so every text is final
        seen["texts"] = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
        seen["titles"] = [sub._suptitle.get_text() for sub in fig.subfigs if sub._suptitle is not None]
        seen["images"] = [[(im.get_clim(), im.get_cmap().name) for ax in sub.axes for im in ax.get_images()]
                          for sub in fig.subfigs]
        seen["heading"] = fig._suptitle.get_text()

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def test_activity_figure_names_classes_and_shares_a_centred_scale(tmp_path, drawn):
    spec = activity_spec()
    model = Model(spec, seed=0)
    x = windows(spec, 2)
    explanation = explain(model, x, "gradient")
    path = tmp_path / "activity.png"

    assert plot_explanation(explanation, x, spec, path) == 2

    width, height = png_size(path)
    assert 800 <= width <= 4000 and 500 <= height <= 4000
    assert 20_000 < path.stat().st_size < 5_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activity.png"]  # no temp file left behind
    assert "gradient x input" in drawn["heading"]
    assert "first" not in drawn["heading"]
    for i, title in enumerate(drawn["titles"]):
        name = spec.classes[int(explanation.targets[i])]
        assert title.replace("\n", " ").startswith(f"window {i}: {name}, P = {explanation.outputs[i]:.2f}")
        assert f"(baseline {explanation.baseline_outputs[i]:.2f})" in title.replace("\n", " ")
        assert f"attribution to P({name})" in drawn["texts"]
    assert set(spec.channels) <= set(drawn["texts"])
    assert "time (s)" in drawn["texts"]
    assert len(drawn["images"]) == 2
    for i, bands in enumerate(drawn["images"]):
        assert len(bands) == len(spec.channels)  # one heat band per channel
        limits = {clim for clim, _ in bands}
        assert len(limits) == 1  # one colour scale for all channels of the window
        (low, high), = limits
        assert low == pytest.approx(-high) and high == pytest.approx(np.abs(explanation.attributions[i]).max())
        assert {cmap for _, cmap in bands} == {"RdBu_r"}  # red above 0, blue below


def test_heart_rate_figure_reads_in_bpm(tmp_path, drawn):
    spec = heart_rate_spec()
    model = Model(spec, seed=0)
    x = windows(spec, 1, seed=1)
    explanation = explain(model, x, "gradient")
    path = tmp_path / "hr.png"

    assert plot_explanation(explanation, x, spec, path) == 1

    png_size(path)
    assert path.stat().st_size > 20_000
    title = drawn["titles"][0]
    assert title == f"window 0: {explanation.outputs[0]:.1f} BPM (baseline {explanation.baseline_outputs[0]:.1f})"
    assert "attribution to BPM" in drawn["texts"]
    assert set(spec.channels) <= set(drawn["texts"])


def test_more_than_six_windows_shows_the_first_six(tmp_path, drawn):
    spec = activity_spec()
    x = windows(spec, MAX_WINDOWS + 1, seed=2)
    explanation = explain(Model(spec, seed=0), x, "gradient")
    path = tmp_path / "many.png"

    assert plot_explanation(explanation, x, spec, path) == 6

    png_size(path)
    assert f"first 6 of {MAX_WINDOWS + 1} windows" in drawn["heading"].replace("\n", " ")
    assert [t.split(":")[0] for t in drawn["titles"]] == [f"window {i}" for i in range(6)]


def test_without_a_spec_uses_sample_indices_and_generic_outputs(tmp_path, drawn):
    spec = activity_spec()
    x = windows(spec, 1, seed=3)
    explanation = explain(Model(spec, seed=0), x, "occlusion")
    path = tmp_path / "exported.png"

    assert plot_explanation(explanation, x, None, path) == 1

    png_size(path)
    target = int(explanation.targets[0])
    assert drawn["titles"][0].replace("\n", " ").startswith(
        f"window 0: output {explanation.outputs[0]:.2f} for class {target}")
    assert "occlusion, patches of 8 samples" in drawn["heading"].replace("\n", " ")
    assert "sample" in drawn["texts"] and "time (s)" not in drawn["texts"]
    assert f"attribution to output {target}" in drawn["texts"]
    assert set(explanation.channels) <= set(drawn["texts"])


def test_windows_that_do_not_match_the_explanation_are_refused(tmp_path):
    spec = heart_rate_spec()
    x = windows(spec, 2, seed=4)
    explanation = explain(Model(spec, seed=0), x, "gradient")
    path = tmp_path / "bad.png"
    with pytest.raises(InputError, match="shape"):
        plot_explanation(explanation, x[:1], spec, path)
    assert not path.exists()
