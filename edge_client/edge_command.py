"""``wearfl edge``: run one gateway (an :class:`~edge_client.runtime.EdgeClient`) until Ctrl-C or SIGTERM.

The source is one argument, ``--source SPEC``: a dataset spec (``sim[:SEED]``,
``hapt:DIR``, ``recordings:DIR``) and the client whose stream to read, joined by ``/``.
The rule (see :func:`resolve_source`): the text after the last ``/`` is the client when it
names one of the dataset's clients; otherwise the whole SPEC is the dataset and the client
is ``--client-id``. So ``sim:0/wearer-03``, ``hapt:/data/RawData/user-05`` and
``recordings:ward-3/subject1`` name a client, and ``--source hapt:/data/RawData
--client-id user-05`` does too.

A live device is a spec of its own (docs/devices.md): ``lsl:NAME``, ``mqtt:TOPIC``
(``mqtt://HOST:PORT/TOPIC``) or ``follow:FILE.csv``. It has one stream, which the edge
reads under its own client id; the spec names that client too (NAME, the topic's last
level, the file's stem), so ``--client-id`` may override it. A live source is realtime:
the edge does not skip what it read before a restart (``resume_stream=False``).

The edge's client id is ``--client-id``, else the device id of ``--credentials``, else the
client the source names (``sim:0/wearer-03`` -> ``wearer-03``, ``lsl:wrist-07`` ->
``wrist-07``).

At start the edge refuses, with one ``error:`` line and exit 2, a source it could never use
(:func:`check_source`): one whose channels feed no task's model, and a recording with a bad row
anywhere. The channels the federation's model really needs are known when the hub's model
arrives (at once when the hub has published one: it is retained); a model that needs channels
the source lacks stops the edge the same way (:class:`~edge_client.ingest.MissingChannels`).

Stopping (SIGINT, SIGTERM) is clean: the edge publishes status offline, checkpoints its
buffers and disconnects; pending updates stay in the outbox for the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.finetune import FineTunePolicy, ResourceHook, battery_hook, temperature_hook
from edge_client.replay import POLICIES, REPLAY_MAX_BYTES, REPLAY_MAX_WINDOWS
from edge_client.sources.base import Source
from edge_client.sources.datasets import is_live
from models.errors import ConfigError, InputError, WearflError

if TYPE_CHECKING:
    from edge_client.config import EdgeConfig

__all__ = ["SOURCE_HELP", "add_edge_command", "check_source", "cmd_edge", "resolve_source"]

log = logging.getLogger(__name__)

SOURCE_HELP = """\
source SPEC = DATASET/CLIENT, or DATASET alone with the client taken from --client-id:
  sim:0/wearer-03                  simulated wearer 3 of seed 0 (30 minutes; --realtime: endless, paced)
  hapt:/data/RawData/user-05       UCI HAPT volunteer 5
  recordings:/data/ward-3/subject1 subject1.csv of a wearfl recordings folder
The text after the last '/' is the client when it names one of the dataset's clients;
otherwise the whole SPEC is the dataset and --client-id names the client.

or a live device (docs/devices.md), realtime by nature; its client is the name shown
unless --client-id is given:
  lsl:NAME                         the Lab Streaming Layer stream NAME (client NAME)
  mqtt:TOPIC                       JSON sample batches a BLE bridge publishes to TOPIC at the gateway's
                                   own broker mqtt://127.0.0.1:1883 (client: TOPIC's last level)
  mqtt://HOST:PORT/TOPIC           the same at another broker (mqtts:// for TLS)
  follow:/data/live/wrist-07.csv   a recording file another program appends to, followed through
                                   rotation, dataset.toml beside it (client wrist-07)

