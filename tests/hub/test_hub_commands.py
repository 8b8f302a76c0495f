"""``wearfl hub`` and ``wearfl status`` through an argparse parser built like the CLI's."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from hub.commands import add_commands, hub_config_from_args
from hub.config import HubConfig
from hub.store import HubStore
from models import Model, activity_spec, save_package
from models.errors import ConfigError
from models.protocol.messages import REJECT_REASONS


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wearfl")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_status_json_is_the_store_contract(tmp_path, capsys):
    with HubStore(tmp_path) as store:
        store.pin_key("edge-a", b"k" * 32, now=1.0)
        store.record_update("edge-a", 2, 1, 0, 10, b"x", received_at=5.0)
        store.count_rejection("stale")
        store.count_rejection("norm_bound", client="edge-b")
        store.count_declined("resources", client="edge-a")
        store.put("model_version", 0)
    args = parse("status", "--state", str(tmp_path), "--json")

    assert args.func(args) == 0

    out = json.loads(capsys.readouterr().out)
    assert out == {
        "model_version": 0, "rounds_completed": 0, "updates_accepted": 1,
        "updates_rejected": {**dict.fromkeys(REJECT_REASONS, 0), "stale": 1, "norm_bound": 1},
        "duplicates_dropped": 0, "messages_shed": 0,
        "declined": {"resources": 1}, "waiting": None,
        "clients": {"edge-a": {"accepted": 1, "last_sequence": 2, "last_seen": 5.0, "rejected": 0, "declined": 1},
                    "edge-b": {"accepted": 0, "last_sequence": None, "last_seen": None, "rejected": 1, "declined": 0}},
        "global_metrics": None, "personalization": {}, "explanation": None, "privacy": None, "upstream": None,
        "sites": [],
        "leader": None, "replicas": {},
    }


def test_status_text_shows_counters_and_a_client_table(tmp_path, capsys):
    with HubStore(tmp_path) as store:
        store.pin_key("edge-a", b"k" * 32)
        store.record_update("edge-a", 0, 1, 0, 10, b"x")
        store.count_rejection("norm_bound", 2)
    args = parse("status", "--state", str(tmp_path))
    args.func(args)
    text = capsys.readouterr().out
    assert "updates accepted    1" in text and "norm_bound 2" in text
    assert any(line.startswith("edge-a") for line in text.splitlines())


def test_status_of_a_directory_without_state_is_a_config_error(tmp_path):
    args = parse("status", "--state", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no hub state"):
        args.func(args)


def test_hub_settings_come_from_the_toml_file_and_flags_override_it(tmp_path):
    config_file = tmp_path / "hub.toml"
    config_file.write_text(
        'broker = "mqtt://127.0.0.1:1999"\nfederation = "ward-3"\nstate = "%s"\nmin-clients = 4\n'
        "round_timeout = 15\nrounds = 9\ntask = \"heart-rate\"\nmax_update_norm = 5.0\n"
        '[task_config]\nepochs = 2\nlr = 0.01\nquantize = "int4"\n' % (tmp_path / "state")
    )
    args = parse("hub", "--config", str(config_file), "--min-clients", "3", "--quantize", "topk")

    config, initial = hub_config_from_args(args)

    assert (config.broker, config.federation, config.state_dir) == ("mqtt://127.0.0.1:1999", "ward-3",
                                                                   tmp_path / "state")
    assert (config.min_clients, config.round_timeout_s, config.rounds, config.max_update_norm) == (3, 15.0, 9, 5.0)
    assert config.clients_per_round is None
    assert config.task_config["epochs"] == 2 and config.task_config["quantize"] == "topk"
    assert config.task_config["batch_size"] == 32  # defaults fill the rest
    assert initial is not None and initial.spec.task == "heart-rate"


def test_renamed_settings_are_still_read_for_one_release_with_a_warning(tmp_path, caplog):
    config_file = tmp_path / "hub.toml"
    config_file.write_text('broker = "mqtt://h"\nfederation = "f"\nstate = "s"\nnorm_bound = 5.0\n'
                           '[strategy_args]\nclip_norm = 2.0\n')
    with caplog.at_level(logging.WARNING, logger="hub.renamed"):
        from_toml, _ = hub_config_from_args(parse("hub", "--config", str(config_file)))
        from_flag, _ = hub_config_from_args(parse("hub", "--broker", "mqtt://h", "--federation", "f", "--state", "s",
                                                  "--norm-bound", "3"))
        keywords = HubConfig("mqtt://h", "f", tmp_path, norm_bound=4.0, secagg_clip=7.0)

    assert (from_toml.max_update_norm, from_flag.max_update_norm) == (5.0, 3.0)
    assert from_toml.build_strategy().norm_bound == 2.0
    assert (keywords.max_update_norm, keywords.secagg_range) == (4.0, 7.0)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "hub setting norm_bound is deprecated", "strategy arg clip_norm is deprecated",
        "flag --norm-bound is deprecated", "hub setting norm_bound is deprecated",
        "hub setting secagg_clip is deprecated"]
    assert "use --max-update-norm" in caplog.records[2].getMessage()
    with pytest.raises(ConfigError, match="old name of max_update_norm"):
        HubConfig("mqtt://h", "f", tmp_path, norm_bound=4.0, max_update_norm=4.0)


def test_hub_takes_an_initial_model_package(tmp_path):
    save_package(Model(activity_spec(), version=0), tmp_path / "m.safetensors")
    args = parse("hub", "--broker", "mqtt://127.0.0.1:1", "--federation", "f", "--state", str(tmp_path / "s"),
                 "--model", str(tmp_path / "m.safetensors"), "--clients-per-round", "5")
    config, initial = hub_config_from_args(args)
    assert initial is not None and initial.spec.task == "activity" and config.clients_per_round == 5


@pytest.mark.parametrize(("toml", "message"), [
    ('federation = "f"\nstate = "s"\n', "--broker"),
    ('broker = "mqtt://h"\nfederation = "f"\nstate = "s"\ncolour = "red"\n', "unknown setting"),
    ('broker = "mqtt://h"\nfederation = "f"\nstate = "s"\nrounds = "many"\n', "rounds must be"),
    ('broker = "mqtt://h"\nfederation = "bad name"\nstate = "s"\n', "federation"),
    ('broker = "mqtt://h"\nfederation = "f"\nstate = "s"\n[task_config]\nquantize = "int3"\n', "quantization"),
    ("not toml [", "not valid TOML"),
])
def test_bad_hub_settings_are_config_errors(tmp_path, toml, message):
    path = tmp_path / "hub.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        hub_config_from_args(parse("hub", "--config", str(path)))


def test_status_text_says_how_long_ago_in_readable_units(tmp_path, capsys):
    from hub.commands import format_status

    with HubStore(tmp_path) as store:
        for client, seen in (("a", 958.0), ("b", 1000.0 - 1108.0), ("c", 1000.0 - 5 * 3600), ("d", -2e5)):
            store.pin_key(client, b"k" * 32)
            store.record_update(client, 0, 1, 0, 10, client.encode(), received_at=seen)
        status = store.status()
    rows = {line.split()[0]: line for line in format_status(status, now=1000.0).splitlines()[-4:]}
    assert rows["a"].endswith("42 s ago") and rows["b"].endswith("18 min ago")
    assert rows["c"].endswith("5.0 h ago") and rows["d"].endswith("2.3 days ago")


def test_status_text_names_the_leader_and_the_replicas_heartbeats(tmp_path):
    from hub.commands import format_status

    with HubStore(tmp_path) as store:
        status = store.status()
    status.update(leader="r2", replicas={"r1": 990.0, "r2": 999.0})
    line = next(x for x in format_status(status, now=1000.0).splitlines() if x.startswith("leader"))
    assert "r2" in line and "r1 10 s ago" in line and "r2 1 s ago" in line


def test_a_task_setting_every_edge_would_refuse_is_refused_by_the_hub(tmp_path):
    from hub.config import HubConfig

    for bad in ({"local_steps": -3}, {"epochs": 0}, {"lr": "fast"}):
        with pytest.raises(ConfigError, match="task setting"):
            HubConfig(broker="mqtt://127.0.0.1:1", federation="f", state_dir=tmp_path, task_config=bad)
    assert HubConfig(broker="mqtt://127.0.0.1:1", federation="f", state_dir=tmp_path,
                     task_config={"local_steps": 5}).task_config["local_steps"] == 5


def test_the_federated_metric_line_counts_a_consortium_s_clients_as_sites(tmp_path):
    from hub.commands import format_status

    with HubStore(tmp_path) as store:
        status = store.status()
    status["global_metrics"] = {"round": 3, "model_version": 2, "metrics": {"accuracy": 0.9, "eval_clients": 3.0}}
    assert "accuracy 0.9 (3 edges)" in format_status(status)
    status["sites"] = ["site-a", "site-b", "site-c"]
    assert "accuracy 0.9 (3 sites)" in format_status(status)
