"""Shared command-line plumbing: one clear error line and a non-zero exit for bad input.

* :func:`run_cli` turns the user errors below into ``<prog>: error: <one line>`` and exit status 2;
  any other exception is a bug and propagates with its traceback;
* :class:`ArgumentParser` is argparse whose errors are such a line too (argparse's own prints a
  usage block first), and whose positionals may follow options (``--stop-after 2 a.b=1``);
* :func:`int_at_least` / :func:`float_at_least` are argparse ``type=`` checks for counts and sizes
  (``--images 0``, ``--steps -1`` are refused with one line naming the option).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from rewards.base import RewardConfigError

from .checkpoint import CheckpointError
from .errors import UserError


class UsageError(UserError, ValueError):
    """Bad command-line arguments (printed by :func:`run_cli` as one line, exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` (one line under :func:`run_cli`)
    and whose :meth:`parse_args` lets positionals and options mix (``a.b=1 --stop-after 2 c.d=3``)."""

    def error(self, message: str):  # argparse calls this for every bad argument
        raise UsageError(f"{' '.join(message.split())} (see --help)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        try:
            return self.parse_intermixed_args(args, namespace)
        except TypeError:  # sub-commands or nargs=REMAINDER cannot be intermixed
            return super().parse_args(args, namespace)


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= lo``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def float_at_least(lo: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= lo`` (``> lo`` with ``strict``)."""
    rel = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rel} {lo}, got {text!r}") from None
        if not math.isfinite(value) or (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {rel} {lo}, got {text}")
        return value

    parse.__name__ = f"number {rel} {lo}"
    return parse


#: The project's exceptions that mean "the user's input is wrong": printed as one line, exit code 2.
#: (``UserError`` covers ``ConfigError``, ``UsageError``, ``PathNotFoundError`` and ``OutputExistsError``.)
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, CheckpointError, RewardConfigError)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str = "") -> int:
    """Run ``main``; user errors become ``error: <message>`` on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog + ': ' if prog else ''}error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
        return 130


NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # numpy 2 asks torch tensors for __array__(copy=...); diffusers' schedulers call np.array on them
    (DeprecationWarning, r"__array__ implementation doesn't accept a copy keyword", r"diffusers\."),
)
"""``(category, message regex, module regex)`` of the libraries' warnings a training run hides: known
noise a user cannot act on. Every other warning (a real deprecation in our own calls included) shows."""


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and info logging (our tqdm shows progress) and the
    specific warnings in :data:`NOISY_WARNINGS`; nothing else."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for category, message, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
