"""Shared fixtures: small generated data, and small trained models."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from models import Model, TrainConfig, activity_spec, fit, heart_rate_spec

pytest_plugins = ["lsl_outlets"]  # the lsl_config and pylsl fixtures


def synthetic_activity(n: int, seed: int, spec=None) -> tuple[np.ndarray, np.ndarray]:
    """Windows whose class sets the frequency and amplitude of a few channels: easy to separate."""
    spec = spec or activity_spec()
    rng = np.random.default_rng(seed)
    c, t = spec.input_shape
    k = len(spec.classes)
    y = rng.integers(0, k, n)
    time = np.arange(t) / spec.sampling_rate_hz
    freq = 0.5 + 0.6 * y[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, c, 1))
    amp = (1.0 + 0.3 * ((y[:, None, None] + np.arange(c)[None, :, None]) % k)) * 0.5
    x = amp * np.sin(2 * np.pi * freq * time[None, None, :] + phase) + 0.3 * rng.standard_normal((n, c, t))
    return x.astype(np.float32), y


def synthetic_heart_rate(n: int, seed: int, spec=None) -> tuple[np.ndarray, np.ndarray]:
    """PPG-like sinusoids at the target BPM plus noise, accelerometer noise."""
    spec = spec or heart_rate_spec()
    rng = np.random.default_rng(seed)
    c, t = spec.input_shape
    bpm = rng.uniform(55, 170, n)
    time = np.arange(t) / spec.sampling_rate_hz
    x = 0.2 * rng.standard_normal((n, c, t))
    x[:, 0] += np.sin(2 * np.pi * (bpm[:, None] / 60.0) * time[None] + rng.uniform(0, 6.3, (n, 1)))
    return x.astype(np.float32), bpm.astype(np.float32)


@pytest.fixture(scope="session")
def trained_activity() -> tuple[Model, np.ndarray, np.ndarray]:
    """An activity model trained briefly on synthetic windows (BN statistics non-trivial)."""
    model = Model(activity_spec(), seed=0)
    x, y = synthetic_activity(512, seed=1)
    fit(model, x, y, TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=0))
    return model, x, y


@pytest.fixture(scope="session")
def trained_heart_rate() -> tuple[Model, np.ndarray, np.ndarray]:
    model = Model(heart_rate_spec(), seed=0)
    x, y = synthetic_heart_rate(256, seed=1)
    fit(model, x, y, TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0))
    return model, x, y


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """A broker for the whole session: real Mosquitto; amqtt only off CI when Mosquitto is missing.

    Yields a started :class:`wearfl.broker.MosquittoBroker` or ``EmbeddedBroker``
    (``.host``, ``.port``, ``.url``, ``.kind``). ``WEARFL_TEST_BROKER=amqtt`` forces the
    fallback off CI.
    """
    from wearfl.broker import EmbeddedBroker, MosquittoBroker, mosquitto_binary

    on_ci = os.environ.get("CI", "").lower() == "true"
    forced_embedded = os.environ.get("WEARFL_TEST_BROKER") == "amqtt" and not on_ci
    if mosquitto_binary() is not None and not forced_embedded:
        broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    elif on_ci:
        pytest.fail("CI=true but mosquitto is not installed: `apt-get install -y mosquitto` (see .ci/run).")
    else:
        broker = EmbeddedBroker()
    with broker:
        yield broker


@pytest.fixture
def topic_prefix(request) -> str:
    """A topic prefix of this test's own, so tests never see each other's retained messages."""
    return f"wearfl-test/{uuid.uuid4().hex[:12]}/{request.node.name[:40]}"


HAPT_HINT = (
    "UCI HAPT is not available: download 'Smartphone-Based Recognition of Human Activities and Postural "
    "Transitions' from the UCI Machine Learning Repository and set WEARFL_HAPT_DIR to its RawData folder"
)


@pytest.fixture(scope="session")
def hapt_dir():
    """The UCI HAPT RawData folder; skipped (with how to get it) when absent, an error under CI=true."""
    from pathlib import Path

    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci-hapt" / "RawData"
    path = Path(os.environ.get("WEARFL_HAPT_DIR", default))
    if (path / "labels.txt").is_file():
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{HAPT_HINT} (looked in {path}; CI=true requires it).")
    pytest.skip(f"{HAPT_HINT} (looked in {path}).")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster for the whole session (Debian's initdb and pg_ctl), stopped at the end."""
    from postgres import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database of the session's cluster."""
    return postgres_server.database()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_state(request, tmp_path) -> str:
    """Where a hub's state lives, for tests of both back-ends: a folder, or a fresh PostgreSQL database."""
    return str(tmp_path) if request.param == "sqlite" else request.getfixturevalue("postgres_url")
