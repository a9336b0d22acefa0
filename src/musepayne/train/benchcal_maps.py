"""The benchmark calibration's maps, fitted and chosen: pure array functions.

A map takes fitted labels to the benchmark scale (``x_bench = x_fit + polynomial in the fitted
labels``, the features of :func:`musepayne.models.benchcal._features`); :func:`fit_calibration`
fits one map per label with the systematic errors, :func:`select_maps` chooses each label's inputs,
degree and ridge by cross-validation over the stars, and :func:`cross_validate_calibration` gives
out-of-fold calibrated labels.  The workflow around them (hold-out models, observed benchmark
spectra, figures, the model file) is :mod:`musepayne.train.benchcal`.  Imports numpy and
:mod:`musepayne.models.benchcal` only.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..models.benchcal import (
    BENCH_LABELS,
    MIN_BIN_STARS,
    BenchmarkCalibration,
    _features,
    _robust_disp,
    star_type,
)
from .crossval import assign_folds

# --------------------------------------------------------------------------- cross-validation
#: index of z_i^2 in the degree-2 features of :func:`musepayne.models.benchcal._features`
#: (order 1, zT, zg, zf, zT^2, zT zg, zT zf, zg^2, zg zf, zf^2)
_PAIR = {(i, j): 4 + n for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(i, 3))}
#: ridge penalties tried by the map selection (features O(1); in units of one row's squared residual)
SELECT_RIDGES = (0.1, 1.0, 10.0, 100.0)
#: fold assignments averaged by the map selection
SELECT_REPEATS = 3
_SHORT = ("T", "g", "f")


def map_candidates(ridges=SELECT_RIDGES) -> list:
    """Candidate maps of one label for :func:`select_maps`: an offset, and for every non-empty
    subset of the fitted labels as inputs a linear and a full quadratic polynomial, each with
    every ridge penalty.

    Parameters
    ----------
    ridges : sequence of float
        Ridge penalties tried for the non-constant terms.

    Returns
    -------
    list of tuple
        ``(name, terms, ridge)``: a name such as ``'quad(T,g) r10'``, the indices of the degree-2
        features used (0 is the constant) and the ridge penalty.
    """
    out = [("offset", (0,), 0.0)]
    for size in (1, 2, 3):
        for sub in itertools.combinations(range(3), size):
            lin = (0,) + tuple(1 + i for i in sub)
            quad = lin + tuple(_PAIR[(i, j)] for i in sub for j in sub if j >= i)
            for kind, terms in (("lin", lin), ("quad", quad)):
                for r in ridges:
                    out.append((f"{kind}({','.join(_SHORT[i] for i in sub)}) r{r:g}", terms, float(r)))
    return out


def _score(r) -> float:
    """Selection score of out-of-fold residuals: sqrt(dispersion^2 + median^2)."""
    return float(np.hypot(_robust_disp(r), np.nanmedian(r)))


def select_maps(fit_labels, bench_labels, groups, k: int = 5, seed: int = 12345, candidates=None,
                repeats: int = SELECT_REPEATS) -> dict:
    """Choose each label's map (inputs, degree, ridge) by K-fold CV over the stars.

    Every candidate of :func:`map_candidates` is fitted on K-1 folds (grouped by star) and
    scored on the held-out fold by sqrt(dispersion^2 + median^2) of the out-of-fold residuals
    (dispersion: half the 15.87-84.13 percentile range, the figure the issue limits), averaged
    over ``repeats`` fold assignments (seeds ``seed``, ``seed + 1``, ...: with ~90 stars one
    assignment's ranking is noisy); the lowest score wins.

    Parameters
    ----------
    fit_labels, bench_labels : array_like
        (n, 3) fitted and benchmark labels (teff [K], logg, fe_h [dex]); rows with a NaN are ignored.
    groups : array_like
        (n,) star key per row (all rows of a star in one fold).
    k : int
        Folds.
    seed : int
        Seed of the fold assignment.
    candidates : list, optional
        ``(name, terms, ridge)`` per candidate (default :func:`map_candidates`).
    repeats : int
        Fold assignments averaged.

    Returns
    -------
    dict
        {label: {'name', 'terms', 'ridge', 'score', 'residuals'}}: the winner, its CV score
        (label units) and its out-of-fold residuals ``bench - fit - map`` (n,; NaN on ignored rows).
    """
    x = np.asarray(fit_labels, float)
    y = np.asarray(bench_labels, float)
    g = np.asarray(groups)
    ok = np.all(np.isfinite(x) & np.isfinite(y), axis=1)
    x, y, g = x[ok], y[ok], g[ok]
    cands = candidates or map_candidates()
    d = y - x
    # out-of-fold residuals of every candidate and label: (repeats, candidates, rows, labels);
    # the features of a fold's training rows and its (clipped) test rows are computed once
    res = np.full((max(1, repeats), len(cands), len(x), 3), np.nan)
    for rep in range(max(1, repeats)):
        folds = assign_folds(g, k, seed + rep)
        for f in range(k):
            te = folds == f
            if not te.any() or te.all():
                continue
            phi_tr = _features(x[~te], 2)
            phi_te = _features(np.clip(x[te], np.min(x[~te], 0), np.max(x[~te], 0)), 2)
            for ic, (_, terms, ridge) in enumerate(cands):
                for kk in range(3):
                    c = _fit_terms(None, d[~te, kk], terms, ridge, phi_all=phi_tr)
                    res[rep, ic, te, kk] = d[te, kk] - phi_te @ c
    out = {}
    for kk, n in enumerate(BENCH_LABELS):
        scores = [float(np.mean([_score(res[rep, ic, :, kk]) for rep in range(res.shape[0])]))
                  for ic in range(len(cands))]
        ib = int(np.argmin(scores))
        full = np.full(len(ok), np.nan)
        full[ok] = res[0, ib, :, kk]
        out[n] = {"name": cands[ib][0], "terms": [int(t) for t in cands[ib][1]], "ridge": float(cands[ib][2]),
                  "score": scores[ib], "residuals": full}
    return out


def fit_calibration(fit_labels, bench_labels, stat_err, bench_err, degree: int = 2, ridge: float = 1.0,
                    sys_bins: str = "all", meta=None, groups=None, inner_k: int = 5,
                    select: bool = False) -> BenchmarkCalibration:
    """Fit the map and the systematic errors.

    Parameters
    ----------
    fit_labels, bench_labels, stat_err, bench_err : array_like
        (n, 3) fitted labels, benchmark labels, statistical errors of the fit and benchmark errors
        (teff [K], logg, fe_h [dex]); rows with a NaN are ignored.
    degree : int
        Polynomial degree of the map (0-2) when ``select`` is False.
    ridge : float
        Penalty on every coefficient but the constant (features O(1); in units of one row's
        squared residual) when ``select`` is False: the map shrinks towards an offset.
    sys_bins : str
        'all' (one sys error per label) or 'type' (dwarf / giant / mp_giant; a type with fewer
        than :data:`~musepayne.models.benchcal.MIN_BIN_STARS` stars is shrunk towards its
        parent, see :func:`_binned_sys`).
    meta : dict, optional
        Provenance stored with the calibration.
    groups : array_like, optional
        (n,) star key per row; when given, the sys errors are solved on the residuals of
        ``inner_k``-fold out-of-fold maps (each star calibrated by a map that did not see it),
        not on the in-sample residuals, which are smaller by the map's degrees of freedom.
    inner_k : int
        Folds of that inner CV (and of the map selection).
    select : bool
        Choose each label's inputs, degree and ridge by ``inner_k``-fold CV over ``groups``
        (:func:`select_maps`; ``degree`` and ``ridge`` are then ignored and the map is stored
        as degree 2 with the unused coefficients zero).

    Returns
    -------
    BenchmarkCalibration
        The map and sys errors; with ``select``, ``meta['map']`` names each label's choice.
    """
    x = np.asarray(fit_labels, float)
    y = np.asarray(bench_labels, float)
    se = np.asarray(stat_err, float)
    be = np.asarray(bench_err, float)
    ok = np.all(np.isfinite(x) & np.isfinite(y) & np.isfinite(se) & np.isfinite(be), axis=1)
    x, y, se, be = x[ok], y[ok], se[ok], be[ok]
    meta = dict(meta or {})
    if select:
        if groups is None:
            raise ValueError("select=True needs groups (one star key per row)")
        chosen = select_maps(x, y, np.asarray(groups)[ok], k=inner_k)
        spec = {n: (chosen[n]["terms"], chosen[n]["ridge"]) for n in BENCH_LABELS}
        degree = 2
        meta["map"] = {n: {"choice": chosen[n]["name"], "cv_score": round(chosen[n]["score"], 5)} for n in BENCH_LABELS}
    else:
        spec = {n: (tuple(range(_features(np.zeros((1, 3)), degree).shape[1])), ridge) for n in BENCH_LABELS}
    coef = {n: [float(v) for v in _fit_terms(x, y[:, kk] - x[:, kk], *spec[n], degree=degree)]
            for kk, n in enumerate(BENCH_LABELS)}
    domain = {n: [float(np.min(x[:, k])), float(np.max(x[:, k]))] for k, n in enumerate(BENCH_LABELS)}
    cal = BenchmarkCalibration(degree, coef, {n: {"all": 0.0} for n in BENCH_LABELS}, meta, domain)
    xc = cal.apply(x)
    if groups is not None:
        g = np.asarray(groups)[ok]
        for kk, n in enumerate(BENCH_LABELS):
            r = (chosen[n]["residuals"] if select
                 else _oof_residuals_deg(x, y[:, kk] - x[:, kk], g, spec[n], degree, inner_k))
            xc[:, kk] = y[:, kk] - r
    keys = np.asarray(groups)[ok] if groups is not None else np.arange(len(x))
    sys_err = _binned_sys(xc, y, se, be, keys, sys_bins)
    return BenchmarkCalibration(degree, coef, sys_err, meta, domain)


def _oof_residuals_deg(x, d, groups, spec, degree, k):
    """:func:`_oof_residuals` for a map stored at ``degree`` (features of that degree)."""
    terms, ridge = spec
    folds = assign_folds(groups, k, 12345)
    out = np.full(len(d), np.nan)
    for f in range(k):
        te = folds == f
        if te.any() and (~te).any():
            c = _fit_terms(x[~te], d[~te], terms, ridge, degree=degree)
            lo, hi = np.min(x[~te], 0), np.max(x[~te], 0)
            out[te] = d[te] - _features(np.clip(x[te], lo, hi), degree) @ c
    return out


def _binned_sys(xc, y, se, be, keys, sys_bins):
    """Sys error per label: 'all', and with ``sys_bins='type'`` per star type of the calibrated
    labels (dwarf; giant, metal-poor ones included; mp_giant).  A type with fewer than
    MIN_BIN_STARS distinct stars is shrunk towards its parent (mp_giant -> giant -> all):
    sys^2 = (n sys_bin^2 + MIN_BIN_STARS sys_parent^2) / (n + MIN_BIN_STARS), n its stars."""
    types = star_type(xc)
    bins = {"dwarf": (types == "dwarf", "all"), "giant": (types != "dwarf", "all"),
            "mp_giant": (types == "mp_giant", "giant")}
    sys_err = {}
    for k, n in enumerate(BENCH_LABELS):
        r = xc[:, k] - y[:, k]
        sys_err[n] = {"all": _solve_sys(r, se[:, k], be[:, k])}
        if sys_bins == "type":
            for t, (sel, parent) in bins.items():
                ns = np.unique(keys[sel]).size
                if ns < 3:
                    continue
                raw = _solve_sys(r[sel], se[sel, k], be[sel, k])
                if ns < MIN_BIN_STARS:
                    par = sys_err[n][parent]
                    raw = float(np.sqrt((ns * raw**2 + MIN_BIN_STARS * par**2) / (ns + MIN_BIN_STARS)))
                sys_err[n][t] = raw
    return sys_err


def _fit_terms(x, d, terms, ridge, degree: int = 2, phi_all=None) -> np.ndarray:
    """Robust ridge fit of ``d`` on the features ``terms`` (indices into the degree-``degree``
    features of ``x``, or of the given ``phi_all``); returns the full coefficient vector (zeros
    for unused features)."""
    if phi_all is None:
        phi_all = _features(x, degree)
    terms = list(terms)
    phi = phi_all[:, terms]
    nf = phi.shape[1]
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
    full = np.zeros(phi_all.shape[1])
    full[terms] = c
    return full


def _fit_map(x, y, degree, ridge) -> dict:
    """Full polynomial of ``degree`` per label (every feature, one ridge)."""
    nf = _features(np.zeros((1, 3)), degree).shape[1]
    return {n: [float(v) for v in _fit_terms(x, y[:, k] - x[:, k], range(nf), ridge, degree=degree)]
            for k, n in enumerate(BENCH_LABELS)}


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
                               degree: int = 2, ridge: float = 1.0, sys_bins: str = "all", learn=None,
                               select: bool = False):
    """K-fold CV of :func:`fit_calibration` grouped by star (``groups``: one key per row; all rows
    of a star -- e.g. its MUSE and LAMOST fits, MILES and STELIB spectra -- in one fold).

    ``learn``: optional boolean mask of the rows the maps may be fitted on (e.g. MUSE only);
    every row is calibrated.  ``select``: each fold chooses its maps by an inner CV over its own
    stars (:func:`select_maps`), so the figures are those of a nested CV.
    Returns ``(cal_labels, total_err, sys_err)``: out-of-fold
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
                            groups=np.asarray(groups)[tr], select=select)
        cal[te] = c.apply(x[te])
        sys[te] = c.sys(cal[te])
    err = np.sqrt(np.asarray(stat_err, float) ** 2 + sys**2)
    return cal, err, sys
