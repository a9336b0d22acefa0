"""``musepayne extract``: cube + source catalogue -> one spectra file (WAVE, FLUX, ERR, SOURCES)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import click

from ..config import ConfigError, from_mapping
from ..extract.detect import DetectConfig, Detector
from ..extract.extractor import ExtractConfig, Extractor, read_source_catalogue
from ..io.spectra import ReaderError
from ..threads import blas_threads
from ._common import Timer, check_output_not_input, emit, exc_text, fail, json_option
from .run import detect_options, detect_overrides


@click.command(name="extract")
@click.argument("cube", type=click.Path(dir_okay=False))
@click.option("--sources", "catalogue", default=None, type=click.Path(dir_okay=False),
              help="Source catalogue (CSV, ECSV, FITS or VOTable) with ra/dec (deg or sexagesimal) or x/y "
                   "(0-based px) and a magnitude.  Without it the stars are detected in the cube "
                   "(written to <output stem>_sources.ecsv).")
@click.option("--mag-column", default=None, help="Magnitude column of --sources (default: mag, F606W, Gmag, V, ...).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output FITS file: WAVE, FLUX, ERR (n_stars x n_layers), SOURCES, LAYER_FLAG.")
@click.option("--method", type=click.Choice(["psf", "aperture"]), default="psf", show_default=True,
              help="psf: all stars fitted together per layer; aperture: exact circular apertures + sky annulus.")
@click.option("--block", type=int, default=50, show_default=True,
              help="Layers per block sharing one PSF evaluation and one factorisation.")
@click.option("--sky-order", type=click.IntRange(-1, 2), default=1, show_default=True,
              help="Sky polynomial order (-1: none).")
@click.option("--no-transform", is_flag=True, help="Use catalogue positions as they are (no offset/rotation/scale fit).")
@click.option("--per-star", "per_star", type=click.Path(file_okay=False), default=None,
              help="Also write PampelMUSE-style 1-D files (flux + SIGMA) of the fitted stars into this folder.")
@click.option("--blas-threads", "blas_threads_", type=click.IntRange(min=1), default=1, show_default=True,
              help="BLAS/LAPACK threads of the solves (as `musepayne run`'s blas_threads: the fluxes' last bits "
                   "depend on it, and extra threads slow a busy machine down).")
@detect_options
@json_option
def extract(cube, catalogue, mag_column, output, method, block, sky_order, no_transform, per_star, blas_threads_,
            detect_threshold, detect_passes, detect_bands, as_json):
    """Extract the spectrum of every catalogue star from a MUSE CUBE.

    Fits the catalogue->cube transformation and a wavelength-dependent Moffat
    PSF, then solves all stars and a smooth sky together in every layer
    (weighted sparse least squares, one factorisation per block of layers),
    streaming through the cube.  Stars off the field are reported with status
    'off_field'.
    """

    check_output_not_input(output, [cube, catalogue], as_json)
    check_output_not_input(per_star, [cube, catalogue, output], as_json, what="--per-star folder")
    timer = Timer()
    cfg = ExtractConfig(method=method, block=block, sky_order=sky_order, fit_transform=not no_transform)
    detected_path = None
    try:
        dcfg = from_mapping(DetectConfig, detect_overrides(detect_threshold, detect_passes, detect_bands), "detect")
    except ConfigError as exc:
        fail(f"bad configuration: {exc}", as_json)
    try:
        with blas_threads(blas_threads_):
            if catalogue is None:
                with timer("detect"):
                    sources = Detector(dcfg)(cube)
                if len(sources) == 0:
                    raise ValueError(f"{cube}: no star detected above S/N {sources.meta.get('THRESH')}")
                detected_path = Path(output).with_name(Path(output).stem + "_sources.ecsv")
                sources.write(detected_path, format="ascii.ecsv", overwrite=True)
                cfg = replace(cfg, fit_transform=False)  # detected positions are in the cube frame already
            else:
                sources = read_source_catalogue(catalogue, mag_column=mag_column)
            with timer("extract"):
                result = Extractor(cfg)(cube, sources)
        with timer("write"):
            result.write(output)
            n_per_star = len(result.write_per_star(per_star)) if per_star else 0
    except (ReaderError, OSError, ValueError) as exc:
        fail(exc_text(exc), as_json)
    counts = dict(Counter(result.sources["status"].tolist()))
    t = result.transform
    info = {
        "output": str(Path(output)),
        "n_stars": int(len(result.sources)),
        "n_layers": int(result.wave.size),
        "n_flagged_layers": int((result.layer_flag & 1).sum()),
        "counts": counts,
        "method": method,
        "per_star_files": n_per_star,
        "transform": {"offset": list(t.offset), "rotation_deg": t.rotation, "scale": t.scale, "rms_px": t.rms,
                      "n_used": t.n_used},
        "psf": result.psf.describe(),
        "timings": {**timer.timings, **{f"step_{k}": round(v, 3) for k, v in result.timings.items()}},
    }
    if detected_path is not None:
        info["detected_sources"] = str(detected_path)
    lines = ([f"detected {len(sources)} stars in the cube -> {detected_path}"] if detected_path else []) + [
             f"extracted {info['n_stars']} stars x {info['n_layers']} layers ({method}) -> {output}",
             "status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
             f"transform: offset=({t.offset[0]:.3f}, {t.offset[1]:.3f}) px rot={t.rotation:.4f} deg "
             f"scale={t.scale:.5f} residual rms={t.rms:.3f} px ({t.n_used} stars)",
             f"PSF: {result.psf.describe()}",
             "time: " + ", ".join(f"{k}={v:.1f}s" for k, v in result.timings.items())]
    if detected_path is not None:
        lines += [f"warning: {w}" for w in sources.meta.get("warnings", [])]
    lines += [f"warning: {w}" for w in result.sources.meta.get("warnings", [])]
    emit(info, as_json, lines)
