"""Building the benchmark-scale calibration: hold-out models, the benchmark stars observed as MUSE
and LAMOST, cross-validation over the benchmark stars, and attaching the result to a model file.

The stored calibration and its fitting are :mod:`musepayne.models.benchcal` (read its docstring
for the method); this module runs the workflow behind ``musepayne model calibrate-benchmark``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..fit.fitter import FitConfig, Fitter
from ..io.fits import sha256_file
from ..io.prepared import PreparedSpectra
from ..models.benchcal import (
    BENCH_LABELS,
    DEFAULT_BENCHMARK_FILE,
    FEH_BENCH_ERR,
    MIN_BIN_STARS,
    BenchmarkCalibration,
    _features,
    _robust_disp,
    match_benchmarks,
    read_benchmarks,
    star_type,
)
from ..models.gradients import CannonEmulator, build_templates
from ..prepare.preparer import PrepareConfig, Preparer
from .crossval import _NOT_RECIPE, assign_folds
from .trainer import TrainConfig, train_model
from .trainset import build_trainset, library_files, read_library, simulate_lamost_observation, simulate_muse_observation


# --------------------------------------------------------------------------- cross-validation
def fit_calibration(fit_labels, bench_labels, stat_err, bench_err, degree: int = 2, ridge: float = 1.0,
                    sys_bins: str = "all", meta=None, groups=None, inner_k: int = 5) -> BenchmarkCalibration:
    """Fit the map and the systematic errors.

    ``fit_labels``, ``bench_labels``, ``stat_err``, ``bench_err``: (n, 3) arrays (rows with a NaN
    are ignored).  ``ridge``: penalty on every coefficient but the constant, in units of the
    residual variance per star (the features are O(1)), so the map shrinks towards an offset.
    ``sys_bins``: 'all' (one sys error per label) or 'type' (dwarf / giant / mp_giant).
    ``groups``: one key per row (the star); when given, the sys errors are solved on the
    residuals of ``inner_k``-fold out-of-fold maps (each star calibrated by a map that did not
    see it), not on the in-sample residuals, which are smaller by the map's degrees of freedom.
    """
    x = np.asarray(fit_labels, float)
    y = np.asarray(bench_labels, float)
    se = np.asarray(stat_err, float)
    be = np.asarray(bench_err, float)
    ok = np.all(np.isfinite(x) & np.isfinite(y) & np.isfinite(se) & np.isfinite(be), axis=1)
    x, y, se, be = x[ok], y[ok], se[ok], be[ok]
    coef = _fit_map(x, y, degree, ridge)
    domain = {n: [float(np.min(x[:, k])), float(np.max(x[:, k]))] for k, n in enumerate(BENCH_LABELS)}
    cal = BenchmarkCalibration(degree, coef, {n: {"all": 0.0} for n in BENCH_LABELS}, dict(meta or {}), domain)
    xc = cal.apply(x)
    if groups is not None:
        g = np.asarray(groups)[ok]
        folds = assign_folds(g, inner_k, 12345)
        for f in range(inner_k):
            te = folds == f
            if te.any() and (~te).any():
                c = BenchmarkCalibration(degree, _fit_map(x[~te], y[~te], degree, ridge), cal.sys_err,
                                         domain={n: [float(np.min(x[~te, k])), float(np.max(x[~te, k]))]
                                                 for k, n in enumerate(BENCH_LABELS)})
                xc[te] = c.apply(x[te])
    sys_err = {}
    types = star_type(xc)
    keys = np.asarray(groups)[ok] if groups is not None else np.arange(len(x))
    # bins by star type (of the calibrated labels): giants include the metal-poor giants unless
    # those alone have MIN_BIN_STARS stars; a bin with fewer stars falls back to 'all'
    bins = {"dwarf": types == "dwarf", "giant": types != "dwarf", "mp_giant": types == "mp_giant"}
    for k, n in enumerate(BENCH_LABELS):
        r = xc[:, k] - y[:, k]
        sys_err[n] = {"all": _solve_sys(r, se[:, k], be[:, k])}
        if sys_bins == "type":
            for t, sel in bins.items():
                if np.unique(keys[sel]).size >= MIN_BIN_STARS:
                    sys_err[n][t] = _solve_sys(r[sel], se[sel, k], be[sel, k])
    return BenchmarkCalibration(degree, coef, sys_err, dict(meta or {}), domain)


def _fit_map(x, y, degree, ridge) -> dict:
    phi = _features(x, degree)
    nf = phi.shape[1]
    coef = {}
    for k, n in enumerate(BENCH_LABELS):
        d = y[:, k] - x[:, k]
        # Huber weights (3 MAD-sigma), re-estimated twice: outliers (e.g. a badly fitted star) weigh less
        w = np.ones(len(d))
        for _ in range(3):
            pen = np.eye(nf) * ridge
            pen[0, 0] = 0.0
            A = phi.T @ (w[:, None] * phi) + pen
            c = np.linalg.solve(A, phi.T @ (w * d))
            r = d - phi @ c
            s = 1.4826 * np.median(np.abs(r - np.median(r)))
            w = np.where(np.abs(r) > 3 * s, 3 * s / np.maximum(np.abs(r), 1e-30), 1.0)
        c[0] += np.median(d - phi @ c)  # the median residual (the quoted bias) is zero, not the mean
        coef[n] = [float(v) for v in c]
    return coef


def _solve_sys(resid, stat, ebench) -> float:
    """Smallest sys >= 0 with dispersion(resid / sqrt(stat^2 + sys^2 + ebench^2)) <= 1 (bisection)."""
    resid, stat, ebench = (np.asarray(a, float) for a in (resid, stat, ebench))
    def pull(s):
        return _robust_disp(resid / np.sqrt(stat**2 + s**2 + ebench**2))
    if not np.isfinite(pull(0.0)) or pull(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, max(10 * _robust_disp(resid), 1e-6)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if pull(mid) > 1.0:
            lo = mid
        else:
            hi = mid
    return float(hi)



def _stats(d):
    d = np.asarray(d, float)
    return {"bias": float(np.nanmedian(d)), "dispersion": float(_robust_disp(d)), "n": int(np.isfinite(d).sum())}


def calibration_figures(fit_labels, bench_labels, err, bench_err, types=None) -> dict:
    """bias / dispersion of fit - bench and dispersion of the pulls, overall and by star type
    (``types``: from the benchmark labels unless given)."""
    x, y, e, be = (np.asarray(a, float) for a in (fit_labels, bench_labels, err, bench_err))
    types = star_type(y) if types is None else np.asarray(types)
    out = {}
    for sel_name, sel in (("all", np.ones(len(x), bool)), ("dwarf", types == "dwarf"),
                          ("giant", types != "dwarf"), ("mp_giant", types == "mp_giant")):
        o = {}
        for k, n in enumerate(BENCH_LABELS):
            d = x[sel, k] - y[sel, k]
            s = _stats(d)
            s["pull_dispersion"] = float(_robust_disp(d / np.sqrt(e[sel, k] ** 2 + be[sel, k] ** 2)))
            o[n] = s
        out[sel_name] = o
    return out


def cross_validate_calibration(fit_labels, bench_labels, stat_err, bench_err, groups, k: int = 5, seed: int = 0,
                               degree: int = 2, ridge: float = 1.0, sys_bins: str = "all", learn=None):
    """K-fold CV of :func:`fit_calibration` grouped by star (``groups``: one key per row; all rows
    of a star -- e.g. its MUSE and LAMOST fits, MILES and STELIB spectra -- in one fold).

    ``learn``: optional boolean mask of the rows the maps may be fitted on (e.g. MUSE only);
    every row is calibrated.  Returns ``(cal_labels, total_err, sys_err)``: out-of-fold
    calibrated labels, errors ``sqrt(stat^2 + sys^2)`` and the sys errors, (n, 3) each."""
    x = np.asarray(fit_labels, float)
    folds = assign_folds(np.asarray(groups), k, seed)
    cal = np.full(x.shape, np.nan)
    sys = np.full(x.shape, np.nan)
    learn = np.ones(len(x), bool) if learn is None else np.asarray(learn, bool)
    for f in range(k):
        tr, te = (folds != f) & learn, folds == f
        c = fit_calibration(x[tr], np.asarray(bench_labels)[tr], np.asarray(stat_err)[tr],
                            np.asarray(bench_err)[tr], degree=degree, ridge=ridge, sys_bins=sys_bins,
                            groups=np.asarray(groups)[tr])
        cal[te] = c.apply(x[te])
        sys[te] = c.sys(cal[te])
    err = np.sqrt(np.asarray(stat_err, float) ** 2 + sys**2)
    return cal, err, sys



# --------------------------------------------------------------------------- workflow
@dataclass(frozen=True)
class BenchCalConfig:
    """Settings of :func:`calibrate` (``musepayne model calibrate-benchmark``).

    seeds: training seeds of the hold-out models (trained without the benchmark stars); the
        map and sys errors are fitted on the pooled fits of all of them, the CV figures are
        quoted per seed (mean and spread).
    k: folds over the benchmark stars for the CV figures.  snr: S/N of the simulated
    observations; instruments: 'muse', 'lamost'.  degree / ridge: the map's polynomial degree
    and ridge penalty (features O(1)).  sys_bins: 'all' or 'type'.
    """

    seeds: tuple = (0, 1, 2)
    k: int = 5
    snr: float = 100.0
    instruments: tuple = ("muse", "lamost")
    #: instruments whose fits the map and sys errors are learnt from (None: all of ``instruments``)
    map_instruments: tuple | None = None
    degree: int = 2
    ridge: float = 1.0
    sys_bins: str = "type"
    seed: int = 0


def benchmark_library_spectra(shared, bench: Table):
    """Library spectra (MILES, STELIB under ``shared/libraries``) of benchmark stars.

    Returns ``(sets, index)``: one :class:`~musepayne.io.spectra.SpectrumSet` per matching
    spectrum (native resolution) and the row of ``bench`` it matches."""
    shared = Path(shared)
    sets, index = [], []
    for kind in ("miles", "stelib"):
        root = shared / "libraries" / kind
        files = library_files(root, kind)
        params = root / "paramsMILES_v9.1.txt" if kind == "miles" else None
        got, _ = read_library(files, kind, params if params is not None and params.exists() else None)
        names = [str(s.meta["name"][0]) if "name" in s.meta.colnames else str(s.meta["stellar_id"][0]) for s in got]
        m = match_benchmarks(names, bench)
        for s, j in zip(got, m):
            if j >= 0:
                sets.append(s)
                index.append(int(j))
    return sets, np.array(index, int)


def observe(sets, instrument: str, snr: float, seed: int):
    """The spectra simulated as ``instrument`` observations at ``snr`` and prepared (standard mode)."""
    sim = {"muse": simulate_muse_observation, "lamost": simulate_lamost_observation}[instrument]
    prep = Preparer(PrepareConfig())
    rng = np.random.default_rng(seed)
    return PreparedSpectra.concatenate([prep(sim(s, snr, rng)) for s in sets])


def holdout_table(models, observed: dict, bench: Table, index, seeds=None) -> Table:
    """Fits of the observed benchmark spectra by hold-out models: one row per (model, instrument,
    spectrum) with the fitted labels, stat errors, status and the benchmark labels."""
    rows = []
    for im, model in enumerate(models):
        fitter = Fitter(model, FitConfig(benchmark_calibration=False))
        for inst, prepared in observed.items():
            cat = fitter(prepared)
            for i in range(len(cat)):
                j = int(index[i])
                r = {"seed": int(seeds[im]) if seeds is not None else im, "instrument": inst,
                     "stellar_id": str(cat["stellar_id"][i]), "hd": str(bench["hd"][j]),
                     "status": str(cat["status"][i])}
                for n in BENCH_LABELS:
                    r[n] = float(cat[n][i])
                    r[f"{n}_err"] = float(cat[f"{n}_err"][i])
                    r[f"{n}_bench"] = float(bench[n][j])
                    r[f"e_{n}_bench"] = float(bench[f"e_{n}"][j])
                rows.append(r)
    return Table(rows=rows)


def _arrays(tab):
    x = np.stack([np.asarray(tab[n], float) for n in BENCH_LABELS], 1)
    y = np.stack([np.asarray(tab[f"{n}_bench"], float) for n in BENCH_LABELS], 1)
    e = np.stack([np.asarray(tab[f"{n}_err"], float) for n in BENCH_LABELS], 1)
    be = np.stack([np.asarray(tab[f"e_{n}_bench"], float) for n in BENCH_LABELS], 1)
    return x, y, e, be


def _learn_rows(tab, cfg):
    insts = np.asarray(tab["instrument"]).astype(str)
    return np.isin(insts, list(cfg.map_instruments or cfg.instruments))


def _usable(tab):
    st = np.asarray(tab["status"]).astype(str)
    return ~np.char.startswith(st, "failed")


def evaluate(tab: Table, config: BenchCalConfig | None = None) -> dict:
    """Cross-validated figures of the calibration from a :func:`holdout_table`.

    K folds over the benchmark stars (HD number; all spectra, instruments and seeds of a star
    in one fold); the map and sys errors of a fold are fitted on the pooled rows of the other
    folds.  Returns per seed and instrument the figures before (``uncal``: fit errors only) and
    after (``cal``) calibration (:func:`calibration_figures`), and their mean and spread over
    seeds (``summary``)."""
    cfg = config or BenchCalConfig()
    tab = tab[_usable(tab)]
    x, y, e, be = _arrays(tab)
    xc, err, _ = cross_validate_calibration(x, y, e, be, np.asarray(tab["hd"]), k=cfg.k, seed=cfg.seed,
                                             degree=cfg.degree, ridge=cfg.ridge, sys_bins=cfg.sys_bins,
                                             learn=_learn_rows(tab, cfg))
    seeds = sorted(set(int(s) for s in tab["seed"]))
    insts = [i for i in cfg.instruments if i in set(np.asarray(tab["instrument"]).astype(str))]
    per = {}
    for s in seeds:
        for inst in insts:
            sel = (np.asarray(tab["seed"]) == s) & (np.asarray(tab["instrument"]).astype(str) == inst)
            types = star_type(y[sel])
            per[f"{inst}/seed{s}"] = {
                "n": int(sel.sum()),
                "uncal": calibration_figures(x[sel], y[sel], e[sel], be[sel], types),
                "cal": calibration_figures(xc[sel], y[sel], err[sel], be[sel], types),
            }
    summary = {}
    for inst in insts:
        keys = [f"{inst}/seed{s}" for s in seeds]
        o = {}
        for stage in ("uncal", "cal"):
            o[stage] = {}
            for grp in ("all", "dwarf", "giant", "mp_giant"):
                o[stage][grp] = {}
                for n in BENCH_LABELS:
                    o[stage][grp][n] = {}
                    for q in ("bias", "dispersion", "pull_dispersion"):
                        v = np.array([per[kk][stage][grp][n][q] for kk in keys])
                        o[stage][grp][n][q] = {"mean": float(np.mean(v)), "min": float(np.min(v)),
                                               "max": float(np.max(v))}
                    o[stage][grp][n]["n"] = per[keys[0]][stage][grp][n]["n"]
        summary[inst] = o
    return {"per_seed": per, "summary": summary, "seeds": seeds, "k": cfg.k, "n_stars": int(len(set(tab["hd"]))),
            "n_spectra": int(len(set(tab["stellar_id"])))}


#: the issue's acceptance limits (cross-validated, MUSE, calibrated): |bias| and dispersion per label,
#: and the pull-dispersion range
LIMITS = {"teff": (30.0, 130.0), "logg": (0.03, 0.17), "fe_h": (0.02, 0.09)}
PULL_RANGE = (0.85, 1.2)


def checks(figures: dict, instrument: str = "muse") -> dict:
    """Pass/fail of the issue's limits on the seed-mean CV figures of one instrument."""
    s = figures["summary"][instrument]["cal"]["all"]
    out = {}
    for n, (bmax, dmax) in LIMITS.items():
        out[f"{n}_bias"] = bool(abs(s[n]["bias"]["mean"]) <= bmax)
        out[f"{n}_dispersion"] = bool(s[n]["dispersion"]["mean"] <= dmax)
        out[f"{n}_pulls"] = bool(PULL_RANGE[0] <= s[n]["pull_dispersion"]["mean"] <= PULL_RANGE[1])
    return out


