"""The project's user-error types: input the user can fix (a config value, a path, an output folder).

The command-line entry points (``cli.run_cli``) print these as one line with exit status 2; any
other exception is a bug and shows its traceback. Each also derives from the builtin an API caller
would expect (``ValueError``, ``FileNotFoundError``, ``FileExistsError``).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message says what is wrong and, where it helps, what to do."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it should be)."""


class OutputExistsError(UserError, FileExistsError):
    """An output location the user named is already in use; nothing there is overwritten."""


__all__ = ["OutputExistsError", "PathNotFoundError", "UserError"]
