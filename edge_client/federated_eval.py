"""Federated evaluation: the global model, and this edge's fine-tuned weights, on the held-out windows.

The holdout (every k-th labelled window of the stream, see :mod:`edge_client.ingest`) never
trains; the edge evaluates each new global model on it, and after each fit also its own
fine-tuned weights (``local_*``, a measure of personalization), and publishes the result as
``metrics/<client>``; with ``explain`` in the task also the global model's attribution map over the
same windows (:func:`models.attribution.attribution_map`: means per class, channel and time segment), and
with ``adapt`` the model adapted to the wearer without labels (``adapted_*``).
The hub aggregates these into the federation's metrics, so an edge
publishes nothing from fewer than :data:`MIN_EVAL_WINDOWS` windows, nor while replayed data
is still streaming in (its holdout is still growing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_client.adoption import ModelAdoption
from edge_client.ingest import Ingest, StreamView
from edge_client.shared import Link, Wakes
from edge_client.updates import finite_metrics
from models.model import Model
from models.protocol.messages import ModelMessage, Task

__all__ = ["MIN_EVAL_WINDOWS", "Evaluator", "use_adapted"]

log = logging.getLogger(__name__)

MIN_EVAL_WINDOWS = 4  # do not publish federated metrics from fewer held-out windows
ADAPT_WINDOWS = 256  # with ``adapt`` in the task: the newest replay windows the gateway adapts to, labels unread
ADAPT_MIN_WINDOWS = 32


def use_adapted(ingest: Any, global_model: Model, adapted: Model) -> bool:
    """Live inference on ``adapted`` when it runs on ``global_model`` now: never over this edge's fine-tuned
    weights (labels beat no labels), never after a newer model came. True when installed."""
    from models.inference import NumpyPredictor

    current = ingest.predictor
    if adapted is global_model or not isinstance(current, NumpyPredictor) or current.model is not global_model:
        return False
    ingest.predictor = NumpyPredictor(adapted)
    return True


class Evaluator:
    """Owns federated evaluation: what was evaluated last, and publishing ``metrics/<client>``.

    ``task`` gives the current task (its config, e.g. ``evaluate``, and its round).
    """

    def __init__(self, link: Link, ingest: Ingest, models: ModelAdoption, wakes: Wakes, counters: dict[str, int],
                 task: Callable[[], Task | None]) -> None:
        self.client_id = link.client_id
        self._link, self._ingest, self._models, self._wakes, self._counters = link, ingest, models, wakes, counters
        self._task = task
        self._evaluated: tuple[int, int] | None = None  # (model version, holdout size) last evaluated

    def due(self, view: StreamView) -> bool:
        """Whether the current model is still to be evaluated on ``view``'s holdout, which is big enough."""
        version = self._models.version
        return (version is not None and len(view.holdout) >= MIN_EVAL_WINDOWS
                and (self._evaluated is None or self._evaluated[0] != version))

    async def loop(self) -> None:
        while not self._wakes.stopping:
            await self._wakes.evaluate.wait()
            self._wakes.evaluate.clear()
            await self.evaluate_and_publish()

    def _adapted_metrics(self, view: StreamView, current: ModelMessage, config: Mapping[str, Any]) -> dict[str, float]:
        """``adapted_*``: the model this gateway uses after adapting to its wearer without labels (the replay
        buffer's newest windows, labels unread; :func:`edge_client.adaptation.adapt_for_wearer`) on the holdout.
        Where the checks keep the global model these are the global model's figures and ``adapted_kept_global``
        is 1. Live inference takes the adapted model (see :func:`use_adapted`)."""
        from edge_client.adaptation import adapt_for_wearer

        adapted, report = adapt_for_wearer(current.model, view.replay.x[-ADAPT_WINDOWS:])
        if report["kept_global"]:
            log.info("%s: model v%d not adapted to the wearer: %s %s", self.client_id, current.model.version,
                     report["reason"], report["check"] or "")
        loss, _, metrics = view.trainer.evaluate(adapted.network.state_dict(), config)
        use_adapted(self._ingest, current.model, adapted)
        return {"adapted_loss": loss, **{f"adapted_{k}": v for k, v in metrics.items()},
                "adapted_kept_global": float(report["kept_global"])}

    async def _explanation(self, current: ModelMessage, x: np.ndarray, y: np.ndarray,
                           config: Mapping[str, Any]) -> dict[str, Any] | None:
        """With ``explain`` in the task: the global model's attribution map over these held-out windows."""
        from models.attribution import attribution_map, explain_settings
        from models.errors import WearflError

        try:
            settings = explain_settings(config)
            if settings is None:
                return None
            return await asyncio.to_thread(attribution_map, current.model, x, y, *settings)
        except WearflError as exc:
            log.warning("%s: no explanation this round: %s", self.client_id, exc)
            return None

    async def evaluate_and_publish(
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
        current, ingest, view = base or self._models.model, self._ingest, self._ingest.view
        if current is None or view is None or ingest.catching_up:
            return  # while replayed data streams in, the holdout is still growing: evaluate once it is read
        version = current.model.version
        task = self._task()
        config = dict(task.config) if task is not None else {}
        if config.get("evaluate") is False:
            return  # the hub asks for federated evaluation only every few rounds
        async with ingest.lock:
            if ingest.view is not view or len(view.holdout) < MIN_EVAL_WINDOWS:
                return
            size = len(view.holdout)
            if self._evaluated == (version, size) and local is None:
                return
            view.trainer.holdout = (view.holdout.x, view.holdout.y)
            loss, n, metrics = await asyncio.to_thread(view.trainer.evaluate, current.model.network.state_dict(),
                                                       config)
            out = {"loss": loss, **metrics}
            if local is not None:
                local_loss, _, local_metrics = await asyncio.to_thread(view.trainer.evaluate, local, config)
                out.update({"local_loss": local_loss, **{f"local_{k}": v for k, v in local_metrics.items()}})
            explanation = await self._explanation(current, view.holdout.x, view.holdout.y, config)
            if config.get("adapt") is True and len(view.replay) >= ADAPT_MIN_WINDOWS:
                out.update(await asyncio.to_thread(self._adapted_metrics, view, current, config))
        self._evaluated = (version, size)
        if round_number is None:
            task = self._task()
            round_number = task.round if task is not None and task.model_version == version else current.round
        body = {"client": self.client_id, "round": round_number, "model_version": version, "num_examples": n,
                "metrics": finite_metrics(out), "timestamp": time.time()}
        if explanation is not None:
            body["explanation"] = explanation
        if await self._link.publish_json(self._link.topics.metrics(self.client_id), body):
            self._counters["metrics_published"] += 1
            log.debug("%s: metrics for model v%d on %d held-out windows", self.client_id, version, n)
