"""The ``musepayne`` command line tool: a thin layer over the library.

Subcommands are defined one per module in this package (:mod:`musepayne.cli`) and
imported lazily, so ``musepayne --help`` is fast and a missing optional
dependency only affects the subcommand that needs it.

Every subcommand prints a short human summary; with ``--json`` it prints
instead exactly one JSON object (output paths, counts by status, timings).
"""

from __future__ import annotations

import importlib
import os
import traceback

import click

from .. import __version__
from ..config import ConfigError
from ._common import FolderBusy, error_message, fail

#: subcommand name -> "module:attribute" (one module per subcommand)
COMMANDS = {
    "prepare": "musepayne.cli.prepare:prepare",
    "demo": "musepayne.cli.demo:demo",
    "gradients": "musepayne.cli.gradients:gradients",
    "trainset": "musepayne.cli.trainset:trainset",
    "train": "musepayne.cli.train:train",
    "forecast": "musepayne.cli.forecast:forecast",
    "validate": "musepayne.cli.validate:validate",
    "select": "musepayne.cli.select:select_cmd",
    "calibrate": "musepayne.cli.calibrate:calibrate",
    "fit": "musepayne.cli.fit:fit",
    "model": "musepayne.cli.model:model",
    "extract": "musepayne.cli.extract:extract",
    "simulate": "musepayne.cli.simulate:simulate",
    "run": "musepayne.cli.run:run",
    "survey": "musepayne.cli.survey:survey",
}

_HELP = {
    "survey": "Many cubes on Dask (or in process) into one store; resumable, fault tolerant.",
    "run": "Cube(s) + source list -> labelled catalogue and report (resumable).",
    "prepare": "Prepare MUSE/LAMOST/library spectra for a LAMOST-grid model.",
    "demo": "Run the main job on an embedded default (no arguments, no network).",
    "gradients": "Build theoretical gradient templates (d flux / d label) for regularisation and flags.",
    "trainset": "Build a training set (prepared library spectra + labels) from MILES/STELIB.",
    "train": "Train a DD-Payne model (PyTorch) on a training set, optionally gradient-regularised.",
    "forecast": "Label precision vs S/N, V and exposure time (paper Eq. 11-13, Table 3).",
    "validate": "Compare catalogues (bias, dispersion, plots) and scale errors from repeats (Eq. 10).",
    "select": "Apply the paper's cuts (Eq. 5, 6, 8) or a safe custom expression to a catalogue.",
    "calibrate": "[Mg/Fe]-Teff trend correction (App. A, Table A1) or per-region offsets.",
    "fit": "Fit prepared spectra: labels, RV, errors, fit quality -> catalogue.",
    "model": "Import Payne networks into the musepayne model format; describe model files.",
    "extract": "Extract every catalogue star's spectrum from a MUSE cube (PSF fitting or apertures).",
    "simulate": "Simulate a crowded MUSE cube with truth table and source catalogue.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)

    def parse_args(self, ctx, args):
        ctx.meta["musepayne.argv"] = list(args)  # the error handler answers in JSON under --json
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        """Run the subcommand; any unexpected exception becomes one line and exit code 2.

        The traceback is printed only with ``musepayne --debug`` (or
        ``MUSEPAYNE_DEBUG=1``); click's own usage errors, ``sys.exit`` and
        Ctrl-C keep their behaviour.
        """
        as_json = "--json" in ctx.meta.get("musepayne.argv", ())
        debug = bool((ctx.params or {}).get("debug")) or os.environ.get("MUSEPAYNE_DEBUG", "") not in ("", "0")
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise
        except ConfigError as exc:
            if debug:
                traceback.print_exc()
            fail(f"bad configuration: {exc}", as_json)
        except FolderBusy as exc:
            fail(str(exc), as_json, code=3)
        except Exception as exc:  # noqa: BLE001 - the command line never shows a traceback
            if debug:
                traceback.print_exc()
            fail(error_message(exc), as_json)

    def format_commands(self, ctx, formatter):
        rows = [(n, _HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="musepayne")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an unexpected error.")
def main(debug):
    """musepayne: stellar labels for every resolved star in VLT/MUSE cubes.

    Stages: extract (cube -> spectra), prepare (spectra -> model grid),
    fit (labels, RV, errors, flags), and tools to validate, select and plan.
    Run 'musepayne COMMAND --help' for each.
    """
