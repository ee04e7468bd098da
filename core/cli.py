"""What every entry point shares: the `--debug` flag and one-line reports of user errors.

Example:
    parser.add_argument(...)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_as_one_line("tml-<project>", args.debug):
        run(args)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from tml.core.errors import is_user_error

USER_ERROR_EXIT_STATUS = 2  # as for a command-line usage error: the input is wrong, not the program


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug`: print the traceback of user errors too (same as TML_DEBUG=1)."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of config, data and file errors (also: TML_DEBUG=1)",
    )


def debug_requested(flag: bool = False) -> bool:
    """`--debug` given, or TML_DEBUG set to anything but empty or 0."""
    return flag or os.environ.get("TML_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def user_errors_as_one_line(prog: str, debug: bool = False) -> Iterator[None]:
    """Report a user error (`tml.core.errors.is_user_error`) raised in the block as `prog: message`.

    Exits with status 2; the traceback comes first only with `debug` or TML_DEBUG=1. Other exceptions
    propagate unchanged. Under torchrun each failing rank prints its own line with its rank, so that a
    failure on one rank only is never hidden.
    """
    try:
        yield
    except Exception as error:
        if not is_user_error(error):
            raise
        if debug_requested(debug):
            traceback.print_exception(error, file=sys.stderr)
        print(f"{prog}: {_rank_prefix()}{error}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_STATUS) from None


def _rank_prefix() -> str:
    # torchrun's variables; read from the environment because the process group is already torn down.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{world_size}] " if world_size > 1 else ""
