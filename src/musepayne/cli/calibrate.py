"""``musepayne calibrate``: the [Mg/Fe]-Teff calibration of paper Appendix A."""

from __future__ import annotations

import json

import click

from ..science import calibration as cal
from ..science.selection import SelectionError
from ._common import Timer, check_output_not_input, emit, exc_text, fail, json_option
from ._tables import read_table, write_table


def _parse_offset(text):
    if "=" not in text:
        raise ValueError(f"--offset needs EXPRESSION=VALUE, got {text!r}")
    expr, val = text.rsplit("=", 1)
    return expr.strip(), float(val)


@click.command(name="calibrate")
@click.argument("catalogue", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Calibrated catalogue (format from the suffix).")
@click.option("--trend/--no-trend", default=True, show_default=True,
              help="Remove the Table A1 [Mg/Fe]-Teff trend.")
@click.option("--source", type=click.Choice(["lamost_ddpayne_a", "apogee_payne"]), default="lamost_ddpayne_a",
              show_default=True, help="Which Table A1 column pair of slopes.")
@click.option("--teff-ref", default=4500.0, show_default=True, help="Pivot Teff (K) of the trend correction.")
@click.option("--giant-logg", default=3.5, show_default=True, help="Giants have logg below this.")
@click.option("--outside", type=click.Choice(["skip", "clip"]), default="skip", show_default=True,
              help="Stars outside the [Fe/H] bins -0.8..0.6: unchanged, or nearest bin's slope.")
@click.option("--offset", "offsets", multiple=True,
              help="Region offset EXPRESSION=VALUE, e.g. 'r_gc < 3.5=0.08' (repeat; first match wins).")
@click.option("--paper-offsets", is_flag=True, help="Use the paper's R_gc offsets (needs an r_gc column, kpc).")
@json_option
def calibrate(catalogue, output, trend, source, teff_ref, giant_logg, outside, offsets, paper_offsets, as_json):
    """Calibrate [Mg/Fe] of CATALOGUE (paper App. A); the steps go to the output's metadata."""

    check_output_not_input(output, [catalogue], as_json)
    timer = Timer()
    try:
        regions = [_parse_offset(o) for o in offsets]
        if paper_offsets:
            regions = list(cal.PAPER_REGION_OFFSETS) + regions
        if not trend and not regions:
            raise ValueError("nothing to do: --no-trend and no --offset/--paper-offsets")
        with timer("read"):
            table = read_table(catalogue)
        out = table
        n_trend = 0
        with timer("calibrate"):
            if trend:
                out = cal.MgFeTeffCalibration(source=source, teff_ref=teff_ref, giant_logg=giant_logg,
                                              outside=outside)(out)
                n_trend = int(out["mg_fe_cal_flag"].sum())
            if regions:
                out = cal.apply_region_offsets(out, regions)
        with timer("write"):
            write_table(out, output)
    except (SelectionError, KeyError, ValueError, FileNotFoundError) as exc:
        fail(exc_text(exc), as_json)
        return

    info = {"input": catalogue, "output": output, "n_rows": len(out), "n_trend_corrected": n_trend,
            "calibration": json.loads(out.meta["calibration"]), "timings": timer.timings}
    lines = [f"{len(out)} rows; Teff-trend correction applied to {n_trend}" if trend else f"{len(out)} rows"]
    if regions:
        for r in json.loads(out.meta["calibration"])[-1]["regions"]:
            lines.append(f"region {r['region']}: {r['offset']:+g} dex to {r['n']} rows")
    lines.append(f"written: {output} (steps recorded in meta 'calibration')")
    emit(info, as_json, lines)
