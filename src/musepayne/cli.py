"""The ``musepayne`` command line tool: a thin layer over the library.

Subcommands are defined one per module in :mod:`musepayne.commands` and
imported lazily, so ``musepayne --help`` is fast and a missing optional
dependency only affects the subcommand that needs it.

Every subcommand prints a short human summary; with ``--json`` it prints
instead exactly one JSON object (output paths, counts by status, timings).
"""

from __future__ import annotations

import importlib

import click

from . import __version__

#: subcommand name -> "module:attribute" (one module per subcommand)
COMMANDS = {
    "prepare": "musepayne.commands.prepare:prepare",
    "demo": "musepayne.commands.demo:demo",
    "gradients": "musepayne.commands.gradients:gradients",
    "trainset": "musepayne.commands.trainset:trainset",
    "train": "musepayne.commands.train:train",
    "fit": "musepayne.commands.fit:fit",
    "model": "musepayne.commands.model:model",
}

_HELP = {
    "prepare": "Prepare MUSE/LAMOST/library spectra for a LAMOST-grid model.",
    "demo": "Run the main job on an embedded default (no arguments, no network).",
    "gradients": "Build theoretical gradient templates (d flux / d label) for regularisation and flags.",
    "trainset": "Build a training set (prepared library spectra + labels) from MILES/STELIB.",
    "train": "Train a DD-Payne model (PyTorch) on a training set, optionally gradient-regularised.",
    "fit": "Fit prepared spectra: labels, RV, errors, fit quality -> catalogue.",
    "model": "Import Payne networks into the musepayne model format; describe model files.",
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

    def format_commands(self, ctx, formatter):
        rows = [(n, _HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="musepayne")
def main():
    """musepayne: stellar labels for every resolved star in VLT/MUSE cubes.

    Stages: extract (cube -> spectra), prepare (spectra -> model grid),
    fit (labels, RV, errors, flags), and tools to validate, select and plan.
    Run 'musepayne COMMAND --help' for each.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
