"""The edge runtime: one gateway's MQTT session, stream ingestion, fine-tuning and outbox.

An :class:`EdgeClient` is what runs on a gateway (``wearfl edge``), and, many at a time in
one event loop, what ``wearfl simulate`` runs (:func:`run_edges`). It

1. connects a persistent MQTT session (``clean_start=False``; its last will marks the
   client offline), publishes a retained ``status/<client>`` and subscribes to ``model``,
   ``task`` and ``receipt/<client>``;
2. verifies every ``model`` message (:func:`~models.protocol.messages.parse_model`), pinning
   the hub's public key the first time it sees one (or taking it from
   :attr:`EdgeConfig.hub_key`), refuses bad, foreign or older models and keeps the previous
   one, and stores the current one in the state directory;
3. ingests its :class:`~edge_client.sources.base.Source` in the background: preprocessing
   (:class:`~edge_client.pipeline.Preprocessor`), labels
   (:func:`~edge_client.labels.label_windows`), every k-th labelled window held out for
   federated evaluation, the rest into the replay buffer; meanwhile it runs live inference on
   the newest window and keeps the prediction for the status message;
4. for each task of a round it has not trained yet whose model version is the current
   model's: fine-tunes (:meth:`~edge_client.finetune.EdgeTrainer.fit`, which applies the
   policy, its resource hooks and the CPU budget), encodes Δ = w_local - w_base
   (:class:`~models.protocol.codec.UpdateCodec`, top-k residual kept for error feedback),
   signs it, stores it in the :class:`~edge_client.outbox.Outbox` *first* and then publishes
   it with QoS 1; evaluates the global model on the holdout and publishes ``metrics/<client>``;
5. removes an update from the outbox only on a final receipt, re-publishes everything
   pending after each (re)connect and every ``resend_interval_s``; pauses training while the
   outbox is full.

Replayed data: a source that delivers over twice as fast as real time (a recording, the
simulator without pacing) is data the gateway would have collected over that long, so training waits
until it is read (or the replay buffer is full) instead of fitting on its first minutes;
a live source (stream time keeps pace with the clock) trains as soon as the policy allows.

Concurrency: everything runs on one asyncio loop, and the CPU-heavy steps (reading and
preprocessing the source, fit, evaluate, encode, sign and store) go through
:func:`asyncio.to_thread`, so one loop hosts many edges. Per edge, one asyncio lock
serializes whatever touches the buffers (committing windows, fit, evaluate, checkpoint);
windows read while a fit runs wait in a short pending list. The session code never touches
arrays beyond encoding: learning is the :class:`~edge_client.finetune.EdgeTrainer` contract.

Restarts lose and repeat nothing: the last round trained, the top-k residual and each update
change in one outbox transaction; the replay buffer, the holdout and the stream position are
checkpointed every ``checkpoint_interval_s`` and at stop; a restart mid-round re-publishes
the pending update (same sequence, same bytes) and does not train that round again.

State directory::

    device.key            the device's Ed25519 key (load_or_create_key); with ``credentials``, the
                          folder's ``device.key`` is used instead and ``hub.pub`` comes from it
    hub.pub               the hub's public key, hex (pinned on first sight)
    model.msg             the current global model message, exactly as the hub signed it
    ledger.head           version and hash of that model's ledger entry (the next must link to it)
    outbox.sqlite3        pending updates, sequence counter, last round, residual, stream position
    replay.safetensors    the replay buffer; holdout.safetensors the held-out windows
    lock                  flock: one runtime per state directory
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_client.finetune import EdgeTrainer, FineTunePolicy, ResourceHook
from edge_client.labels import LabelledWindows, label_windows
from edge_client.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Outbox, OutboxFull, OutboxStats
from edge_client.pipeline import Preprocessor
from edge_client.replay import LABEL_SOURCES, POLICIES, ReplayBuffer
from edge_client.sources.base import UNKNOWN, Chunk, Source
from edge_client.windowing import Windows
from models.errors import BrokerUnavailable, ConfigError, InputError, ModelFormatError, WearflError
from models.files import StorageError, check_writable, write_atomic
from models.inference import NumpyPredictor, Predictor
from models.model import Model
from models.package import package_bytes
from models.protocol.codec import CodecConfig, UpdateCodec, clip_l2
from models.protocol.identity import load_or_create_key, public_hex
from models.protocol.ledger import check_entry
from models.protocol.messages import ModelMessage, Receipt, Task, UpdateMeta, build_update, parse_model
from models.protocol.signed import SigningError
from models.protocol.topics import Topics, check_name
from models.spec import ModelSpec
from models.transport.credentials import Credentials
from models.transport.mqtt import BrokerAddress, Message, MqttSession, Will

__all__ = ["EdgeClient", "EdgeConfig", "run_edges"]

log = logging.getLogger(__name__)

WeightsHook = Callable[[int, dict[str, np.ndarray], Mapping[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
"""(round, base weights, trained weights) -> the weights to send instead."""

CONNECTION_POLL_S = 0.5  # how often a connected edge checks whether its connection dropped
STATUS_MIN_SPACING_S = 1.0  # at most one event-driven status message a second
MIN_EVAL_WINDOWS = 4  # do not publish federated metrics from fewer held-out windows
SHUTDOWN_PUBLISH_S = 5.0


@dataclass(frozen=True)
class EdgeConfig:
    """Everything one edge needs; only the first four fields have no default.

    ``eval_fraction``: every ``round(1 / eval_fraction)``-th labelled window (never a
    pseudo-labelled one) is held out for federated evaluation instead of training (0: none).
    ``pseudo_threshold``: label unlabelled activity windows whose top class probability
    reaches it (None: no pseudo-labels). ``hub_key``: the hub's Ed25519 public key (64 hex
    digits) to pin; None trusts the first validly signed model (trust on first use).
    ``resume_stream``: after a restart, skip the samples already ingested (right for
    replayable sources: simulator, recordings); turn it off for live sources whose stream
    starts anew. ``chunk_samples``: samples read from the source at a time (live inference
    latency). Intervals are seconds; ``resend_interval_s`` 0 turns periodic re-publishing
    off (pending updates are still re-published after every reconnect). ``train_delay_s``:
    the mean of a random (exponential) wait before each round's training, so a fleet does
    not all train and send at once; simulations use it for gateways that come and go.
    ``credentials``: a folder from ``wearfl keys add-device`` (its username must be the
    client id): the device key, broker password, TLS certificates and the hub's key to pin.
    ``peer_keyring``: the devices' public keys (``client_id key_hex`` lines, the hub's
    keyring), which secure aggregation needs from the operator, never from the hub.
    """

    broker: str
    federation: str
    client_id: str
    state_dir: Path
    policy: FineTunePolicy = field(default_factory=FineTunePolicy)
    hooks: tuple[ResourceHook, ...] = ()
    replay_max_windows: int = 2048
    replay_max_bytes: int = 8 * 1024 * 1024
    replay_policy: str = "reservoir"
    holdout_max_windows: int = 256
    eval_fraction: float = 0.2
    window_hop_fraction: float = 0.5
    pseudo_threshold: float | None = None
    seed: int = 0
    hub_key: str | None = None
    credentials: Path | None = None
    peer_keyring: Path | None = None
    outbox_max_entries: int = DEFAULT_MAX_ENTRIES
    outbox_max_bytes: int = DEFAULT_MAX_BYTES
    chunk_samples: int = 500
    resume_stream: bool = True
    status_interval_s: float = 30.0
    resend_interval_s: float = 120.0
    checkpoint_interval_s: float = 30.0
    train_delay_s: float = 0.0
    retry_interval_s: float = 30.0
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    keepalive: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    topic_prefix: str = "wearfl/v1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_name("federation", self.federation)
        check_name("client id", self.client_id)
        if self.replay_policy not in POLICIES:
            raise ConfigError(f"unknown replay policy {self.replay_policy!r}; use one of {', '.join(POLICIES)}.")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise ConfigError(f"eval_fraction must be in [0, 0.5], got {self.eval_fraction}.")
        if self.pseudo_threshold is not None and not 0.0 < self.pseudo_threshold <= 1.0:
            raise ConfigError(f"pseudo_threshold must be in (0, 1], got {self.pseudo_threshold}.")
        if self.replay_max_windows < 1 or self.holdout_max_windows < 1 or self.chunk_samples < 1:
            raise ConfigError("replay_max_windows, holdout_max_windows and chunk_samples must be >= 1.")
        if min(self.status_interval_s, self.checkpoint_interval_s, self.retry_interval_s,
               self.connect_timeout_s, self.publish_timeout_s) <= 0 or self.resend_interval_s < 0:
            raise ConfigError("intervals and timeouts must be > 0 (resend_interval_s >= 0).")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"unknown MQTT protocol {self.protocol!r}; use 'auto', '5' or '3.1.1'.")
        if self.hub_key is not None:
            _hub_key_bytes(self.hub_key)

    @property
    def hub_key_bytes(self) -> bytes | None:
        return None if self.hub_key is None else _hub_key_bytes(self.hub_key)


def _hub_key_bytes(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"hub key {text!r} is not an Ed25519 public key; give its 64 hex digits.")
    return key


def spec_key(spec: ModelSpec) -> str:
    """What the buffered windows depend on: a new model with another key starts fresh buffers."""
    text = json.dumps([spec.task, list(spec.channels), spec.window, spec.sampling_rate_hz, list(spec.classes),
                       spec.preprocessing], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the stream: preprocessing, labels, buffers (worker-thread side) ---------------------------


@dataclass(frozen=True)
class _Batch:
    """What one read from the source produced, before it is committed to the buffers."""

    key: str
    samples: int
    train: LabelledWindows | None
    holdout: LabelledWindows | None
    labelled_after: int
    windows: int
    prediction: dict[str, Any] | None


def _skip_samples(chunks: Iterator[Chunk], n: int) -> Iterator[Chunk]:
    """``chunks`` without their first ``n`` samples (a restart resuming a replayable stream)."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        if n > 0:
            chunk = Chunk(chunk.client_id, chunk.t[n:], chunk.data[n:], chunk.channels, chunk.activity[n:],
                          chunk.hr_bpm[n:], chunk.classes)
            n = 0
        yield chunk


