"""``musepayne fit``: prepared spectra -> label catalogue."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import click

from ..fit.catalogue import combine_metal_poor, write_catalogue
from ..fit.fitter import FitConfig, Fitter
from ..io.prepared import PreparedSpectra
from ..io.spectra import ReaderError
from ..models.model import ModelError, load_model
from ._common import Timer, check_output_not_input, emit, exc_text, fail, json_option


@click.command(name="fit")
@click.argument("prepared", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", default="default", show_default=True,
              help="Model file (musepayne format); 'default' uses the model shipped with the package.")
@click.option("--model-mp", "model_mp_path", default=None,
              help="Metal-poor model: fitted too and combined with --model by the A / A-mp rule (paper Eq. 2).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Catalogue file: .fits (default), .csv or .parquet by suffix.")
@click.option("--rv-range", default=600.0, show_default=True, type=float,
              help="Half-width (km/s) of the RV search and bound of the fitted RV.")
@click.option("--starts", "n_starts", default=2, show_default=True, type=click.IntRange(min=1),
              help="Starting points per spectrum.")
@click.option("--lsf-excess/--no-lsf-excess", default=True, show_default=True,
              help="Convolve the model by the prepared LSF_EXCESS where the data are broader than the model.")
@click.option("--model-scatter", type=click.Choice(["errors", "weights", "off"]), default="errors",
              show_default=True,
              help="The model's intrinsic per-pixel scatter (SCATTER in the model file): in the errors and "
                   "red_chi2_model only (labels from the observed errors, paper Eq. 3), also in the fit "
                   "weights (Cannon test step), or not at all.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--threads", "n_threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="Fit chunks of spectra in this many threads; 0: one per CPU core. Results do not depend on it.")
@click.option("--keep-model", is_flag=True, help="Store the best-fit model spectra (FITS output only).")
@click.option("--also", "also", multiple=True, type=click.Path(dir_okay=False),
              help="Also export the catalogue to this file (.csv or .parquet); repeatable.")
@json_option
def fit(prepared, model_path, model_mp_path, output, rv_range, n_starts, lsf_excess, model_scatter, precision, n_threads,
        keep_model, also, as_json):
    """Fit PREPARED spectra (the file 'musepayne prepare' writes) and write the catalogue.

    Labels, RV (relativistic Doppler shift, coarse search over +-RV_RANGE then
    fitted jointly), errors (covariance with the model's intrinsic scatter in
    the pixel variances, scaled by sqrt(chi2/dof) when > 1),
    red_chi2, corr_flux and a status per spectrum.  Failed spectra are rows
    with status 'failed:<reason>'.
    """

    models = [m for m in (model_path, model_mp_path) if m and m != "default"]
    for out_path in (output, *also):
        check_output_not_input(out_path, [prepared, *models], as_json)
    n_threads = n_threads or os.cpu_count() or 1
    try:  # options are checked before anything is read
        cfg = FitConfig(rv_range=rv_range, n_starts=n_starts, lsf_excess=lsf_excess, model_scatter=model_scatter,
                        precision=precision,
                        keep_model=keep_model, n_threads=n_threads)
    except ValueError as exc:
        fail(f"bad option: {exc}", as_json)
    timer = Timer()
    try:
        with timer("read"):
            data = PreparedSpectra.read(prepared)
            model = load_model(model_path)
            model_mp = load_model(model_mp_path) if model_mp_path else None
    except (ReaderError, ModelError, OSError) as exc:
        fail(exc_text(exc), as_json)
    with timer("fit"):
        cat = Fitter(model, cfg)(data)
        if model_mp is not None:
            cat_mp = Fitter(model_mp, cfg)(data)
            cat = combine_metal_poor(cat, cat_mp)
    try:
        with timer("write"):
            write_catalogue(cat, output)
            for extra in also:
                write_catalogue(cat, extra)
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc_text(exc), as_json)
    counts = dict(Counter(s.split(":")[0] if s.startswith("failed") else s for s in cat["status"]))
    reasons = dict(Counter(s for s in cat["status"] if s.startswith("failed")))
    n = len(cat)
    info = {"output": str(Path(output)), "also": [str(a) for a in also], "n_spectra": n, "threads": n_threads,
            "counts": counts,
            "failed": reasons, "model": str(model_path), "model_mp": model_mp_path, "timings": timer.timings,
            "spectra_per_second": round(n / timer.timings["fit"], 2) if timer.timings.get("fit") else None}
    lines = [f"fitted {n} spectra with {model_path} -> {output} ({timer.timings['fit']:.2f} s)",
             "status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    for k, v in sorted(reasons.items()):
        lines.append(f"  {k}: {v}")
    emit(info, as_json, lines)
    if n and all(str(s).startswith("failed") for s in cat["status"]):
        sys.exit(1)  # the catalogue is written, but no spectrum could be fitted
