"""Building the benchmark-scale calibration: hold-out models, the benchmark stars observed as MUSE
and LAMOST, cross-validation over the benchmark stars, and attaching the result to a model file.

The stored calibration and its fitting are :mod:`musepayne.models.benchcal` (read its docstring
for the method); this module runs the workflow behind ``musepayne model calibrate-benchmark``.
The maps' array core (fitting, selection by CV) is :mod:`musepayne.train.benchcal_maps`.

Length: just over 600 lines because it is the whole workflow in one place (hold-out models, the
observed benchmark spectra, out-of-fold figures and pulls, the ensemble helper, provenance).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack

from ..fit.fitter import FitConfig, Fitter
from ..io.fits import sha256_file
from ..io.prepared import PreparedSpectra
from ..models.benchcal import (
    BENCH_COLUMNS,
    BENCH_LABELS,
    DEFAULT_BENCHMARK_FILE,
    FEH_BENCH_ERR,
    MIN_BIN_STARS,
    SEED_COLUMNS,
    BenchmarkCalibration,
    _robust_disp,
    attach_benchmark_labels,
    match_benchmarks,
    read_benchmarks,
    seed_spread,
    star_type,
)
from ..models.gradients import CannonEmulator, build_templates
from ..models.model import MLPPayne
from ..prepare.preparer import PrepareConfig, Preparer
from ..threads import blas_threads
from .benchcal_maps import (  # noqa: F401  (re-exported: the public names of the calibration workflow)
    _PAIR,
    _SHORT,
    SELECT_REPEATS,
    SELECT_RIDGES,
    _binned_sys,
    _fit_map,
    _fit_terms,
    _oof_residuals_deg,
    _score,
    _solve_sys,
    _stats,
    calibration_figures,
    cross_validate_calibration,
    fit_calibration,
    map_candidates,
    select_maps,
)
from .crossval import _NOT_RECIPE, assign_folds
from .trainer import TrainConfig, train_model
from .trainset import build_trainset, library_files, read_library, simulate_lamost_observation, simulate_muse_observation


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
    #: choose each label's map (inputs, degree, ridge) by CV over the stars (:func:`select_maps`;
    #: nested inside the CV figures); False: the polynomial of ``degree`` with ``ridge`` for all
    select: bool = True
    #: further S/N at which the benchmark spectra are observed and fitted to check the error
    #: calibration (the map and sys errors are learnt at ``snr`` only)
    check_snr: tuple = (20.0, 50.0)


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
            with blas_threads(1):  # the fit's products are per chunk (small): one BLAS thread, as musepayne fit
                cat = fitter(prepared)
            for i in range(len(cat)):
                j = int(index[i])
                r = {"seed": int(seeds[im]) if seeds is not None else im, "instrument": inst,
                     "stellar_id": str(cat["stellar_id"][i]), "hd": str(bench["hd"][j]),
                     "status": str(cat["status"][i])}
                for n in BENCH_LABELS:
                    r[n] = float(cat[n][i])
                    r[f"{n}_err"] = float(cat[f"{n}_err"][i])
                    if f"{n}_err_seed" in cat.colnames:  # spread over the hold-out model's seed members
                        r[f"{n}_err_seed"] = float(cat[f"{n}_err_seed"][i])
                    r[f"{n}_bench"] = float(bench[n][j])
                    r[f"e_{n}_bench"] = float(bench[f"e_{n}"][j])
                rows.append(r)
    return Table(rows=rows)


def _arrays(tab):
    """(fitted labels, benchmark labels, errors, benchmark errors) of hold-out fits; the errors
    are the fit's statistical ones with the seed members' spread (``X_err_seed``) added in
    quadrature when the table has it: the part of ``X_err`` the sys error is solved beside."""
    x = np.stack([np.asarray(tab[n], float) for n in BENCH_LABELS], 1)
    y = np.stack([np.asarray(tab[f"{n}_bench"], float) for n in BENCH_LABELS], 1)
    e = np.stack([np.asarray(tab[f"{n}_err"], float) for n in BENCH_LABELS], 1)
    seed = seed_spread(tab)
    if seed is not None:
        e = np.hypot(e, seed)
    be = np.stack([np.asarray(tab[f"e_{n}_bench"], float) for n in BENCH_LABELS], 1)
    return x, y, e, be


def _learn_rows(tab, cfg):
    insts = np.asarray(tab["instrument"]).astype(str)
    return np.isin(insts, list(cfg.map_instruments or cfg.instruments))


def _usable(tab):
    st = np.asarray(tab["status"]).astype(str)
    return ~np.char.startswith(st, "failed")


def _at_snr(tab, cfg):
    """Rows at the calibration's S/N (tables without an ``snr`` column are all at it)."""
    if "snr" not in tab.colnames:
        return tab
    return tab[np.isclose(np.asarray(tab["snr"], float), cfg.snr)]