def _class_table(have: tuple[str, ...], want: tuple[str, ...]) -> np.ndarray | None:
    """Source class index -> model class index (UNKNOWN where the model lacks it); None when identical."""
    if tuple(have) == tuple(want):
        return None
    return np.array([want.index(c) if c in want else UNKNOWN for c in have] + [UNKNOWN], np.int16)


def _select(labelled: LabelledWindows, mask: np.ndarray) -> LabelledWindows | None:
    if not mask.any():
        return None
    return LabelledWindows(labelled.x[mask], labelled.y[mask], labelled.source[mask])


class _Ingest:
    """One model spec's view of the stream: preprocessor, replay buffer, holdout and trainer.

    :meth:`read` runs in a worker thread and changes nothing shared; :meth:`commit`,
    :meth:`save` run in a worker thread under the edge's buffer lock.
    """

    def __init__(self, spec: ModelSpec, source: Source, config: EdgeConfig, samples: int = 0) -> None:
        self.spec, self.key, self.config = spec, spec_key(spec), config
        missing = [c for c in spec.channels if c not in source.channels]
        if missing:
            raise InputError(
                f"{config.client_id}: the global model needs channels {missing}, which the source "
                f"{source.client_id!r} does not have (it has {list(source.channels)})."
            )
        hop = max(1, round(spec.window * config.window_hop_fraction))
        self.preprocessor = Preprocessor(spec, source.sampling_rate_hz, hop=hop)
        self.class_table = _class_table(tuple(source.classes), spec.classes) if spec.is_classifier else None
        self.replay = self._new_replay()
        self.holdout = self._new_holdout()
        self.every = round(1.0 / config.eval_fraction) if config.eval_fraction > 0 else 0
        self.samples = samples  # stream samples whose windows are committed
        self.labelled = 0  # labelled (non-pseudo) windows committed: drives the holdout split
        self._read_labelled = 0
        self.pending: list[_Batch] = []
        self.trainer = EdgeTrainer(spec, self.replay, config.policy, config.hooks)

    def _new_replay(self) -> ReplayBuffer:
        c = self.config
        return ReplayBuffer(self.spec.input_shape, c.replay_max_windows, c.replay_max_bytes, c.replay_policy, c.seed)

    def _new_holdout(self) -> ReplayBuffer:
        c = self.config
        return ReplayBuffer(self.spec.input_shape, c.holdout_max_windows, c.replay_max_bytes, "reservoir", c.seed + 1)

    def use_spec(self, spec: ModelSpec) -> None:
        """A new model with the same data key (e.g. another architecture): keep the windows."""
        if spec != self.spec:
            self.spec = spec
            self.trainer = EdgeTrainer(spec, self.replay, self.config.policy, self.config.hooks)

    @property
    def pending_windows(self) -> int:
        return sum(b.windows for b in self.pending)

    # -- worker thread: read ------------------------------------------------------------

    def read(self, chunks: Iterator[Chunk], predictor: Predictor | None) -> _Batch | None:
        """Read one chunk and turn it into labelled windows (None when the stream ended)."""
        chunk = next(chunks, None)
        if chunk is None:
            return None
        windows = self.preprocessor(chunk)
        if len(windows) == 0:
            return _Batch(self.key, len(chunk), None, None, self._read_labelled, 0, None)
        if self.class_table is not None:
            table = self.class_table
            windows = Windows(windows.x, table[np.where(windows.activity >= 0, windows.activity, len(table) - 1)],
                              windows.hr_bpm, windows.t_end)
        prediction = _latest_prediction(predictor, self.spec, windows) if predictor is not None else None
        labelled = label_windows(windows, self.spec, predictor, self.config.pseudo_threshold)
        if len(labelled) == 0:
            return _Batch(self.key, len(chunk), None, None, self._read_labelled, 0, prediction)
        held = np.zeros(len(labelled), bool)
        if self.every:
            real = np.flatnonzero(labelled.source != "pseudo")
            counts = self._read_labelled + np.arange(1, len(real) + 1)
            held[real[counts % self.every == 0]] = True
            self._read_labelled += len(real)
        return _Batch(self.key, len(chunk), _select(labelled, ~held), _select(labelled, held), self._read_labelled,
                      len(labelled), prediction)

    # -- worker thread, under the buffer lock: commit, save, restore --------------------

    def commit(self, batches: list[_Batch]) -> int:
        """Add batches to the buffers; returns the windows stored. Batches of an older spec only count samples."""
        stored = 0
        for b in batches:
            self.samples += b.samples
            if b.key != self.key:
                continue
            if b.train is not None:
                stored += self.replay.add(b.train.x, b.train.y, b.train.source)
            if b.holdout is not None:
                self.holdout.add(b.holdout.x, b.holdout.y, b.holdout.source)
            self.labelled = b.labelled_after
        return stored

    def save(self, state_dir: Path) -> dict[str, Any]:
        self.replay.save(state_dir / "replay.safetensors")
        self.holdout.save(state_dir / "holdout.safetensors")
        return {"key": self.key, "samples": self.samples, "labelled": self.labelled}

    def restore(self, state_dir: Path, saved: Mapping[str, Any]) -> None:
        """Take back a checkpoint written by :meth:`save` (buffers only when the data key matches)."""
        self.samples = int(saved.get("samples", 0))
        if saved.get("key") != self.key:
            log.info("%s: the checkpointed windows were cut for another model input; starting with empty buffers",
                     self.config.client_id)
            return
        replay = self._load(state_dir / "replay.safetensors", self._new_replay)
        holdout = self._load(state_dir / "holdout.safetensors", self._new_holdout)
        if replay is None or holdout is None:
            return
        self.replay, self.holdout = replay, holdout
        self.labelled = self._read_labelled = int(saved.get("labelled", 0))
        self.trainer = EdgeTrainer(self.spec, self.replay, self.config.policy, self.config.hooks)

    def _load(self, path: Path, fresh: Any) -> ReplayBuffer | None:
        if not path.exists():
            return None
        try:
            loaded = ReplayBuffer.load(path)
        except ModelFormatError as exc:
            log.warning("%s: %s", self.config.client_id, exc)
            return None
        if loaded.window_shape != self.spec.input_shape:
            return None
        target: ReplayBuffer = fresh()
        if (loaded.max_windows, loaded.max_bytes, loaded.policy) == (target.max_windows, target.max_bytes,
                                                                      target.policy):
            return loaded
        # the buffer settings changed: refill a buffer of the new settings with the old windows
        target.add(loaded.x, loaded.y, np.array(LABEL_SOURCES)[loaded.source])
        target.new_windows = min(loaded.new_windows, len(target))
        return target