def fit_final(tab: Table, config: BenchCalConfig | None = None, meta=None) -> BenchmarkCalibration:
    """The calibration to ship: map and sys errors fitted on every usable row (all seeds, instruments)."""
    cfg = config or BenchCalConfig()
    tab = tab[_usable(tab)]
    tab = tab[_learn_rows(tab, cfg)]
    x, y, e, be = _arrays(tab)
    return fit_calibration(x, y, e, be, degree=cfg.degree, ridge=cfg.ridge, sys_bins=cfg.sys_bins, meta=meta,
                           groups=np.asarray(tab["hd"]))


def figures_lines(figures: dict) -> list:
    """Human-readable table of :func:`evaluate`'s seed-mean figures."""
    lines = []
    for inst, o in figures["summary"].items():
        lines.append(f"{inst.upper()} (CV over {figures['n_stars']} benchmark stars, seeds {figures['seeds']}; "
                     "bias / dispersion / pull dispersion, mean [min..max] over seeds):")
        for stage in ("uncal", "cal"):
            for grp in ("all", "dwarf", "giant", "mp_giant"):
                parts = []
                for n in BENCH_LABELS:
                    v = o[stage][grp][n]
                    fmt = "{:+.0f}" if n == "teff" else "{:+.3f}"
                    dfmt = "{:.0f}" if n == "teff" else "{:.3f}"
                    parts.append(f"{n} {fmt.format(v['bias']['mean'])} / {dfmt.format(v['dispersion']['mean'])} "
                                 f"[{dfmt.format(v['dispersion']['min'])}..{dfmt.format(v['dispersion']['max'])}]"
                                 f" / {v['pull_dispersion']['mean']:.2f}")
                lines.append(f"  {stage:5s} {grp:8s} (n={o[stage][grp]['teff']['n']:3d}) " + "; ".join(parts))
    return lines