def evaluate(tab: Table, config: BenchCalConfig | None = None) -> dict:
    """Cross-validated figures of the calibration from a :func:`holdout_table`.

    K folds over the benchmark stars (HD number; all spectra, instruments and seeds of a star
    in one fold); the map and sys errors of a fold are fitted on the pooled rows of the other
    folds.  Returns per seed and instrument the figures before (``uncal``: fit errors only) and
    after (``cal``) calibration (:func:`calibration_figures`), and their mean and spread over
    seeds (``summary``)."""
    cfg = config or BenchCalConfig()
    tab = _at_snr(tab[_usable(tab)], cfg)
    x, y, e, be = _arrays(tab)
    xc, err, _ = cross_validate_calibration(x, y, e, be, np.asarray(tab["hd"]), k=cfg.k, seed=cfg.seed,
                                             degree=cfg.degree, ridge=cfg.ridge, sys_bins=cfg.sys_bins,
                                             learn=_learn_rows(tab, cfg), select=cfg.select)
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


def _apply_out_of_fold(tab, other, cfg):
    """``other``'s usable rows, calibrated out of fold by calibrations learnt from ``tab``
    (K folds over the stars of both; see :func:`evaluate_snr`): ``(rows, cal_labels, total_err)``."""
    tab = _at_snr(tab[_usable(tab)], cfg)
    tab = tab[_learn_rows(tab, cfg)]
    other = other[_usable(other)]
    x, y, e, be = _arrays(tab)
    xo, _, eo, _ = _arrays(other)
    hd, hdo = np.asarray(tab["hd"]), np.asarray(other["hd"])
    uniq = np.unique(np.concatenate([hd, hdo]))
    fold_of = dict(zip(uniq, assign_folds(uniq, cfg.k, cfg.seed)))
    f_t = np.array([fold_of[h] for h in hd])
    f_o = np.array([fold_of[h] for h in hdo])
    xc = np.full(xo.shape, np.nan)
    err = np.full(xo.shape, np.nan)
    for f in range(cfg.k):
        tr, te = f_t != f, f_o == f
        if not te.any():
            continue
        c = fit_calibration(x[tr], y[tr], e[tr], be[tr], degree=cfg.degree, ridge=cfg.ridge, sys_bins=cfg.sys_bins,
                            groups=hd[tr], select=cfg.select)
        xc[te] = c.apply(xo[te])
        err[te] = np.sqrt(eo[te] ** 2 + c.sys(xc[te]) ** 2)
    return other, xc, err


#: a (instrument, S/N, type) bin of :func:`pull_bins` is asserted / quoted only with this many distinct stars
MIN_PULL_STARS = 10


