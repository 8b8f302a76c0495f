"""What the hub reports besides models: federated evaluation, personalization and the privacy spent.

Edges publish on ``metrics/<client>`` how the round's base model did on their held-out
data (and, with personalization, how their own fine-tuned weights did);
:class:`MetricsCollector` keeps the latest report of each client, and the round's
example-weighted means go into its :class:`hub.rounds.RoundSummary`. After every release
:func:`record_release` stores each client's personalization and, for a differentially
private rule, the epsilon spent so far (and per round) for ``wearfl status`` and reports.
:func:`finish_reason` says why no further round is run: the configured rounds are done,
or one more release would pass the privacy budget.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from hub.explanations import FederatedExplanations
from models.protocol.messages import parse_json
from models.protocol.signed import SigningError

if TYPE_CHECKING:
    from hub.accounting import PrivacyAccountant
    from hub.store import HubStore

__all__ = ["MetricsCollector", "budget_spent", "describe_metrics", "finish_reason", "record_release"]

log = logging.getLogger(__name__)


MAX_METRICS = 32
"""Metrics one report may carry (a task's metrics and their ``local_`` twins are a dozen)."""
MAX_METRIC_NAME = 64
MAX_METRIC_VALUE = 1e12
MAX_REPORT_EXAMPLES = 1_000_000_000


class MetricsCollector:
    """Federated-evaluation reports by round: the latest report of each client counts.

    Reports come from the network: the caller passes only those of members the open round
    expects, and :meth:`add` takes only the open round's, with bounded counts and values, so
    what is kept is one small report per expected edge.
    """

    def __init__(self) -> None:
        self._reports: dict[int, dict[str, tuple[int, dict[str, float]]]] = {}
        self._personal: dict[str, dict[str, Any]] = {}
        self.explanations = FederatedExplanations()  # the attribution maps reports carry with ``explain``

    def add(self, client: str, payload: bytes, open_round: int | None = None) -> bool:
        """Parse ``{"round", "model_version", "num_examples", "metrics": {...}}``; False when unusable.

        ``open_round``: a report for any other round is ignored."""
        try:
            d = parse_json(payload, "metrics")
            round_number, n = int(d["round"]), int(d["num_examples"])
            raw = d["metrics"]
            if not isinstance(raw, dict) or len(raw) > MAX_METRICS:
                raise ValueError(f"metrics must be an object of at most {MAX_METRICS} numbers")
            metrics = {str(k)[:MAX_METRIC_NAME]: float(v) for k, v in raw.items()}
        except (SigningError, KeyError, TypeError, ValueError, OverflowError) as exc:
            log.info("ignored metrics from %s: %s", client, exc)
            return False
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v) and abs(v) <= MAX_METRIC_VALUE}
        if not 1 <= n <= MAX_REPORT_EXAMPLES or round_number < 0:
            log.info("ignored metrics from %s: num_examples must be 1 .. %d and round >= 0", client,
                     MAX_REPORT_EXAMPLES)
            return False
        if open_round is not None and round_number != open_round:
            log.debug("ignored metrics from %s for round %d (round %d is open)", client, round_number, open_round)
            return False
        self._reports.setdefault(round_number, {})[client] = (n, metrics)
        if "explanation" in d:
            self.explanations.add(client, round_number, d["explanation"])
        personalized = {k[len("local_"):]: v for k, v in metrics.items() if k.startswith("local_")}
        adapted = {k[len("adapted_"):]: v for k, v in metrics.items() if k.startswith("adapted_")}
        if personalized or adapted:
            shown = {k: v for k, v in metrics.items() if not k.startswith(("local_", "adapted_"))}
            record = {"round": round_number, "examples": n,
                      "global": {k: v for k, v in shown.items() if k in personalized or k in adapted},
                      "personalized": personalized}
            if adapted:
                record["adapted"] = adapted
            self._personal[client] = record
        return True

    def personalization(self) -> dict[str, dict[str, Any]]:
        """Each client's latest report of the global model vs its own fine-tuned weights, on its held-out data."""
        return {c: dict(v) for c, v in sorted(self._personal.items())}

    def result(self, round_number: int) -> dict[str, float]:
        """Example-weighted means of each metric for ``round_number``."""
        reports = self._reports.get(round_number, {})
        if not reports:
            return {}
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for n, metrics in reports.values():
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + n * v
                weights[k] = weights.get(k, 0.0) + n
        out = {k: sums[k] / weights[k] for k in sorted(sums)}
        out["eval_clients"] = float(len(reports))
        out["eval_examples"] = float(sum(n for n, _ in reports.values()))
        return out

    def forget_before(self, round_number: int) -> None:
        for r in [r for r in self._reports if r < round_number]:
            del self._reports[r]
        self.explanations.forget_before(round_number)


def budget_spent(store: HubStore, privacy: PrivacyAccountant | None) -> bool:
    """Whether one more release would pass the privacy budget."""
    return privacy is not None and not privacy.can_release(store.rounds_completed() + 1)


def finish_reason(store: HubStore, privacy: PrivacyAccountant | None, rounds: int | None) -> str | None:
    """Why no further round is run (the ``rounds`` are done, or one more would pass the privacy budget), or None."""
    done = store.rounds_completed()
    if privacy is not None and budget_spent(store, privacy):
        return (f"the privacy budget is spent: epsilon {privacy.epsilon_after(done):.3g} after {done} rounds, "
                f"one more would pass {privacy.budget_epsilon:g}; no further model is released")
    if rounds is not None and done >= rounds:
        return f"the federation completed {done} rounds"
    return None


def record_release(store: HubStore, metrics: MetricsCollector, privacy: PrivacyAccountant | None,
                   explanation: dict[str, Any] | None = None) -> None:
    """After a release: each client's personalization, the round's federated explanation map, and the epsilon
    spent so far (and per round)."""
    personal = metrics.personalization()
    if personal:
        store.put("personalization", personal)
    if explanation is not None:
        store.put("explanation", explanation)
    if privacy is None:
        return
    rounds = store.rounds_completed()
    report = privacy.report(rounds)
    previous = store.get("privacy") or {}
    per_round = [r for r in previous.get("per_round", []) if r["round"] < rounds]
    report["per_round"] = [*per_round, {"round": rounds, "epsilon": report["epsilon"]}]
    report["budget_reached"] = not privacy.can_release(rounds + 1)
    store.put("privacy", report)


HEADLINE = ("accuracy", "macro_f1", "mae_bpm", "rmse_bpm")
"""The metrics a round line shows first, when a task reports them."""


def describe_metrics(metrics: dict[str, float], unit: str = "edge") -> str:
    """A federated evaluation in a few words: ``accuracy 0.8163, macro_f1 0.8024 (8 edges)``; "" when empty.
    ``unit``: what the hub's clients are (a consortium's are sites)."""
    shown = [k for k in HEADLINE if k in metrics] or [k for k in sorted(metrics) if not k.startswith("eval_")][:2]
    if not shown:
        return ""
    text = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown)
    clients = metrics.get("eval_clients")
    return text + (f" ({int(clients)} {unit}{'s' if clients != 1 else ''})" if clients else "")
