"""The ``wearfl`` command line: one parser, subcommands registered by each package.

A :class:`WearflError` prints ``error: <message>`` on stderr and exits 2; anything
else is a bug and shows its traceback. A reader that leaves early (``wearfl status --json |
head -c 10``) ends the command quietly with :data:`STDOUT_CLOSED_EXIT`.

Only the module of the command being run is imported (:data:`COMMANDS`): ``wearfl edge``
on a gateway loads neither the hub nor the simulator, and nothing loads numpy before
:func:`tune_gateway_process` has set up the process for a long-running edge.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
from collections.abc import Sequence

from wearfl import __version__
from wearfl.process_tuning import tune_gateway_process, tune_simulation_process

__all__ = ["COMMANDS", "STDOUT_CLOSED_EXIT", "build_parser", "main", "tune_gateway_process"]

_REGISTRARS = (
    ("models.commands", "add_commands"),
    ("edge_client.commands", "add_commands"),
    ("hub.commands", "add_commands"),
    ("hub.keys_command", "add_keys_command"),
    ("hub.privacy_command", "add_privacy_command"),
    ("edge_client.edge_command", "add_edge_command"),
    ("wearfl.simulate", "add_commands"),
)
"""Every module that registers subcommands, and its function, in ``wearfl --help`` order."""

COMMANDS = {
    **dict.fromkeys(("init", "export", "predict", "explain", "info"), _REGISTRARS[0]),
    **dict.fromkeys(("evaluate", "record"), _REGISTRARS[1]),
    **dict.fromkeys(("hub", "status", "ledger"), _REGISTRARS[2]),
    "keys": _REGISTRARS[3],
    "privacy": _REGISTRARS[4],
    "edge": _REGISTRARS[5],
    "simulate": _REGISTRARS[6],
}
"""Subcommand -> the (module, function) that registers it; a name not here registers them all."""

STDOUT_CLOSED_EXIT = 128 + 13
"""Exit status when stdout's reader has gone: 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended
(``yes | head``), as 130 is for Ctrl-C. Python's docs (signal, "Note on SIGPIPE") exit 1, but here 1 means
``wearfl ledger verify`` found a bad entry."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors exit 2 as well
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``command`` alone when it is one of :data:`COMMANDS`."""
    parser = _Parser(prog="wearfl", description="Federated on-device learning for wearables.")
    parser.add_argument("--version", action="version", version=f"wearfl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    registrars = [COMMANDS[command]] if command in COMMANDS else _REGISTRARS
    for module, function in registrars:
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wearfl`` on ``argv`` (default: the process's arguments, and then a gateway is tuned).

    Output goes to a reader that may leave early (``| head``): writing then raises BrokenPipeError,
    which ends the command quietly (:data:`STDOUT_CLOSED_EXIT`) instead of with a traceback. stdout is
    flushed here, inside the handler, because Python's own flush at exit would report the error anyway.
    (argparse's ``--help`` and ``--version`` ignore a failed write themselves.)
    """
    try:
        code = _run(argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:  # Ctrl-C while the command's modules still load
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a socket or a child's pipe: a bug, with its traceback
        _discard_stdout()
        return STDOUT_CLOSED_EXIT


def _run(argv: Sequence[str] | None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command = command_of(args_in)
    if argv is None and command == "edge":
        tune_gateway_process()
    elif argv is None and command == "simulate":
        tune_simulation_process()
    args = build_parser(command).parse_args(args_in)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from models.errors import WearflError

    try:
        return int(args.func(args) or 0)
    except WearflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (poll says POLLERR or POLLHUP)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced or closed: the error came from elsewhere
        return False
    if not hasattr(select, "poll"):  # Windows: cannot tell, so do as Python's docs do
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit of what is still buffered succeeds."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
