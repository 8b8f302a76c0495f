"""A gateway's own ``/metrics`` (``wearfl edge --http HOST:PORT``), in Prometheus' text format.

What an operator watches on a gateway: rounds trained and the CPU seconds they took, the outbox
depth (updates waiting for the hub's receipt), receipts by status, live inference latency, and
the battery and SoC temperature where the board reports them. Values are read from the running
:class:`~edge_client.runtime.EdgeClient` at each scrape. prometheus_client is imported only when
``--http`` is given, so a gateway without it carries nothing extra.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edge_client.finetune import read_first
from models.transport.http_server import RouteServer

if TYPE_CHECKING:
    from edge_client.runtime import EdgeClient

__all__ = ["BATTERY_GLOB", "THERMAL_ZONE", "EdgeCollector", "metrics_server"]

BATTERY_GLOB = "/sys/class/power_supply/BAT*/capacity"
THERMAL_ZONE = "/sys/class/thermal/thermal_zone0/temp"


def _read_number(path: str) -> float | None:
    text = read_first([path])
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


class EdgeCollector:
    """Prometheus metrics of one edge, read from it at each scrape."""

    def __init__(self, client: EdgeClient, battery_glob: str = BATTERY_GLOB, thermal_zone: str = THERMAL_ZONE) -> None:
        self.client, self.battery_glob, self.thermal_zone = client, battery_glob, thermal_zone

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        client = self.client
        counters = dict(client.counters)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("wearfl_edge_rounds_trained", "Rounds this edge trained and stored an update for.",
                      counters.get("updates_built", 0))
        yield counter("wearfl_edge_training_seconds", "CPU seconds spent fine-tuning.",
                      counters.get("training_seconds", 0.0))
        yield counter("wearfl_edge_rounds_declined", "Rounds this edge sat out (its status says why).",
                      counters.get("rounds_declined", 0))
        yield counter("wearfl_edge_updates_published", "Update messages published (re-sends included).",
                      counters.get("updates_published", 0))
        receipts = CounterMetricFamily("wearfl_edge_receipts", "Receipts from the hub, by status.", labels=["status"])
        for status in ("accepted", "duplicate", "rejected"):
            receipts.add_metric([status], counters.get(f"receipts_{status}", 0))
        yield receipts
        models = CounterMetricFamily("wearfl_edge_models", "Global models received, by outcome.", labels=["outcome"])
        models.add_metric(["adopted"], counters.get("models_accepted", 0))
        models.add_metric(["refused"], counters.get("models_refused", 0))
        yield models
        stats = client.outbox_stats
        if stats is not None:
            yield GaugeMetricFamily("wearfl_edge_outbox_updates", "Updates waiting for the hub's receipt.",
                                    value=stats.entries)
            yield GaugeMetricFamily("wearfl_edge_outbox_bytes", "Bytes of the updates waiting for a receipt.",
                                    value=stats.bytes)
        if client.model_version is not None:
            yield GaugeMetricFamily("wearfl_edge_model_version", "Version of the global model in use.",
                                    value=client.model_version)
        yield GaugeMetricFamily("wearfl_edge_replay_windows", "Labelled windows in the replay buffer.",
                                value=client.replay_windows)
        latencies = client.inference_latencies
        yield HistogramMetricFamily(
            "wearfl_edge_inference_seconds", "Live inference time of one window.",
            buckets=[*((floatToGoString(b), n) for b, n in zip(latencies.bounds, latencies.counts, strict=True)),
                     ("+Inf", latencies.count)], sum_value=latencies.total)
        explainer = client.live_explainer
        if explainer is not None:
            explained = CounterMetricFamily("wearfl_edge_live_explanations",
                                            "Live predictions explained, or left unexplained to keep the CPU budget.",
                                            labels=["outcome"])
            explained.add_metric(["explained"], explainer.explained)
            explained.add_metric(["skipped"], explainer.skipped)
            yield explained
            yield counter("wearfl_edge_live_explanation_seconds", "CPU seconds spent explaining live predictions.",
                          explainer.spent_s)
        battery = next((v for v in map(_read_number, sorted(glob.glob(self.battery_glob))) if v is not None), None)
        if battery is not None:
            yield GaugeMetricFamily("wearfl_edge_battery_percent", "Battery charge.", value=battery)
        temperature = _read_number(self.thermal_zone)
        if temperature is not None:
            yield GaugeMetricFamily("wearfl_edge_soc_temperature_celsius", "SoC temperature.",
                                    value=temperature / 1000.0)


def metrics_server(client: EdgeClient, host: str, port: int, token: str | None = None) -> RouteServer:
    """A server of ``/metrics`` for ``client`` (not started)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(client))
    return RouteServer(host, port, {"/metrics": lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)}, token)
