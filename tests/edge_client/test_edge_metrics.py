"""A gateway's /metrics: what it reads from the edge and from the board (battery, SoC temperature)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_client.metrics import EdgeCollector
from edge_client.shared import Latencies
from models.transport.outbox import OutboxStats


def scrape(collector: EdgeCollector) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def client(**kw) -> SimpleNamespace:
    latencies = Latencies()
    for seconds in (0.0008, 0.0012, 0.2):
        latencies.observe(seconds)
    base = {"counters": {"updates_built": 4, "training_seconds": 2.5, "receipts_accepted": 3, "models_accepted": 5},
            "outbox_stats": OutboxStats(1, 12000, 1000, 64 << 20, 5), "model_version": 4, "replay_windows": 900,
            "inference_latencies": latencies, "live_explainer": None}
    return SimpleNamespace(**{**base, **kw})


def test_counters_outbox_and_latency_come_from_the_edge(tmp_path):
    samples = scrape(EdgeCollector(client(), str(tmp_path / "none*"), str(tmp_path / "none")))
    assert samples[("wearfl_edge_rounds_trained_total", ())] == 4
    assert samples[("wearfl_edge_training_seconds_total", ())] == 2.5
    assert samples[("wearfl_edge_receipts_total", (("status", "accepted"),))] == 3
    assert samples[("wearfl_edge_receipts_total", (("status", "rejected"),))] == 0
    assert samples[("wearfl_edge_outbox_updates", ())] == 1 and samples[("wearfl_edge_outbox_bytes", ())] == 12000
    assert samples[("wearfl_edge_inference_seconds_bucket", (("le", "0.001"),))] == 1
    assert samples[("wearfl_edge_inference_seconds_bucket", (("le", "0.0025"),))] == 2
    assert samples[("wearfl_edge_inference_seconds_count", ())] == 3
    assert not any(name.startswith(("wearfl_edge_battery", "wearfl_edge_soc")) for name, _ in samples)
    assert not any(name.startswith("wearfl_edge_live_explanation") for name, _ in samples)  # not asked to explain


def test_live_explanations_are_counted_when_the_edge_explains(tmp_path):
    explainer = SimpleNamespace(explained=7, skipped=2, spent_s=0.25)
    samples = scrape(EdgeCollector(client(live_explainer=explainer), str(tmp_path / "none*"), str(tmp_path / "x")))
    assert samples[("wearfl_edge_live_explanations_total", (("outcome", "explained"),))] == 7
    assert samples[("wearfl_edge_live_explanations_total", (("outcome", "skipped"),))] == 2
    assert samples[("wearfl_edge_live_explanation_seconds_total", ())] == 0.25


def test_battery_and_temperature_appear_where_the_board_reports_them(tmp_path):
    (tmp_path / "BAT0").mkdir()
    (tmp_path / "BAT0" / "capacity").write_text("57\n")
    (tmp_path / "temp").write_text("48250\n")
    samples = scrape(EdgeCollector(client(outbox_stats=None, model_version=None),
                                   str(tmp_path / "BAT*" / "capacity"), str(tmp_path / "temp")))
    assert samples[("wearfl_edge_battery_percent", ())] == 57
    assert samples[("wearfl_edge_soc_temperature_celsius", ())] == 48.25
    assert ("wearfl_edge_outbox_updates", ()) not in samples and ("wearfl_edge_model_version", ()) not in samples
