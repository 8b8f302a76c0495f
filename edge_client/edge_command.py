"""``wearfl edge``: run one gateway (an :class:`~edge_client.runtime.EdgeClient`) until Ctrl-C or SIGTERM.

The source is one argument, ``--source SPEC``: a dataset spec (``sim[:SEED]``,
``hapt:DIR``, ``recordings:DIR``) and the client whose stream to read, joined by ``/``.
The rule (see :func:`resolve_source`): the text after the last ``/`` is the client when it
names one of the dataset's clients; otherwise the whole SPEC is the dataset and the client
is ``--client-id``. So ``sim:0/wearer-03``, ``hapt:/data/RawData/user-05`` and
``recordings:ward-3/subject1`` name a client, and ``--source hapt:/data/RawData
--client-id user-05`` does too.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.finetune import FineTunePolicy, ResourceHook, battery_hook, temperature_hook
from edge_client.replay import POLICIES
from edge_client.sources.base import Source
from models.errors import ConfigError, WearflError

if TYPE_CHECKING:
    from edge_client.config import EdgeConfig

__all__ = ["SOURCE_HELP", "add_edge_command", "cmd_edge", "resolve_source"]

log = logging.getLogger(__name__)

SOURCE_HELP = """\
source SPEC = DATASET/CLIENT, or DATASET alone with the client taken from --client-id:
  sim:0/wearer-03                  simulated wearer 3 of seed 0 (30 minutes; --realtime: endless, paced)
  hapt:/data/RawData/user-05       UCI HAPT volunteer 5
  recordings:/data/ward-3/subject1 subject1.csv of a wearfl recordings folder
The text after the last '/' is the client when it names one of the dataset's clients;
otherwise the whole SPEC is the dataset and --client-id names the client.
"""


STORAGE_ADVICE = "The restarted edge sends its pending updates again."


def _clients_hint(clients: tuple[str, ...]) -> str:
    return ", ".join(clients) if len(clients) <= 12 else f"{clients[0]} .. {clients[-1]} ({len(clients)} clients)"


def resolve_source(spec: str, client_id: str, *, realtime: bool = False) -> Source:
    """The source a ``--source`` SPEC names (see the module docstring for the rule).

    ``realtime`` (simulator only) makes the wearer's stream endless and paced at wall-clock
    speed, as a live gateway would see it. ConfigError or InputError when the spec cannot work.
    """
    from edge_client.sources.datasets import open_dataset

    text = spec.strip()
    if not text:
        raise ConfigError("--source is empty; use e.g. sim:0/wearer-03 (see `wearfl edge --help`).")
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
    if client_id in dataset.clients:
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


def _hooks(args: argparse.Namespace) -> tuple[ResourceHook, ...]:
    hooks: list[ResourceHook] = []
    if args.min_battery is not None:
        hooks.append(battery_hook(args.min_battery))
    if args.max_soc_temp is not None:
        hooks.append(temperature_hook(args.max_soc_temp))
    return tuple(hooks)


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """The :class:`~edge_client.config.EdgeConfig` the command line describes."""
    from edge_client.config import EdgeConfig
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
    if client_id is None:
        raise ConfigError("wearfl edge needs --client-id (or --credentials, whose device id it takes).")
    policy = FineTunePolicy().with_overrides({"min_new_windows": args.min_new_windows,
                                              "cpu_seconds": args.cpu_seconds})  # validated
    return EdgeConfig(
        broker=args.broker, federation=args.federation, client_id=client_id, state_dir=Path(args.state),
        policy=policy, hooks=_hooks(args), replay_max_windows=args.replay_windows,
        replay_max_bytes=args.replay_mib * 1024 * 1024, replay_policy=args.replay_policy,
        eval_fraction=args.eval_fraction, pseudo_threshold=args.pseudo_threshold, seed=args.seed,
        hub_key=args.hub_key, credentials=Path(args.credentials) if args.credentials else None,
        peer_keyring=Path(args.peer_keyring) if args.peer_keyring else None,
        resume_stream=not args.realtime, connect_timeout_s=args.connect_timeout,
    )


async def _run(config: EdgeConfig, source: Source) -> None:
    from edge_client.outbox import DB_NAME
    from edge_client.runtime import EdgeClient
    from models.files import state_dir_error

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await EdgeClient(config, source).run(stop)
    except OSError as exc:  # a full or read-only state directory: one clear line, not a traceback
        error = state_dir_error(exc, config.state_dir, "edge", STORAGE_ADVICE, DB_NAME)
        if error is None:
            raise
        raise error from exc
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def cmd_edge(args: argparse.Namespace) -> int:
    from models.files import check_writable

    config = config_from_args(args)
    check_writable(config.state_dir, "edge state directory")  # read-only or full: one clear line, before any write
    source = resolve_source(args.source, config.client_id, realtime=args.realtime)
    print(f"edge {config.client_id} of federation {config.federation} via {config.broker}, reading "
          f"{args.source}, state in {config.state_dir}; Ctrl-C stops", file=sys.stderr)
    asyncio.run(_run(config, source))
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
                   help="this edge's client id in the federation (default with --credentials: the device id)")
    p.add_argument("--credentials", metavar="DIR",
                   help="the device's folder from `wearfl keys add-device`: its signing key, broker password, "
                        "TLS certificates (with an mqtts:// broker) and the hub's key to pin")
    p.add_argument("--source", required=True, metavar="SPEC", help="dataset and client, e.g. sim:0/wearer-03")
    p.add_argument("--state", required=True, metavar="DIR", help="state directory (key, outbox, model, buffers)")
    p.add_argument("--realtime", action="store_true",
                   help="simulator only: an endless stream paced at wall-clock speed (a live gateway)")
    p.add_argument("--hub-key", metavar="HEX", help="pin the hub's Ed25519 public key (default: trust the first)")
    p.add_argument("--peer-keyring", metavar="FILE",
                   help="the devices' public keys ('client_id key_hex' lines, the hub's keyring): needed to take "
                        "part in secure aggregation")
    p.add_argument("--eval-fraction", type=float, default=0.2, metavar="F",
                   help="share of labelled windows held out for federated evaluation (default 0.2)")
    p.add_argument("--pseudo-threshold", type=float, metavar="P",
                   help="pseudo-label unlabelled activity windows at this confidence (default: off)")
    p.add_argument("--replay-windows", type=int, default=2048, metavar="N",
                   help="replay buffer size in windows (default 2048)")
    p.add_argument("--replay-mib", type=int, default=8, metavar="MIB", help="replay buffer bound in MiB (default 8)")
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
    p.set_defaults(func=cmd_edge)