def pull_bins(tab: Table, other: Table | None = None, config: BenchCalConfig | None = None) -> dict:
    """Error calibration by S/N and star type, pooled over the hold-out seeds.

    The dispersion (half the 15.87-84.13 percentile range) of
    (fit_cal - bench) / sqrt(X_err^2 + e_bench^2), X_err = sqrt(stat^2 + sys^2), for the rows of
    ``other`` (default: ``tab`` itself) calibrated out of fold (:func:`evaluate_snr`), per
    instrument, S/N (column ``snr``; absent: the config's) and type of the benchmark labels
    (all, dwarf: log g > 3.5, giant, mp_giant: giant with [Fe/H] < -1).

    Parameters
    ----------
    tab : astropy.table.Table
        Hold-out fits the calibration is learnt from.
    other : astropy.table.Table, optional
        Hold-out fits to evaluate (may hold several S/N; default ``tab``).
    config : BenchCalConfig, optional
        Calibration settings.

    Returns
    -------
    dict
        {instrument: {snr: {type: {'n', 'n_stars', label: pull dispersion}}}}.
    """
    cfg = config or BenchCalConfig()
    other = tab if other is None else other
    rows, xc, err = _apply_out_of_fold(tab, other, cfg)
    _, y, _, be = _arrays(rows)
    types = star_type(y)
    inst = np.asarray(rows["instrument"]).astype(str)
    snr = np.asarray(rows["snr"], float) if "snr" in rows.colnames else np.full(len(rows), cfg.snr)
    hd = np.asarray(rows["hd"])
    out = {}
    for i in sorted(set(inst)):
        out[i] = {}
        for sn in sorted(set(snr)):
            o = {}
            for grp, sel in (("all", np.ones(len(rows), bool)), ("dwarf", types == "dwarf"),
                             ("giant", types != "dwarf"), ("mp_giant", types == "mp_giant")):
                m = sel & (inst == i) & (snr == sn)
                o[grp] = {"n": int(m.sum()), "n_stars": int(np.unique(hd[m]).size)}
                for k, n in enumerate(BENCH_LABELS):
                    o[grp][n] = float(_robust_disp((xc[m, k] - y[m, k]) / np.hypot(err[m, k], be[m, k])))
            out[i][float(sn)] = o
    return out


def pull_lines(bins: dict) -> list:
    """Human-readable lines of :func:`pull_bins`.

    Parameters
    ----------
    bins : dict
        :func:`pull_bins` output.

    Returns
    -------
    list of str
        One line per instrument and S/N.
    """
    lines = []
    for i, per in bins.items():
        for sn, o in per.items():
            lines.append(f"  {i:6s} S/N {sn:5.0f}: " + "; ".join(
                f"{g} ({v['n_stars']} stars) " + "/".join(f"{v[n]:.2f}" for n in BENCH_LABELS) for g, v in o.items()))
    return lines


def evaluate_snr(tab: Table, other: Table, config: BenchCalConfig | None = None) -> dict:
    """Cross-validated figures at other S/N: the calibration learnt from ``tab`` (the S/N of
    :class:`BenchCalConfig`) applied, out of fold, to ``other`` (hold-out fits of the same
    benchmark stars at other S/N; column ``snr``).

    K folds over the stars (HD number, fold seed ``config.seed``): the calibration of fold f is
    fitted on the rows of ``tab`` whose stars are not in f and applied to the rows of ``other``
    whose stars are.  Returns {f'{instrument}/snr{S}/seed{s}': {'n', 'uncal', 'cal'}} with
    :func:`calibration_figures` (types from the benchmark labels).

    Parameters
    ----------
    tab : astropy.table.Table
        Hold-out fits the calibration is learnt from (:func:`holdout_table`).
    other : astropy.table.Table
        Hold-out fits at other S/N, same columns plus ``snr``.
    config : BenchCalConfig, optional
        Calibration settings (default :class:`BenchCalConfig`).

    Returns
    -------
    dict
        Figures per instrument, S/N and seed.
    """
    cfg = config or BenchCalConfig()
    other, xc, err = _apply_out_of_fold(tab, other, cfg)
    xo, yo, eo, beo = _arrays(other)
    out = {}
    inst = np.asarray(other["instrument"]).astype(str)
    snr = np.asarray(other["snr"], float)
    seeds = np.asarray(other["seed"])
    for i in sorted(set(inst)):
        for sn in sorted(set(snr)):
            for s in sorted(set(seeds)):
                sel = (inst == i) & (snr == sn) & (seeds == s)
                if sel.any():
                    types = star_type(yo[sel])
                    out[f"{i}/snr{sn:g}/seed{s}"] = {
                        "n": int(sel.sum()),
                        "uncal": calibration_figures(xo[sel], yo[sel], eo[sel], beo[sel], types),
                        "cal": calibration_figures(xc[sel], yo[sel], err[sel], beo[sel], types)}
    return out