def _latest_prediction(predictor: Predictor, spec: ModelSpec, windows: Windows) -> dict[str, Any]:
    """Live inference on the newest window: the class and its probability, or the BPM."""
    out = predictor.predict(windows.x[-1:])
    t = float(windows.t_end[-1])
    if spec.is_classifier:
        i = int(np.argmax(out[0]))
        return {"activity": spec.classes[i], "confidence": round(float(out[0][i]), 4), "t": t}
    return {"bpm": round(float(out[0]), 1), "t": t}


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | float | np.floating | np.integer) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 the latter can swallow
    a cancellation that arrives as the event fires, and a stopping edge would hang.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class _StateDirLock:
    """An exclusive ``flock`` on ``state_dir/lock``: two runtimes on one state directory would corrupt it."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise ConfigError(
                f"the state directory {state_dir} is in use by another edge runtime; stop it or use another --state."
            ) from None

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


# -- the edge ------------------------------------------------------------------------------------


class EdgeClient:
    """One gateway: see the module docstring. ``run(stop)`` once; read the attributes for status."""

    def __init__(self, config: EdgeConfig, source: Source) -> None:
        self.config = config
        self.source = source
        self.client_id = config.client_id
        self.topics = Topics(config.federation, config.topic_prefix)
        self.model: ModelMessage | None = None
        self.task: Task | None = None
        self.last_round = -1
        self.outbox: Outbox | None = None
        self.latest_prediction: dict[str, Any] | None = None
        self.training_state = "waiting for a model"
        self.source_ended = False
        self._train_due: dict[int, float] = {}
        self._stop_wake = asyncio.Event()
        self.weights_hook: WeightsHook | None = None
        """Simulation seam: turns each round's trained weights into others (the attack harness)."""
        self.counters = {"updates_built": 0, "updates_published": 0, "receipts_accepted": 0,
                         "receipts_duplicate": 0, "receipts_rejected": 0, "models_accepted": 0,
                         "models_refused": 0, "rounds_skipped": 0, "metrics_published": 0}
        self._session: MqttSession | None = None
        self._ingest: _Ingest | None = None
        self._predictor: Predictor | None = None
        self._pinned: bytes | None = None
        self._key: Any = None
        self._stats: OutboxStats | None = None
        self._last_sent: dict[int, float] = {}
        self._sending: set[int] = set()
        self._sent_on: dict[int, int] = {}
        self._evaluated: tuple[int, int] | None = None
        self._dirty = False
        self._stopping = False
        self._ran = False
        self._logged: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._eval_wake = asyncio.Event()
        self._status_wake = asyncio.Event()
        self._have_model = asyncio.Event()
        self._catching_up = False
        self._fit: asyncio.Future[tuple[dict[str, Any], int, dict[str, Any]]] | None = None
        self._fit_undo: tuple[_Ingest, int] | None = None  # set while a fit has not reached the outbox
        self._creds: Credentials | None = None  # the credentials folder, read with the state
        self._secure: Any = None  # the SecureParticipant of the current secure round
        self._secure_config: Any = None  # the task's secagg entry it was made for
        self._secure_delta: tuple[int, np.ndarray] | None = None  # (round, flat delta) kept for a re-run

    def __repr__(self) -> str:
        return f"EdgeClient({self.client_id!r}, federation={self.config.federation!r})"

    @property
    def model_version(self) -> int | None:
        return None if self.model is None else self.model.model.version

    @property
    def outbox_stats(self) -> OutboxStats | None:
        return self._stats

    @property
    def replay_windows(self) -> int:
        return 0 if self._ingest is None else len(self._ingest.replay)

    @property
    def holdout_windows(self) -> int:
        return 0 if self._ingest is None else len(self._ingest.holdout)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then publish status offline, checkpoint and disconnect.

        Raises ConfigError (state directory in use, bad settings), BrokerUnavailable (no
        broker within ``connect_timeout_s`` at start), StorageError (the state directory is
        read-only, or its disk filled up: the outbox keeps its pending updates intact), or
        whatever error stopped a worker.
        """
        if self._ran:
            raise RuntimeError(f"{self!r} has already run; create a new EdgeClient to run again")
        self._ran = True
        cfg = self.config
        await asyncio.to_thread(check_writable, cfg.state_dir, "edge state directory")  # read-only or full: say so
        lock = _StateDirLock(cfg.state_dir)
        try:
            stored = await asyncio.to_thread(self._open_state)
            if stored is not None:
                self._install_model(*stored)
            session = self._session = MqttSession(
                self._broker_address(), f"wearfl-edge-{cfg.federation}-{self.client_id}",
                clean_start=False, session_expiry_s=cfg.session_expiry_s,
                will=Will(self.topics.status(self.client_id), self._offline_payload("connection lost", will=True), 1,
                          True),
                manual_ack=True, protocol=cfg.protocol, keepalive=cfg.keepalive,
            )
            if not await self._connect_unless_stopped(session, stop):
                return
            try:
                for topic in (self.topics.model, self.topics.task, self.topics.receipt(self.client_id),
                              self.topics.secagg_down(self.client_id)):
                    await session.subscribe(topic, qos=1, timeout=cfg.connect_timeout_s)
                log.info("%s: connected to %s (MQTT %s), federation %s", self.client_id, session.address.url,
                         session.protocol, cfg.federation)
                await self._serve(stop)
            finally:
                await self._shutdown()
        finally:
            if self.outbox is not None:
                self.outbox.close()
            lock.release()

    async def _connect_unless_stopped(self, session: MqttSession, stop: asyncio.Event) -> bool:
        """Connect (BrokerUnavailable after ``connect_timeout_s``); False when ``stop`` came first."""
        connecting = asyncio.create_task(session.connect(timeout=self.config.connect_timeout_s))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([connecting, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, WearflError):
                await connecting
            with contextlib.suppress(WearflError):
                await session.abort()
            log.info("%s: stopped before the broker answered", self.client_id)
            return False
        connecting.result()  # BrokerUnavailable when no attempt succeeded in time
        return True

    def _open_state(self) -> tuple[ModelMessage, _Ingest | None] | None:
        """Key, outbox, pinned hub key, stored model and checkpointed buffers (worker thread)."""
        cfg, state = self.config, self.config.state_dir
        creds = self._creds = self._credentials()
        self._key = creds.signing_key() if creds is not None else load_or_create_key(state / "device.key")
        self.outbox = Outbox(state, max_entries=cfg.outbox_max_entries, max_bytes=cfg.outbox_max_bytes)
        self._stats = self.outbox.stats()
        raw = self.outbox.get("last_round")
        self.last_round = int(raw) if raw else -1
        pin_path = state / "hub.pub"
        stored_pin = None
        if pin_path.exists():
            try:
                stored_pin = _hub_key_bytes(pin_path.read_text())
            except ConfigError as exc:
                raise ConfigError(f"{pin_path}: {exc} Restore it, or remove it to trust the next model.") from None
        from_creds = _hub_key_bytes(creds.hub_public_key) if creds is not None and creds.hub_public_key else None
        self._pinned = cfg.hub_key_bytes or from_creds or stored_pin
        if self._pinned is not None and self._pinned != stored_pin:
            write_atomic(pin_path, (self._pinned.hex() + "\n").encode())
        if self._stats.entries:
            log.info("%s: %d update(s) pending in the outbox from before the restart", self.client_id,
                     self._stats.entries)
        model_path = state / "model.msg"
        if not model_path.exists():
            return None
        try:
            message = parse_model(model_path.read_bytes(), self._pinned)
            return message, self._prepare_ingest(message.model.spec, None)
        except (SigningError, WearflError) as exc:
            log.warning("%s: the stored model %s is unusable (%s); waiting for the hub's", self.client_id,
                        model_path, exc)
            return None

    def _credentials(self) -> Credentials | None:
        """The ``credentials`` folder, read and checked against the client id (None without one)."""
        cfg = self.config
        if cfg.credentials is None:
            return None
        creds = Credentials.load(cfg.credentials, "device")
        if creds.username != self.client_id:
            raise ConfigError(f"the credentials in {cfg.credentials} are device {creds.username!r}'s, not "
                              f"{self.client_id!r}'s; use that client id or that device's folder.")
        return creds

    def _broker_address(self) -> BrokerAddress:
        """The broker URL, with the credentials' password and TLS certificates (read by :meth:`_open_state`)."""
        address = BrokerAddress.parse(self.config.broker)
        return self._creds.apply(address) if self._creds is not None else address

    async def _serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failure: asyncio.Future[BaseException] = loop.create_future()

        def worker_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and not failure.done():
                failure.set_result(task.exception())  # type: ignore[arg-type]

        workers = [
            asyncio.create_task(coro, name=f"edge-{self.client_id}-{coro.__name__}")
            for coro in (self._message_loop(), self._connection_loop(), self._ingest_loop(), self._train_loop(),
                         self._eval_loop(), self._status_loop(), self._resend_loop(), self._checkpoint_loop())
        ]
        for task in workers:
            task.add_done_callback(worker_done)
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopped, failure], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stopping = True
            self._stop_wake.set()
            stopped.cancel()
            for task in workers:
                task.cancel()
            self._close_source()
            await asyncio.gather(*workers, stopped, return_exceptions=True)
        if failure.done():
            exc = failure.result()
            log.error("%s: stopping after an error: %s", self.client_id, exc)
            raise exc

    async def _discard_running_fit(self) -> None:
        """Let a fit in flight finish, then give its windows back as new: the next start trains that round."""
        fit = self._fit
        if fit is not None and not fit.done():
            log.info("%s: waiting for the running fine-tuning to end (its result is discarded)", self.client_id)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.policy.cpu_seconds + 30.0):
                    await asyncio.shield(fit)
        self._undo_fit()

    def _undo_fit(self) -> None:
        """Count the windows of a fit whose update was not stored as new again."""
        if self._fit_undo is not None:
            ingest, new_windows = self._fit_undo
            ingest.replay.new_windows = max(ingest.replay.new_windows, new_windows)
            self._fit_undo = None
            self._dirty = True

    def _close_source(self) -> None:
        """Live sources (PushSource) block while waiting for samples: closing them ends that read."""
        close = getattr(self.source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    async def _shutdown(self) -> None:
        self._stopping = True
        await self._discard_running_fit()
        try:
            await self._checkpoint()
        except StorageError as exc:  # the disk is full or read-only: the error that stops the edge says so
            log.error("%s: could not checkpoint the buffers at stop: %s", self.client_id, exc)
        except Exception:
            log.exception("%s: could not checkpoint the buffers at stop", self.client_id)
        session = self._session
        if session is None:
            return
        if session.connected:
            with contextlib.suppress(BrokerUnavailable):
                await session.publish(self.topics.status(self.client_id), self._offline_payload("stopped"), qos=1,
                                      retain=True, timeout=SHUTDOWN_PUBLISH_S)
        await session.disconnect()
        log.info("%s: stopped (%d update(s) pending in the outbox)", self.client_id,
                 self._stats.entries if self._stats else 0)

    # -- MQTT in -------------------------------------------------------------------------------

    async def _message_loop(self) -> None:
        session = self._require_session()
        receipt_topic = self.topics.receipt(self.client_id)
        secagg_topic = self.topics.secagg_down(self.client_id)
        async for message in session.messages():
            try:
                if message.topic == self.topics.model:
                    await self._on_model(message)
                elif message.topic == self.topics.task:
                    await self._on_task(message)
                elif message.topic == receipt_topic:
                    await self._on_receipt(message)
                elif message.topic == secagg_topic:
                    await self._on_secagg(message.payload)
                else:
                    log.debug("%s: ignoring a message on %s", self.client_id, message.topic)
            except StorageError:
                raise  # the state directory refused a write: stop the edge; the message is redelivered
            except Exception:
                log.exception("%s: handling a message on %s failed", self.client_id, message.topic)
            session.ack(message)  # after handling (and persisting); not on cancellation: then it is redelivered

    async def _on_model(self, message: Message) -> None:
        if not message.payload:
            log.debug("%s: the retained model was cleared", self.client_id)
            return
        current = self.model
        try:
            parsed = await asyncio.to_thread(parse_model, message.payload, self._pinned)
        except (SigningError, WearflError) as exc:
            self.counters["models_refused"] += 1
            log.warning("%s: refused a model message of %d bytes (%s); keeping model v%s", self.client_id,
                        len(message.payload), exc, self.model_version)
            return
        if current is not None and parsed.hash == current.hash:
            return  # the retained model again (re-subscription, redelivery)
        if current is not None and parsed.model.version <= current.model.version:
            self.counters["models_refused"] += 1
            log.warning("%s: refused model v%d: not newer than the current v%d", self.client_id,
                        parsed.model.version, current.model.version)
            return
        state = self.config.state_dir
        refusal = await asyncio.to_thread(self._check_ledger, parsed)
        if refusal:
            self.counters["models_refused"] += 1
            log.warning("%s: refused model v%d: %s; keeping model v%s", self.client_id, parsed.model.version,
                        refusal, self.model_version)
            return
        if self._pinned is None:
            self._pinned = parsed.public_key
            await asyncio.to_thread(write_atomic, state / "hub.pub", (parsed.public_key.hex() + "\n").encode())
            log.info("%s: pinned the hub's key %s (first model seen)", self.client_id, parsed.public_key.hex())
        try:
            fresh = await asyncio.to_thread(self._prepare_ingest, parsed.model.spec, self._ingest)
        except WearflError as exc:
            self.counters["models_refused"] += 1
            log.error("%s: cannot use model v%d: %s", self.client_id, parsed.model.version, exc)
            return
        saving = f"saving the hub's model v{parsed.model.version}"
        await asyncio.to_thread(write_atomic, state / "model.msg", message.payload, doing=saving)
        if parsed.ledger is not None:
            head = {"version": parsed.model.version, "hash": parsed.ledger["hash"]}
            await asyncio.to_thread(write_atomic, state / "ledger.head", json.dumps(head).encode(), doing=saving)
        self._install_model(parsed, fresh)
        self.counters["models_accepted"] += 1
        log.info("%s: model v%d (round %d) accepted", self.client_id, parsed.model.version, parsed.round)
        self._wake.set()
        self._eval_wake.set()
        self._status_wake.set()

    def _check_ledger(self, parsed: ModelMessage) -> str | None:
        """(worker thread) Why the model's ledger entry fails, or None; a model without one passes."""
        if parsed.ledger is None:
            return None
        try:
            previous = json.loads((self.config.state_dir / "ledger.head").read_text())
        except (OSError, ValueError):
            previous = None
        digest = hashlib.sha256(package_bytes(parsed.model)).hexdigest()
        return check_entry(parsed.ledger, int(parsed.model.version), digest,
                           previous if isinstance(previous, dict) else None)

    def _prepare_ingest(self, spec: ModelSpec, current: _Ingest | None) -> _Ingest | None:
        """(worker thread) A new stream view when ``spec`` takes another input than ``current``, else None.

        The first one takes back the checkpointed buffers and stream position.
        """
        if current is not None and current.key == spec_key(spec):
            return None
        fresh = _Ingest(spec, self.source, self.config)
        if current is None and self.outbox is not None:
            saved = self.outbox.get("ingest")
            if saved:
                fresh.restore(self.config.state_dir, json.loads(saved))
        return fresh

    def _install_model(self, message: ModelMessage, fresh: _Ingest | None) -> None:
        """Make ``message`` the current model (on the loop); ``fresh`` replaces the stream view."""
        old = self._ingest
        if fresh is not None:
            if old is not None:
                log.info("%s: model v%d takes another input; starting with empty buffers", self.client_id,
                         message.model.version)
                fresh.samples, fresh.pending, old.pending = old.samples, old.pending, []
            self._ingest = fresh
        elif old is not None:
            old.use_spec(message.model.spec)
        self.model = message
        self._predictor = NumpyPredictor(message.model)
        self._have_model.set()

    async def _on_task(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            task = Task.from_bytes(message.payload)
        except SigningError as exc:
            log.warning("%s: ignoring a malformed task (%s)", self.client_id, exc)
            return
        if task == self.task:
            if not message.retain:
                await self._republish_pending(again=True)
            return
        self.task = task
        log.info("%s: task for round %d on model v%d", self.client_id, task.round, task.model_version)
        self._wake.set()

    async def _on_receipt(self, message: Message) -> None:
        try:
            receipt = Receipt.from_bytes(message.payload)
        except SigningError as exc:
            log.warning("%s: ignoring a malformed receipt (%s)", self.client_id, exc)
            return
        if receipt.client != self.client_id:
            log.warning("%s: ignoring a receipt addressed to %r", self.client_id, receipt.client)
            return
        if self._pinned is not None and not receipt.verify(self._pinned):
            # only the hub may say an update is stored: a forged receipt must not empty the outbox
            log.warning("%s: ignoring a receipt for update %d that the hub did not sign", self.client_id,
                        receipt.sequence)
            return
        if not receipt.final:
            return
        outbox = self._require_outbox()
        removed = await asyncio.to_thread(outbox.remove, receipt.sequence)
        self._last_sent.pop(receipt.sequence, None)
        self._sent_on.pop(receipt.sequence, None)
        self._stats = await asyncio.to_thread(outbox.stats)
        self.counters[f"receipts_{receipt.status}"] = self.counters.get(f"receipts_{receipt.status}", 0) + 1
        if receipt.status == "rejected" and receipt.reason == "replayed":
            # a re-send after its round closed (the first receipt was lost): the hub holds that sequence number
            log.info("%s: the hub already holds sequence %d (%s)", self.client_id, receipt.sequence, receipt.detail)
        elif receipt.status == "rejected":
            log.warning("%s: the hub rejected update %d (round %s): %s%s", self.client_id, receipt.sequence,
                        receipt.round, receipt.reason, f" ({receipt.detail})" if receipt.detail else "")
        else:
            log.info("%s: update %d %s by the hub%s", self.client_id, receipt.sequence, receipt.status,
                     "" if removed else " (already gone from the outbox)")
        self._wake.set()  # room in the outbox
        self._status_wake.set()

    # -- MQTT out ------------------------------------------------------------------------------

    def _offline_payload(self, reason: str, will: bool = False) -> bytes:
        body: dict[str, Any] = {"state": "offline", "client": self.client_id, "reason": reason}
        if not will:  # the will is fixed at connect time: a timestamp there would mislead
            body["timestamp"] = time.time()
        if self._stats is not None and not will:
            body["outbox"] = self._stats.as_dict()
        return json.dumps(body, sort_keys=True).encode()

    def status(self) -> dict[str, Any]:
        """The retained ``status/<client>`` message: presence, model, outbox, training, live prediction."""
        ingest = self._ingest
        return {
            "state": "online",
            "client": self.client_id,
            "timestamp": time.time(),
            "public_key": public_hex(self._key) if self._key is not None else None,
            "model_version": self.model_version,
            "last_round": self.last_round,
            "training": self.training_state,
            "outbox": self._stats.as_dict() if self._stats is not None else None,
            "windows": None if ingest is None else {
                "replay": len(ingest.replay), "holdout": len(ingest.holdout), "new": ingest.replay.new_windows},
            "source": {"samples": 0 if ingest is None else ingest.samples, "ended": self.source_ended},
            "prediction": self.latest_prediction,
            "counters": dict(self.counters),
        }

    async def _publish_json(self, topic: str, body: Mapping[str, Any], retain: bool = False) -> bool:
        try:
            await self._require_session().publish(topic, json.dumps(body, sort_keys=True).encode(), qos=1,
                                                   retain=retain, timeout=self.config.publish_timeout_s)
        except BrokerUnavailable as exc:
            log.debug("%s: publishing on %s failed (%s)", self.client_id, topic, exc)
            return False
        return True

    async def _publish_status(self) -> None:
        await self._publish_json(self.topics.status(self.client_id), self.status(), retain=True)

    async def _send(self, sequence: int, payload: bytes, again: bool = False) -> bool:
        """Publish one update (QoS 1); it stays in the outbox whatever happens here.

        Once per connection: a copy already on its way, or acknowledged on the current
        connection, is not sent again unless ``again`` (the periodic re-send).
        """
        session = self._require_session()
        if sequence in self._sending or (not again and self._sent_on.get(sequence) == session.connection):
            return True
        self._sending.add(sequence)
        self._last_sent[sequence] = asyncio.get_running_loop().time()
        try:
            await session.publish(self.topics.update(self.client_id), payload, qos=1,
                                  timeout=self.config.publish_timeout_s)
        except BrokerUnavailable as exc:
            log.info("%s: update %d not acknowledged by the broker yet (%s); it stays in the outbox",
                     self.client_id, sequence, exc)
            return False
        finally:
            self._sending.discard(sequence)
        self._sent_on[sequence] = session.connection
        self.counters["updates_published"] += 1
        try:
            await asyncio.to_thread(self._require_outbox().mark_published, sequence)
        except StorageError as exc:  # only a count for status and logs: a full disk stops the edge elsewhere
            log.warning("%s: %s", self.client_id, exc)
        log.debug("%s: update %d published", self.client_id, sequence)
        return True

    async def _republish_pending(self, again: bool = False) -> None:
        outbox = self._require_outbox()
        if self._stats is not None and self._stats.entries == 0:
            return
        pending = await asyncio.to_thread(outbox.pending)
        if pending:
            log.info("%s: re-publishing %d pending update(s)", self.client_id, len(pending))
        for entry in pending:
            if self._stopping or not await self._send(entry.sequence, entry.payload, again):
                return  # the connection dropped again: the next connection starts over

    async def _connection_loop(self) -> None:
        """After every (re)connect: status online, then every pending update again."""
        session = self._require_session()
        while not self._stopping:
            await session.connected_event.wait()
            connection = session.connection
            await self._publish_status()
            await self._republish_pending()
            while session.connected and session.connection == connection:
                await asyncio.sleep(CONNECTION_POLL_S)

    async def _status_loop(self) -> None:
        session = self._require_session()
        while not self._stopping:
            await _wait(self._status_wake, self.config.status_interval_s)
            self._status_wake.clear()
            if session.connected:
                await self._publish_status()
            await asyncio.sleep(STATUS_MIN_SPACING_S)

    async def _resend_loop(self) -> None:
        """Pending updates without a receipt for ``resend_interval_s`` are published again (the hub dedups)."""
        interval = self.config.resend_interval_s
        if interval <= 0:
            return
        loop = asyncio.get_running_loop()
        session = self._require_session()
        while not self._stopping:
            await asyncio.sleep(max(1.0, interval / 4))
            if not session.connected or self._stats is None or self._stats.entries == 0:
                continue
            for entry in await asyncio.to_thread(self._require_outbox().pending):
                due = loop.time() - self._last_sent.get(entry.sequence, -math.inf) >= interval
                if self._stopping or (due and not await self._send(entry.sequence, entry.payload, again=True)):
                    break

    # -- the stream ------------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        await self._have_model.wait()
        ingest = self._ingest
        assert ingest is not None
        skip = ingest.samples if self.config.resume_stream else 0
        chunks = self.source.chunks(self.config.chunk_samples)
        if skip:
            log.info("%s: resuming the stream after %d samples", self.client_id, skip)
            chunks = _skip_samples(chunks, skip)
        else:
            ingest.samples = 0
        loop = asyncio.get_running_loop()
        started, read_s = loop.time(), 0.0
        self._catching_up = True  # until the stream shows that it keeps pace with the clock
        rate = float(self.source.sampling_rate_hz)
        while not self._stopping:
            ingest = self._ingest
            assert ingest is not None
            batch = await asyncio.to_thread(ingest.read, chunks, self._predictor)
            if batch is None:
                break
            if batch.prediction is not None:
                self.latest_prediction = batch.prediction
            read_s += batch.samples / rate
            # over twice as fast as real time: replayed data (a recording, the simulator) that training waits for
            self._catching_up = read_s > 2.0 * (loop.time() - started) + 1.0
            current = self._ingest
            assert current is not None
            current.pending.append(batch)
            # commit now unless a fit holds the buffers; wait for it once enough windows are pending
            if not self._lock.locked() or current.pending_windows >= current.replay.capacity:
                await self._commit()
        self._catching_up = False
        await self._commit()
        self.source_ended = True
        self._wake.set()  # training and evaluation may have waited for the rest of the stream
        self._eval_wake.set()
        log.info("%s: the source ended after %d samples", self.client_id, self._ingest.samples if self._ingest else 0)
        self._status_wake.set()

    async def _commit(self) -> None:
        """Pending windows into the buffers (under the buffer lock, in a worker thread)."""
        async with self._lock:
            ingest = self._ingest
            if ingest is None or not ingest.pending:
                return
            batches, ingest.pending = ingest.pending, []
            stored = await asyncio.to_thread(ingest.commit, batches)
            self._dirty = True
        if stored:
            self._wake.set()
        if (self.model is not None and not self._catching_up and len(ingest.holdout) >= MIN_EVAL_WINDOWS
                and (self._evaluated is None or self._evaluated[0] != self.model_version)):
            self._eval_wake.set()

    async def _checkpoint_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Replay buffer, holdout and stream position to the state directory."""
        if not self._dirty or self._ingest is None or self.outbox is None:
            return
        async with self._lock:
            ingest = self._ingest
            state = await asyncio.to_thread(ingest.save, self.config.state_dir)
            await asyncio.to_thread(self.outbox.put, "ingest", json.dumps(state).encode())
            self._dirty = False
        log.debug("%s: checkpointed %d + %d windows at sample %d", self.client_id, len(ingest.replay),
                  len(ingest.holdout), ingest.samples)

    # -- training --------------------------------------------------------------------------------

    async def _train_loop(self) -> None:
        while not self._stopping:
            await _wait(self._wake, self.config.retry_interval_s)
            self._wake.clear()
            try:
                await self._maybe_train()
            except (ConfigError, InputError, ModelFormatError) as exc:
                task = self.task
                self._note(f"error:{task.round if task else None}:{exc}", logging.ERROR,
                           "%s: cannot train round %s: %s", self.client_id, task.round if task else None, exc)

    def _note(self, key: str, level: int, msg: str, *args: Any) -> None:
        """Log a message once per key (a waiting edge re-checks often; the log says it once)."""
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    def _set_state(self, state: str) -> None:
        if state != self.training_state:
            self.training_state = state
            self._status_wake.set()

    async def _delay(self, round_number: int) -> bool:
        """Wait out this round's random start delay; False when a stop or a newer task came first."""
        if self.config.train_delay_s <= 0:
            return True
        wait = np.random.default_rng([self.config.seed, round_number, 17]).exponential(self.config.train_delay_s)
        due = self._train_due.setdefault(round_number, time.monotonic() + float(wait))
        while (left := due - time.monotonic()) > 0:
            self._set_state(f"waiting {left:.0f} s before round {round_number}")
            await _wait(self._stop_wake, left)
            if self._stopping or self.task is None or self.task.round != round_number:
                return False
        return True

    async def _maybe_train(self) -> None:
        task, current, ingest = self.task, self.model, self._ingest
        if task is None or current is None or ingest is None or self._stopping:
            return
        if task.round <= self.last_round:
            await self._maybe_rejoin_secure(task)
            return
        if not task.selects(self.client_id):
            self._set_state(f"not selected for round {task.round}")
            return
        version = current.model.version
        if task.model_version != version:
            self._set_state(f"waiting for model v{task.model_version}")
            return
        if self._stats is not None and self._stats.full:
            self._set_state("paused: outbox full")
            self._note(f"full:{task.round}", logging.WARNING,
                       "%s: the outbox is full (%d updates, %d bytes); training paused until receipts arrive",
                       self.client_id, self._stats.entries, self._stats.bytes)
            return
        policy = self.config.policy.with_overrides(task.config)
        if self._catching_up and len(ingest.replay) < ingest.replay.capacity:
            self._set_state("waiting: reading the stream")
            return  # replayed data arrives faster than real time: read it before training on a part of it
        reason = "no windows yet" if len(ingest.replay) == 0 else ingest.trainer.veto(policy)
        if reason:
            self._set_state(f"waiting: {reason}")
            self._note(f"veto:{task.round}:{reason.split(' ')[-1]}", logging.INFO,
                       "%s: not training round %d yet: %s", self.client_id, task.round, reason)
            return
        if not await self._delay(task.round):
            return
        config = dict(task.config)
        config.setdefault("seed", policy.train.seed + task.round)
        codec = CodecConfig.from_task(config)
        self._set_state(f"training round {task.round}")
        async with self._lock:
            if self._ingest is not ingest:
                return  # the model's input changed meanwhile
            if ingest.pending:
                batches, ingest.pending = ingest.pending, []
                await asyncio.to_thread(ingest.commit, batches)
            base = current.model.network.state_dict()
            # shielded: a stop lets the fit finish (a thread cannot be interrupted), then undoes it
            self._fit_undo = (ingest, ingest.replay.new_windows)
            self._fit = asyncio.ensure_future(asyncio.to_thread(ingest.trainer.fit, base, config))
            try:
                weights, n, metrics = await asyncio.shield(self._fit)
            except Exception:
                self._fit_undo = None  # a failed fit consumed nothing
                raise
            self._dirty = True
            if self._stopping:
                return  # discarded (_shutdown puts the windows back): the next start trains this round
            if metrics.get("skipped") or n < 1:
                self._fit_undo = None  # vetoed: the fit consumed nothing
                self.counters["rounds_skipped"] += 1
                self._set_state(f"skipped round {task.round}: {metrics.get('skipped', 'no examples')}")
                log.info("%s: round %d skipped: %s", self.client_id, task.round, metrics.get("skipped"))
                return
            trained = weights
            if self.weights_hook is not None:
                weights = await self.weights_hook(task.round, base, weights)
            if "secagg" in task.config:
                self._fit_undo = None
                await self._join_secure(task, base, weights)
                return
            sequence: int | None = None
            try:
                sequence, payload = await self._store_update(task, current, base, weights, n, metrics, codec)
            finally:
                if sequence is not None:
                    self._fit_undo = None
                elif not self._stopping:
                    self._undo_fit()  # not stored (outbox full): the windows count as new for the next attempt
        if sequence is None or payload is None:
            return
        if self.model is current:  # live inference on the personalized weights until the next model
            local = Model(current.model.spec, version=version)
            local.network.load_state_dict(trained)
            self._predictor = NumpyPredictor(local)
        self._set_state("idle")
        log.info("%s: round %d trained on %d examples (loss %.4f); update %d, %d bytes", self.client_id, task.round,
                 n, float(metrics.get("train_loss", float("nan"))), sequence, len(payload))
        await self._evaluate_and_publish(current, trained, task.round)  # the round's metrics before its update
        await self._send(sequence, payload)

    async def _join_secure(self, task: Task, base: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> None:
        """Take part in the task's secure round with this delta (kept for a re-run of the round)."""
        codec = UpdateCodec.for_weights(base)
        delta = codec.flatten({k: np.asarray(weights[k], np.float32) - base[k] for k in base})
        delta = clip_l2(delta, CodecConfig.from_task(task.config).update_clip)  # DP's clip, before noise
        outbox = self._require_outbox()
        await asyncio.to_thread(outbox.put, "last_round", str(task.round).encode())
        self.last_round = task.round
        self._secure_delta = (task.round, delta)
        self._set_state("idle")
        await self._start_secure(task)

    async def _maybe_rejoin_secure(self, task: Task) -> None:
        """A secure round of a round already trained, run again (after an abort): join with the kept delta."""
        kept = self._secure_delta
        if kept is None or kept[0] != task.round or "secagg" not in task.config:
            return
        if task.config.get("secagg") == self._secure_config:
            return  # this secure round is joined (or was refused) already
        await self._start_secure(task)

    async def _start_secure(self, task: Task) -> None:
        from edge_client.secure_aggregation import SecureParticipant, round_config_of
        from models.protocol.identity import load_keyring
        from models.protocol.secagg import SecAggError

        kept = self._secure_delta
        assert kept is not None
        self._secure, self._secure_config = None, task.config.get("secagg")
        if self.config.peer_keyring is None:
            log.warning("%s: round %d uses secure aggregation, but this edge has no peer keyring; it sits out",
                        self.client_id, task.round)
            return
        try:
            config = round_config_of(task.config)
            if config is None or self.client_id not in config.roster:
                return
            directory = load_keyring(self.config.peer_keyring)
            participant = SecureParticipant(self.client_id, config, self._key, directory, kept[1],
                                            np.random.default_rng(),
                                            float(task.config.get("dp_noise_share", 0.0) or 0.0))
            first = participant.start()
        except (SecAggError, WearflError) as exc:
            log.warning("%s: cannot take part in the secure round of round %d: %s", self.client_id, task.round, exc)
            return
        self._secure = participant
        log.info("%s: secure round %s: %d clients, threshold %d", self.client_id, config.round_id, config.n,
                 config.threshold)
        await self._require_session().publish(self.topics.secagg_up(self.client_id), first, qos=1)

    async def _on_secagg(self, payload: bytes) -> None:
        from models.protocol.secagg import SecAggError

        participant = self._secure
        if participant is None or participant.done:
            return
        try:
            reply = await asyncio.to_thread(participant.answer, payload)
        except SecAggError as exc:
            log.warning("%s: secure round %s: %s", self.client_id, participant.round_id, exc)
            return
        await self._require_session().publish(self.topics.secagg_up(self.client_id), reply, qos=1)
        if participant.client.stage.name == "DONE":
            self.counters["secure_rounds"] = self.counters.get("secure_rounds", 0) + 1

    async def _store_update(
        self, task: Task, current: ModelMessage, base: dict[str, np.ndarray], weights: Mapping[str, np.ndarray],
        n: int, metrics: Mapping[str, Any], codec_cfg: CodecConfig,
    ) -> tuple[int | None, bytes | None]:
        """Encode, sign and add to the outbox in one transaction with the round and residual."""
        outbox = self._require_outbox()
        codec = UpdateCodec.for_weights(base, codec_cfg)
        residual = None
        if codec_cfg.quantize == "topk":
            residual = await asyncio.to_thread(self._load_residual, codec.size)

        def encode() -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
            delta = {k: np.asarray(weights[k], np.float32) - base[k] for k in base}
            return codec.encode(delta, np.random.default_rng([self.config.seed, task.round]), residual)

        tensors, codec_meta, new_residual = await asyncio.to_thread(encode)
        built: list[bytes] = []

        def build(sequence: int) -> bytes:
            meta = UpdateMeta(client=self.client_id, round=task.round, base_version=current.model.version,
                              base_hash=current.hash, num_examples=int(n), sequence=sequence, codec=codec_meta,
                              metrics=_finite_metrics(metrics))
            built.append(build_update(meta, tensors, self._key))
            return built[-1]

        state = {"last_round": str(task.round).encode(),
                 "residual": b"" if new_residual is None else st_save({"residual": new_residual})}
        try:
            sequence = await asyncio.to_thread(outbox.add, task.round, build, state=state)
        except OutboxFull as exc:
            self._set_state("paused: outbox full")
            log.warning("%s: %s", self.client_id, exc)
            return None, None
        self.last_round = task.round
        self.counters["updates_built"] += 1
        self._stats = await asyncio.to_thread(outbox.stats)
        return sequence, built[-1]

    def _load_residual(self, size: int) -> np.ndarray | None:
        raw = self._require_outbox().get("residual")
        if not raw:
            return None
        try:
            residual = st_load(raw)["residual"]
        except Exception:  # a damaged residual only costs error feedback; never the update
            log.warning("%s: the stored top-k residual is unreadable; starting without it", self.client_id)
            return None
        return residual if residual.shape == (size,) else None

    # -- federated evaluation ----------------------------------------------------------------

    async def _eval_loop(self) -> None:
        while not self._stopping:
            await self._eval_wake.wait()
            self._eval_wake.clear()
            await self._evaluate_and_publish()

    async def _evaluate_and_publish(
        self, base: ModelMessage | None = None, local: Mapping[str, np.ndarray] | None = None,
        round_number: int | None = None,
    ) -> None:
        """Federated evaluation: a global model (and a fine-tuned one) on the held-out windows.

        Published as ``metrics/<client>``. After a fit (``base``, ``local`` and ``round_number``
        given) this runs *before* the update is published, so the hub has the round's metrics
        when the round's last update closes it; ``local_*`` metrics are this edge's fine-tuned
        weights (a measure of personalization). On a new model, ``round`` is the current
        task's round when that task is on this model, else the round that produced the model.
        """
        current, ingest = base or self.model, self._ingest
        if current is None or ingest is None or self._catching_up:
            return  # while replayed data streams in, the holdout is still growing: evaluate once it is read
        version = current.model.version
        task = self.task
        config = dict(task.config) if task is not None else {}
        if config.get("evaluate") is False:
            return  # the hub asks for federated evaluation only every few rounds
        async with self._lock:
            if self._ingest is not ingest or len(ingest.holdout) < MIN_EVAL_WINDOWS:
                return
            size = len(ingest.holdout)
            if self._evaluated == (version, size) and local is None:
                return
            ingest.trainer.holdout = (ingest.holdout.x, ingest.holdout.y)
            loss, n, metrics = await asyncio.to_thread(ingest.trainer.evaluate, current.model.network.state_dict(),
                                                       config)
            out = {"loss": loss, **metrics}
            if local is not None:
                local_loss, _, local_metrics = await asyncio.to_thread(ingest.trainer.evaluate, local, config)
                out.update({"local_loss": local_loss, **{f"local_{k}": v for k, v in local_metrics.items()}})
        self._evaluated = (version, size)
        if round_number is None:
            task = self.task
            round_number = task.round if task is not None and task.model_version == version else current.round
        body = {"client": self.client_id, "round": round_number, "model_version": version, "num_examples": n,
                "metrics": _finite_metrics(out), "timestamp": time.time()}
        if await self._publish_json(self.topics.metrics(self.client_id), body):
            self.counters["metrics_published"] += 1
            log.debug("%s: metrics for model v%d on %d held-out windows", self.client_id, version, n)

    # -- helpers ----------------------------------------------------------------------------------

    def _require_session(self) -> MqttSession:
        if self._session is None:
            raise RuntimeError(f"{self!r} is not running")
        return self._session

    def _require_outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError(f"{self!r} is not running")
        return self.outbox


async def run_edges(
    edges: Iterable[EdgeClient | tuple[EdgeConfig, Source]],
    stop: asyncio.Event,
    *,
    connect_spread_s: float = 0.0,
) -> dict[str, BaseException]:
    """Run many edges in this event loop until ``stop`` is set; each edge is its own MQTT session.

    ``edges`` are EdgeClients or (EdgeConfig, Source) pairs. ``connect_spread_s`` spreads the
    starts over that many seconds (a thousand simultaneous CONNECTs are a storm). An edge that
    fails does not stop the others: the failures come back as ``{client_id: exception}`` (and
    are logged); every edge publishes status offline and checkpoints when stopped.
    """
    clients = [e if isinstance(e, EdgeClient) else EdgeClient(*e) for e in edges]
    seen: set[tuple[str, str]] = set()
    for c in clients:
        key = (c.config.federation, c.client_id)
        if key in seen:
            raise ConfigError(f"client id {c.client_id!r} appears twice in federation {c.config.federation!r}.")
        seen.add(key)

    async def one(i: int, client: EdgeClient) -> None:
        if connect_spread_s > 0 and len(clients) > 1:
            await _wait(stop, connect_spread_s * i / (len(clients) - 1))
            if stop.is_set():
                return
        await client.run(stop)

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)), return_exceptions=True)
    failures: dict[str, BaseException] = {}
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            failures[client.client_id] = result
            log.error("%s: edge failed: %s", client.client_id, result,
                      exc_info=None if isinstance(result, WearflError) else result)
    return failures
