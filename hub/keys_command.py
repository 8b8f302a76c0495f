"""``wearfl keys``: make a federation's CA and credentials, enrol devices, write the broker's config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hub.commands import add_command_group

__all__ = ["add_keys_command"]


def add_keys_command(sub: Any) -> None:
    """Register ``keys init``, ``keys add-device`` and ``keys broker-config``."""
    ksub = add_command_group(sub, "keys", help="device identity: CA, hub and device credentials, broker config",
                             description="Provision a federation: a CA, the hub's credentials, one folder per "
                                         "device, and a Mosquitto config that admits only them.")
    init = ksub.add_parser("init", help="make the CA and the hub's credentials in STATE/keys/")
    init.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    init.set_defaults(func=cmd_keys_init)

    add = ksub.add_parser("add-device", help="enrol a device: STATE/keys/devices/ID/ and the hub's keyring")
    add.add_argument("device_id", metavar="ID", help="the device's client id in the federation")
    add.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    add.set_defaults(func=cmd_keys_add_device)

    broker = ksub.add_parser("broker-config", help="write mosquitto.conf, password file, ACL and TLS files",
                             description="Write OUT/mosquitto.conf for Mosquitto 2: one TLS listener that needs a "
                                         "client certificate from the federation's CA and a password, an ACL that "
                                         "keeps each device to its own topics, raised queue limits. Run it again "
                                         "after adding devices.")
    broker.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    broker.add_argument("--out", metavar="DIR", required=True, help="folder for the config and the files beside it")
    broker.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    broker.add_argument("--bind", default="0.0.0.0", metavar="ADDR", help="address to listen on (default 0.0.0.0)")
    broker.add_argument("--hostname", action="append", metavar="NAME",
                        help="a name or address clients use to reach the broker, put in its certificate "
                             "(repeatable; default localhost and 127.0.0.1)")
    broker.add_argument("--federation", default="+", metavar="NAME",
                        help="serve only this federation's topics (default: any)")
    broker.add_argument("--user", metavar="ACCOUNT",
                        help="the account mosquitto started as root runs as (default: mosquitto, its own default); "
                             "run as root, this command hands it the files it must read")
    broker.set_defaults(func=cmd_keys_broker_config)


def cmd_keys_init(args: argparse.Namespace) -> int:
    from hub.keys import init_keys

    folder = init_keys(Path(args.state))
    print(f"CA: {folder.parent / 'ca.crt'} (its key {folder.parent / 'ca.key'} stays with the operator)")
    print(f"hub credentials: {folder}  (wearfl hub --credentials {folder})")
    print(f"hub public key: {(folder / 'hub.pub').read_text().strip()}")
    return 0


def cmd_keys_add_device(args: argparse.Namespace) -> int:
    from hub.keys import add_device

    folder = add_device(Path(args.state), args.device_id)
    print(f"device {args.device_id}: {folder}  (copy it to the gateway: wearfl edge --credentials {folder.name}/ ...)")
    print(f"added to the hub's keyring {Path(args.state) / 'keys' / 'hub' / 'keyring'}; run `wearfl keys "
          "broker-config` again so the broker knows its password")
    return 0


def cmd_keys_broker_config(args: argparse.Namespace) -> int:
    """Write the broker's files, then the next steps: who Mosquitto runs as, what to fix first, how to start it."""
    from hub.keys import broker_config, broker_next_steps

    config = broker_config(Path(args.state), Path(args.out), port=args.port, bind=args.bind,
                           hostnames=tuple(args.hostname or ("localhost", "127.0.0.1")),
                           federation=args.federation, user=args.user)
    print(f"wrote {os.path.relpath(config)} with passwords, acl, ca.crt, server.crt and server.key beside it")
    for step in broker_next_steps(config, args.user):
        print(step)
    return 0
