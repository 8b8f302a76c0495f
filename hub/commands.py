"""The hub commands of the ``wearfl`` CLI: ``wearfl hub`` (run a hub) and ``wearfl status``.

``wearfl hub`` takes its settings from flags, from a TOML file (``--config``) with the
same keys (``broker``, ``federation``, ``state``, ``keyring``, ``credentials``, ``model``, ``task``,
``min_clients``, ``clients_per_round``, ``round_timeout``, ``rounds``, ``quantize``,
``max_update_norm``, ``max_update_bytes``, ``max_examples``, ``max_pinned``, ``keep_models``, ``server_lr``,
``strategy``; dashes or underscores),
a ``[task_config]`` table of scalars for the edges and a ``[strategy_args]`` table for the
aggregation rule, or both: flags override the file. The old key ``norm_bound`` and flag
``--norm-bound`` are still read for one release (:mod:`hub.renamed`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.renamed import CLI_FLAGS, HUB_SETTINGS, renamed, warn_renamed
from hub.reports import describe_metrics
from models.errors import ConfigError

if TYPE_CHECKING:
    from hub.config import HubConfig

# The service modules are imported inside the handlers: every `wearfl` command
# (an edge on a Pi included) builds this parser, and should not pay for the hub.
from models.model import Model
from models.protocol.codec import SCHEMES
from models.spec import TASKS, default_spec

__all__ = ["add_command_group", "add_commands", "cmd_hub", "cmd_ledger_verify", "cmd_status", "hub_config_from_args"]

CONFIG_KEYS = {
    "broker": str, "federation": str, "state": str, "keyring": str, "credentials": str, "model": str, "task": str,
    "min_clients": int, "clients_per_round": int, "round_timeout": float, "rounds": int, "quantize": str,
    "max_update_norm": float, "max_update_bytes": int, "server_lr": float, "strategy": str,
    "max_examples": int, "max_pinned": int, "keep_models": int, "fraction": float, "max_clients": int,
    "stragglers": str, "evaluate_every": int, "secure_aggregation": bool, "http": str, "http_token": str,
    "upstream": str, "upstream_federation": str, "upstream_credentials": str, "site_id": str,
    "consortium_key": str, "upstream_topic_prefix": str, "replica_id": str, "local_steps": int,
}


def add_commands(sub: Any) -> None:
    """Register ``hub`` and ``status`` on the ``wearfl`` subparsers."""
    p = sub.add_parser("hub", help="run the aggregation hub of a federation",
                       description="Run the hub: take signed updates over MQTT, close rounds, publish new models.")
    p.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--federation", help="federation name (letters, digits, _ . -)")
    p.add_argument("--state", metavar="DIR|URL",
                   help="state directory (database, model registry, hub key), or postgresql://USER@HOST:PORT/DB "
                        "shared by hub replicas")
    p.add_argument("--config", metavar="FILE", help="TOML file with the same settings; flags override it")
    p.add_argument("--keyring", metavar="FILE", help="accept only these clients' keys ('client_id key_hex' lines)")
    p.add_argument("--credentials", metavar="DIR",
                   help="the hub's folder from `wearfl keys init` (STATE/keys/hub): signing key, broker password, "
                        "TLS certificates (with an mqtts:// broker) and the keyring of enrolled devices")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", metavar="PKG", help="initial model package (when the state holds none)")
    start.add_argument("--task", choices=TASKS, help="start from a fresh default model of this task")
    p.add_argument("--min-clients", type=int, metavar="N", help="fewest clients a round closes with (default 2)")
    p.add_argument("--clients-per-round", type=int, metavar="N",
                   help="close a round once N clients sent an update (default: every edge online)")
    p.add_argument("--round-timeout", type=float, metavar="S", help="seconds before a round closes early (default 60)")
    p.add_argument("--rounds", type=int, metavar="R", help="stop after R completed rounds (default: run forever)")
    p.add_argument("--quantize", choices=SCHEMES, help="update encoding the edges use (default int8)")
    p.add_argument("--local-steps", type=int, metavar="S",
                   help="each edge trains exactly S optimizer steps a round (default: the task's epochs)")
    p.add_argument("--max-update-norm", type=float, metavar="L2",
                   help="reject updates with a larger L2 norm (receipt reason norm_bound)")
    p.add_argument("--norm-bound", type=float, help=argparse.SUPPRESS)  # renamed --max-update-norm
    p.add_argument("--max-update-bytes", type=int, metavar="B", help="reject larger updates (default 4 MiB)")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="reject an update that claims more examples (receipt reason too_many_examples; "
                        "default 1000000)")
    p.add_argument("--max-pinned", type=int, metavar="N",
                   help="without a keyring, pin at most N clients' keys (receipt reason too_many_clients)")
    p.add_argument("--keep-models", type=int, metavar="N",
                   help="keep the newest N model versions in the registry (default 100; the ledger keeps all)")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the operator view: dashboard at /, Prometheus /metrics, /api/status (default: off)")
    p.add_argument("--http-token", metavar="TOKEN",
                   help="required to serve --http beyond loopback: clients send 'Authorization: Bearer TOKEN'")
    p.add_argument("--server-lr", type=float, metavar="LR", help="server learning rate of FedAvg (default 1.0)")
    p.add_argument("--fraction", type=float, metavar="F", help="select this fraction of online edges a round")
    p.add_argument("--max-clients", type=int, metavar="N", help="select at most N edges a round")
    p.add_argument("--stragglers", choices=("drop", "next-round"),
                   help="a late update is refused (drop, default) or counted into the next round")
    p.add_argument("--evaluate-every", type=int, metavar="K", help="federated evaluation every K rounds (default 1)")
    p.add_argument("--secure-aggregation", action="store_true", default=None,
                   help="run SecAgg+ over MQTT: the hub learns only the sum of the selected edges' updates "
                        "(needs --keyring or --credentials; the edges need the keyring as --peer-keyring)")
    p.add_argument("--replica-id", metavar="ID",
                   help="with --state postgresql://...: this replica's name among the hubs sharing that database "
                        "(default: host and pid)")
    site = p.add_argument_group("a site hub under a consortium hub (docs/sites.md)")
    site.add_argument("--upstream", metavar="URL",
                      help="the consortium's broker: run its rounds with this hub's gateways and send one partial "
                           "aggregate a round there")
    site.add_argument("--upstream-federation", metavar="NAME",
                      help="the consortium's federation (default and only choice: --federation)")
    site.add_argument("--upstream-credentials", metavar="DIR",
                      help="the site's folder from `wearfl keys add-site ID` on the consortium: its key, grant, "
                           "the consortium's key and broker login")
    site.add_argument("--site-id", metavar="ID",
                      help="this site's client id at the consortium (default: the --upstream-credentials folder's "
                           "name, else the host name)")
    site.add_argument("--consortium-key", metavar="HEX",
                      help="pin the consortium hub's public key (default: --upstream-credentials' hub.pub, else "
                           "the first model's)")
    site.add_argument("--upstream-topic-prefix", metavar="PREFIX",
                      help="the consortium's topics on --upstream start with PREFIX (default wearfl/v1; e.g. "
                           "consortium/wearfl/v1 under a Mosquitto bridge's local prefix)")
    add_strategy_flags(p)
    p.set_defaults(func=cmd_hub)

    s = sub.add_parser("status", help="show a hub's counters and clients",
                       description="Show the hub's model version, rounds, update counters and clients.")
    s.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    lsub = add_command_group(sub, "ledger", help="check a hub's model ledger",
                             description="The hub's append-only, hash-chained log of released models.")
    v = lsub.add_parser("verify", help="check every entry's hash and link; name the first bad one")
    v.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_ledger_verify)


def add_command_group(sub: Any, name: str, *, help: str, description: str) -> Any:
    """Register ``wearfl NAME ACTION ...`` on ``sub``; the subparsers its actions are added to."""
    group = sub.add_parser(name, help=help, description=description)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_strategy_flags(p: argparse.ArgumentParser) -> None:
    """``--strategy NAME`` and repeatable ``--strategy-arg KEY=VALUE`` (shared with ``wearfl simulate``).

    The help lists the names of the registry (:data:`hub.strategies.STRATEGIES`), so a new rule is never missing.
    """
    from hub.strategies import STRATEGIES

    p.add_argument("--strategy", metavar="NAME",
                   help=f"aggregation rule: {', '.join(STRATEGIES)} (default: fedavg)")
    p.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE",
                   help="a setting of the rule, e.g. f=2, beta=0.1, server_opt=adam, eta=0.01 (repeatable)")


def _read_config(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(settings, task_config, strategy_args) from a TOML file, keys normalized to underscores and checked."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read hub config {path}: {exc.strerror}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"hub config {path} is not valid TOML ({exc}).") from exc
    task_config = data.pop("task_config", {})
    if not isinstance(task_config, dict):
        raise ConfigError(f"{path}: task_config must be a table of scalars.")
    strategy_args = data.pop("strategy_args", {})
    if not isinstance(strategy_args, dict) or any(isinstance(v, dict | list) for v in strategy_args.values()):
        raise ConfigError(f"{path}: strategy_args must be a table of scalars.")
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        kind = CONFIG_KEYS.get(HUB_SETTINGS.get(name, name))
        if kind is None:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(CONFIG_KEYS))}.")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{path}: {key} must be a {kind.__name__}, got {value!r}.")
        settings[name] = value
    from hub.config import task_config_from

    return renamed(settings, HUB_SETTINGS, "hub setting"), task_config_from(task_config), dict(strategy_args)


def hub_config_from_args(args: argparse.Namespace) -> tuple[HubConfig, Model | None]:
    """The hub's config and initial model from parsed flags (and ``--config``)."""
    from hub.config import HubConfig
    from hub.strategies import parse_strategy_args
    from models.package import load_package

    settings, task_config, strategy_args = _read_config(args.config) if args.config else ({}, {}, {})
    strategy_args.update(parse_strategy_args(args.strategy_arg))
    if args.norm_bound is not None:
        if args.max_update_norm is not None:
            raise ConfigError("--norm-bound is the old name of --max-update-norm; give only --max-update-norm.")
        warn_renamed("--norm-bound", CLI_FLAGS["--norm-bound"], "flag")
        args.max_update_norm = args.norm_bound
    flags = {
        "broker": args.broker, "federation": args.federation, "state": args.state, "keyring": args.keyring,
        "credentials": args.credentials,
        "model": args.model, "task": args.task, "min_clients": args.min_clients,
        "clients_per_round": args.clients_per_round, "round_timeout": args.round_timeout, "rounds": args.rounds,
        "quantize": args.quantize, "max_update_norm": args.max_update_norm, "max_update_bytes": args.max_update_bytes,
        "server_lr": args.server_lr, "strategy": args.strategy, "fraction": args.fraction,
        "max_clients": args.max_clients, "stragglers": args.stragglers, "evaluate_every": args.evaluate_every,
        "secure_aggregation": args.secure_aggregation, "max_examples": args.max_examples,
        "max_pinned": args.max_pinned, "keep_models": args.keep_models, "http": args.http,
        "http_token": args.http_token, "upstream": args.upstream, "upstream_federation": args.upstream_federation,
        "upstream_credentials": args.upstream_credentials, "site_id": args.site_id,
        "consortium_key": args.consortium_key, "upstream_topic_prefix": args.upstream_topic_prefix,
        "replica_id": args.replica_id, "local_steps": args.local_steps,
    }
    if args.model or args.task:  # the flags' choice of initial model replaces the file's
        settings.pop("model", None)
        settings.pop("task", None)
    settings.update({k: v for k, v in flags.items() if v is not None})
    missing = [f"--{k}" for k in ("broker", "federation", "state") if k not in settings]
    if missing:
        raise ConfigError(f"wearfl hub needs {', '.join(missing)} (as flags or in --config).")
    if "model" in settings and "task" in settings:
        raise ConfigError("give either model or task as the initial model, not both.")
    if "quantize" in settings:
        task_config["quantize"] = settings["quantize"]
    if "local_steps" in settings:
        task_config["local_steps"] = settings["local_steps"]
    config = HubConfig(
        broker=settings["broker"], federation=settings["federation"], state_dir=settings["state"],
        min_clients=settings.get("min_clients", 2), clients_per_round=settings.get("clients_per_round"),
        round_timeout_s=settings.get("round_timeout", 60.0), rounds=settings.get("rounds"),
        keyring=Path(settings["keyring"]) if "keyring" in settings else None,
        credentials=Path(settings["credentials"]) if "credentials" in settings else None,
        max_update_norm=settings.get("max_update_norm"), task_config=task_config,
        server_lr=settings.get("server_lr", 1.0), strategy=settings.get("strategy", "fedavg"),
        strategy_args=strategy_args, fraction=settings.get("fraction", 1.0),
        max_clients=settings.get("max_clients"), stragglers=settings.get("stragglers", "drop"),
        evaluate_every=settings.get("evaluate_every", 1),
        secure_aggregation=settings.get("secure_aggregation", False),
        max_pinned=settings.get("max_pinned"),
        **{k: settings[k] for k in ("max_update_bytes", "max_examples", "keep_models", "http", "http_token",
                                    "upstream", "upstream_federation", "site_id", "consortium_key",
                                    "upstream_topic_prefix", "replica_id") if k in settings},
        upstream_credentials=Path(settings["upstream_credentials"]) if "upstream_credentials" in settings else None,
    )
    initial: Model | None = None
    if "model" in settings:
        initial = load_package(settings["model"])
    elif "task" in settings:
        if settings["task"] not in TASKS:
            raise ConfigError(f"unknown task {settings['task']!r}; use one of {', '.join(TASKS)}.")
        initial = Model(default_spec(settings["task"]), seed=0)
    return config, initial


