"""The ``wearfl`` command line: one parser, subcommands registered by each package.

A :class:`WearflError` prints ``error: <message>`` on stderr and exits 2; anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edge_client.commands import add_commands as add_edge_commands
from edge_client.edge_command import add_edge_command
from hub.commands import add_commands as add_hub_commands
from hub.keys_command import add_keys_command
from hub.privacy_command import add_privacy_command
from models.commands import add_commands as add_model_commands
from models.errors import WearflError
from wearfl import __version__
from wearfl.simulate import add_commands as add_simulate_command

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors exit 2 as well
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wearfl", description="Federated on-device learning for wearables.")
    parser.add_argument("--version", action="version", version=f"wearfl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_model_commands(sub)
    add_edge_commands(sub)
    add_hub_commands(sub)
    add_keys_command(sub)
    add_privacy_command(sub)
    add_edge_command(sub)
    add_simulate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except WearflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
