"""The ``spatium-torch`` command: ``spatium-torch compare [options]``, ``spatium-torch
--version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from spatium_torch import __version__


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
    try:
        from spatium_torch import compare  # matplotlib, rich, scikit-learn: the viz extra
    except ImportError as error:
        missing = None if error.name is None else error.name.split(".")[0]
        compare_parser.set_defaults(run=lambda args: _needs_viz(missing))
        args, _ = parser.parse_known_args(argv)  # compare's options cannot be known
        return args.run(args)
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(run=compare.run)
    args = parser.parse_args(argv)
    return args.run(args)


def _needs_viz(missing: str | None) -> int:
    print(
        f"spatium-torch compare needs {missing or 'the viz extra'}: "
        "pip install 'spatium-torch[viz]'",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
