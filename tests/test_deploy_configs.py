"""scripts/deploy's Prometheus and Grafana files name only metrics that the hub and the gateways serve."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_client.metrics import EdgeCollector
from edge_client.shared import Latencies
from hub.web import HubCollector
from models.transport.outbox import OutboxStats

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"


def served_names(tmp_path: Path) -> set[str]:
    """Every sample name the two collectors produce, with every optional metric present."""
    status = {"rounds_completed": 1, "updates_accepted": 2, "updates_rejected": {"stale": 1}, "declined": {"x": 1},
              "duplicates_dropped": 0, "messages_shed": 0, "model_version": 1, "clients": {},
              "global_metrics": {"metrics": {"accuracy": 0.5}},
              "privacy": {"epsilon": 1.0, "budget_epsilon": 4.0}}
    snapshot = {"status": status, "rounds": [{"bytes_up": 1, "bytes_down": 1, "duration_s": 2.0}],
                "live": {"online": []}}
    (tmp_path / "BAT0").mkdir()
    (tmp_path / "BAT0" / "capacity").write_text("50")
    (tmp_path / "temp").write_text("40000")
    edge = SimpleNamespace(counters={}, outbox_stats=OutboxStats(0, 0, 1, 1, 0), model_version=1, replay_windows=0,
                           inference_latencies=Latencies(), live_explainer=None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(lambda: snapshot))
    registry.register(EdgeCollector(edge, str(tmp_path / "BAT*" / "capacity"), str(tmp_path / "temp")))
    return {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


def test_the_grafana_dashboard_queries_served_metrics(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bwearfl_\w+", expr)}
    assert used, "the dashboard queries nothing"
    assert used <= served_names(tmp_path), sorted(used - served_names(tmp_path))
    assert {"wearfl_global_metric", "wearfl_edge_outbox_updates"} <= used


def test_the_scrape_config_targets_both_kinds_of_endpoint():
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "job_name: wearfl-hub" in text and "job_name: wearfl-edge" in text
    assert "type: Bearer" in text  # beyond loopback both need --http-token
