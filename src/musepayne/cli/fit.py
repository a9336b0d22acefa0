"""``musepayne fit``: prepared spectra -> label catalogue."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import click

from ..fit import FitConfig, Fitter
from ..fit.catalogue import CatalogueStream, _catalogue_format, combine_metal_poor, fits_bytes, write_catalogue
from ..flags import fit_status_name
from ..io.prepared import PreparedSpectra
from ..io.spectra import ReaderError
from ..models.files import load_model
from ..models.gradients import GradientTemplates
from ..models.model import ModelError
from ..threads import blas_threads
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
@click.option("--benchmark-calibration/--no-benchmark-calibration", "benchmark_calibration", default=True,
              show_default=True,
              help="Apply the model's Gaia FGK benchmark-scale calibration (BENCHCAL in the model file): labels on "
                   "the benchmark scale (model values in X_uncal), X_err = sqrt(X_err_stat^2 + X_err_sys^2).")
@click.option("--seed-errors/--no-seed-errors", "seed_errors", default=True, show_default=True,
              help="When the model carries seed members (the default model does), report the labels' spread over "
                   "them, X_err_seed (with the benchmark calibration part of X_err_sys).")
@click.option("--gradient-templates", "templates_path", type=click.Path(dir_okay=False), default=None,
              help="Gradient templates (musepayne gradients build) for the per-label flags X_gradcorr / X_flag "
                   "(paper Eq. 4); default: the model's own, <model>.templates.fits beside the model file (the "
                   "default model has them); without any, X_flag is -1.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--threads", "n_threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="Fit chunks of spectra in this many threads; 0: one per CPU core. Results do not depend on it.")
@click.option("--processes", "n_processes", default=0, show_default=True, type=int,
              help="Fit blocks of spectra in this many processes (the threads shared among them); 0: one per "
                   "CPU core for inputs of two blocks (4096 spectra) or more with FITS output only, else 1. "
                   "Results do not depend on it.")
@click.option("--block-size", default=2048, show_default=True, type=int,
              help="Spectra read, fitted and written per block (memory ~ block x pixels x 12 B per process). "
                   "Results do not depend on it.")
@click.option("--keep-model", is_flag=True, help="Store the best-fit model spectra (FITS output only).")
@click.option("--also", "also", multiple=True, type=click.Path(dir_okay=False),
              help="Also export the catalogue to this file (.csv or .parquet); repeatable.")
@json_option
def fit(prepared, model_path, model_mp_path, output, rv_range, n_starts, lsf_excess, model_scatter, benchmark_calibration,
        seed_errors, templates_path, precision, n_threads, n_processes, block_size, keep_model, also, as_json):
    """Fit PREPARED spectra (the file 'musepayne prepare' writes) and write the catalogue.

    Labels, RV (relativistic Doppler shift, coarse search over +-RV_RANGE then
    fitted jointly), errors (covariance with the model's intrinsic scatter in
    the pixel variances, scaled by sqrt(chi2/dof) when > 1; the spread over the
    model's seed members, X_err_seed, when it has them),
    red_chi2, corr_flux and a status per spectrum.  Failed spectra are rows
    with status 'failed:<reason>'.

    The prepared file is read a block of spectra at a time and the catalogue is
    written as blocks finish, so memory does not grow with the number of spectra
    (with --model-mp both catalogues are combined at the end).  BLAS runs one thread
    per fitting thread.
    """
    models = [m for m in (model_path, model_mp_path, templates_path) if m and m != "default"]
    for out_path in (output, *also):
        check_output_not_input(out_path, [prepared, *models], as_json)
    if n_threads < 0 or n_processes < 0 or block_size < 1:
        fail("--threads and --processes must be >= 0, --block-size >= 1", as_json)
    try:  # options are checked before anything is read
        FitConfig(rv_range=rv_range, n_starts=n_starts, model_scatter=model_scatter, precision=precision,
                  block_size=block_size)
    except ValueError as exc:
        fail(f"bad option: {exc}", as_json)
    timer = Timer()
    try:
        with timer("read"):
            data = PreparedSpectra.open(prepared)
            model = load_model(model_path)
            model_mp = load_model(model_mp_path) if model_mp_path else None
            templates = GradientTemplates.load(templates_path) if templates_path else None
    except (ReaderError, ModelError, OSError) as exc:
        fail(exc_text(exc), as_json)
    n_threads = n_threads or os.cpu_count() or 1
    cfg = FitConfig(rv_range=rv_range, n_starts=n_starts, lsf_excess=lsf_excess, model_scatter=model_scatter,
                    precision=precision, benchmark_calibration=benchmark_calibration, seed_errors=seed_errors,
                    keep_model=keep_model, n_threads=n_threads, block_size=block_size)
    n_processes = _n_processes(n_processes, data.n_spectra, cfg, (output, *also), model_mp is not None)
    if n_processes > 1:
        cfg = replace(cfg, n_threads=max(1, n_threads // n_processes))
    counts, reasons, n = Counter(), Counter(), 0
    try:
        # one BLAS thread per fitting thread (the chunks' products are small; more threads per
        # product only oversubscribe the cores); the limit is set here, at the edge, not in the library
        with timer("fit"):
            fitter = Fitter(model, cfg, templates)
        with blas_threads(1, scipy=False):
            if model_mp is None:
                n = _fit_streaming(fitter, data, n_processes, output, also, timer, counts, reasons)
            else:
                n = _fit_metal_poor(fitter, (model_mp, cfg, templates), data, output, also, timer, counts, reasons)
    except (RuntimeError, ValueError, OSError) as exc:
        fail(exc_text(exc), as_json)
    finally:
        data.close()
    counts, reasons = dict(counts), dict(reasons)
    info = {"output": str(Path(output)), "also": [str(a) for a in also], "n_spectra": n, "threads": n_threads,
            "processes": n_processes,
            "counts": counts,
            "failed": reasons, "model": str(model_path), "model_mp": model_mp_path, "timings": timer.timings,
            "spectra_per_second": round(n / timer.timings["fit"], 2) if timer.timings.get("fit") else None}
    lines = [f"fitted {n} spectra with {model_path} -> {output} ({timer.timings['fit']:.2f} s)",
             "status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    for k, v in sorted(reasons.items()):
        lines.append(f"  {k}: {v}")
    emit(info, as_json, lines)
    if n and sum(reasons.values()) == n:
        sys.exit(1)  # the catalogue is written, but no spectrum could be fitted


def _count(counts, reasons, status):
    """Add a block's statuses to ``counts`` (failures by kind) and ``reasons`` (failures in full)."""
    names = [fit_status_name(s) for s in status]
    counts.update(names)
    reasons.update(s for s, n in zip(status, names) if n == "failed")


def _fit_streaming(fitter, data, n_processes, output, also, timer, counts, reasons):
    """Fit ``data`` block by block (in this or other processes), streaming the catalogue; returns n fitted."""
    n = 0
    outs = [CatalogueStream(p) for p in (output, *also)]
    try:
        blocks = (fitter.fit_blocks(data) if n_processes == 1
                  else _fit_in_processes(fitter, data, n_processes, Path(output)))
        for a, b, res in _timed(timer, "fit", blocks):
            with timer("write"):
                if isinstance(res, bytes):  # a block fitted in another process
                    status, raw = _decode_part(res)
                    for out in outs:
                        out.add_fits_bytes(raw)
                else:
                    status = res.status
                    cat = fitter.catalogue(data.spectra[a:b], res)
                    for out in outs:
                        out.add(cat)
            n += b - a
            _count(counts, reasons, status)
        with timer("write"):
            for out in outs:
                out.close()
    finally:
        for out in outs:
            out.abort()
    return n


def _fit_metal_poor(fitter, mp_args, data, output, also, timer, counts, reasons):
    """Fit ``data`` with both models (``mp_args``: the metal-poor Fitter's arguments), combine by the A / A-mp
    rule (paper Eq. 2) and write; returns the number of rows."""
    with timer("fit"):
        fitter_mp = Fitter(*mp_args)
        cat = combine_metal_poor(fitter(data), fitter_mp(data))
    with timer("write"):
        for path in (output, *also):
            write_catalogue(cat, path)
    _count(counts, reasons, [str(s) for s in cat["status"]])
    return len(cat)


def _timed(timer, name, blocks):
    """Iterate ``blocks``, adding the time spent producing each item to ``timer[name]``."""
    it = iter(blocks)
    while True:
        with timer(name):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _n_processes(requested, n_spectra, cfg, outputs, metal_poor) -> int:
    """Processes for the fit: as requested, or (0) one per core for two blocks or more.  Blocks
    fitted elsewhere come back as FITS bytes, so only FITS outputs, one model, and where
    processes can be forked (the fitter and the opened file are inherited, nothing pickled)."""
    if metal_poor or any(_catalogue_format(Path(p)) != "fits" for p in outputs):
        return 1
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if requested:
        return max(1, requested)
    if n_spectra < 2 * cfg.block_size:
        return 1
    return max(1, min(os.cpu_count() or 1, n_spectra // cfg.block_size))


def _part_path(folder: Path, a: int) -> Path:
    return folder / f"part-{a:012d}.fits"


def _encode_part(status, raw: bytes) -> bytes:
    head = json.dumps(list(status)).encode()
    return len(head).to_bytes(8, "little") + head + raw


def _decode_part(data: bytes):
    k = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + k]), data[8 + k:]


def _draw_blocks(counter, n_blocks):
    """Block indices drawn from ``counter`` (a ``multiprocessing.Value`` shared by the forked
    processes): every block goes to whichever process is free first."""
    while True:
        with counter.get_lock():
            k = counter.value
            counter.value = k + 1
        if k >= n_blocks:
            return
        yield k


def _fit_group(fitter, data, plan, counter, folder):
    """Worker process: fit the blocks it draws from ``counter`` and leave each as a part file
    (status list + the block's catalogue as FITS bytes), renamed into place when complete."""
    for a, b, res in fitter.fit_blocks(data, plan=plan, take=_draw_blocks(counter, len(plan.bounds))):
        part = _part_path(folder, a)
        tmp = part.with_suffix(".tmp")
        tmp.write_bytes(_encode_part([str(s) for s in res.status],
                                     fits_bytes(fitter.catalogue(data.spectra[a:b], res))))
        os.replace(tmp, part)


#: blocks this process may hold fitted ahead of the row order it writes in
_AHEAD = 4


def _fit_in_processes(fitter, data, n_proc, output: Path):
    """Yield ``(a, b, FitArrays | part bytes)`` for every block in row order.  The spectra are
    validated and the blocks cut once, here (:meth:`Fitter.plan_blocks`); this process and the
    forked ones then draw blocks from a shared counter, so no core idles while another still
    has a share to do.  Blocks are cut as in one pass over all rows, so the results are those
    of one process."""
    plan = fitter.plan_blocks(data)
    n_proc = max(1, min(n_proc, len(plan.bounds)))
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.parts-", dir=output.parent))
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    procs = [ctx.Process(target=_fit_group, args=(fitter, data, plan, counter, folder), daemon=True)
             for _ in range(n_proc - 1)]
    try:
        for p in procs:
            p.start()
        own = fitter.fit_blocks(data, plan=plan, take=_draw_blocks(counter, len(plan.bounds)))
        mine, own_left = {}, True
        for a, b in plan.bounds:
            while True:
                if a in mine:
                    yield a, b, mine.pop(a)
                    break
                part = _part_path(folder, a)
                if part.exists():
                    raw = part.read_bytes()
                    part.unlink()
                    yield a, b, raw
                    break
                if own_left and len(mine) < _AHEAD:
                    got = next(own, None)
                    if got is None:
                        own_left = False
                    else:
                        mine[got[0]] = got[2]
                    continue
                bad = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if bad or not any(p.is_alive() for p in procs) and not part.exists():
                    raise RuntimeError(f"a fitting process failed (exit code {bad[0] if bad else 0}) "
                                       f"before rows {a}-{b - 1} were fitted")
                time.sleep(0.01)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        shutil.rmtree(folder, ignore_errors=True)