def ensemble_mlp(models):
    """One MLP whose spectrum is the mean of several MLPs' spectra (a seed ensemble).

    Hidden layers are stacked block-diagonally (each member's units see only its own previous
    layer; leaky ReLU acts per unit), the output layer is the members' output layers side by
    side divided by their number: ``predict`` equals the mean of the members' predictions, and
    the file format is the ordinary MLP one.  The pixel mask is the union of the members'; the
    intrinsic scatter is their mean (an upper bound: the ensemble's own scatter, not re-measured
    here, is smaller).

    Parameters
    ----------
    models : list of MLPPayne
        Members with the same labels, label scaling (x_min, x_max), wavelength grid, layer count
        and leaky-ReLU slope.

    Returns
    -------
    MLPPayne
        The ensemble (fitting cost grows ~ linearly with the number of members).
    """
    m0 = models[0]
    for m in models[1:]:
        if (m.arch != "mlp" or m.label_names != m0.label_names or not np.allclose(m.x_min, m0.x_min)
                or not np.allclose(m.x_max, m0.x_max) or not np.array_equal(m.wave, m0.wave)
                or len(m.weights) != len(m0.weights) or m.negative_slope != m0.negative_slope):
            raise ValueError("ensemble members differ in labels, label scaling, grid, depth or slope")
    weights, biases = [np.concatenate([m.weights[0] for m in models], 0)], [np.concatenate([m.biases[0] for m in models])]
    for i in range(1, len(m0.weights) - 1):
        rows = sum(m.weights[i].shape[0] for m in models)
        cols = sum(m.weights[i].shape[1] for m in models)
        w = np.zeros((rows, cols), m0.weights[i].dtype)
        r = c = 0
        for m in models:
            h, v = m.weights[i].shape
            w[r:r + h, c:c + v] = m.weights[i]
            r, c = r + h, c + v
        weights.append(w)
        biases.append(np.concatenate([m.biases[i] for m in models]))
    weights.append(np.concatenate([m.weights[-1] for m in models], 1) / len(models))
    biases.append(np.mean([m.biases[-1] for m in models], 0).astype(m0.biases[-1].dtype))
    meta = {"name": f"ensemble of {len(models)}: " + ", ".join(str(m.meta.get("name", "")) for m in models),
            "ensemble_of": [str(m.meta.get("name", "")) for m in models],
            "seeds": [m.meta.get("seed") for m in models]}
    out = MLPPayne(weights, biases, m0.label_names, m0.x_min, m0.x_max, m0.wave, m0.frame, m0.label_units, meta,
                   negative_slope=m0.negative_slope)
    out = out.with_pixel_mask(np.any([m.pixel_mask for m in models], 0))
    return out.with_scatter(np.mean([m.scatter for m in models], 0))


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
    tab = _at_snr(tab[_usable(tab)], cfg)
    tab = tab[_learn_rows(tab, cfg)]
    x, y, e, be = _arrays(tab)
    return fit_calibration(x, y, e, be, degree=cfg.degree, ridge=cfg.ridge, sys_bins=cfg.sys_bins, meta=meta,
                           groups=np.asarray(tab["hd"]), select=cfg.select)


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


