"""Stream ingestion: the source, cut into windows, into the replay buffer and the holdout.

An edge ingests its :class:`~edge_client.sources.base.Source` in the background:
preprocessing (:class:`~edge_client.pipeline.Preprocessor`), labels
(:func:`~edge_client.labels.label_windows`), every k-th labelled window held out for
federated evaluation, the rest into the replay buffer; meanwhile it runs live inference on
the newest window and keeps the prediction for the status message.

Replayed data: a source that delivers over twice as fast as real time (a recording, the
simulator without pacing) is data the gateway would have collected over that long, so training waits
until it is read (or the replay buffer is full) instead of fitting on its first minutes;
a live source (stream time keeps pace with the clock) trains as soon as the policy allows.
:attr:`Ingest.catching_up` says which.

Reading and preprocessing run in a worker thread and change nothing shared
(:meth:`StreamView.read`). One asyncio lock, :attr:`Ingest.lock`, serializes whatever touches
the buffers (committing windows, fit, evaluate, checkpoint); windows read while a fit runs
wait in a short pending list. The buffers and the stream position are checkpointed every
``checkpoint_interval_s`` and at stop (``replay.safetensors``, ``holdout.safetensors`` and
the outbox's ``ingest`` state), so a restart resumes the stream where it was.

The buffers depend on the model's input (:func:`spec_key`): a model that takes another
input starts a new :class:`StreamView` with empty buffers; one with the same input (another
architecture) keeps the windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.config import EdgeConfig
from edge_client.finetune import EdgeTrainer
from edge_client.labels import LabelledWindows, label_windows
from edge_client.live_explanation import LiveExplainer
from edge_client.pipeline import Preprocessor
from edge_client.replay import LABEL_SOURCES, ReplayBuffer
from edge_client.shared import Latencies, Wakes
from edge_client.sources.base import UNKNOWN, Chunk, Source
from edge_client.windowing import Windows
from models.errors import InputError, ModelFormatError
from models.inference import NumpyPredictor, Predictor
from models.model import Model
from models.spec import ModelSpec
from models.transport.outbox import Outbox

__all__ = ["Ingest", "MissingChannels", "StreamView", "spec_key"]

log = logging.getLogger(__name__)


class MissingChannels(InputError):
    """The model needs channels the source does not have: the edge can never serve it, so it stops."""


def spec_key(spec: ModelSpec) -> str:
    """What the buffered windows depend on: a new model with another key starts fresh buffers."""
    text = json.dumps([spec.task, list(spec.channels), spec.window, spec.sampling_rate_hz, list(spec.classes),
                       spec.preprocessing], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    window: np.ndarray | None = None  # the newest window, (1, channels, samples): what the prediction saw


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


def _latest_prediction(predictor: Predictor, spec: ModelSpec, windows: Windows) -> dict[str, Any]:
    """Live inference on the newest window: the class and its probability, or the BPM, and how long it took."""
    started = time.perf_counter()
    out = predictor.predict(windows.x[-1:])
    latency = {"latency_s": round(time.perf_counter() - started, 6)}
    t = float(windows.t_end[-1])
    if spec.is_classifier:
        i = int(np.argmax(out[0]))
        prediction = {"activity": spec.classes[i], "confidence": round(float(out[0][i]), 4), "t": t, **latency}
    else:
        prediction = {"bpm": round(float(out[0]), 1), "t": t, **latency}
    return prediction


class StreamView:
    """One model spec's view of the stream: preprocessor, replay buffer, holdout and trainer.

    :meth:`read` runs in a worker thread and changes nothing shared; :meth:`commit`,
    :meth:`save` run in a worker thread under the edge's buffer lock.
    """

    def __init__(self, spec: ModelSpec, source: Source, config: EdgeConfig, samples: int = 0) -> None:
        self.spec, self.key, self.config = spec, spec_key(spec), config
        missing = [c for c in spec.channels if c not in source.channels]
        if missing:
            raise MissingChannels(
                f"{config.client_id}: the global {spec.task} model needs channels {missing}, which the source "
                f"{source.client_id!r} does not have (it has {list(source.channels)}); give this edge a source "
                f"with them, or run it in a federation whose model needs no other channels."
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
        newest = windows.x[-1:].copy() if predictor is not None else None
        labelled = label_windows(windows, self.spec, predictor, self.config.pseudo_threshold)
        if len(labelled) == 0:
            return _Batch(self.key, len(chunk), None, None, self._read_labelled, 0, prediction, newest)
        held = np.zeros(len(labelled), bool)
        if self.every:
            real = np.flatnonzero(labelled.source != "pseudo")
            counts = self._read_labelled + np.arange(1, len(real) + 1)
            held[real[counts % self.every == 0]] = True
            self._read_labelled += len(real)
        return _Batch(self.key, len(chunk), _select(labelled, ~held), _select(labelled, held), self._read_labelled,
                      len(labelled), prediction, newest)

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

    def _load(self, path: Path, fresh: Callable[[], ReplayBuffer]) -> ReplayBuffer | None:
        if not path.exists():
            return None
        try:
            loaded = ReplayBuffer.load(path)
        except ModelFormatError as exc:
            log.warning("%s: %s", self.config.client_id, exc)
            return None
        if loaded.window_shape != self.spec.input_shape:
            return None
        target = fresh()
        if (loaded.max_windows, loaded.max_bytes, loaded.policy) == (target.max_windows, target.max_bytes,
                                                                      target.policy):
            return loaded
        # the buffer settings changed: refill a buffer of the new settings with the old windows
        target.add(loaded.x, loaded.y, np.array(LABEL_SOURCES)[loaded.source])
        target.new_windows = min(loaded.new_windows, len(target))
        return target


class Ingest:
    """The edge's ingest part: the stream view of the current model, its buffer lock, the live prediction.

    ``evaluation_due`` says whether the holdout of a view is worth a federated evaluation now;
    after a commit that makes it so, :attr:`Wakes.evaluate` is set.
    """

    def __init__(self, config: EdgeConfig, source: Source, wakes: Wakes,
                 evaluation_due: Callable[[StreamView], bool]) -> None:
        self.config, self.source, self.client_id = config, source, config.client_id
        self._wakes, self._evaluation_due = wakes, evaluation_due
        self.view: StreamView | None = None
        self.predictor: Predictor | None = None  # live inference: the global model, or this edge's fine-tuned one
        self.outbox: Outbox | None = None  # keeps the stream position; set when the edge opens its state
        self.lock = asyncio.Lock()
        self._latest: tuple[dict[str, Any], np.ndarray | None, Predictor | None] | None = None
        self.inference = Latencies()  # live inference, for the gateway's /metrics
        # --explain-predictions: one budget for the edge's life, whatever models come
        self.explainer = LiveExplainer(config.explain_predictions) if config.explain_predictions > 0 else None
        self.source_ended = False
        self.catching_up = False
        self.dirty = False  # the buffers changed since the last checkpoint
        self._have_model = asyncio.Event()

    @property
    def latest_prediction(self) -> dict[str, Any] | None:
        """Live inference on the newest window (None before the first); with ``--explain-predictions``, explained
        when first read, within the budget: only the predictions a status message carries are explained."""
        if self._latest is None:
            return None
        prediction, window, predictor = self._latest
        if self.explainer is not None and window is not None:
            self.explainer.attach(prediction, window, predictor)
            self._latest = (prediction, None, predictor)  # one attempt per prediction
        return prediction

    def status(self) -> dict[str, Any]:
        """The ``windows`` and ``source`` entries of the status message."""
        view = self.view
        return {
            "windows": None if view is None else {
                "replay": len(view.replay), "holdout": len(view.holdout), "new": view.replay.new_windows},
            "source": {"samples": 0 if view is None else view.samples, "ended": self.source_ended},
        }

    # -- a new model --------------------------------------------------------------------

    def prepare(self, spec: ModelSpec) -> StreamView | None:
        """(worker thread) A new stream view when ``spec`` takes another input than the current one, else None.

        The first one takes back the checkpointed buffers and stream position.
        """
        current = self.view
        if current is not None and current.key == spec_key(spec):
            return None
        fresh = StreamView(spec, self.source, self.config)
        if current is None and self.outbox is not None:
            saved = self.outbox.get("ingest")
            if saved:
                fresh.restore(self.config.state_dir, json.loads(saved))
        return fresh

    def install(self, model: Model, fresh: StreamView | None) -> None:
        """Read for ``model`` from now on (on the loop); ``fresh``, from :meth:`prepare`, replaces the view."""
        old = self.view
        if fresh is not None:
            if old is not None:
                log.info("%s: model v%d takes another input; starting with empty buffers", self.client_id,
                         model.version)
                fresh.samples, fresh.pending, old.pending = old.samples, old.pending, []
            self.view = fresh
        elif old is not None:
            old.use_spec(model.spec)
        self.predictor = NumpyPredictor(model)
        self._have_model.set()

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Read the source (from the first model on) until it ends or the edge stops."""
        await self._have_model.wait()
        view = self.view
        assert view is not None
        skip = view.samples if self.config.resume_stream else 0
        chunks = self.source.chunks(self.config.chunk_samples)
        if skip:
            log.info("%s: resuming the stream after %d samples", self.client_id, skip)
            chunks = _skip_samples(chunks, skip)
        else:
            view.samples = 0
        loop = asyncio.get_running_loop()
        started, read_s = loop.time(), 0.0
        self.catching_up = True  # until the stream shows that it keeps pace with the clock
        rate = float(self.source.sampling_rate_hz)
        while not self._wakes.stopping:
            view = self.view
            assert view is not None
            predictor = self.predictor
            batch = await asyncio.to_thread(view.read, chunks, predictor)
            if batch is None:
                break
            if batch.prediction is not None:
                self._latest = (batch.prediction, batch.window, predictor)
                self.inference.observe(batch.prediction["latency_s"])
            read_s += batch.samples / rate
            # over twice as fast as real time: replayed data (a recording, the simulator) that training waits for
            self.catching_up = read_s > 2.0 * (loop.time() - started) + 1.0
            current = self.view
            assert current is not None
            current.pending.append(batch)
            # commit now unless a fit holds the buffers; wait for it once enough windows are pending
            if not self.lock.locked() or current.pending_windows >= current.replay.capacity:
                await self.commit()
        self.catching_up = False
        await self.commit()
        self.source_ended = True
        self._wakes.train.set()  # training and evaluation may have waited for the rest of the stream
        self._wakes.evaluate.set()
        log.info("%s: the source ended after %d samples", self.client_id, self.view.samples if self.view else 0)
        self._wakes.status.set()

    async def commit(self) -> None:
        """Pending windows into the buffers (under the buffer lock, in a worker thread)."""
        async with self.lock:
            view = self.view
            if view is None or not view.pending:
                return
            stored = await self.commit_held(view)
            self.dirty = True
        if stored:
            self._wakes.train.set()
        if not self.catching_up and self._evaluation_due(view):
            self._wakes.evaluate.set()

    @staticmethod
    async def commit_held(view: StreamView) -> int:
        """The windows read meanwhile into ``view``'s buffers; the caller holds :attr:`lock`."""
        if not view.pending:
            return 0
        batches, view.pending = view.pending, []
        return await asyncio.to_thread(view.commit, batches)

    def close_source(self) -> None:
        """Live sources (PushSource) block while waiting for samples: closing them ends that read."""
        close = getattr(self.source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()

    # -- checkpoints --------------------------------------------------------------------

    async def checkpoint_loop(self) -> None:
        while not self._wakes.stopping:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Replay buffer, holdout and stream position to the state directory."""
        if not self.dirty or self.view is None or self.outbox is None:
            return
        async with self.lock:
            view = self.view
            state = await asyncio.to_thread(view.save, self.config.state_dir)
            await asyncio.to_thread(self.outbox.put, "ingest", json.dumps(state).encode())
            self.dirty = False
        log.debug("%s: checkpointed %d + %d windows at sample %d", self.client_id, len(view.replay),
                  len(view.holdout), view.samples)
