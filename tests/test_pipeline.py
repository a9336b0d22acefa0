"""End to end: `musepayne run` on simulated cubes; resuming after interruptions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from fit_helpers import toy_stellar_model
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.pipeline.runner import Pipeline, RunConfig
from musepayne.simulate.simulator import SimulateConfig, Simulator
from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    d = tmp_path_factory.mktemp("field")
    model = toy_stellar_model()
    model.save(d / "model.fits")
    cfg = SimulateConfig(nx=40, ny=40, nlayers=3681, nstars=40, mag_bright=15, mag_faint=19, king_rc=15, seed=3)
    info = Simulator(cfg, ModelSpectra(model, globular_cluster_sampler())).write(d / "cube.fits")
    # a repeat exposure of the same field: same stars, an independent noise realisation
    rng = np.random.default_rng(7)
    with fits.open(d / "cube.fits") as h:
        h["DATA"].data = (h["DATA"].data + rng.normal(size=h["DATA"].data.shape) *
                          np.sqrt(h["STAT"].data)).astype(np.float32)
        h["STAT"].data = (2 * h["STAT"].data).astype(np.float32)
        h.writeto(d / "cube2.fits")
    return {"dir": d, "model": str(d / "model.fits"), "cube": str(d / "cube.fits"), "cube2": str(d / "cube2.fits"),
            "sources": info["sources"], "truth": Table.read(info["truth"], "TRUTH")}


def _config(field, **kw):
    return RunConfig(model=field["model"], cube_lsf="lamost", fit_chunk=8, **kw)


@pytest.fixture(scope="module")
def reference_run(field):
    out = field["dir"] / "reference"
    rec = Pipeline(out, _config(field)).run([field["cube"]], field["sources"], truth=field["truth"])
    return out, rec


def _same_catalogue(a, b):
    ta, tb = Table.read(a), Table.read(b)
    assert ta.colnames == tb.colnames and len(ta) == len(tb)
    for c in ta.colnames:
        x, y = np.asarray(ta[c]), np.asarray(tb[c])
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), c
        else:
            assert np.array_equal(x, y), c


def test_run_outputs(field, reference_run):
    out, rec = reference_run
    cat = Table.read(out / "catalogue.fits")
    truth = field["truth"]
    # every catalogue source exactly once, off-field stars as rows with a status
    assert sorted(cat["stellar_id"]) == sorted(truth["stellar_id"])
    infield = set(truth["stellar_id"][truth["in_field"]])
    conv = {s for s, st in zip(cat["stellar_id"], cat["status"]) if st.startswith("converged")}
    assert conv <= infield and len(conv) >= 0.8 * len(infield)
    # RVs of converged stars are recovered (the labels of this toy model are not physical)
    tmap = {s: i for i, s in enumerate(truth["stellar_id"])}
    ok = np.array([s in conv for s in cat["stellar_id"]])
    drv = np.asarray(cat["rv"])[ok] - np.asarray(truth["rv"])[[tmap[s] for s in cat["stellar_id"][ok]]]
    assert np.median(np.abs(drv)) < 2.0
    # every column keeps its unit and description through the per-chunk checkpoints
    assert [c for c in cat.colnames if not cat[c].description] == []
    # the Parquet export has the same columns (no ".mask" companions) and keeps the descriptions
    from musepayne.fit.catalogue import read_catalogue

    pq_cat = read_catalogue(out / "catalogue.parquet")
    assert pq_cat.colnames == cat.colnames
    assert pq_cat["teff"].description == cat["teff"].description and str(pq_cat["rv"].unit) == "km / s"
    assert str(cat["rv"].unit) == "km / s" and "HIGH_CHI2" in cat["fit_flags"].description
    for f in ("config.json", "run.json", "catalogue.csv", "catalogue.parquet", "catalogue_stars.fits",
              "models.fits", "report/index.html", "report/kiel.png", "report/truth.png"):
        assert (out / f).exists(), f
    run = json.loads((out / "run.json").read_text())
    assert {"extract", "prepare", "fit", "total"} <= set(run["timings"])
    assert run["cubes"][0]["sources"]["detected_in_cube"] is False and "note" not in run["cubes"][0]["sources"]
    assert run["n_observations"] == len(truth) and sum(run["counts"].values()) == len(truth)
    assert json.loads((out / "config.json").read_text())["cube_lsf"] == "lamost"
    with fits.open(out / "models.fits") as h:
        assert h["MODEL"].data.shape == (len(cat), lamost_wavelength().size)
    # what extraction knew reaches the catalogue, row for row, with units
    src = Table.read(out / "cubes" / rec["cubes"][0]["cube_id"] / "extracted.fits", "SOURCES")
    smap = {str(s): i for i, s in enumerate(src["stellar_id"])}
    j = [smap[str(s)] for s in cat["stellar_id"]]
    for c_cat, c_src in (("x", "x"), ("y", "y"), ("mag", "mag"), ("ext_snr", "snr"), ("blend_frac", "blend_frac"),
                         ("edge_dist", "edge_dist")):
        assert np.array_equal(np.asarray(cat[c_cat], float), np.asarray(src[c_src], float)[j], equal_nan=True), c_cat
    assert list(np.asarray(cat["ext_status"]).astype(str)) == list(np.asarray(src["status"]).astype(str)[j])
    assert str(cat["x"].unit) == "pix" and cat["ext_status"].description
    # min_snr: spectra below it keep their row, are not fitted, and say why
    assert not np.any((np.asarray(cat["snr_muse"], float) < 3.0) & np.char.startswith(
        np.asarray(cat["status"]).astype(str), "converged"))


def test_min_snr_rows_are_kept_unfitted(field):
    out = field["dir"] / "min_snr"
    Pipeline(out, _config(field, report=False, min_snr=1e5)).run([field["cube"]], field["sources"])
    cat = Table.read(out / "catalogue.fits")
    status = np.asarray(cat["status"]).astype(str)
    assert len(cat) == len(field["truth"])
    fitted_before = np.asarray(cat["snr_muse"], float) > 0
    assert np.all(status[fitted_before] == "failed:low_snr") and np.all(np.isnan(np.asarray(cat["teff"], float)))
    assert all("below min_snr" in r for r in np.asarray(cat["reason"]).astype(str)[fitted_before])


def test_rerun_skips_finished_stages(field, reference_run):
    out, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in (out / "cubes").rglob("*.fits")}
    rec = Pipeline(out, _config(field, report=False)).run([field["cube"]], field["sources"])
    after = {p: p.stat().st_mtime_ns for p in (out / "cubes").rglob("*.fits")}
    assert before == after  # nothing under cubes/ was redone
    assert "extract" not in rec["timings"] and "fit" not in rec["timings"]


def test_resume_after_interrupt_in_fit(field, reference_run):
    out = field["dir"] / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Pipeline(out, _config(field)).run([field["cube"]], field["sources"], stop_after=2)
    parts = list((out / "cubes").rglob("part-*.fits"))
    assert len(parts) == 2
    Pipeline(out, _config(field)).run([field["cube"]], field["sources"])
    _same_catalogue(out / "catalogue.fits", reference_run[0] / "catalogue.fits")


@pytest.mark.slow
def test_kill_and_resume_cli(field, reference_run):
    """SIGKILL the CLI at two fixed points (once extraction is committed, then once the first fitted
    chunk is), run the same command again: same catalogue.  The kill points are events, not clock
    times, so the test exercises the same resume paths on every machine and load."""
    out = field["dir"] / "killed"
    cmd = [sys.executable, "-m", "musepayne.cli", "run", field["cube"], "--sources", field["sources"],
           "-o", str(out), "--model", field["model"], "--cube-lsf", "lamost", "--fit-chunk", "8", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for pattern in ("cubes/*/extracted.fits", "cubes/*/fit/part-*.fits"):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while p.poll() is None and not list(out.glob(pattern)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        assert list(out.glob(pattern)), f"the run never reached {pattern}"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list(out.rglob("*.part"))  # no temporary files left behind by the final run
    _same_catalogue(out / "catalogue.fits", reference_run[0] / "catalogue.fits")


def test_repeat_cubes_best_per_star(field):
    out = field["dir"] / "repeats"
    Pipeline(out, _config(field, report=False)).run([field["cube"], field["cube2"]], field["sources"])
    cat = Table.read(out / "catalogue.fits")
    stars = Table.read(out / "catalogue_stars.fits")
    n = len(field["truth"])
    assert len(cat) == 2 * n and len(stars) == n and len(set(cat["obs_id"])) == 2 * n
    assert set(stars["n_obs"]) == {2}
    for row in stars:
        obs = cat[cat["stellar_id"] == row["stellar_id"]]
        cf = np.nan_to_num(np.asarray(obs["corr_flux"], float), nan=-np.inf)
        assert row["obs_id"] == obs["obs_id"][int(np.argmax(cf))]


@pytest.mark.slow
def test_recovery_matches_fitter_alone(tmp_path):
    """Issue 6: extraction + preparation add little error to what the fitter alone achieves.

    A crowded simulated field (300 stars); for isolated bright stars the label
    dispersion from the cube is compared with the fitter on the *true* spectra
    with noise at the same per-pixel errors as the extracted ones.
    """
    from scipy.spatial import cKDTree

    from musepayne.fit.fitter import Fitter
    from musepayne.instrument.lsf import lsf_from_spec
    from musepayne.io.readers import read_muse_spectra
    from musepayne.io.spectra import SpectrumSet
    from musepayne.models.files import load_model
    from musepayne.prepare.preparer import Preparer
    from musepayne.science.validation import bias_dispersion

    model = toy_stellar_model()
    model.save(tmp_path / "model.fits")
    cfg = SimulateConfig(nx=90, ny=90, nlayers=3681, nstars=350, king_rc=25, mag_bright=14.5, mag_faint=19.0,
                         seed=11)
    info = Simulator(cfg, ModelSpectra(model, globular_cluster_sampler())).write(tmp_path / "cube.fits")
    out = tmp_path / "run"
    Pipeline(out, RunConfig(model=str(tmp_path / "model.fits"), cube_lsf="lamost", report=False)).run(
        [info["cube"]], info["sources"])
    cat = Table.read(out / "catalogue.fits")
    with fits.open(info["truth"]) as h:
        truth = Table(h["TRUTH"].data)
        true_flux = np.array(h["TRUE_FLUX"].data, dtype=np.float64)
    cdir = next((out / "cubes").iterdir())
    ext = read_muse_spectra(cdir / "extracted.fits", lsf=lsf_from_spec("lamost"))
    tmap = {s: i for i, s in enumerate(truth["stellar_id"])}
    ti = np.array([tmap[s] for s in ext.meta["stellar_id"]])
    # isolated (nearest neighbour >= 1 FWHM ~ 3.7 px) and in the brightest half, inside the field
    xy = np.c_[truth["x"], truth["y"]]
    d, _ = cKDTree(xy).query(xy, k=2)
    fwhm = cfg.psf.fwhm_at(7000.0)
    sel_t = truth["in_field"] & (d[:, 1] >= fwhm) & (truth["mag"] < np.median(truth["mag"]))
    sel = sel_t[ti] & np.isfinite(ext.flux).all(axis=1)
    assert sel.sum() >= 20
    # S/N of the brightest half
    assert np.median(np.nanmedian(ext.flux[sel] / np.sqrt(ext.variance[sel]), axis=1)) >= 50
    # the fitter alone: true spectra + noise drawn from the extracted errors
    rng = np.random.default_rng(5)
    tf = true_flux[ti[sel]]
    err = np.sqrt(ext.variance[sel])
    alone = SpectrumSet(ext.wave, tf + rng.normal(size=tf.shape) * err, err**2, "air", ext.lsf, ext.meta[sel])
    fitter = Fitter(load_model(tmp_path / "model.fits"))
    cat_alone = fitter(Preparer()(alone))
    # reference: the same fit of the noise-free true spectra, so that the toy model's own
    # systematics (it is not pseudo-continuum consistent) cancel and only noise + extraction remain
    exact = SpectrumSet(ext.wave, tf, (1e-4 * tf) ** 2, "air", ext.lsf, ext.meta[sel])
    cat_exact = fitter(Preparer()(exact))
    cmap = {s: i for i, s in enumerate(cat["stellar_id"])}
    ci = np.array([cmap[s] for s in ext.meta["stellar_id"][sel]])
    for name in ("teff", "logg", "fe_h"):
        t = np.asarray(cat_exact[name])
        _, s_run, _ = bias_dispersion(np.asarray(cat[name])[ci] - t)
        _, s_alone, _ = bias_dispersion(np.asarray(cat_alone[name]) - t)
        print(f"{name}: dispersion from the cube {s_run:.4g}, fitter alone {s_alone:.4g} (N={sel.sum()})")
        assert s_run <= 1.5 * s_alone, (name, s_run, s_alone)
    drv = np.asarray(cat["rv"])[ci] - np.asarray(truth["rv"])[ti[sel]]
    print(f"rv: bias {np.median(drv):.3f} km/s, dispersion {bias_dispersion(drv)[1]:.3f} km/s")
    assert bias_dispersion(drv)[1] <= 2.0 and abs(np.median(drv)) <= 2.0


@pytest.fixture(scope="module")
def injection_budget_field(tmp_path_factory):
    """A sparse field of the default model's own stars (issue 15), run through the whole pipeline with the
    same model; returns the injection budget (musepayne.pipeline.report.injection_budget)."""
    from musepayne.models.files import load_model
    from musepayne.pipeline.report import injection_budget

    d = tmp_path_factory.mktemp("budget")
    model = load_model("default")
    cfg = SimulateConfig(nx=90, ny=90, nlayers=3681, nstars=45, cluster_fraction=0.0, mag_bright=15.0,
                         mag_faint=18.0, seed=15)
    info = Simulator(cfg, ModelSpectra(model, globular_cluster_sampler())).write(d / "cube.fits")
    out = d / "run"
    Pipeline(out, RunConfig(model="default", cube_lsf="lamost", report=False)).run([info["cube"]], info["sources"])
    cat = Table.read(out / "catalogue.fits")
    with fits.open(next((out / "cubes").iterdir()) / "extracted.fits") as h:
        sources = Table(h["SOURCES"].data)
    return injection_budget(cat, Table.read(info["truth"], "TRUTH"), sources)


@pytest.mark.slow
def test_injection_recovery_unbiased_for_isolated_stars(injection_budget_field):
    """Issue 15: the default model's own stars, simulated into a cube, extracted, prepared and fitted
    with the same model, come back unbiased: isolated stars (no single neighbour brings more than 5 %
    of the star's light within 1 FWHM) at S/N > 50 have |bias| < 20 K / 0.03 / 0.02 dex and
    |median pull| < 0.3 for Teff and log g.  Before the fixes of issue 15 (pseudo-continuum-consistent
    model stars, discrete-Gaussian kernels): about -50 K / -0.11 / -0.07 dex, pulls -1.1 / -1.1 / -1.7.
    [Fe/H] pull: the test below."""
    b = injection_budget_field
    assert b["column"] == "neighbour_frac"
    assert b["n_isolated"] >= 12, b["n_isolated"]
    limits = {"teff": 20.0, "logg": 0.03, "fe_h": 0.02}
    for name, st in b["isolated"].items():
        print(name, st)
        assert abs(st["bias"]) < limits[name], (name, st)
        assert abs(st["pull"]) < (0.3 if name != "fe_h" else 0.5), (name, st)


@pytest.mark.slow
def test_injection_recovery_fe_h_pull_below_0_3(injection_budget_field):
    """The [Fe/H] pull of the same isolated stars: below 0.3 with the default model rebuilt on the
    exact-variance kernels (it was -0.33 with the model trained before them)."""
    assert abs(injection_budget_field["isolated"]["fe_h"]["pull"]) < 0.3


def test_progress_rate_counts_only_work_done_over_time():
    """The rate shown per stage is items per second of real work: items that arrive at once
    (a resumed run reading its checkpoints) give no rate instead of millions per second."""
    import time

    from musepayne.cli.run import progress_display

    prog, cb = progress_display(True)
    cb("fit", 10, 10)  # everything at once
    assert prog.tasks[0].fields["rate"] == ""
    cb("cubes", 0, 20)
    time.sleep(0.1)
    cb("cubes", 2, 20)
    rate = float(prog.tasks[1].fields["rate"].rstrip("/s"))
    assert 2.0 < rate < 21.0  # 2 items in >= 0.1 s