def _calibration_meta(cfg, figures, pulls, chk, bpath, seeds, holdout_meta, inputs, command) -> dict:
    """The provenance and cross-validated figures stored with the calibration (its ``meta``)."""
    return {
        "id": "gaia-fgk-benchmark-v3",
        "method": ("post-fit map x_bench = x_fit + polynomial in the fitted labels, per label the inputs, degree "
                   "(offset, linear, quadratic) and ridge chosen by CV over the benchmark stars" if cfg.select else
                   f"post-fit map x_bench = x_fit + polynomial (degree {cfg.degree}, ridge {cfg.ridge}) in the fitted "
                   "labels")
                  + ", robust least squares over benchmark stars fitted by hold-out models; sys error per "
                    f"label ({cfg.sys_bins}; types with < {MIN_BIN_STARS} stars shrunk towards their parent) so that "
                    "the dispersion (half the 15.87-84.13 percentile range) of (fit - bench) / sqrt(stat^2 + sys^2 + "
                    "e_bench^2) is 1",
        "benchmarks": bpath.name,
        "benchmarks_sha256": sha256_file(bpath),
        "benchmark_feh_error": f"{FEH_BENCH_ERR} dex assumed for every benchmark star (the table has none)",
        "reference": "Gaia FGK Benchmark Stars v3, Soubiran et al. 2024",
        "n_stars": figures["n_stars"],
        "n_spectra": figures["n_spectra"],
        "snr": cfg.snr,
        "check_snr": [float(s) for s in cfg.check_snr],
        "instruments": list(cfg.instruments),
        "seeds": seeds,
        "holdout_models": holdout_meta,
        "inputs_sha256": dict(inputs or {}),
        "config": {"k": cfg.k, "degree": cfg.degree, "ridge": cfg.ridge, "sys_bins": cfg.sys_bins, "seed": cfg.seed,
                   "select": cfg.select, "map_instruments": list(cfg.map_instruments or cfg.instruments)},
        "cv": {inst: {stage: {grp: {n: {q: round(v[q]["mean"], 4) if isinstance(v[q], dict) else v[q]
                                           for q in v} for n, v in g.items()}
                              for grp, g in st.items()} for stage, st in o.items()}
               for inst, o in figures["summary"].items()},
        "cv_seed_range": {inst: {n: [round(o["cal"]["all"][n]["dispersion"]["min"], 4),
                                     round(o["cal"]["all"][n]["dispersion"]["max"], 4)] for n in BENCH_LABELS}
                          for inst, o in figures["summary"].items()},
        "cv_pulls": {inst: {f"{sn:g}": {grp: {q: (round(v, 3) if isinstance(v, float) else v) for q, v in o.items()}
                                        for grp, o in per.items()} for sn, per in d.items()}
                     for inst, d in pulls.items()},
        "checks_muse": chk,
        "validity": VALIDITY,
        "command": command,
    }


def _with_holdout_members(models, n_members):
    """Each hold-out model with the next ``n_members`` other hold-out models as its seed members
    (cyclically): the hold-out fits then report the seed spread as the calibrated model's fits
    will (its members are the same recipe trained with other seeds)."""
    models = list(models)
    if len(models) < n_members + 1:
        raise ValueError(f"the model carries {n_members} seed members: its calibration needs at least "
                         f"{n_members + 1} hold-out models (seeds), got {len(models)}")
    out = []
    for i, m in enumerate(models):
        others = [models[(i + j) % len(models)] for j in range(1, n_members + 1)]
        out.append(m.with_seed_members(others))
    return out


