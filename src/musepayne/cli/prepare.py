"""``musepayne prepare``: spectra -> the prepared interchange format."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
import numpy as np

from ..flags import SPECTRUM_STATUS
from ..instrument.lsf import lsf_from_spec
from ..io.batching import group_sets
from ..io.prepared import PreparedSpectra
from ..io.readers import read_spectra
from ..io.spectra import ReaderError
from ..prepare.preparer import PrepareConfig, Preparer
from ..threads import blas_threads
from ._common import Timer, check_output_not_input, emit, json_option


@click.command(name="prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output FITS file (interchange format: WAVE, FLUX, IVAR, MASK, LSF_EXCESS, CONT, SPECTRA).")
@click.option("--mode", type=click.Choice(["standard", "bulge"]), default="standard", show_default=True,
              help="standard: telluric bands, >8750 A and the LAMOST dichroic masked; "
                   "bulge: lambda<5991 A and the paper's narrow telluric bands masked, sky residuals cleaned.")
@click.option("--ao-notch", type=click.Choice(["WFM-AO-N", "WFM-AO-E", "NFM"], case_sensitive=False),
              default=None, help="Mask the NaD laser notch of this MUSE AO mode.")
@click.option("--instrument", type=click.Choice(["muse", "lamost", "miles", "stelib"]), default=None,
              help="Kind of the input files (detected from the files when omitted).")
@click.option("--lsf", "lsf_spec", default=None,
              help="Override the input LSF: muse, lamost, miles, stelib, fwhm=<A>, R=<value> or a "
                   "two-column table file (wavelength, FWHM in A).")
@click.option("--target-lsf", default="lamost", show_default=True,
              help="LSF of the model grid (same forms as --lsf).")
@click.option("--sky-clean/--no-sky-clean", default=None,
              help="Replace sky-emission residuals (default: on in bulge mode only).")
@json_option
def prepare(inputs, output, mode, ao_notch, instrument, lsf_spec, target_lsf, sky_clean, as_json):
    """Prepare INPUT spectra for a LAMOST-grid model and write one OUTPUT file.

    Each input (MUSE PampelMUSE/extract/table files, LAMOST DR1-8 or DR9+
    files, MILES or STELIB library files) is converted to vacuum, degraded to
    the target LSF with a wavelength-dependent Gaussian kernel (paper Eq. 1;
    pixels where the input is already coarser are flagged, not sharpened),
    rebinned flux-conservingly onto the LAMOST grid with errors propagated,
    masked for the chosen mode and normalised by the 50 A pseudo-continuum.
    Files that cannot be read become rows with status 'read_error'.
    """

    check_output_not_input(output, inputs, as_json)
    timer = Timer()
    cfg = PrepareConfig(mode=mode, ao_notch=ao_notch, target_lsf=target_lsf, sky_clean=sky_clean)
    prep = Preparer(cfg)
    parts, sets = [], []
    with timer("read"):
        for i, path in enumerate(inputs):
            try:
                kw = {"lsf": lsf_from_spec(lsf_spec)} if lsf_spec else {}
                s = read_spectra(path, kind=instrument, **kw)
                s.meta["_order"] = [(i, j) for j in range(s.n_spectra)]
                sets.append(s)
            except (ReaderError, ValueError, OSError) as exc:
                part = prep.failure_for_file(path, str(exc))
                part.spectra["_order"] = [(i, 0)]
                parts.append(part)
    with timer("prepare"), blas_threads(1):  # small products: one BLAS thread, as `musepayne run` (same bits)
        for s in group_sets(sets):
            parts.append(prep(s))
    with timer("write"):
        result = PreparedSpectra.concatenate(parts)
        order = np.lexsort(np.asarray(result.spectra["_order"]).T[::-1])  # input file order
        result = result.take(order)
        result.spectra.remove_column("_order")
        result.write(output)
    counts = dict(Counter(result.spectra["status"].tolist()))
    info = {
        "output": str(Path(output)),
        "n_spectra": int(result.n_spectra),
        "counts": counts,
        "timings": timer.timings,
        "mode": mode,
    }
    lines = [f"prepared {result.n_spectra} spectra -> {output}",
             "status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    bad = [r for r in result.spectra if r["status"] != "ok"]
    for r in bad[:10]:
        lines.append(f"  {r['stellar_id']}: {r['status']}: {r['reason']}")
    snr = np.asarray(result.spectra["snr"], float)
    if np.isfinite(snr).any():
        lines.append(f"median S/N per pixel: {np.nanmedian(snr):.1f}")
    emit(info, as_json, lines)
    if result.n_spectra and not any(SPECTRUM_STATUS[k].usable for k in counts if k in SPECTRUM_STATUS):
        sys.exit(1)  # the file is written, but no input could be prepared