--client-id may be left out when the source names the client (sim:0/wearer-03, lsl:NAME, ...)
or --credentials gives the device id.
"""


STORAGE_ADVICE = "The restarted edge sends its pending updates again."


def _clients_hint(clients: tuple[str, ...]) -> str:
    return ", ".join(clients) if len(clients) <= 12 else f"{clients[0]} .. {clients[-1]} ({len(clients)} clients)"


def resolve_source(spec: str, client_id: str | None, *, realtime: bool = False) -> Source:
    """The source a ``--source`` SPEC names (see the module docstring for the rule).

    ``client_id`` None: the spec must name the client. ``realtime`` (simulator only) makes the
    wearer's stream endless and paced at wall-clock speed, as a live gateway would see it; a
    live device (``lsl:``, ``mqtt:``, ``follow:``) is opened, as ``client_id`` if given, and is
    realtime anyway. ConfigError or InputError when the spec cannot work.
    """
    from edge_client.sources.datasets import open_dataset

    text = spec.strip()
    if not text:
        raise ConfigError("--source is empty; use e.g. sim:0/wearer-03 (see `wearfl edge --help`).")
    if is_live(text):
        live = open_dataset(text, live=True)
        return live.source(client_id or live.clients[0])
    head, sep, tail = text.rpartition("/")
    named = None
    if sep and head and tail:
        with contextlib.suppress(WearflError):  # e.g. hapt:/data/RawData: the part after '/' is the folder's
            named = open_dataset(head)
        if named is not None and tail in named.clients:
            return _source(named, tail, realtime)
    try:
        dataset = open_dataset(text)
    except WearflError:
        if named is None:
            raise
        raise ConfigError(
            f"--source {spec!r}: {named.name} has no client {tail!r}; its clients: "
            f"{_clients_hint(tuple(named.clients))}."
        ) from None
    if client_id is not None and client_id in dataset.clients:
        return _source(dataset, client_id, realtime)
    raise ConfigError(
        f"--source {spec!r} names no client of {dataset.name}: add '/CLIENT' (its clients: "
        f"{_clients_hint(tuple(dataset.clients))}) or use one of them as --client-id."
    )


def _source(dataset: Any, client: str, realtime: bool) -> Source:
    if not realtime:
        return dataset.source(client)
    from edge_client.sources.simulator import SimulatedDataset, SimulatedWearer

    if not isinstance(dataset, SimulatedDataset):
        raise ConfigError(f"--realtime works with the simulator (sim:SEED) only, not {dataset.name}.")
    return SimulatedWearer(client, dataset.seed, minutes=math.inf, realtime=True)


def check_source(source: Source, spec: str) -> None:
    """Refuse a source the edge could never use, at start rather than when the hub's model arrives.

    * Its channels must feed some task's model, by the rule models are built from a data set with
      (:func:`~edge_client.evaluation.task_spec`): activity reads any motion channels (an
      accelerometer-only recording is fine, docs/recordings.md), heart rate reads ``ppg`` and the
      accelerometer. Which task, and which channels exactly, the hub's model says when it arrives.
    * A source that can check itself (a recording: :meth:`RecordingSource.validate
      <edge_client.sources.recordings.RecordingSource.validate>`) reads itself through once, so a
      bad row anywhere is an error now, naming file, line and column.
    """
    from models.spec import ACTIVITY_CHANNELS, HEART_RATE_CHANNELS

    channels = set(source.channels)
    if not channels & set(ACTIVITY_CHANNELS) and not channels >= set(HEART_RATE_CHANNELS):
        raise InputError(
            f"--source {spec}: the source {source.client_id!r} has the channels {list(source.channels)}, which no "
            f"task's model reads: activity needs motion channels (any of {', '.join(ACTIVITY_CHANNELS)}), "
            f"heart-rate needs {', '.join(HEART_RATE_CHANNELS)}."
        )
    validate = getattr(source, "validate", None)
    if callable(validate):
        started = time.monotonic()
        samples = validate()
        log.info("%s: checked %d samples in %.1f s", spec, samples, time.monotonic() - started)


def _hooks(args: argparse.Namespace) -> tuple[ResourceHook, ...]:
    hooks: list[ResourceHook] = []
    if args.min_battery is not None:
        hooks.append(battery_hook(args.min_battery))
    if args.max_soc_temp is not None:
        hooks.append(temperature_hook(args.max_soc_temp))
    return tuple(hooks)


def _close(source: Source) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def config_from_args(args: argparse.Namespace, source_client: str | None = None) -> EdgeConfig:
    """The :class:`~edge_client.config.EdgeConfig` the command line describes.

    The client id is ``--client-id``, else the ``--credentials`` device's, else
    ``source_client`` (the client the ``--source`` spec names, from :func:`resolve_source`).
    """
    from edge_client.config import EdgeConfig
    from models.protocol.topics import check_name
    from models.transport.mqtt import BrokerAddress

    BrokerAddress.parse(args.broker)  # a malformed URL fails here, before anything starts
    client_id = args.client_id
    if args.credentials is not None:
        from models.transport.credentials import Credentials

        username = Credentials.load(args.credentials, "device").username
        if client_id is None:
            client_id = username
        elif client_id != username:
            raise ConfigError(f"--client-id {client_id} does not match the credentials in {args.credentials}, "
                              f"which are device {username!r}'s; drop --client-id or give that device's folder.")
    if client_id is None and source_client is not None:
        try:
            client_id = check_name("client id", source_client)
        except ConfigError:
            raise ConfigError(
                f"--source {args.source} names the client {source_client!r}, which is no valid client id (1-64 "
                f"letters, digits, '_', '.' or '-', starting alphanumeric); give --client-id."
            ) from None
    if client_id is None:
        raise ConfigError("wearfl edge needs --client-id, --credentials (whose device id it takes) or a --source "
                          "that names the client (e.g. sim:0/wearer-03 or lsl:NAME).")
    policy = FineTunePolicy().with_overrides({"min_new_windows": args.min_new_windows,
                                              "cpu_seconds": args.cpu_seconds})  # validated
    return EdgeConfig(
        broker=args.broker, federation=args.federation, client_id=client_id, state_dir=Path(args.state),
        policy=policy, hooks=_hooks(args), replay_max_windows=args.replay_windows,
        replay_max_bytes=args.replay_mib * 1024 * 1024, replay_policy=args.replay_policy,
        eval_fraction=args.eval_fraction, pseudo_threshold=args.pseudo_threshold, seed=args.seed,
        explain_predictions=args.explain_predictions,
        hub_key=args.hub_key, credentials=Path(args.credentials) if args.credentials else None,
        peer_keyring=Path(args.peer_keyring) if args.peer_keyring else None,
        resume_stream=not (args.realtime or is_live(args.source)), connect_timeout_s=args.connect_timeout,
    )


async def _run(config: EdgeConfig, source: Source, http: tuple[str, int] | None = None,
               http_token: str | None = None) -> None:
    from edge_client.runtime import EdgeClient
    from models.files import state_dir_error
    from models.transport.outbox import DB_NAME

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    client = EdgeClient(config, source)
    server = None
    if http is not None:
        from edge_client.metrics import metrics_server

        server = metrics_server(client, *http, http_token)
        server.start()
        print(f"metrics on {server.url}metrics", file=sys.stderr)
    progress = asyncio.create_task(_print_progress(client, stop))
    try:
        await client.run(stop)
    except OSError as exc:  # a full or read-only state directory: one clear line, not a traceback
        error = state_dir_error(exc, config.state_dir, "edge", STORAGE_ADVICE, DB_NAME)
        if error is None:
            raise
        raise error from exc
    finally:
        progress.cancel()
        if server is not None:
            server.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def progress_lines(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed between two snapshots of an edge (:func:`_snapshot`), as lines an operator reads."""
    lines = []
    # faster than the printer looks (a laptop federation), several models or rounds fall between two lines
    if now["model"] is not None and now["model"] != before["model"]:
        models = now["models"] - before["models"]
        lines.append(f"model v{now['model']} adopted" + (f" ({models} models since the last line)" if models > 1
                                                           else ""))
    if now["round"] > before["round"]:
        rounds = now["rounds"] - before["rounds"]
        lines.append(f"round {now['round']}: trained, update stored and sent" +
                     (f" ({rounds} rounds since the last line)" if rounds > 1 else ""))
    for kind in ("accepted", "duplicate", "rejected"):
        if (n := now[kind] - before[kind]) > 0:
            lines.append(f"{n} update(s) {kind} by the hub ({now['accepted']} accepted in all)")
    declined = now["declined"]
    if declined is not None and declined != before["declined"]:
        lines.append(f"round {declined['round']} declined: {declined['reason']} ({declined['detail']})")
    return lines


