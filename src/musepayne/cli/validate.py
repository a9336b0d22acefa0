"""``musepayne validate``: catalogue comparisons and repeat-based error scaling (paper §4, Eq. 10).

Cross-validation hook (``--cv``): the K-fold cross-validation of the training
issue plugs in here without touching this file's logic: ``CV_HOOK`` names a
function ``run_cv(options: dict) -> (info: dict, lines: list[str])`` that is
imported lazily when ``--cv`` is given.  Until it exists, ``--cv`` fails with
a clear message.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from ..science import validation as val
from ..science.selection import SelectionError, select
from ._common import Timer, check_output_not_input, emit, exc_text, fail, json_option
from ._tables import read_table, write_table

#: "module:function" run by ``validate --cv`` (provided by the training/cross-validation stage).
CV_HOOK = "musepayne.train.crossval:run_cv"


def _run_cv(options, as_json):
    mod, attr = CV_HOOK.split(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        fail("cross-validation (--cv) is not available in this build (needs "
             f"{CV_HOOK}, provided by the training stage)", as_json)
        return
    try:
        info, lines = fn(options)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        fail(f"cross-validation failed: {exc}", as_json)
        return
    emit(info, as_json, lines)


@click.command(name="validate")
@click.argument("catalogue", required=False, type=click.Path(dir_okay=False))
@click.argument("reference", required=False, type=click.Path(dir_okay=False))
@click.option("--match", "match", type=click.Choice(["id", "sky"]), default="id", show_default=True,
              help="Cross-match by identifier or by sky position.")
@click.option("--id-col", default="stellar_id", show_default=True, help="Identifier column of CATALOGUE.")
@click.option("--ref-id-col", default=None, help="Identifier column of REFERENCE (default: --id-col).")
@click.option("--tolerance", default=1.0, show_default=True, help="Sky-match tolerance in arcsec.")
@click.option("--labels", default=None, help="Comma-separated labels to compare (default: all common labels).")
@click.option("--preset", default=None, help="Selection preset applied to CATALOGUE first (e.g. eq5).")
@click.option("--where", default=None, help="Selection expression applied to CATALOGUE first.")
@click.option("--ref-column", "ref_columns", multiple=True,
              help="REF=NEW: copy a REFERENCE column onto matched CATALOGUE rows before --preset/--where, "
                   "e.g. 'snrg=snr_lamost' for the Eq. 5 cut; repeatable.")
@click.option("--x", "xcol", default="fe_h", show_default=True, help="x axis of the difference plot (Fig. 5).")
@click.option("--plot-dir", type=click.Path(file_okay=False),
              help="Write differences.png (Fig. 5 style) and bias_precision.png (Fig. 6-7 style) here; "
                   "with --cv the per-star tables cv_regularised.fits (with the baseline's *_cannon "
                   "columns) and cv_weight0.fits.")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False),
              help="Write the per-label statistics table here (.ecsv, .fits, .csv).")
@click.option("--repeats", is_flag=True, help="Eq. 10 error factors from repeat observations in CATALOGUE.")
@click.option("--robust", is_flag=True, help="Repeats: robust std (half the 15.87-84.13 range) instead of std.")
@click.option("--apply-errors", "apply_out", type=click.Path(dir_okay=False),
              help="With --repeats: write CATALOGUE with <label>_err scaled by the factors (Eq. 9) here.")
@click.option("--cv", is_flag=True, help="Run the model cross-validation (training stage; see CV_HOOK).")
@click.option("--no-baseline", is_flag=True,
              help="With --cv: skip the quadratic-Cannon baseline trained and tested on the same folds.")
@click.option("--trainset", "cv_trainset", type=click.Path(exists=True, dir_okay=False),
              help="With --cv: training set file (musepayne trainset build) instead of building one in memory "
                   "from ../shared/data (the default model is trained from such a file, whose float32 storage "
                   "alone moves CV figures by a few K).")
@click.option("--templates", "cv_templates", type=click.Path(exists=True, dir_okay=False),
              help="With --cv: gradient templates file (musepayne gradients build) instead of building them.")
@json_option
def validate(catalogue, reference, match, id_col, ref_id_col, tolerance, labels, preset, where, ref_columns, xcol,
             plot_dir, stats_path, repeats, robust, apply_out, cv, no_baseline, cv_trainset, cv_templates, as_json):
    """Compare CATALOGUE with REFERENCE: bias (median) and dispersion (half the
    15.87-84.13 percentile range) of the differences per label; and/or the
    Eq. 10 error scale factors from repeat observations within CATALOGUE.
    """
    if cv:
        _run_cv({"catalogue": catalogue, "reference": reference, "plot_dir": plot_dir,
                 "baseline": not no_baseline, "trainset": cv_trainset, "templates": cv_templates}, as_json)
        return
    if not catalogue:
        fail("give a CATALOGUE (and a REFERENCE, or --repeats)", as_json)
    if not reference and not repeats:
        fail("give a REFERENCE catalogue to compare with, or --repeats", as_json)
    if apply_out and not repeats:
        fail("--apply-errors needs --repeats", as_json)
    for out_path in (stats_path, apply_out):
        check_output_not_input(out_path, [catalogue, reference], as_json)

    timer = Timer()
    info = {"catalogue": catalogue, "reference": reference}
    lines = []
    try:
        with timer("read"):
            cat = read_table(catalogue)
            ref = read_table(reference) if reference else None
        n_in = len(cat)
        match_kw = dict(by=match, id_col=id_col, ref_id_col=ref_id_col, tolerance_arcsec=tolerance)
        if ref_columns:
            if ref is None:
                raise ValueError("--ref-column needs a REFERENCE")
            pairs = dict(rc.split("=", 1) if "=" in rc else (rc, rc) for rc in ref_columns)
            cat = val.attach_columns(cat, ref, pairs, **match_kw)
        if preset or where:
            cat = select(cat, where, preset)
            info["selection"] = cat.meta["selection"]
            lines.append(f"selection kept {len(cat)} of {n_in} rows: {cat.meta['selection']}")
        labs = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
        if ref is not None:
            with timer("compare"):
                comp = val.compare(cat, ref, labs, **match_kw)
            info["n_matched"] = len(comp.matched)
            info["labels"] = comp.as_dict()
            lines.append(f"{len(comp.matched)} matched rows ({match}); per label: bias, dispersion (N)")
            for lab, s in info["labels"].items():
                lines.append(f"  {lab:10s} {s['bias']:+.4g}  {s['dispersion']:.4g}  ({s['n']})")
            if stats_path:
                write_table(comp.stats, stats_path)
                info["stats"] = stats_path
            if plot_dir:
                with timer("plots"):
                    d = Path(plot_dir)
                    plots = {}
                    if xcol in comp.matched.colnames:
                        plots["differences"] = str(d / "differences.png")
                        info["points_per_panel"] = val.plot_differences(plots["differences"], comp, x=xcol)
                    plots["bias_precision"] = str(d / "bias_precision.png")
                    val.plot_bias_precision(plots["bias_precision"], {Path(catalogue).name: comp.stats})
                info["plots"] = plots
                lines += [f"plot written: {p}" for p in plots.values()]
        if repeats:
            with timer("repeats"):
                fac = val.repeat_error_factors(cat, labs, id_col=id_col, robust=robust)
            info["error_factors"] = {str(r["label"]): {"factor": float(r["factor"]), "n_pairs": int(r["n_pairs"])}
                                     for r in fac}
            if not any(v["n_pairs"] for v in info["error_factors"].values()):
                lines.append(f"no repeat pairs: no {id_col} occurs twice with finite values and errors"
                             + (" (a best-per-star selection keeps one row per star)" if preset or where else ""))
            lines.append("repeat error factors (Eq. 10): " + ", ".join(
                f"{k} {v['factor']:.3g} ({v['n_pairs']} pairs)" for k, v in info["error_factors"].items()))
            if apply_out:
                good = {k: v["factor"] for k, v in info["error_factors"].items() if v["n_pairs"] > 0}
                scaled = val.apply_error_factors(cat, good)
                write_table(scaled, apply_out)
                info["scaled_catalogue"] = apply_out
                lines.append(f"errors scaled -> {apply_out}")
    except (SelectionError, KeyError, ValueError, FileNotFoundError) as exc:
        fail(exc_text(exc), as_json)
        return
    info["timings"] = timer.timings
    emit(info, as_json, lines)
