"""Helpers shared by the subcommands: the --json contract and timing."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

import click

__all__ = ["json_option", "emit", "Timer", "fail"]

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="Print one JSON object (outputs, counts by status, timings) instead of the summary.",
)


def emit(result: dict, as_json: bool, lines=()):
    """Print either the human summary lines or one JSON object."""
    if as_json:
        click.echo(json.dumps(result, sort_keys=True, default=str))
    else:
        for line in lines:
            click.echo(line)


def fail(message: str, as_json: bool = False, code: int = 2):
    """Exit with a clear message (JSON object with an 'error' key under --json)."""
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