def calibrate(model, shared, config: BenchCalConfig | None = None, holdout_models=None, trainset=None,
              templates=None, benchmarks=None, progress=None, command: str = "", table: Table | None = None,
              save_holdout=None, inputs=None):
    """Build the benchmark calibration of ``model`` (a :class:`~musepayne.models.model.SpectralModel`).

    Parameters
    ----------
    model : SpectralModel
        The model to calibrate (not modified).
    shared : path-like
        Shared data folder (``libraries/``, ``benchmarks/``, ``synthetic/``).
    config : BenchCalConfig, optional
        Settings.
    holdout_models : list of SpectralModel, optional
        Models of ``model``'s recipe trained without the benchmark stars (one per seed); None:
        trained here (``config.seeds``; training set ``trainset`` or built from
        ``shared/libraries``; gradient templates ``templates`` or built from the shared emulator).
    trainset, templates : optional
        :class:`~musepayne.train.trainset.TrainingSet` and
        :class:`~musepayne.models.gradients.GradientTemplates` for training hold-out models.
    benchmarks : path-like, optional
        Benchmark table (default ``shared/benchmarks/gbs_v3_gdr3_tmass.csv``).
    progress : callable, optional
        Called with progress messages.
    command : str
        The command line recorded in the provenance (reproducible form).
    table : astropy.table.Table, optional
        An existing hold-out fits table (:func:`holdout_table`, e.g. a previous ``--table``):
        no model is trained or fitted.
    save_holdout : callable, optional
        ``save_holdout(seed, model)`` is called for every hold-out model trained here (to cache it).
    inputs : dict, optional
        {name: sha256} of input files, recorded in the provenance.

    Returns
    -------
    tuple
        ``(calibration, figures, table)``: the :class:`BenchmarkCalibration`, the figures of
        :func:`evaluate` and the hold-out fits (column ``snr``: ``config.snr`` and ``config.check_snr``).
    """
    cfg = config or BenchCalConfig()
    say = progress or (lambda m: None)
    shared = Path(shared)
    bpath = Path(benchmarks) if benchmarks else shared / DEFAULT_BENCHMARK_FILE
    bench = read_benchmarks(bpath)
    holdout_meta = []
    n_members = len(getattr(model, "seed_members", ()))
    if table is not None:
        tab = table if all(c in table.colnames for c in BENCH_COLUMNS) else attach_benchmark_labels(table, bench)
        has_seed = set(SEED_COLUMNS) <= set(tab.colnames)
        if n_members and not has_seed:
            raise ValueError(f"the model carries {n_members} seed members but the hold-out table has no "
                             "X_err_seed columns: refit the hold-out models (--holdout-model) so that the sys "
                             "errors are solved beside the seed spread the fits will report")
        if has_seed and not n_members:  # a plain model: its fits report no seed spread
            tab = tab.copy(copy_data=False)
            tab.remove_columns(list(SEED_COLUMNS))
        seeds = sorted(set(int(s) for s in tab["seed"]))
        holdout_meta = [{"seed": s, "from_table": True} for s in seeds]
    else:
        if holdout_models is None:
            ts = trainset if trainset is not None else build_trainset(shared / "libraries" / "miles",
                                                                      shared / "libraries" / "stelib")
            keys = ts.table["star_key"] if "star_key" in ts.table.colnames else ts.table["stellar_id"]
            names = ts.table["name"] if "name" in ts.table.colnames else keys
            keep = np.nonzero((match_benchmarks(names, bench) < 0) & (match_benchmarks(keys, bench) < 0))[0]
            sub = ts.select(keep)
            if templates is None:
                templates = build_templates(CannonEmulator.load(shared / "synthetic" /
                                                                "doppler_cannon_coolstars_norm.npz"))
            recipe = _recipe(model, ts.label_names)
            holdout_models = []
            for s in cfg.seeds:
                say(f"training hold-out model seed {s} on {sub.n_spectra} spectra ({ts.n_spectra - sub.n_spectra} "
                    "benchmark spectra left out)")
                res = train_model(sub.flux, sub.ivar, sub.labels, sub.label_names, sub.wave,
                                  replace(recipe, seed=int(s)), templates=templates,
                                  groups=np.asarray(sub.table["star_key"]) if "star_key" in sub.table.colnames
                                  else None)
                hm = res.to_model()
                hm.meta["seed"] = int(s)
                hm.meta["name"] = f"{model.meta.get('name', 'model')}-nobench-seed{int(s)}"
                if save_holdout is not None:
                    save_holdout(int(s), hm)
                holdout_models.append(hm)
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
        if n_members:
            holdout_models = _with_holdout_members(holdout_models, n_members)
        say("reading the benchmark stars' library spectra")
        sets, index = benchmark_library_spectra(shared, bench)
        if not sets:
            raise ValueError(f"no library spectrum under {shared / 'libraries'} matches a benchmark star")
        parts = []
        for j, snr in enumerate((cfg.snr,) + tuple(s for s in cfg.check_snr if s != cfg.snr)):
            observed = {inst: observe(sets, inst, snr, 1000 * cfg.seed + 10 * j + i)
                        for i, inst in enumerate(cfg.instruments)}
            say(f"fitting {len(sets)} spectra x {len(observed)} instruments x {len(holdout_models)} hold-out models "
                f"at S/N {snr:g}")
            t = holdout_table(holdout_models, observed, bench, index, seeds)
            t["snr"] = float(snr)
            parts.append(t)
        tab = vstack(parts)
    figures = evaluate(tab, cfg)
    chk = checks(figures, "muse")
    say("error calibration by S/N and star type (out of fold)")
    pulls = pull_bins(tab, tab, cfg)
    meta = _calibration_meta(cfg, figures, pulls, chk, bpath, seeds, holdout_meta, inputs, command)
    if n_members:
        meta["seed_members"] = {"n": n_members, "note": "stat in the sys solve and the pulls includes X_err_seed, the "
                                "spread over each hold-out model's seed members (the other hold-out models)"}
    return fit_final(tab, cfg, meta=meta), figures, tab
