"""Reading a UTF-8 text or JSON Lines file with one-line errors: the one reader behind config files,
prompt files, GenEval metadata and GenEval results.

It lives in ``rewards`` because both sides use it and ``rewards`` never imports ``fpo_diffusion``
(docs/architecture.md, "The layer order"). Each caller passes the exception class its users see
(``ConfigError``, ``GenEvalInputError``) and names the file in its own words (``what``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: str | Path, what: str, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path``; a file that cannot be read or is not UTF-8 raises ``error`` with one line
    naming it: ``<what> <path> is not UTF-8 text (byte n)`` / ``<what> <path> cannot be read: <why>``."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of a JSON Lines text with their 1-based numbers.

    JSON Lines end at ``"\\n"`` only (as the official GenEval evaluator reads them): ``str.splitlines()``
    would also cut at U+2028, ``\\x1c`` ... which a JSON string may hold."""
    return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


class JSONLineError(ValueError):
    """A line that is not valid JSON; ``str(e)`` says why in a few words (the caller names file and line)."""


def json_line(line: str) -> Any:
    """The value of one JSON line, or :class:`JSONLineError` with the decoder's reason (or "nested too deeply")."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise JSONLineError(e.msg) from None
    except RecursionError:
        raise JSONLineError("nested too deeply") from None


__all__ = ["JSONLineError", "json_line", "jsonl_lines", "read_text"]