def _snapshot(client: Any) -> dict[str, Any]:
    counters = client.counters
    return {"model": client.model_version, "round": client.last_round, "declined": client.declined,
            "models": counters.get("models_accepted", 0),
            "rounds": counters.get("updates_built", 0) + counters.get("secure_rounds", 0),
            **{kind: counters.get(f"receipts_{kind}", 0) for kind in ("accepted", "duplicate", "rejected")}}


async def _print_progress(client: Any, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """A line on stderr whenever the edge adopts a model, trains a round, hears back or declines (the
    default log level shows nothing else while a gateway runs)."""
    before = _snapshot(client)
    while not stop.is_set():
        await asyncio.sleep(every_s)
        now = _snapshot(client)
        for line in progress_lines(before, now):
            print(f"{time.strftime('%H:%M:%S')} {client.client_id}: {line}", file=sys.stderr, flush=True)
        before = now


def cmd_edge(args: argparse.Namespace) -> int:
    from models.files import check_writable
    from models.transport.mqtt import BrokerAddress

    source: Source | None = None
    try:
        http = None
        if args.http is not None:
            from models.transport.http_server import check_http_address, parse_http_address

            http = parse_http_address(args.http)
            check_http_address(http[0], args.http_token)
        if args.client_id is None and args.credentials is None:  # the source names the client
            BrokerAddress.parse(args.broker)  # a malformed URL fails before a device is opened
            source = resolve_source(args.source, None, realtime=args.realtime)
            check_source(source, args.source)  # here, before the state directory is made
        config = config_from_args(args, None if source is None else source.client_id)
        check_writable(config.state_dir, "edge state directory")  # read-only or full: one clear line, before any write
        if source is None:
            source = resolve_source(args.source, config.client_id, realtime=args.realtime)
            check_source(source, args.source)
        print(f"edge {config.client_id} of federation {config.federation} via {config.broker}, reading "
              f"{args.source}, state in {config.state_dir}; Ctrl-C stops", file=sys.stderr)
        asyncio.run(_run(config, source, http, args.http_token))
    finally:
        if source is not None:
            _close(source)  # a live device's connection, thread or file
    print(f"edge {config.client_id} stopped; pending updates stay in {config.state_dir}", file=sys.stderr)
    return 0


def add_edge_command(sub: Any) -> None:
    """Register ``wearfl edge`` on an argparse sub-parser set."""
    p = sub.add_parser(
        "edge", help="run one gateway: fine-tune on a sensor stream and federate over MQTT",
        description="Run one edge gateway until Ctrl-C or SIGTERM: read a sensor stream, fine-tune the hub's "
                    "global model on it each round, and send signed, quantized updates over MQTT.",
        epilog=SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", required=True, metavar="URL", help="MQTT broker, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--federation", required=True, metavar="NAME", help="federation name (topics wearfl/v1/NAME/...)")
    p.add_argument("--client-id", metavar="ID",
                   help="this edge's client id in the federation (default: the device id of --credentials, else "
                        "the client the source names, e.g. wearer-03 of sim:0/wearer-03, NAME of lsl:NAME)")
    p.add_argument("--credentials", metavar="DIR",
                   help="the device's folder from `wearfl keys add-device`: its signing key, broker password, "
                        "TLS certificates (with an mqtts:// broker) and the hub's key to pin")
    p.add_argument("--source", required=True, metavar="SPEC",
                   help="dataset and client, e.g. sim:0/wearer-03, or a live device: lsl:NAME, mqtt:TOPIC, "
                        "follow:FILE.csv (see below)")
    p.add_argument("--state", required=True, metavar="DIR", help="state directory (key, outbox, model, buffers)")
    p.add_argument("--realtime", action="store_true",
                   help="simulator: an endless stream paced at wall-clock speed (a live gateway); live devices "
                        "(lsl:, mqtt:, follow:) are realtime without it. Realtime streams are not resumed "
                        "after a restart")
    p.add_argument("--hub-key", metavar="HEX", help="pin the hub's Ed25519 public key (default: trust the first)")
    p.add_argument("--peer-keyring", metavar="FILE",
                   help="the devices' public keys ('client_id key_hex' lines, the hub's keyring): needed to take "
                        "part in secure aggregation")
    p.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                   help="share of labelled windows held out for federated evaluation (default 0.2)")
    p.add_argument("--pseudo-threshold", type=float, metavar="P",
                   help="pseudo-label unlabelled activity windows at this confidence (default: off)")
    p.add_argument("--explain-predictions", type=float, default=0.0, metavar="FRACTION",
                   help="attach to each live prediction the channel and stretch of the window that moved it most "
                        "(integrated gradients), using at most this fraction of one core, e.g. 0.05 (default: off)")
    p.add_argument("--replay-windows", type=int, default=REPLAY_MAX_WINDOWS, metavar="N",
                   help=f"replay buffer size in windows (default {REPLAY_MAX_WINDOWS})")
    p.add_argument("--replay-mib", type=int, default=REPLAY_MAX_BYTES >> 20, metavar="MIB",
                   help=f"replay buffer bound in MiB (default {REPLAY_MAX_BYTES >> 20}: 1022 heart-rate or 1361 "
                        "activity windows; it is resident once full)")
    p.add_argument("--replay-policy", choices=POLICIES, default="reservoir")
    p.add_argument("--min-new-windows", type=int, default=16, metavar="N",
                   help="train a round only after this many new windows (default 16)")
    p.add_argument("--cpu-seconds", type=float, default=60.0, metavar="S",
                   help="CPU budget of one fine-tuning (default 60)")
    p.add_argument("--min-battery", type=float, metavar="PCT", help="skip training below this battery level")
    p.add_argument("--max-soc-temp", type=float, metavar="C", help="skip training while the SoC is hotter")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to reach the broker at start before giving up (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the replay sampling and the update rounding")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve this gateway's Prometheus /metrics (default: off; e.g. 127.0.0.1:9101)")
    p.add_argument("--http-token", metavar="TOKEN",
                   help="required to serve --http beyond loopback: scrapers send 'Authorization: Bearer TOKEN'")
    p.set_defaults(func=cmd_edge)
