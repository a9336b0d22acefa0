"""``musepayne demo``: the main job on an embedded default."""

from __future__ import annotations

import time
from pathlib import Path

import click
from astropy.table import Table

from ..models.files import load_model
from ..models.model import ModelError
from ..pipeline.runner import RunConfig
from ..simulate.simulator import SimulateConfig, Simulator
from ._common import emit, exc_text, fail, json_option
from .run import detect_options, detect_overrides, run_pipeline


@click.command(name="demo")
@click.option("-o", "--outdir", default="musepayne-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the simulated cube and every output.")
@click.option("--cube", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Run the pipeline on this cube instead of a simulated one.")
@click.option("--sources", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Source catalogue for --cube (default: stars detected in the cube).")
@click.option("--model", default="default", show_default=True, help="Model file or 'default'.")
@click.option("--nstars", default=400, show_default=True, help="Stars in the simulated field.")
@click.option("--size", default=80, show_default=True, help="Simulated field size in spaxels (square).")
@click.option("--seed", default=2022, show_default=True, help="Random seed of the simulation.")
@click.option("--progress/--no-progress", default=True)
@detect_options
@json_option
def demo(outdir, cube, sources, model, nstars, size, seed, progress, detect_threshold, detect_passes, detect_bands,
         as_json):
    """Simulate a globular-cluster-like MUSE cube and run the full pipeline on it.

    With no arguments and no network: the package's simulator makes a crowded
    field (a King-profile cluster of old metal-poor stars plus disc field
    stars; spectra from the default model, at MUSE air sampling, with a
    wavelength-dependent Moffat PSF, sky and noise); then extract -> prepare
    -> fit -> catalogue -> report run on it with the default model, and the
    recovered labels are compared with the truth.  Writes everything to
    OUTDIR and prints where.  With --cube/--sources it runs on your cube.
    """


    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        mdl = load_model(model)
    except ModelError as exc:
        fail(exc_text(exc), as_json)
    truth = None
    if cube is not None:
        cubes, cube_lsf = [cube], "muse"
    else:
        from ..simulate.synthesis import ModelSpectra, globular_cluster_sampler

        cfg = SimulateConfig(nx=size, ny=size, nlayers=3681, nstars=nstars, king_rc=size / 4.0,
                             mag_bright=15.0, mag_faint=20.0, seed=seed)
        info = Simulator(cfg, ModelSpectra(mdl, globular_cluster_sampler())).write(out / "demo_cube.fits")
        cubes, sources, cube_lsf = [info["cube"]], info["sources"], "lamost"
        truth = Table.read(info["truth"], "TRUTH")
    t_sim = time.perf_counter() - t0
    try:
        rc = RunConfig(model=model, cube_lsf=cube_lsf).updated(
            detect=detect_overrides(detect_threshold, detect_passes, detect_bands))
    except ValueError as exc:  # ConfigError
        fail(f"bad configuration: {exc}", as_json)
    record = run_pipeline(out, rc, cubes, sources, as_json=as_json, progress=progress, what="demo", truth=truth)
    rep = record.get("report", {})
    info = {"outdir": str(out.resolve()), "catalogue": str(out / "catalogue.fits"),
            "report": str(out / "report" / "index.html"), "counts": record["counts"],
            "n_observations": record["n_observations"], "simulate_s": round(t_sim, 2),
            "timings": record["timings"], "truth": rep.get("truth"), "warnings": record.get("warnings", [])}
    lines = [f"demo: {'simulated ' + str(nstars) + '-star cluster field' if cube is None else cube}, "
             f"{record['n_observations']} stars -> " + ", ".join(f"{k}={v}" for k, v in sorted(record["counts"].items()))]
    for name, st in (rep.get("truth") or {}).items():
        lines.append(f"  {name:5s} recovered - true: bias {st['bias']:+.3g}, dispersion {st['dispersion']:.3g} "
                     f"(N={st['n']})")
    lines += [f"warning: {w}" for w in record.get("warnings", [])]
    if rep.get("truth_budget"):  # the short error budget (benchmarks/bias_budget.py has the full one)
        from ..pipeline.report import format_budget

        info["truth_budget"] = rep["truth_budget"]
        lines += format_budget(rep["truth_budget"])
    lines += [f"catalogue: {out / 'catalogue.fits'}", f"report:    {out / 'report' / 'index.html'}",
              f"total {time.perf_counter() - t0:.0f} s; everything is in {out.resolve()}"]
    emit(info, as_json, lines)
