"""The ``spatium-torch`` command: ``spatium-torch compare [options]``, ``spatium-torch
--version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from spatium_torch import __version__, compare


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the subcommand; returns the exit status (argparse exits
    with status 2 on bad options)."""
    parser = argparse.ArgumentParser(prog="spatium-torch", description="spatium_torch tools")
    parser.add_argument(
        "--version",
        action="version",
        version=f"spatium-torch {__version__} (torch {torch.__version__})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare_parser = commands.add_parser(
        "compare", help="nn.Linear against SpatialLayer MLPs: table, report and plots"
    )
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(run=compare.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
