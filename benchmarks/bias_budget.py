"""Injection-recovery error budget from cube to labels (issue 15).

Stars with known labels go through the chain one step at a time; after each step the
script prints bias (median), dispersion (half the 15.87-84.13 % range) and the median
pull (recovered - true) / error for Teff, log g and [Fe/H]:

  0  the fitter on noiseless model spectra on the model grid (flat IVAR of S/N 100)
  1  + Gaussian noise at S/N 100
  2  observed as MUSE (1.25 A air grid; model stars keep the model's LSF, declared 'lamost';
     library stars: MUSE LSF) with photon-like noise at S/N 100, then prepared
     ('2n': the same without noise, to isolate the bias)
  3  isolated stars in a cube (Moffat PSF, no sky), extracted (blend_frac <= 0.05, S/N > 50)
  4  + sky (continuum and lines) and its noise
  5  + crowding at the demo's density (the demo's field with another seed); isolated stars,
     and S/N > 50 stars by blend_frac bin
  6  the demo itself (``--demo DIR``: an existing ``musepayne demo`` output; else it is run)

Model stars (the default model, the demo's label distribution) are compared with their true
labels.  Library stars (STELIB, 4000-7000 K, [Fe/H] > -2; real spectra) are compared with the
fit of the *same* library spectrum prepared directly (same model), so the model's own error
against the literature cancels and only what the MUSE observation, cube, extraction and prepare
add remains; their literature labels are reported too (``lit``).

Usage::

    python benchmarks/bias_budget.py                  # every step, ~6 min on one core
    python benchmarks/bias_budget.py --steps 0,1,2 --no-library
    python benchmarks/bias_budget.py --json budget.json --workdir /tmp/budget
    python benchmarks/bias_budget.py --steps 0 --crowding-seeds 7,8,9,10   # crowding table only

Needs ``../shared/data`` (or ``$MUSEPAYNE_SHARED``) for the library stars only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from musepayne.fit import FitConfig, Fitter
from musepayne.instrument.lsf import LAMOST_LSF
from musepayne.instrument.wavelength import linear_grid
from musepayne.io.prepared import PreparedSpectra
from musepayne.io.spectra import SpectrumSet
from musepayne.models.model import load_model
from musepayne.pipeline.report import injection_budget
from musepayne.prepare import Preparer
from musepayne.science.validation import bias_dispersion
from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler
from musepayne.train.trainset import muse_air_grid, simulate_muse_observation

LABELS = ("teff", "logg", "fe_h")
FMT = {"teff": "{:+6.1f}", "logg": "{:+6.3f}", "fe_h": "{:+6.3f}"}


def meta_table(n, prefix="s"):
    return Table({"stellar_id": [f"{prefix}{i:04d}" for i in range(n)], "ra": np.zeros(n), "dec": np.zeros(n),
                  "source": [""] * n, "instrument": ["sim"] * n})


def stats_of(fit, true, err, keep):
    out = {}
    for k, n in enumerate(LABELS):
        d = fit[keep, k] - true[keep, k]
        b, s, m = bias_dispersion(d)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = d / err[keep, k]
        out[n] = {"bias": b, "dispersion": s, "pull": float(np.nanmedian(p)) if m else np.nan, "n": m}
    return out


def converged(res):
    st = np.asarray(res.status).astype(str)
    return np.char.startswith(st, "converged")


def fit_prepared(fitter, prep):
    res = fitter.fit_arrays(prep)
    return res, converged(res)


def row(name, kind, st, extra=""):
    s = f"{name:4s} {kind:7s}"
    for n in LABELS:
        x = st[n]
        s += f" | {n} {FMT[n].format(x['bias'])} {FMT[n].format(x['dispersion']).lstrip('+')} {x['pull']:+5.2f}"
    s += f" | N={st[LABELS[0]]['n']}" + (f" {extra}" if extra else "")
    print(s, flush=True)


# ------------------------------------------------------------------ model stars, steps 0-2
def model_steps(model, fitter, n, snr, steps, rng, results):
    lab = globular_cluster_sampler()(rng, n)
    X = np.clip(np.c_[[lab[k] for k in LABELS]].T, model.x_min, model.x_max)
    f = model.predict(X)
    w = np.asarray(model.wave)
    t = meta_table(n)
    t["status"], t["reason"] = ["ok"] * n, [""] * n
    iv = np.full(f.shape, snr**2)
    zeros = np.zeros(f.shape)
    if 0 in steps:
        res, ok = fit_prepared(fitter, PreparedSpectra(w, f, iv, np.zeros(f.shape, np.int32), zeros, zeros + 1, t))
        results["0"] = {"model": stats_of(res.labels, X, res.labels_err, ok)}
        row("0", "model", results["0"]["model"])
    if 1 in steps:
        fn = f + rng.standard_normal(f.shape) / snr
        res, ok = fit_prepared(fitter, PreparedSpectra(w, fn, iv, np.zeros(f.shape, np.int32), zeros, zeros + 1, t))
        results["1"] = {"model": stats_of(res.labels, X, res.labels_err, ok)}
        row("1", "model", results["1"]["model"])
    if 2 in steps:
        wm = muse_air_grid()
        src = ModelSpectra(model, None)
        rv = rng.normal(0, 15, n)
        F = np.array([src({k: X[i, j] for j, k in enumerate(LABELS)}, wm, rv=float(rv[i])) for i in range(n)])
        F /= np.median(F, axis=1, keepdims=True)
        var = np.abs(F) / snr**2
        prep = Preparer()
        for key, flux in (("2n", F), ("2", F + rng.standard_normal(F.shape) * np.sqrt(var))):
            p = prep(SpectrumSet(wm, flux, var, "air", LAMOST_LSF, meta_table(n)))
            res, ok = fit_prepared(fitter, p)
            results.setdefault(key, {})["model"] = stats_of(res.labels, X, res.labels_err, ok)
            row(key, "model", results[key]["model"], f"rv bias {np.median(res.rv[ok] - rv[ok]):+.2f} km/s")


# ------------------------------------------------------------------ library stars
def shared_dir():
    env = os.environ.get("MUSEPAYNE_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def library_stars(n):
    from musepayne.io.readers import read_stelib
    from musepayne.train.trainset import group_sets

    files = sorted((shared_dir() / "libraries" / "stelib").glob("STELIB*.fits"))
    sets = []
    for p in files:
        try:
            s = read_stelib(p)
        except Exception:  # noqa: BLE001 - unreadable library files are skipped
            continue
        m = s.meta
        if not all(c in m.colnames for c in LABELS):
            continue
        te, lg, fe = (float(m[c][0]) for c in LABELS)
        if np.isfinite([te, lg, fe]).all() and 4000 < te < 7000 and fe > -2 and s.wave[-1] > 9400:
            sets.append(s)
    step = max(1, len(sets) // n)
    sets = sets[::step][:n]
    return list(group_sets(sets))


def library_reference(fitter, sets):
    """Fits of the library spectra prepared directly (the reference) and their literature labels."""
    prep = Preparer()
    ref, lit, ids = [], [], []
    for s in sets:
        res = fitter.fit_arrays(prep(s))
        ref.append(np.where(converged(res)[:, None], res.labels, np.nan))
        lit.append(np.c_[[np.asarray(s.meta[c], float) for c in LABELS]].T)
        ids += list(s.meta["stellar_id"])
    return np.vstack(ref), np.vstack(lit), ids


def library_step2(fitter, sets, ref, lit, snr, rng, results):
    prep = Preparer()
    for key, s_n in (("2n", 1e5), ("2", snr)):
        labs, errs, oks = [], [], []
        for s in sets:
            res = fitter.fit_arrays(prep(simulate_muse_observation(s, s_n, rng)))
            labs.append(res.labels)
            errs.append(res.labels_err)
            oks.append(converged(res))
        L, E, ok = np.vstack(labs), np.vstack(errs), np.concatenate(oks) & np.isfinite(ref).all(1)
        results.setdefault(key, {})["library"] = stats_of(L, ref, E, ok)
        results[key]["library_lit"] = stats_of(L, lit, E, ok)
        row(key, "library", results[key]["library"])
        row(key, "lib-lit", results[key]["library_lit"])
    ok = np.isfinite(ref).all(1)
    results.setdefault("ref", {})["library_lit"] = stats_of(ref, lit, np.ones_like(ref), ok)
    row("ref", "lib-lit", results["ref"]["library_lit"], "(direct fit - literature; pull meaningless)")


# ------------------------------------------------------------------ cubes, steps 3-6
def run_cube(workdir, name, source, sim_cfg, cube_lsf):
    from musepayne.pipeline import Pipeline, RunConfig
    from musepayne.simulate import Simulator

    d = Path(workdir) / name
    d.mkdir(parents=True, exist_ok=True)
    info = Simulator(sim_cfg, source).write(d / "cube.fits")
    Pipeline(d / "run", RunConfig(model="default", cube_lsf=cube_lsf, report=False)).run(
        [info["cube"]], info["sources"])
    return read_run(d / "run", Table.read(info["truth"], "TRUTH"))


def read_run(rundir, truth):
    cat = Table.read(Path(rundir) / "catalogue.fits")
    cdir = next((Path(rundir) / "cubes").iterdir())
    with fits.open(cdir / "extracted.fits") as h:
        sources = Table(h["SOURCES"].data)
    return cat, truth, sources


def cube_steps(model, steps, workdir, n_cube, results, lib=None):
    from musepayne.simulate import LibrarySpectra, SimulateConfig

    sparse = dict(nx=120, ny=120, nlayers=3681, nstars=n_cube, cluster_fraction=0.0, mag_bright=15.0,
                  mag_faint=17.5, seed=5)
    demo_like = dict(nx=80, ny=80, nlayers=3681, nstars=400, king_rc=20.0, mag_bright=15.0, mag_faint=20.0,
                     seed=7)
    todo = {3: ("3", {**sparse, "sky_level": 0.0, "sky_line_scale": 0.0}),
            4: ("4", sparse), 5: ("5", demo_like)}
    for k, (key, kw) in todo.items():
        if k not in steps:
            continue
        t0 = time.perf_counter()
        cat, truth, sources = run_cube(workdir, f"model{key}", ModelSpectra(model, globular_cluster_sampler()),
                                       SimulateConfig(**kw), "lamost")
        b = injection_budget(cat, truth, sources)
        results.setdefault(key, {})["model"] = b["isolated"]
        results[key]["model_by_blend"] = b["by_blend"]
        results[key]["model_by_snr"] = b["by_snr"]
        row(key, "model", b["isolated"], f"({time.perf_counter() - t0:.0f} s)")
        if k == 5:
            print_blend(b)
        if lib is not None:
            sets, ref, lit, ids = lib
            cfg = SimulateConfig(**{**kw, "seed": kw["seed"] + 100})
            src = LibrarySpectra(sets, linear_grid(cfg.crval3, cfg.cdelt3, cfg.nlayers))
            lsf_path = (src.write_lsf(Path(workdir) / f"lib{key}_lsf.txt") if hasattr(src, "write_lsf")
                        else "muse")  # (releases before the effective-LSF fix)
            cat, truth, sources = run_cube(workdir, f"lib{key}", src, cfg, lsf_path)
            # truth = the direct fit of the same library spectrum (matched by its literature labels;
            # LibrarySpectra drops spectra that do not cover the cube, so indices may differ)
            truth = truth.copy()
            tl = np.c_[[np.asarray(truth[n], float) for n in LABELS]].T
            j = np.array([np.argmin(np.sum(((lit - r) / [100.0, 0.1, 0.05]) ** 2, axis=1)) for r in tl])
            for k2, n in enumerate(LABELS):
                truth[n] = ref[j, k2]
            b = injection_budget(cat, truth, sources)
            results[key]["library"] = b["isolated"]
            results[key]["library_by_blend"] = b["by_blend"]
            row(key, "library", b["isolated"])
            if k == 5:
                print_blend(b)


def print_blend(b):
    for r in b["by_blend"] + b["by_snr"]:
        kind = "crowd" if r in b["by_blend"] else "S/N"
        if r["n"]:
            print(f"       {kind:5s} {r['lo']:6.2f}-{r['hi']:<6.2f} N={r['n']:3d}: " + ", ".join(
                f"{n} {FMT[n].format(r['stats'][n]['bias'])} +- {r['stats'][n]['dispersion']:.3g}"
                f" ({r['stats'][n]['pull']:+.2f})" for n in LABELS))


def crowding_study(model, seeds, workdir, results):
    """Step 5 repeated for several seeds of the demo-like field; all stars pooled: bias, dispersion and
    median pull by neighbour_frac bin for S/N > 50 and 20 < S/N <= 50 (issue 15, item 3)."""
    from astropy.table import vstack

    from musepayne.simulate import SimulateConfig

    cats, truths, srcs = [], [], []
    for sd in seeds:
        cfg = SimulateConfig(nx=80, ny=80, nlayers=3681, nstars=400, king_rc=20.0, mag_bright=15.0,
                             mag_faint=20.0, seed=int(sd))
        cat, truth, sources = run_cube(workdir, f"crowd{sd}", ModelSpectra(model, globular_cluster_sampler()), cfg,
                                       "lamost")
        for t in (cat, truth, sources):
            t["stellar_id"] = [f"{sd}:{x}" for x in t["stellar_id"]]
        cats.append(cat)
        truths.append(truth)
        srcs.append(sources)
    cat, truth, sources = vstack(cats), vstack(truths), vstack(srcs)
    out = {}
    for lo in (50.0, 20.0):
        b = injection_budget(cat, truth, sources, snr_min=lo)
        if lo == 20.0:  # 20 < S/N <= 50 only
            keep = np.asarray(cat["snr_muse"], float) <= 50.0
            b = injection_budget(cat[keep], truth, sources, snr_min=lo)
        out[f"snr>{lo:g}"] = b["by_blend"]
        print(f"crowding, {len(seeds)} demo-like fields, S/N {'> 50' if lo == 50 else '20-50'}:")
        print_blend({"by_blend": b["by_blend"], "by_snr": []})
    results["crowding"] = out


def demo_step(demo_dir, workdir, results):
    if demo_dir is None:
        from musepayne.simulate import SimulateConfig

        model = load_model("default")
        cfg = SimulateConfig(nx=80, ny=80, nlayers=3681, nstars=400, king_rc=20.0, mag_bright=15.0,
                             mag_faint=20.0, seed=2022)
        cat, truth, sources = run_cube(workdir, "demo", ModelSpectra(model, globular_cluster_sampler()), cfg,
                                       "lamost")
    else:
        d = Path(demo_dir)
        cat, truth, sources = read_run(d, Table.read(d / "demo_cube_truth.fits", "TRUTH"))
    b = injection_budget(cat, truth, sources)
    results["6"] = {"model": b["isolated"], "model_by_blend": b["by_blend"], "model_by_snr": b["by_snr"]}
    row("6", "model", b["isolated"])
    print_blend(b)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="0,1,2,3,4,5,6")
    ap.add_argument("--n", type=int, default=80, help="model stars in steps 0-2")
    ap.add_argument("--n-cube", type=int, default=60, help="stars in the sparse cubes of steps 3-4")
    ap.add_argument("--n-library", type=int, default=40, help="STELIB stars (0: none)")
    ap.add_argument("--no-library", action="store_true")
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--demo", default=None, help="existing 'musepayne demo' output folder for step 6")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--crowding-seeds", default="", help="comma-separated seeds of extra demo-like fields "
                    "pooled for the crowding table (e.g. 7,8,9,10)")
    a = ap.parse_args(argv)
    steps = {int(s) for s in a.steps.split(",") if s.strip()}
    rng = np.random.default_rng(a.seed)
    model = load_model("default")
    fitter = Fitter(model, FitConfig())
    results = {}
    print("step kind    | label bias dispersion median-pull (Teff K, log g, [Fe/H] dex)")
    t0 = time.perf_counter()
    model_steps(model, fitter, a.n, a.snr, steps, rng, results)
    lib = None
    if not a.no_library and a.n_library > 0 and steps & {2, 3, 4, 5}:
        sets = library_stars(a.n_library)
        ref, lit, ids = library_reference(fitter, sets)
        lib = (sets, ref, lit, ids)
        if 2 in steps:
            library_step2(fitter, sets, ref, lit, a.snr, rng, results)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir) if a.workdir else Path(tmp)
        if steps & {3, 4, 5}:
            cube_steps(model, steps, work, a.n_cube, results, lib)
        if 6 in steps:
            demo_step(a.demo, work, results)
        if a.crowding_seeds:
            crowding_study(model, [int(x) for x in a.crowding_seeds.split(",")], work, results)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
