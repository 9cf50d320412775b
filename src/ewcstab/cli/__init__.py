"""The ``ewcstab`` command line: one module per command group, each with ``register(subparsers)``.

- ``run``: ``run`` (one run, one record) and ``run-batched`` (several runs as one batch)
- ``search``: ``search`` (an Optuna study of lambda) and ``search-summary``
- ``aggregate``: ``gather`` (records -> long CSV) and ``table`` (Table 1)
- ``prune``: ``prune`` (one network's pruning curves) and ``prune-summary``
- ``explosion``: ``explosion-gather``, ``explosion-summary``, ``explosion-traces``

The package imports the library and the library never imports it. Building the parser imports no torch,
pandas or optuna (each command imports what it needs when it runs), so ``ewcstab --help`` and argument
errors answer at once. Every user error (``ewcstab.errors.UserError``: a bad value, file, URL or device)
is reported in one line and exit status 2, before any work and with nothing written; tracebacks are for
bugs.
"""

from __future__ import annotations

import logging
import sys

from ewcstab.cli import aggregate, explosion, prune, run, search
from ewcstab.cli.common import Parser, add_run_arguments, config_from_args
from ewcstab.errors import UserError

__all__ = ["add_run_arguments", "build_parser", "config_from_args", "main"]

COMMAND_GROUPS = (run, search, aggregate, prune, explosion)


def build_parser() -> Parser:
    parser = Parser(
        prog="ewcstab",
        description="Stabilized EWC (Kutalev & Lapina, arXiv:2109.10021): continual-learning runs, "
        "lambda search, pruning by weight importance.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except UserError as err:  # a bad value, file, URL or device: one line, no traceback
        parser.exit(2, f"ewcstab {args.command}: error: {' '.join(str(err).split())}\n")
