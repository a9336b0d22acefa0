"""``musepayne trainset``: training sets from labelled library spectra."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import click

from ..train.trainset import TrainsetCuts, build_trainset
from ._common import Timer, emit, exc_text, fail, json_option, reproducible_command

_DEFAULT_LIB = Path("..") / "shared" / "data" / "libraries"


def _range(text, name):
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{name} must be lo,hi") from None
    if not hi > lo:
        raise click.BadParameter(f"{name}: hi must exceed lo")
    return (lo, hi)


@click.group(name="trainset")
def trainset():
    """Training sets: prepared library spectra on the model grid plus labels."""


@trainset.command(name="build")
@click.option("--miles", "miles_dir", type=click.Path(file_okay=False), default=None,
              help=f"MILES folder (spectra + paramsMILES_v9.1.txt). Default {_DEFAULT_LIB / 'miles'} if present.")
@click.option("--stelib", "stelib_dir", type=click.Path(file_okay=False), default=None,
              help=f"STELIB folder (labels from headers). Default {_DEFAULT_LIB / 'stelib'} if present.")
@click.option("--no-miles", is_flag=True, help="Do not use MILES.")
@click.option("--no-stelib", is_flag=True, help="Do not use STELIB.")
@click.option("--teff-range", default="3800,8000", show_default=True, help="Keep lo < Teff < hi (K).")
@click.option("--logg-range", default="-0.5,5.5", show_default=True, help="Keep lo < logg < hi.")
@click.option("--feh-range", default="-3.0,1.0", show_default=True, help="Keep lo < [Fe/H] < hi.")
@click.option("--train-dichroic/--mask-dichroic", default=True, show_default=True,
              help="Train on the LAMOST dichroic region 5720-6060 A (library spectra are fine there).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Training-set FITS file.")
@json_option
def build(miles_dir, stelib_dir, no_miles, no_stelib, teff_range, logg_range, feh_range, train_dichroic,
          output, as_json):
    """Build a training set from MILES and STELIB through the project's own prepare.

    Each library spectrum is taken from its native resolution (MILES 2.5 A,
    STELIB 3 A, air) to the LAMOST grid, R = 1800 and the 50 A
    pseudo-continuum exactly as observed spectra are; pixels the library does
    not cover keep IVAR = 0.  Stars need finite Teff, logg, [Fe/H] inside the
    ranges and a usable prepared spectrum.
    """

    timer = Timer()
    if not no_miles and miles_dir is None and (_DEFAULT_LIB / "miles").is_dir():
        miles_dir = _DEFAULT_LIB / "miles"
    if not no_stelib and stelib_dir is None and (_DEFAULT_LIB / "stelib").is_dir():
        stelib_dir = _DEFAULT_LIB / "stelib"
    if no_miles:
        miles_dir = None
    if no_stelib:
        stelib_dir = None
    if miles_dir is None and stelib_dir is None:
        fail("no library folder: pass --miles DIR and/or --stelib DIR", as_json)
    cuts = TrainsetCuts(_range(teff_range, "--teff-range"), _range(logg_range, "--logg-range"),
                        _range(feh_range, "--feh-range"))
    try:
        with timer("build"):
            ts = build_trainset(miles_dir, stelib_dir, cuts=cuts, unmask=("DICHROIC",) if train_dichroic else ())
    except (FileNotFoundError, ValueError) as exc:
        fail(exc_text(exc), as_json)


    ts = replace(ts, meta={**ts.meta, "tscmd": reproducible_command("musepayne trainset")})
    with timer("write"):
        ts.write(output)
    counts = dict(Counter(ts.table["instrument"].tolist()))
    info = {"output": str(output), "n_spectra": int(ts.n_spectra), "by_library": counts,
            "cuts": ts.meta["tscuts"], "dropped": ts.meta["tsdrop"], "timings": timer.timings}
    emit(info, as_json, [
        f"training set: {ts.n_spectra} stars ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) -> {output}",
        f"cuts: {ts.meta['tscuts']}; dropped {ts.meta['tsdrop']} of {ts.meta['tsnfile']} files",
    ])