def cmd_hub(args: argparse.Namespace) -> int:
    from hub.rounds import RoundSummary
    from hub.service import HubService
    from models.files import check_writable
    from models.protocol.identity import load_keyring, public_hex

    config, initial = hub_config_from_args(args)
    # Everything that can be checked without writing is checked first: a mistake leaves no state directory behind.
    config.broker_address()  # the URL's scheme, host and port; the credentials folder's files
    if (keyring := config.keyring_path()) is not None:
        load_keyring(keyring)
    # a file on the way, read-only or full: one clear line, before any write
    if not config.in_database:
        check_writable(config.state_dir, "hub state directory (--state)")
    service = HubService(config, initial)
    if config.is_site:
        print(f"site hub {config.site_id} for federation {config.federation} on {config.broker}, under the "
              f"consortium at {config.upstream}; site key {public_hex(config.site_key())} (the consortium's grant "
              "names it; gateways pin the consortium's key)", flush=True)
    else:
        print(f"hub for federation {config.federation} on {config.broker}; hub public key "
              f"{public_hex(config.signing_key())} (edges pin it to trust the models)", flush=True)

    def report(summary: RoundSummary) -> None:
        if config.is_site:
            print(f"round {summary.round} closed: {summary.participants} gateways, {summary.updates_accepted} updates "
                  f"accepted, {summary.updates_rejected} rejected; partial sent to the consortium "
                  f"({summary.duration_s:.1f} s)", flush=True)
            return
        print(f"round {summary.round} closed: {summary.participants} clients, {summary.updates_accepted} updates "
              f"accepted, {summary.updates_rejected} rejected, model v{summary.model_version} "
              f"({summary.duration_s:.1f} s)" + (f"; the edges' evaluation of the round's model: {evaluated}"
                                                  if (evaluated := describe_metrics(summary.metrics)) else ""),
              flush=True)

    service.on_round_closed = report

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
                loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(main())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hub.store import HubStore

    with HubStore(args.state, create=False) as store:
        status = store.status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the chain holds; 1, naming the first bad entry, when it does not."""
    from hub.database import is_database_url
    from hub.ledger import LedgerError, verify

    if is_database_url(args.state):
        path: str | Path = args.state
    elif Path(args.state).is_dir():
        path = Path(args.state) / "ledger.jsonl"
    else:
        raise ConfigError(f"{args.state} is not a hub state directory.")
    try:
        result = verify(path)
    except LedgerError as exc:
        if args.json:
            print(json.dumps({"ok": False, "bad_entry": exc.index, "reason": exc.reason}))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "entries": result.entries, "head": result.head,
                          "last_version": result.last_version}))
    else:
        print(f"ledger ok: {result.entries} entries, last model v{result.last_version}, head {result.head[:16]}")
    return 0


def _ago(seconds: float) -> str:
    """``42 s ago``, ``18 min ago``, ``3.5 h ago``, ``2.0 days ago``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _explanation_lines(explanation: dict[str, Any]) -> list[str]:
    """What the federated explanation map says: per class the channel and stretch of the window the model leans
    on most, with its share of the class's attribution."""
    from hub.explanations import strongest

    segments = int(explanation["segments"])
    dp = " (DP noise added)" if explanation.get("dp") else ""
    lines = ["", f"explanations        model v{explanation.get('model_version', '?')}, round {explanation['round']}, "
                 f"{explanation['clients']} edges{dp}: per class, the channel the model leans on most"]
    for name, channel, share, segment in strongest(explanation):
        lines.append(f"  {name:<18} {channel} ({share:.0%} of the attribution), most in stretch {segment + 1} of "
                     f"{segments}")
    return lines


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """The status as a short text report with a table of clients."""
    now = time.time() if now is None else now
    rejected = {k: v for k, v in status["updates_rejected"].items() if v}
    lines = [
        f"model version       {status['model_version']}",
        f"rounds completed    {status['rounds_completed']}",
        f"updates accepted    {status['updates_accepted']}",
        f"updates rejected    {sum(rejected.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(rejected.items()))})" if rejected else ""),
        f"duplicates dropped  {status['duplicates_dropped']}",
        *([f"messages shed       {status['messages_shed']} (a flood: the intake was behind)"]
          if status.get("messages_shed") else []),
        f"rounds declined     {sum(status.get('declined', {}).values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(status['declined'].items()))})"
           if status.get("declined") else ""),
        f"clients             {len(status['clients'])}",
    ]
    evaluation = status.get("global_metrics")
    if evaluation:
        unit = "site" if status.get("sites") else "edge"  # a consortium's clients are site hubs
        lines.insert(2, f"federated metric    {describe_metrics(evaluation['metrics'], unit)} "
                        f"(model v{evaluation['model_version']}, round {evaluation['round']})")
    upstream = status.get("upstream")
    if upstream:
        partial = upstream.get("partial") or {}
        lines.insert(1, f"upstream            site {upstream['site']} under the consortium at {upstream['broker']}"
                        f" ({'connected' if upstream.get('connected') else 'not connected'}): consortium model "
                        f"v{upstream.get('consortium_version')}, round {upstream.get('consortium_round')}"
                        + (f"; partial of round {partial['round']} {partial['state']}" if partial else ""))
    if status.get("replicas"):
        seen = ", ".join(f"{r} {_ago(now - t)}" for r, t in sorted(status["replicas"].items()))
        lines.insert(1, f"leader              {status.get('leader')} (replicas' last heartbeats: {seen})")
    if status.get("sites"):
        lines.append(f"sites               {len(status['sites'])} (this hub is a consortium: its clients are site "
                     "hubs)")
    privacy = status.get("privacy")
    if privacy:
        budget = f" of budget {privacy['budget_epsilon']:g}" if privacy.get("budget_epsilon") else ""
        lines.append(f"privacy             epsilon {privacy['epsilon']:.3g}{budget} at delta {privacy['delta']:g} "
                     f"({privacy['accountant']}, noise {privacy['noise_multiplier']:g}); {privacy['sampling']}"
                     + ("; budget reached, no more models" if privacy.get("budget_reached") else ""))
    explanation = status.get("explanation")
    if explanation:
        lines += _explanation_lines(explanation)
    waiting = status.get("waiting")
    if waiting and (waiting.get("edges") or waiting.get("declined")):
        left = max(0.0, float(waiting.get("deadline") or now) - now)
        lines += ["", f"round {waiting['round']}: {waiting['answered']} updates in, deadline in {left:.0f} s; "
                  f"waiting for {len(waiting['edges'])} edge(s)"]
        lines += [f"  {c}: {doing}" for c, doing in waiting["edges"].items()]
        lines += [f"  {c}: declined ({why})" for c, why in waiting.get("declined", {}).items()]
    if status["clients"]:
        width = max(6, *(len(c) for c in status["clients"]))
        lines += ["", f"{'client':<{width}}  {'accepted':>8}  {'rejected':>8}  {'declined':>8}  {'last seq':>8}  "
                      "last seen"]
        for client, c in sorted(status["clients"].items()):
            seq = "-" if c["last_sequence"] is None else str(c["last_sequence"])
            seen = "-" if c["last_seen"] is None else _ago(now - c["last_seen"])
            lines.append(f"{client:<{width}}  {c['accepted']:>8}  {c.get('rejected', 0):>8}  "
                         f"{c.get('declined', 0):>8}  {seq:>8}  {seen}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the lead wires add_commands into wearfl.cli
    sys.exit("use `wearfl hub` or `wearfl status`")
