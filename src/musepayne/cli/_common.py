"""Helpers shared by the subcommands: the --json contract and timing."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from ..io.fits import FolderBusy, folder_lock

__all__ = ["json_option", "emit", "Timer", "fail", "one_line", "json_safe", "check_output_not_input",
           "folder_lock", "FolderBusy", "error_message", "exc_text", "reproducible_command"]

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON object (outputs, counts by status, timings) instead of the summary.",
)


def emit(result: dict, as_json: bool, lines=()):
    """Print either the human summary lines or one JSON object."""
    if as_json:
        click.echo(json.dumps(json_safe(result), sort_keys=True, default=str, allow_nan=False))
    else:
        for line in lines:
            click.echo(line)


def fail(message: str, as_json: bool = False, code: int = 2):
    """Exit with a clear one-line message (JSON object with an 'error' key under --json)."""
    message = one_line(message)
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"musepayne: error: {message}", err=True)
    sys.exit(code)


class Timer:
    """Collect wall-clock timings per named step."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


def one_line(message, limit: int = 600) -> str:
    """``message`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return json_safe(obj.item())
    return obj


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_not_input(output, inputs, as_json: bool = False, what: str = "output"):
    """Refuse (one-line error, exit 2) when ``output`` is (the same file as) one of ``inputs``.

    Every command that reads files and writes one calls this before doing any
    work, so no input is ever replaced by a result.
    """
    if output is None:
        return
    out = Path(output)
    for inp in inputs:
        if inp is None:
            continue
        if _same_file(out, Path(inp)):
            fail(f"{what} {output} is the input file {inp}; choose another output path", as_json)


def exc_text(exc: BaseException) -> str:
    """The message of an expected exception (its first argument; OSError: reason and file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return error_message(exc)
    return str(exc.args[0]) if exc.args else str(exc)


def error_message(exc: BaseException) -> str:
    """A one-line description of an unexpected exception for the command line."""
    if isinstance(exc, RecursionError):
        return "input too deeply nested (expression or structure too complex)"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = one_line(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _portable_path(word: str, cwd: Path) -> str:
    """An absolute path as a relative one (under ``cwd``) or ``<DIR>/name`` (elsewhere)."""
    if not word.startswith("/"):
        return word
    p = Path(word)
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return f"<DIR>/{p.name}" if p.name else "<DIR>"


def reproducible_command(prefix: str, args=None, cwd=None) -> str:
    """The command line of this process as provenance that does not depend on where it ran.

    Absolute paths (also in ``--opt=/path``) become relative to ``cwd`` when under it, else
    ``<DIR>/file`` (the inputs are identified by the sha256 that the provenance records beside it).

    Parameters
    ----------
    prefix : str
        Leading words, e.g. ``'musepayne train'``.
    args : list of str, optional
        Arguments after the subcommand (default ``sys.argv[2:]``).
    cwd : path-like, optional
        Folder paths are made relative to (default the working directory).

    Returns
    -------
    str
        The shell-quoted command line.
    """
    import shlex

    cwd = Path(cwd or os.getcwd()).resolve()
    words = []
    for a in (sys.argv[2:] if args is None else args):
        a = str(a)
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            words.append(f"{k}={_portable_path(v, cwd)}")
        else:
            words.append(_portable_path(a, cwd))
    return " ".join([prefix] + [shlex.quote(w) for w in words])