VALIDITY = ("The map and sys errors are learnt from hold-out models: the recipe of this model (same training "
            "set, architecture, regularisation; seeds listed) trained WITHOUT the benchmark stars, so every "
            "benchmark star is fitted by a model that never saw it, as any star a user fits is; the CV figures "
            "also keep each star out of the map and sys errors that calibrate it (K folds over stars).  The "
            "shipped model (trained with the benchmark stars) shares the hold-out models' catalogue-label "
            "systematics, which is what the map corrects; its own fits of the benchmark stars are in-sample and "
            "are not used.")


def _recipe(model, label_names):
    tc = dict(model.meta.get("train_config") or {})
    kw = {f.name: tc[f.name] for f in fields(TrainConfig) if f.name not in _NOT_RECIPE and f.name in tc}
    if "hidden" in kw:
        kw["hidden"] = tuple(kw["hidden"])
    if not kw.get("gradient_weight"):
        kw["gradient_weight"] = {n: 3e-4 for n in label_names}
    return TrainConfig(**kw)


def calibrate(model, shared, config: BenchCalConfig | None = None, holdout_models=None, trainset=None,
              templates=None, benchmarks=None, progress=None, command: str = ""):
    """Build the benchmark calibration of ``model`` (a :class:`~musepayne.models.model.SpectralModel`).

    ``holdout_models``: models of ``model``'s recipe trained without the benchmark stars (one
    per seed); None: train them here (``config.seeds``; training set from ``trainset``, a
    :class:`~musepayne.train.trainset.TrainingSet`, or built from ``shared/libraries``; gradient
    templates ``templates`` or built from the shared emulator).  Returns
    ``(calibration, figures, table)``; ``model`` is not modified."""
    cfg = config or BenchCalConfig()
    say = progress or (lambda m: None)
    shared = Path(shared)
    bpath = Path(benchmarks) if benchmarks else shared / DEFAULT_BENCHMARK_FILE
    bench = read_benchmarks(bpath)
    holdout_meta = []
    if holdout_models is None:
        ts = trainset if trainset is not None else build_trainset(shared / "libraries" / "miles",
                                                                  shared / "libraries" / "stelib")
        keys = ts.table["star_key"] if "star_key" in ts.table.colnames else ts.table["stellar_id"]
        names = ts.table["name"] if "name" in ts.table.colnames else keys
        keep = np.nonzero((match_benchmarks(names, bench) < 0) & (match_benchmarks(keys, bench) < 0))[0]
        sub = ts.select(keep)
        if templates is None:
            templates = build_templates(CannonEmulator.load(shared / "synthetic" / "doppler_cannon_coolstars_norm.npz"))
        recipe = _recipe(model, ts.label_names)
        holdout_models = []
        for s in cfg.seeds:
            say(f"training hold-out model seed {s} on {sub.n_spectra} spectra ({ts.n_spectra - sub.n_spectra} "
                "benchmark spectra left out)")
            res = train_model(sub.flux, sub.ivar, sub.labels, sub.label_names, sub.wave, replace(recipe, seed=int(s)),
                              templates=templates,
                              groups=np.asarray(sub.table["star_key"]) if "star_key" in sub.table.colnames else None)
            holdout_models.append(res.to_model())
            holdout_meta.append({"seed": int(s), "n_train_spectra": int(sub.n_spectra), "trained": "here"})
        seeds = list(cfg.seeds)
    else:
        seeds = []
        for i, m in enumerate(holdout_models):
            s = m.meta.get("seed", i)
            seeds.append(int(s) if s is not None else i)
            holdout_meta.append({"seed": seeds[-1], "name": m.meta.get("name", ""),
                                 "file": Path(m.path).name if getattr(m, "path", None) else "",
                                 "sha256": sha256_file(m.path) if getattr(m, "path", None) else "",
                                 "trainset_sha256": m.meta.get("trainset_sha256", ""),
                                 "trainset_n": m.meta.get("trainset_n", None)})
    say("reading the benchmark stars' library spectra")
    sets, index = benchmark_library_spectra(shared, bench)
    if not sets:
        raise ValueError(f"no library spectrum under {shared / 'libraries'} matches a benchmark star")
    observed = {inst: observe(sets, inst, cfg.snr, 1000 * cfg.seed + i) for i, inst in enumerate(cfg.instruments)}
    say(f"fitting {len(sets)} spectra x {len(observed)} instruments x {len(holdout_models)} hold-out models")
    tab = holdout_table(holdout_models, observed, bench, index, seeds)
    figures = evaluate(tab, cfg)
    chk = checks(figures, "muse")
    meta = {
        "id": "gaia-fgk-benchmark-v3",
        "method": (f"post-fit map x_bench = x_fit + polynomial (degree {cfg.degree}, ridge {cfg.ridge}) in the fitted "
                   "labels, robust least squares over benchmark stars fitted by hold-out models; sys error per "
                   f"label ({cfg.sys_bins}) so that the dispersion (half the 15.87-84.13 percentile range) of "
                   "(fit - bench) / sqrt(stat^2 + sys^2 + e_bench^2) is 1"),
        "benchmarks": bpath.name,
        "benchmarks_sha256": sha256_file(bpath),
        "benchmark_feh_error": f"{FEH_BENCH_ERR} dex assumed for every benchmark star (the table has none)",
        "reference": "Gaia FGK Benchmark Stars v3, Soubiran et al. 2024",
        "n_stars": figures["n_stars"],
        "n_spectra": figures["n_spectra"],
        "snr": cfg.snr,
        "instruments": list(cfg.instruments),
        "seeds": seeds,
        "holdout_models": holdout_meta,
        "config": {"k": cfg.k, "degree": cfg.degree, "ridge": cfg.ridge, "sys_bins": cfg.sys_bins, "seed": cfg.seed,
                   "map_instruments": list(cfg.map_instruments or cfg.instruments)},
        "cv": {inst: {stage: {grp: {n: {q: round(v[q]["mean"], 4) if isinstance(v[q], dict) else v[q]
                                           for q in v} for n, v in g.items()}
                              for grp, g in st.items()} for stage, st in o.items()}
               for inst, o in figures["summary"].items()},
        "cv_seed_range": {inst: {n: [round(o["cal"]["all"][n]["dispersion"]["min"], 4),
                                     round(o["cal"]["all"][n]["dispersion"]["max"], 4)] for n in BENCH_LABELS}
                          for inst, o in figures["summary"].items()},
        "checks_muse": chk,
        "validity": VALIDITY,
        "command": command,
    }
    return fit_final(tab, cfg, meta=meta), figures, tab


