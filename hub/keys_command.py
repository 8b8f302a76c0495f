"""``wearfl keys``: make a federation's CA and credentials, enrol devices and sites, write the broker's config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hub.commands import add_command_group

__all__ = ["add_keys_command"]


def add_keys_command(sub: Any) -> None:
    """Register ``keys init``, ``keys add-device``, ``keys add-site`` and ``keys broker-config``."""
    ksub = add_command_group(sub, "keys", help="device identity: CA, hub and device credentials, broker config",
                             description="Provision a federation: a CA, the hub's credentials, one folder per "
                                         "device, and a Mosquitto config that admits only them.")
    init = ksub.add_parser("init", help="make the CA and the hub's credentials in STATE/keys/")
    init.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    init.add_argument("--consortium", metavar="FOLDER",
                      help="this hub is a site: its folder from `wearfl keys add-site` on the consortium. The hub "
                           "signs with the granted key and its gateways pin the consortium's key")
    init.set_defaults(func=cmd_keys_init)

    add = ksub.add_parser("add-device", help="enrol a device: STATE/keys/devices/ID/ and the hub's keyring")
    add.add_argument("device_id", metavar="ID", help="the device's client id in the federation")
    add.add_argument("--state", metavar="DIR", required=True, help="the hub's state directory")
    add.set_defaults(func=cmd_keys_add_device)

    site = ksub.add_parser("add-site", help="enrol a site hub: STATE/keys/sites/ID/, its grant, the hub's keyring",
                           description="On the consortium's keys: enrol a site, whose hub is a client of the "
                                       "consortium's broker like a device. Its folder holds the site's key, its "
                                       "broker login, the consortium's key and the consortium's grant of the "
                                       "site's key.")
    site.add_argument("site_id", metavar="ID", help="the site's client id in the consortium")
    site.add_argument("--state", metavar="DIR", required=True, help="the consortium hub's state directory")
    site.add_argument("--federation", metavar="NAME", required=True, help="the consortium's federation")
    site.set_defaults(func=cmd_keys_add_site)

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

    folder = init_keys(Path(args.state), Path(args.consortium) if args.consortium else None)
    print(f"CA: {folder.parent / 'ca.crt'} (its key {folder.parent / 'ca.key'} stays with the operator)")
    print(f"hub credentials: {folder}  (wearfl hub --credentials {folder})")
    print(f"hub public key: {(folder / 'hub.pub').read_text().strip()}")
    if args.consortium:
        print(f"site of a consortium: the hub signs with the key granted in {Path(args.consortium) / 'grant.json'}; "
              f"gateways added here pin the consortium's key {(folder / 'consortium.pub').read_text().strip()}")
    return 0


def cmd_keys_add_device(args: argparse.Namespace) -> int:
    from hub.keys import add_device

    folder = add_device(Path(args.state), args.device_id)
    print(f"device {args.device_id}: {folder}  (copy it to the gateway: wearfl edge --credentials {folder.name}/ ...)")
    print(f"added to the hub's keyring {Path(args.state) / 'keys' / 'hub' / 'keyring'}; run `wearfl keys "
          "broker-config` again so the broker knows its password")
    return 0


def cmd_keys_add_site(args: argparse.Namespace) -> int:
    """Enrol the site, then say where its folder goes and what to run on each side."""
    from hub.keys import add_site

    folder = add_site(Path(args.state), args.site_id, args.federation)
    print(f"site {args.site_id}: {folder}  (its key, broker login, the consortium's key and grant.json)")
    print(f"added to the hub's keyring {Path(args.state) / 'keys' / 'hub' / 'keyring'}")
    print(f"next: copy {folder.name}/ to the site; there, `wearfl keys init --state SITE_STATE --consortium "
          f"{folder.name}/` provisions its own broker and gateways, and the site hub runs with `wearfl hub "
          f"--federation {args.federation} --upstream mqtts://HOST:8883 --upstream-credentials {folder.name}/ ...`")
    print("then run `wearfl keys broker-config` again here so the consortium's broker knows the site")
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
