"""Shared command-line plumbing: one clear error line and a non-zero exit for bad input."""
from __future__ import annotations

import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError

#: Exceptions that mean "the user's input is wrong": printed as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError,
                                                KeyError, ValueError)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "") -> int:
    """Run ``main``; user errors become ``error: <message>`` on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
        return 130
