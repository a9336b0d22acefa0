"""``musepayne run``: cube(s) + source catalogue -> labelled catalogue and report."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..extract.extractor import read_source_catalogue
from ..io.spectra import ReaderError
from ..models.model import ModelError
from ..pipeline.runner import Pipeline, RunConfig, load_config_file
from ._common import FolderBusy, check_output_not_input, emit, fail, json_option

#: errors of a run on bad input: reported as one line (exit code 2), never a traceback
PIPELINE_ERRORS = (ReaderError, ModelError, ValueError, OSError, RuntimeError)


def one_line(exc) -> str:
    """The message of ``exc`` on one line (multi-line messages joined)."""
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def normalised_catalogue(path, mag_column, outdir: Path) -> Path:
    """Read ``path`` with an explicit magnitude column; write the normalised table to OUTDIR/sources_input.ecsv."""
    t = read_source_catalogue(path, mag_column=mag_column)
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / "sources_input.ecsv"
    t.write(out, format="ascii.ecsv", overwrite=True)
    return out


def detect_options(f):
    """Click options of source detection (``--detect-threshold``, ``--detect-passes``, ``--detect-bands``)."""
    f = click.option("--detect-bands", type=int, default=None,
                     help="Broad bands searched besides white light when detecting (default 4).")(f)
    f = click.option("--detect-passes", type=int, default=None,
                     help="Detection passes on the residual of the fitted stars (default 12).")(f)
    f = click.option("--detect-threshold", type=float, default=None,
                     help="S/N of a detected star (matched filter and fitted flux; default 5).")(f)
    return f


def detect_overrides(threshold, passes, bands) -> dict:
    """The ``[detect]`` options given on the command line (unset ones left out).

    Parameters
    ----------
    threshold : float or None
        ``--detect-threshold`` (S/N).
    passes : int or None
        ``--detect-passes``.
    bands : int or None
        ``--detect-bands``.

    Returns
    -------
    dict
        ``DetectConfig`` option -> value, for :meth:`RunConfig.updated` (``detect=...``).
    """
    d = {"threshold": threshold, "n_iter": passes, "n_bands": bands}
    return {k: v for k, v in d.items() if v is not None}


def progress_display(enabled: bool):
    """A rich progress display with one bar per stage; returns (context, callback)."""
    if not enabled:
        return nullcontext(), None

    prog = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    tasks = {}
    clock = {}  # stage -> (time, done) the rate is counted from

    def cb(stage, done, total):
        now = time.perf_counter()
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total, rate="")
            clock[stage] = (now, done)
        t0, d0 = clock[stage]
        if now - t0 < 0.05:  # items done at once (resumed from checkpoints): not a rate; count from here
            clock[stage] = (now, done)
            rate = ""
        else:
            rate = f"{(done - d0) / (now - t0):.1f}/s" if done > d0 else ""
        prog.update(tasks[stage], completed=done, total=total, rate=rate)

    return prog, cb


def setup_log(outdir: Path):
    """A logger writing OUTDIR/musepayne.log (no global handlers are touched)."""
    outdir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"musepayne.run.{outdir.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    h = logging.FileHandler(outdir / "musepayne.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    return log, h


def run_pipeline(out: Path, config: RunConfig, cubes, sources, *, as_json: bool, progress: bool, what: str = "run",
                 truth=None, mag_column=None) -> dict:
    """Run the pipeline for a command (``run``, ``demo``): log file, progress bars, and every
    expected failure as one error line (a locked folder is left to the command group: exit 3).
    ``mag_column`` first rewrites ``sources`` with that magnitude column (into ``out``)."""
    log, handler = setup_log(out)
    ctx, cb = progress_display(progress and not as_json)
    try:
        if sources is not None and mag_column:
            sources = normalised_catalogue(sources, mag_column, out)
        with ctx:
            return Pipeline(out, config, progress=cb, logger=log).run(cubes, sources, truth=truth)
    except FolderBusy:
        raise  # the command group reports it (exit code 3)
    except PIPELINE_ERRORS as exc:
        log.error("%s failed: %s", what, exc)
        fail(one_line(exc), as_json)
    finally:
        log.removeHandler(handler)
        handler.close()


@click.command(name="run")
@click.argument("cubes", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--sources", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Reference catalogue (CSV, ECSV, FITS or VOTable) with ra/dec (deg or sexagesimal) or x/y and a "
                   "magnitude.  Without it the stars are detected in the cube itself "
                   "(OUTDIR/cubes/<cube_id>/sources_detected.ecsv).")
@click.option("--mag-column", default=None, help="Magnitude column of --sources (default: mag, F606W, Gmag, V, ...).")
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON file with any run option; command-line flags override it.")
@click.option("--model", default=None, help="Model file or 'default' (the shipped model).")
@click.option("--model-mp", default=None, help="Metal-poor model (paper Eq. 2 combination).")
@click.option("--mode", type=click.Choice(["standard", "bulge"]), default=None, help="Masking mode (default standard).")
@click.option("--ao-notch", type=click.Choice(["WFM-AO-N", "WFM-AO-E", "NFM"], case_sensitive=False), default=None)
@click.option("--method", "extract_method", type=click.Choice(["psf", "aperture"]), default=None,
              help="Extraction method (default psf).")
@click.option("--cube-lsf", default=None, help="LSF of the cube spectra (default muse; see 'prepare --lsf').")
@click.option("--rv-range", type=float, default=None, help="Half-width of the RV search in km/s (default 600).")
@click.option("--fit-chunk", type=int, default=None, help="Stars per fit checkpoint (default 200).")
@click.option("--no-report", is_flag=True, help="Skip the HTML report.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@detect_options
@json_option
def run(cubes, sources, mag_column, outdir, config_file, model, model_mp, mode, ao_notch, extract_method, cube_lsf,
        rv_range, fit_chunk, no_report, progress, detect_threshold, detect_passes, detect_bands, as_json):
    """Extract, prepare and fit every star of CUBES; write catalogue and report to OUTDIR.

    Several cubes of the same field are allowed: the catalogue keeps every
    observation and catalogue_stars.fits keeps, per star, the observation with
    the highest corr_flux (paper Eq. 6).  Interrupt at any moment and run the
    same command again: finished stages and fitted chunks are not redone.
    """

    try:
        base = load_config_file(config_file) if config_file else RunConfig()
        cfg = base.updated(model=model, model_mp=model_mp, mode=mode, ao_notch=ao_notch,
                                        extract_method=extract_method, cube_lsf=cube_lsf, rv_range=rv_range,
                                        fit_chunk=fit_chunk, report=False if no_report else None,
                                        detect=detect_overrides(detect_threshold, detect_passes, detect_bands))
    except (TypeError, ValueError) as exc:
        fail(f"bad configuration: {exc}", as_json)
    out = Path(outdir)
    inputs = [*cubes, sources, config_file]
    check_output_not_input(out, inputs, as_json, what="output folder")
    for name in ("config.json", "run.json", "models.fits", "musepayne.log", "catalogue.fits", "catalogue.csv",
                 "catalogue.parquet", "catalogue_stars.fits", "catalogue_stars.csv", "catalogue_stars.parquet"):
        check_output_not_input(out / name, inputs, as_json, what="run output")
    record = run_pipeline(out, cfg, list(cubes), sources, as_json=as_json, progress=progress, mag_column=mag_column)
    info = {"outdir": str(out), "catalogue": str(out / "catalogue.fits"),
            "stars": str(out / "catalogue_stars.fits"), "report": str(out / "report" / "index.html"),
            "counts": record["counts"], "n_observations": record["n_observations"], "n_stars": record["n_stars"],
            "timings": record["timings"], "warnings": record.get("warnings", [])}
    emit(info, as_json, [
        f"run: {len(cubes)} cube(s) -> {record['n_observations']} observations of {record['n_stars']} stars",
        "status: " + ", ".join(f"{k}={v}" for k, v in sorted(record["counts"].items())),
        f"catalogue: {out / 'catalogue.fits'} (+ .csv, .parquet); per star: {out / 'catalogue_stars.fits'}",
        f"report: {out / 'report' / 'index.html'}" if cfg.report else "report: skipped",
        "timings [s]: " + ", ".join(f"{k}={v}" for k, v in record["timings"].items()),
    ] + [f"warning: {w}" for w in record.get("warnings", [])])
