"""The label catalogue (paper Table 2) and operations on catalogues.

Columns (lower case), every one with a unit and a description:

``stellar_id, ra, dec, snr_muse``; for every model label ``X`` (``teff``,
``logg``, ``fe_h``, ``mg_fe``, ...): ``X, X_err, X_flag, X_gradcorr``; then
``rv, rv_err, red_chi2, red_chi2_model, misfit, misfit_err, misfit_ref, ref_dist, corr_flux, n_pix_used,
model, status, fit_flags`` and the
diagnostics ``reason, edge_labels, n_iter, chi2, error_scale`` (+ ``model_flux``
when the fitter keeps best-fit spectra).

* ``X_gradcorr``: correlation of the model's gradient spectrum d f / d X with a
  theoretical gradient spectrum (paper §3.3, Eq. 4); NaN until computed.
* ``X_flag``: 1 when ``X_gradcorr`` > threshold (paper: 0.5), 0 when not,
  -1 while not computed.
* ``status``: ``converged``; ``edge`` (a label or the RV at its bound: the model
  would have to extrapolate; ``edge_labels`` names them, ``<`` lower / ``>`` upper);
  ``not_converged``; ``failed:<reason>`` (row kept, values NaN).
* ``fit_flags``: OR of the :data:`musepayne.flags.FIT_FLAGS` bits (``FAILED``,
  ``NOT_CONVERGED``, ``LABEL_EDGE``, ``HIGH_CHI2`` from the fit; ``LOW_SNR``, ``BLENDED``,
  ``HIDDEN_NEIGHBOUR``, ``LARGE_ERRORS``, ``MISFIT``, ``SPARSE_LABELS`` from :func:`apply_quality_flags`); 0 for a
  clean fit.
* ``misfit``: the best fit's residual beyond the noise in units of the model's intrinsic
  scatter (:func:`model_misfit`); ``misfit_ref`` / ``ref_dist``: what the model's cross-validation
  stars reach near the fitted labels and how far the 5th nearest is (:func:`misfit_reference`):
  the tests behind ``MISFIT`` and ``SPARSE_LABELS``.
* When the model carries a benchmark-scale calibration (``BENCHCAL``, :mod:`musepayne.models.benchcal`)
  and the fit config does not turn it off, ``X`` is on the Gaia FGK benchmark scale and
  ``X_uncal`` keeps the model's value; ``X_err = sqrt(X_err_stat^2 + X_err_sys^2)``.
* When the model carries seed members (networks of its recipe trained with other seeds),
  ``X_err_seed`` is the labels' spread over them (:class:`~musepayne.fit.FitConfig` ``seed_errors``);
  with the calibration it is part of ``X_err_sys``, without it it is reported beside ``X_err``.
* When the model has an intrinsic scatter ``s_p`` (``SCATTER`` in the model file),
  the errors and ``red_chi2_model`` use the pixel variance ``1/ivar + s_p^2``;
  ``red_chi2`` is always the paper's (observed errors).

Also: :func:`combine_metal_poor` (the A / A-mp rule, paper Eq. 2),
:func:`merge_by_gradcorr` (per label, take the model with the larger gradient
correlation), :func:`write_catalogue` (FITS, CSV or Parquet, atomically) and
:class:`CatalogueStream` (the same files written block by block as fits finish).

Length: the module is over 600 lines because the column registry, the quality flags and both
writers (whole table and stream) must agree column for column, so they live together.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Column, Table, vstack
from astropy.table.meta import YamlParseError, get_header_from_yaml

from ..flags import DEFAULT_MAX_RED_CHI2, FIT_FLAGS, FlagThresholds, fit_flags_description
from ..io.fits import atomic_path, fits_ascii
from ..models.benchcal import BENCH_LABELS, BenchmarkCalibration, seed_spread

__all__ = [
    "build_catalogue",
    "apply_quality_flags",
    "model_misfit",
    "misfit_reference",
    "add_extraction_columns",
    "EXTRACTION_COLUMNS",
    "label_columns",
    "apply_gradcorr",
    "combine_metal_poor",
    "merge_by_gradcorr",
    "write_catalogue",
    "CatalogueStream",
    "read_catalogue",
    "catalogue_labels",
]

#: per-label columns that go with ``X`` wherever it is taken from another catalogue: the benchmark calibration's
#: (:func:`apply_to_catalogue`) and the seed members' spread
_COMPANION_SUFFIXES = ("_uncal", "_err_stat", "_err_sys", "_err_seed")

_FIXED_BEFORE = {
    "stellar_id": ("", "identifier of the star / spectrum"),
    "ra": ("deg", "right ascension (ICRS)"),
    "dec": ("deg", "declination (ICRS)"),
    "snr_muse": ("", "median S/N per pixel of the input spectrum (prepared file's 'snr')"),
}

_FIXED_AFTER = {
    "rv": ("km / s", "radial velocity (relativistic Doppler shift of the model), fitted jointly with the labels"),
    "rv_err": ("km / s", "RV uncertainty (covariance, scaled by sqrt(chi2/(n-n_par)) when > 1)"),
    "red_chi2": ("", "reduced chi2 of the best fit, (1/n) sum (P_i - O_i)^2 / e_i^2 over used pixels with the "
                     "observed errors e_i (paper Eq. 3)"),
    "red_chi2_model": ("", "reduced chi2 with e_i^2 = 1/ivar_i + s_i^2 (s_i: the model's intrinsic scatter); ~1 for "
                           "a star the model describes as well as its validation stars; NaN: the model has no "
                           "scatter (or model_scatter='off')"),
    "misfit": ("", "noise-subtracted mismatch of spectrum and best fit in units of the model's intrinsic scatter: "
                   "(mean residual^2 - mean noise variance) / mean s_i^2, from red_chi2 and red_chi2_model "
                   "(musepayne.fit.catalogue.model_misfit); ~1 for a star the model describes as well as its "
                   "validation stars at any S/N; NaN: the model has no scatter"),
    "misfit_err": ("", "1-sigma noise of misfit (chi2 statistics over n_pix_used pixels)"),
    "misfit_ref": ("", "typical misfit of the model's cross-validation stars with similar labels (median of the "
                       "25 nearest in the paper's Eq. 4 metric, musepayne.fit.catalogue.misfit_reference); 1 when "
                       "the model carries no reference (its scatter makes its validation stars' misfit ~1)"),
    "ref_dist": ("", "distance of the fitted labels to the 5th-nearest of the model's cross-validation stars in the "
                     "paper's Eq. 4 metric (Teff/100 K, log g/0.2, [Fe/H]/0.1 dex): large where the training set is "
                     "sparse; NaN: the model carries no reference"),
    "corr_flux": ("", "Pearson correlation of observed and best-fit flux over used pixels"),
    "n_pix_used": ("", "number of pixels used in the fit"),
    "model": ("", "model(s) the labels come from"),
    "status": ("", "converged | edge | not_converged | failed:<reason>"),
    "fit_flags": ("", fit_flags_description()),
    "reason": ("", "human-readable detail for the status"),
    "edge_labels": ("", "labels at a training-range bound ('<' lower, '>' upper), comma separated"),
    "n_iter": ("", "Levenberg-Marquardt iterations"),
    "chi2": ("", "chi2 of the best fit"),
    "error_scale": ("", "factor applied to the covariance errors: max(1, sqrt(chi2/(n-n_par))), chi2 with the "
                        "model's scatter in the variance when it has one"),
}


def _pretty(name: str) -> str:
    if name == "teff":
        return "effective temperature"
    if name == "logg":
        return "surface gravity log10(g / cm s^-2)"
    if name.endswith("_h") or name.endswith("_fe"):
        a, b = name.split("_", 1)
        return f"[{a.capitalize()}/{b.capitalize()}]"
    return name


def label_columns(name: str, unit: str) -> dict:
    """Unit and description of the four columns of one label."""
    u = "" if unit in ("dex",) else unit
    p = _pretty(name)
    return {
        name: (u, f"{p} ({unit})"),
        f"{name}_err": (u, f"uncertainty of {p} (covariance, with the model's intrinsic scatter in the pixel "
                           "variances when it has one, scaled by sqrt(chi2/(n-n_par)) when > 1)"),
        f"{name}_flag": ("", f"1: {name}_gradcorr above threshold (paper §3.3), 0: not, -1: not computed"),
        f"{name}_gradcorr": ("", f"correlation of the model gradient d f/d {name} with the theoretical one; "
                                 "NaN: not computed"),
    }


def catalogue_labels(cat: Table) -> list[str]:
    """Label names present in a catalogue (columns with _err, _flag and _gradcorr siblings)."""
    return [c for c in cat.colnames if f"{c}_err" in cat.colnames and f"{c}_gradcorr" in cat.colnames]


def _set(tab, name, values, unit, desc):
    tab[name] = Column(values, name=name, unit=unit or None, description=desc)


def build_catalogue(spectra: Table, model, res, config=None, templates=None, model_name=None) -> Table:
    """Catalogue Table from the prepared ``SPECTRA`` table and :class:`~musepayne.fit.fitter.FitArrays`."""
    n = len(spectra)
    tab = Table()
    sid = (np.asarray(spectra["stellar_id"]).astype(str) if "stellar_id" in spectra.colnames
           else np.array([str(i) for i in range(n)]))
    _set(tab, "stellar_id", sid, *_FIXED_BEFORE["stellar_id"])
    for c in ("ra", "dec"):
        vals = np.asarray(spectra[c], np.float64) if c in spectra.colnames else np.full(n, np.nan)
        _set(tab, c, vals, *_FIXED_BEFORE[c])
    snr = np.asarray(spectra["snr"], np.float64) if "snr" in spectra.colnames else np.full(n, np.nan)
    _set(tab, "snr_muse", snr, *_FIXED_BEFORE["snr_muse"])
    for k, (name, unit) in enumerate(zip(model.label_names, model.label_units)):
        cols = label_columns(name, unit)
        _set(tab, name, res.labels[:, k], *cols[name])
        _set(tab, f"{name}_err", res.labels_err[:, k], *cols[f"{name}_err"])
        if getattr(res, "labels_err_seed", None) is not None:
            _set(tab, f"{name}_err_seed", res.labels_err_seed[:, k], cols[name][0],
                 _DESC["err_seed"].format(p=_pretty(name)))
        _set(tab, f"{name}_flag", np.full(n, -1, np.int16), *cols[f"{name}_flag"])
        _set(tab, f"{name}_gradcorr", np.full(n, np.nan), *cols[f"{name}_gradcorr"])
    if model_name is None:
        model_name = str(model.meta.get("name") or (Path(model.path).stem if getattr(model, "path", None) else
                                                        model.arch))
    vals = {
        "rv": res.rv, "rv_err": res.rv_err, "red_chi2": res.red_chi2, "red_chi2_model": res.red_chi2_model,
        "corr_flux": res.corr_flux, **dict(zip(("misfit", "misfit_err"),
                                               model_misfit(res.red_chi2, res.red_chi2_model, res.n_pix_used))),
        **dict(zip(("misfit_ref", "ref_dist"),
                   misfit_reference(getattr(model, "misfit_reference", None), res.labels, model.label_names))),
        "n_pix_used": res.n_pix_used, "model": np.full(n, model_name), "status": res.status.astype(str),
        "fit_flags": fit_flags(res.status, np.where(np.isfinite(res.red_chi2_model), res.red_chi2_model,
                                                     res.red_chi2),
                               *(() if config is None else (config.max_red_chi2,))),
        "reason": res.reason.astype(str), "edge_labels": res.edge_labels.astype(str), "n_iter": res.n_iter,
        "chi2": res.chi2, "error_scale": res.error_scale,
    }
    for name, (unit, desc) in _FIXED_AFTER.items():
        _set(tab, name, vals[name], unit, desc)
    if res.model_flux is not None:
        _set(tab, "model_flux", res.model_flux, "", "best-fit model spectrum on the prepared grid")
    tab.meta["MODEL"] = model_name
    if config is not None:
        tab.meta["RVRANGE"] = float(config.rv_range)
        tab.meta["LSFEXC"] = bool(config.lsf_excess)
        has = bool(np.any(getattr(model, "scatter", 0.0)))
        tab.meta["MSCATTER"] = str(config.model_scatter) if has else "none"
        tab.meta["MAXRCHI2"] = float(config.max_red_chi2)
    if templates is not None:
        thr = config.gradcorr_threshold if config is not None else 0.5
        apply_gradcorr(tab, model, templates, threshold=thr)
    cal = getattr(model, "benchmark_calibration", None)
    if cal is not None and (config is None or getattr(config, "benchmark_calibration", True)):
        apply_to_catalogue(tab, cal)  # after gradcorr: the gradients are the model's, at its own labels
    add_extraction_columns(tab, spectra)
    apply_quality_flags(tab)
    return tab


#: neighbours of :func:`misfit_reference`, the floor of ``misfit_ref`` in the ``MISFIT`` test and the
#: rank of the reference star whose distance is ``ref_dist``
MISFIT_REF_K = 25
MISFIT_REF_FLOOR = 0.5
SPARSE_K = 5
_EQ4_SCALE = {"teff": 100.0, "logg": 0.2, "fe_h": 0.1}


def misfit_reference(reference, labels, label_names, k: int = MISFIT_REF_K, k_dist: int = SPARSE_K):
    """What a model's cross-validation says about given labels: the misfit it typically reaches
    there (median ``misfit`` of the ``k`` nearest reference stars) and how densely its stars cover
    them (distance to the ``k_dist``-th nearest reference star), in the paper's Eq. 4 metric
    (Teff / 100 K, log g / 0.2 dex, [Fe/H] / 0.1 dex).

    The reference of a model is its cross-validation stars (held out of training, observed as MUSE
    at S/N 100, fitted by fold models of the same recipe: ``benchmarks/cv_flags.py reference``),
    shipped beside the model as ``<model>.misfitref.fits`` and attached by
    :func:`musepayne.models.files.load_model` as ``model.misfit_reference``.  Stars the model describes
    less well everywhere (cool and low-gravity giants have deeper lines than the average star the
    model's scatter was measured on) then do not count as misfits, and a misfit in a part of label
    space the model describes well (Arcturus landing among the red-clump stars) stands out.

    Parameters
    ----------
    reference : astropy.table.Table or None
        Columns ``teff`` (K), ``logg``, ``fe_h`` (dex; the fitted labels of the reference stars) and
        ``misfit``; None: no reference (misfit_ref 1, ref_dist NaN for every row with finite labels).
    labels : array_like
        Fitted labels, shape (n, n_labels), in the order of ``label_names`` (the model's own, before
        any benchmark calibration).
    label_names : sequence of str
        Names of the columns of ``labels``.
    k : int, optional
        Neighbours of the median misfit.
    k_dist : int, optional
        Rank of the neighbour whose distance is returned.

    Returns
    -------
    misfit_ref : numpy.ndarray
        Reference misfit per row (dimensionless); NaN for rows without finite labels.
    ref_dist : numpy.ndarray
        Distance to the ``k_dist``-th nearest reference star (Eq. 4 units); NaN without a reference.
    """
    lab = np.atleast_2d(np.asarray(labels, np.float64))
    names = [n for n in _EQ4_SCALE if n in list(label_names)]
    ok = np.all(np.isfinite(lab), axis=1)
    out = np.where(ok, 1.0, np.nan)
    dist = np.full(len(lab), np.nan)
    if reference is None or not names or len(reference) == 0:
        return out, dist
    idx = [list(label_names).index(n) for n in names]
    scale = np.array([_EQ4_SCALE[n] for n in names])
    ref = np.column_stack([np.asarray(reference[n], np.float64) for n in names]) / scale
    mf = np.asarray(reference["misfit"], np.float64)
    use = np.all(np.isfinite(ref), axis=1) & np.isfinite(mf)
    ref, mf = ref[use], mf[use]
    kk, kd = min(int(k), len(mf)), min(int(k_dist), len(mf))
    if kk < 1 or kd < 1:
        return out, dist
    x = lab[:, idx] / scale
    for a in range(0, len(x), 512):  # (512 x n_ref) distances at a time
        rows = np.nonzero(ok[a:a + 512])[0] + a
        if rows.size == 0:
            continue
        d2 = ((x[rows, None, :] - ref[None, :, :]) ** 2).sum(-1)
        near = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        out[rows] = np.median(mf[near], axis=1)
        dist[rows] = np.sqrt(np.partition(d2, kd - 1, axis=1)[:, kd - 1])
    return out, dist


def model_misfit(red_chi2, red_chi2_model, n_pix):
    """Noise-subtracted misfit of the best fit in units of the model's intrinsic scatter, and its noise.

    With ``x = red_chi2`` (mean of r^2 / e^2 over the used pixels, e the observed errors) and
    ``y = red_chi2_model`` (mean of r^2 / (e^2 + s^2), s the model's scatter), and treating e and s
    as constant over the pixels, the mean squared residual is ``R = x e^2 = y (e^2 + s^2)``, so

        misfit = (R - e^2) / s^2 = (x - 1) y / (x - y),

    the part of the residual the noise does not explain, in units of the model's own scatter:
    ~1 for a star the model describes as well as its validation stars, whatever the S/N (where
    ``red_chi2_model`` tends to 1 for any fit as the noise grows).  Its noise, from
    var(x) = 2 x^2 / n at fixed e^2 / s^2 = y / (x - y):

        misfit_err = sqrt(2 / n) x y / (x - y).

    Parameters
    ----------
    red_chi2 : array_like
        Reduced chi2 with the observed errors (dimensionless).
    red_chi2_model : array_like
        Reduced chi2 with the model's scatter added to the variances (NaN: no scatter).
    n_pix : array_like
        Pixels used in the fit.

    Returns
    -------
    misfit : numpy.ndarray
        Dimensionless; NaN where not defined (no scatter, ``red_chi2 <= red_chi2_model``, no fit).
    misfit_err : numpy.ndarray
        Its 1-sigma noise; NaN where ``misfit`` is.
    """
    x = np.asarray(red_chi2, np.float64)
    y = np.asarray(red_chi2_model, np.float64)
    n = np.asarray(n_pix, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(x) & np.isfinite(y) & (x > y) & (y > 0) & (n > 0)
        ratio = np.where(ok, y / (x - y), np.nan)  # e^2 / s^2
        misfit = (x - 1.0) * ratio
        err = np.sqrt(2.0 / n) * x * ratio
    return np.where(ok, misfit, np.nan), np.where(ok, err, np.nan)


def fit_flags(status, red_chi2, max_red_chi2: float | None = None) -> np.ndarray:
    """``fit_flags`` values (int32) from the fit ``status`` strings and ``red_chi2``;
    ``max_red_chi2`` defaults to :data:`musepayne.flags.DEFAULT_MAX_RED_CHI2` (the default of
    :attr:`musepayne.fit.fitter.FitConfig.max_red_chi2`)."""
    if max_red_chi2 is None:
        max_red_chi2 = DEFAULT_MAX_RED_CHI2
    st = np.asarray(status).astype(str)
    rc = np.asarray(red_chi2, np.float64)
    out = np.zeros(st.shape, np.int32)
    out[np.char.startswith(st, "failed")] |= FIT_FLAGS["FAILED"].value
    out[st == "not_converged"] |= FIT_FLAGS["NOT_CONVERGED"].value
    out[st == "edge"] |= FIT_FLAGS["LABEL_EDGE"].value
    with np.errstate(invalid="ignore"):
        out[rc > max_red_chi2] |= FIT_FLAGS["HIGH_CHI2"].value
    return out


def apply_gradcorr(cat: Table, model, templates, threshold: float = 0.5) -> Table:
    """Fill ``X_gradcorr`` / ``X_flag`` in place from ``templates.gradcorr(model, labels)``.

    Rows without finite labels keep NaN / -1.
    """
    names = list(model.label_names)
    lab = np.column_stack([np.asarray(cat[n], np.float64) for n in names])
    ok = np.all(np.isfinite(lab), axis=1)
    if not np.any(ok):
        return cat
    gc = np.asarray(templates.gradcorr(model, lab[ok]), np.float64)
    if gc.shape != (int(ok.sum()), len(names)):
        raise ValueError(f"templates.gradcorr returned shape {gc.shape}, expected {(int(ok.sum()), len(names))}")
    for k, n in enumerate(names):
        col = np.asarray(cat[f"{n}_gradcorr"], np.float64).copy()
        col[ok] = gc[:, k]
        cat[f"{n}_gradcorr"][:] = col
        flag = np.where(np.isfinite(col), (col > threshold).astype(np.int16), -1)
        cat[f"{n}_flag"][:] = flag
    return cat


def combine_metal_poor(cat_mr: Table, cat_mp: Table, feh: str = "fe_h", lo: float = -1.0,
                       hi: float = -0.6, name_mr: str = "A", name_mp: str = "A-mp") -> Table:
    """Combine a metal-rich (A) and metal-poor (A-mp) catalogue of the same spectra (paper Eq. 2).

    With ``[Fe/H]_MR`` from the metal-rich model: above ``hi`` take A; below ``lo``
    take A-mp; in between ``w_MP = ([Fe/H]_MR - hi) / (lo - hi)`` (= ([Fe/H]+0.6)/(-0.4)),
    ``w_MR = 1 - w_MP`` and ``X = w_MR X_MR + w_MP X_MP`` for every label both
    catalogues have.  Errors combine as ``w_MR e_MR + w_MP e_MP`` (the two fits use
    the same data, so their errors are correlated; the linear sum is the
    fully-correlated bound).  Non-label columns (rv, red_chi2, status, ...) come
    from the model with the larger weight.  ``model`` says 'A', 'A-mp' or 'A+A-mp'.
    A star whose A fit failed keeps the A row.
    """
    if len(cat_mr) != len(cat_mp):
        raise ValueError("catalogues must have the same rows (same prepared spectra)")
    sid_a, sid_b = np.asarray(cat_mr["stellar_id"]).astype(str), np.asarray(cat_mp["stellar_id"]).astype(str)
    if not np.array_equal(sid_a, sid_b):
        raise ValueError("catalogues must list the same stellar_id in the same order")
    f = np.asarray(cat_mr[feh], np.float64)
    w_mp = np.clip((f - hi) / (lo - hi), 0.0, 1.0)
    w_mp = np.where(np.isfinite(f), w_mp, 0.0)
    mp_ok = np.isfinite(np.asarray(cat_mp[feh], np.float64))
    w_mp = np.where(mp_ok, w_mp, 0.0)
    w_mr = 1.0 - w_mp
    out = cat_mr.copy(copy_data=True)
    take_mp = w_mp > 0.5
    labels = [n for n in catalogue_labels(cat_mr) if n in cat_mp.colnames]
    for c in out.colnames:
        if c in cat_mp.colnames and not any(c == n or c.startswith(n + "_") for n in labels) and c != "model":
            if c in ("stellar_id", "ra", "dec", "snr_muse"):
                continue
            col = np.array(out[c])
            col[take_mp] = np.asarray(cat_mp[c])[take_mp]
            out[c][:] = col
    for n in labels:
        a, b = np.asarray(cat_mr[n], np.float64), np.asarray(cat_mp[n], np.float64)
        ea, eb = np.asarray(cat_mr[f"{n}_err"], np.float64), np.asarray(cat_mp[f"{n}_err"], np.float64)
        out[n][:] = np.where(w_mp == 0, a, np.where(w_mr == 0, b, w_mr * a + w_mp * b))
        out[f"{n}_err"][:] = np.where(w_mp == 0, ea, np.where(w_mr == 0, eb, w_mr * ea + w_mp * eb))
        for sfx in _COMPANION_SUFFIXES:
            if n + sfx in out.colnames and n + sfx in cat_mp.colnames:
                a, b = np.asarray(cat_mr[n + sfx], np.float64), np.asarray(cat_mp[n + sfx], np.float64)
                out[n + sfx][:] = np.where(w_mp == 0, a, np.where(w_mr == 0, b, w_mr * a + w_mp * b))
        for sfx in ("_gradcorr", "_flag"):
            col = np.array(out[n + sfx])
            col[take_mp] = np.asarray(cat_mp[n + sfx])[take_mp]
            out[n + sfx][:] = col
    for n in catalogue_labels(cat_mp):
        if n not in labels:  # labels only the metal-poor model has
            for c in (n, f"{n}_err", f"{n}_flag", f"{n}_gradcorr"):
                col = np.array(cat_mp[c]).copy()
                if c in (n, f"{n}_err", f"{n}_gradcorr"):
                    col = np.where(w_mp > 0, col, np.nan)
                out[c] = Column(col, unit=cat_mp[c].unit, description=cat_mp[c].description)
    model = np.where(w_mp == 0, name_mr, np.where(w_mr == 0, name_mp, f"{name_mr}+{name_mp}"))
    out.replace_column("model", Column(model.astype(str), name="model", description=_FIXED_AFTER["model"][1]))
    _set(out, "w_mp", w_mp, "", "weight of the metal-poor model (paper Eq. 2)")
    return out


def merge_by_gradcorr(cat_a: Table, cat_b: Table) -> Table:
    """Merge two catalogues of the same spectra label by label: for each star and each label
    both have, take value, error, flag and gradcorr from the catalogue with the larger
    ``X_gradcorr`` (NaN counts as lower than any number; ties and both-NaN keep ``cat_a``).
    Labels only one catalogue has are copied.  A column ``X_source`` records the choice."""
    if len(cat_a) != len(cat_b):
        raise ValueError("catalogues must have the same rows")
    out = cat_a.copy(copy_data=True)
    la, lb = catalogue_labels(cat_a), catalogue_labels(cat_b)
    ma = str(cat_a.meta.get("MODEL", "a"))
    mb = str(cat_b.meta.get("MODEL", "b"))
    for n in lb:
        cols = (n, f"{n}_err", f"{n}_flag", f"{n}_gradcorr") + tuple(
            n + sfx for sfx in _COMPANION_SUFFIXES
            if n + sfx in cat_b.colnames and (n not in la or n + sfx in cat_a.colnames))
        if n not in la:
            for c in cols:
                out[c] = cat_b[c].copy()
            _set(out, f"{n}_source", np.full(len(out), mb), "", f"model {n} was taken from")
            continue
        ga = np.nan_to_num(np.asarray(cat_a[f"{n}_gradcorr"], np.float64), nan=-np.inf)
        gb = np.nan_to_num(np.asarray(cat_b[f"{n}_gradcorr"], np.float64), nan=-np.inf)
        use_b = gb > ga
        for c in cols:
            col = np.array(out[c])
            col[use_b] = np.asarray(cat_b[c])[use_b]
            out[c][:] = col
        _set(out, f"{n}_source", np.where(use_b, mb, ma), "", f"model {n} was taken from")
    return out


def write_catalogue(cat: Table, path, fmt: str | None = None, overwrite: bool = True) -> Path:
    """Write atomically as FITS (default), CSV or Parquet (by ``fmt`` or the file suffix).

    Vector columns (``model_flux``) are only kept in FITS.  Parquet needs
    ``pyarrow`` (``pip install musepayne[parquet]``).
    """
    path = Path(path)
    if fmt is None:
        suf = "".join(path.suffixes[-2:]).lower()
        fmt = ("parquet" if suf.endswith(".parquet") else "csv" if suf.endswith(".csv")
               else "ecsv" if suf.endswith(".ecsv") else "fits")
    tab = cat
    if fmt != "fits":
        tab = cat.copy(copy_data=False)
        for c in list(tab.colnames):
            if tab[c].ndim > 1:
                tab.remove_column(c)
            elif tab[c].dtype.kind == "S":  # byte strings, e.g. from a table read back from FITS
                tab[c] = tab[c].astype(str)
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401, PLC0415 - optional dependency (the parquet extra)
        except ImportError:
            raise RuntimeError("Parquet export needs pyarrow: pip install 'musepayne[parquet]'") from None
    with atomic_path(path, overwrite=overwrite) as tmp:
        if fmt == "fits":
            fits_ascii(tab).write(tmp, format="fits", overwrite=True)
        elif fmt == "csv":
            tab.write(tmp, format="ascii.csv", overwrite=True)
        elif fmt == "ecsv":
            tab.write(tmp, format="ascii.ecsv", overwrite=True)
        elif fmt == "parquet":
            tab.write(tmp, format="parquet", overwrite=True)
        else:
            raise ValueError(f"unknown catalogue format {fmt!r} (fits, csv, ecsv, parquet)")
    return path


class CatalogueStream:
    """Write a catalogue block by block: the same file :func:`write_catalogue` writes for the
    whole table, without holding the whole table.

    ``with CatalogueStream(path) as out: out.add(block_table); ...`` -- blocks are catalogue
    tables with the same columns, in row order.  FITS: each block is serialised by astropy
    as it comes (its bytes go to a spool file next to ``path``, so memory stays ~ one block);
    on close the header is the one astropy writes for the whole table (string columns as wide
    as their longest value in any block: blocks written narrower are re-padded), and the
    file is renamed into place atomically -- byte-identical to
    ``write_catalogue(vstack(blocks), path)``.  CSV / ECSV / Parquet (needs the whole table
    for astropy's writers): blocks are kept and written on close.  Nothing is written if the
    block raises inside the ``with``.
    """

    def __init__(self, path, fmt: str | None = None, overwrite: bool = True):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (use overwrite)")
        self.fmt = fmt or _catalogue_format(self.path)
        self.n_rows = 0
        self._tables = []  # non-FITS formats
        self._spool = None
        self._blocks = []  # FITS: (offset, n_rows, raw record dtype)
        self._names = self._primary = self._header0 = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, tab: Table):
        if self.fmt != "fits":
            self._tables.append(tab)
            self.n_rows += len(tab)
            return
        self.add_fits_bytes(fits_bytes(tab))

    def add_fits_bytes(self, raw: bytes):
        """Add a block given as the FITS file :func:`fits_bytes` makes of it (e.g. in another
        process); FITS output only."""
        if self.fmt != "fits":
            raise ValueError("serialised blocks can only be added to a FITS catalogue")
        buf = io.BytesIO(raw)
        with fits.open(buf) as h:  # where astropy put this block's table header and data
            info = h[1].fileinfo()
            header = fits.Header.fromstring(raw[info["hdrLoc"]:info["datLoc"]].decode("ascii"))
            dt = np.dtype(h[1].data.dtype)
            names = list(h[1].columns.names)
        nbytes = header["NAXIS1"] * header["NAXIS2"]
        n_rows = header["NAXIS2"]
        if self._spool is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._spool = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".spool")
            self._names = names
            self._primary = raw[:info["hdrLoc"]]
            self._header0 = header
        elif names != self._names:
            raise ValueError("catalogue blocks must have the same columns")
        if dt.itemsize != header["NAXIS1"]:
            raise ValueError("unexpected FITS record layout")  # pragma: no cover
        self._blocks.append((self._spool.tell(), n_rows, dt))
        self._spool.write(raw[info["datLoc"]:info["datLoc"] + nbytes])
        self.n_rows += n_rows

    def abort(self):
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._tables = []

    def close(self) -> Path:
        if self.fmt != "fits":
            tabs, self._tables = self._tables, []
            if tabs:
                write_catalogue(tabs[0] if len(tabs) == 1 else vstack(tabs, metadata_conflicts="silent"),
                                self.path, self.fmt)
            return self.path
        if self._spool is None:
            raise ValueError("no catalogue block was added")

        dtypes = [b[2] for b in self._blocks]
        # the widest string of each column over all blocks (others keep their width)
        final = []
        for name in dtypes[0].names:
            kinds = [dt[name] for dt in dtypes]
            final.append((name, max(kinds, key=lambda d: d.itemsize) if kinds[0].kind == "S" else kinds[0]))
        final = np.dtype(final)
        hdr = self._header0.copy()
        hdr["NAXIS1"] = final.itemsize
        hdr["NAXIS2"] = self.n_rows
        for k, name in enumerate(final.names, start=1):
            if final[name].kind == "S" and final[name].itemsize != dtypes[0][name].itemsize:
                hdr[f"TFORM{k}"] = f"{final[name].itemsize}A"
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            f.write(self._primary)
            f.write(hdr.tostring().encode("ascii"))
            for off, n, dt in self._blocks:
                self._spool.seek(off)
                rec = np.frombuffer(self._spool.read(n * dt.itemsize), dt)
                if dt != final:
                    wide = np.zeros(n, final)
                    for name in final.names:
                        wide[name] = rec[name]
                    rec = wide
                f.write(rec.tobytes())
            size = final.itemsize * self.n_rows
            f.write(b"\0" * (-size % 2880))
        self._spool.close()
        self._spool = None
        return self.path


def fits_bytes(tab: Table) -> bytes:
    """The FITS file :func:`write_catalogue` writes for ``tab``, as bytes."""
    buf = io.BytesIO()
    tab.write(buf, format="fits")
    return buf.getvalue()


def _catalogue_format(path: Path) -> str:
    suf = "".join(path.suffixes[-2:]).lower()
    return ("parquet" if suf.endswith(".parquet") else "csv" if suf.endswith(".csv")
            else "ecsv" if suf.endswith(".ecsv") else "fits")


def _restore_parquet_meta(tab: Table, yaml_bytes) -> None:
    """Units, descriptions and table meta from astropy's ``table_meta_yaml`` Parquet metadata
    (written by ``Table.write(format='parquet')``), in place; nothing when absent or unreadable."""
    if not yaml_bytes:
        return
    try:
        hdr = get_header_from_yaml(yaml_bytes.decode("utf-8").splitlines())
    except (YamlParseError, UnicodeDecodeError, ValueError):
        return
    for col in hdr.get("datatype", []):
        name = col.get("name")
        if name not in tab.colnames:
            continue
        if col.get("description"):
            tab[name].description = col["description"]
        if col.get("unit"):
            tab[name].unit = u.Unit(col["unit"], parse_strict="silent")
    tab.meta.update(hdr.get("meta") or {})


def read_catalogue(path) -> Table:
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency (the parquet extra)
        except ImportError:
            raise RuntimeError("reading Parquet needs pyarrow: pip install 'musepayne[parquet]'") from None
        t = pq.read_table(path)
        out = Table({name: np.asarray(t.column(name).to_numpy(zero_copy_only=False)) for name in t.column_names})
        _restore_parquet_meta(out, (t.schema.metadata or {}).get(b"table_meta_yaml"))
        return out
    if path.suffix.lower() == ".csv":
        return Table.read(path, format="ascii.csv")
    return Table.read(path)


#: extraction quality columns a catalogue carries when its spectra came from a cube
#: (``musepayne extract`` SOURCES table, through prepare): name -> (unit, description)
EXTRACTION_COLUMNS = {
    "x": ("pix", "extraction: 0-based cube pixel x of the star (after the catalogue->cube transform)"),
    "y": ("pix", "extraction: 0-based cube pixel y of the star"),
    "mag": ("mag", "extraction: magnitude of the star in the source catalogue"),
    "ext_snr": ("", "extraction: median over layers of flux/err of the extracted spectrum"),
    "blend_frac": ("", "extraction: fraction of the flux within 1 FWHM of the star contributed by neighbours"),
    "neighbour_frac": ("", "extraction: light of the brightest single neighbour within 1 FWHM relative to the "
                           "star's own light there"),
    "edge_dist": ("pix", "extraction: distance to the nearest unusable spaxel or field edge (negative outside)"),
    "ext_psf_chi2": ("", "extraction: reduced chi^2 of the PSF-fit residuals within 1 FWHM (aperture: NaN)"),
    "hidden_frac": ("", "extraction: light within 1 FWHM of the star of an unmodelled point source (one not in "
                        "the source list, fitted to the extraction residual), relative to the star's own light there "
                        "(3-sigma lower bound; 0: none significant; NaN: aperture extraction)"),
    "chroma_shift": ("", "extraction: largest wavelength shift of the star's light centroid in broad bands from its "
                         "mean (3-sigma lower bound, in FWHM; 0: none significant; NaN: aperture extraction): an "
                         "unresolved companion of another colour"),
    "ext_status": ("", "extraction status: ok, edge (< 1 FWHM from the edge), low_snr (S/N below "
                       "ExtractConfig.snr_min), off_field, failed (musepayne.extract.extractor.EXTRACT_STATUS)"),
}


def add_extraction_columns(cat: Table, spectra: Table) -> Table:
    """Copy the extraction quality columns of the prepared ``SPECTRA`` table into ``cat`` (in place).

    Parameters
    ----------
    cat : Table
        A catalogue whose rows are the rows of ``spectra``.
    spectra : Table
        The prepared spectra's table; columns it lacks (spectra not extracted from a cube)
        are simply not added.

    Returns
    -------
    Table
        ``cat``, with units and descriptions from :data:`EXTRACTION_COLUMNS`.
    """
    for name, (unit, desc) in EXTRACTION_COLUMNS.items():
        if name in spectra.colnames and name not in cat.colnames:
            v = np.asarray(spectra[name])
            v = v.astype(str) if v.dtype.kind in "SUO" else v.astype(np.float64)
            _set(cat, name, v, unit, desc)
    return cat


def apply_quality_flags(cat: Table, thresholds: FlagThresholds | None = None) -> Table:
    """Set the ``LOW_SNR``, ``BLENDED``, ``HIDDEN_NEIGHBOUR``, ``LARGE_ERRORS``, ``MISFIT`` and ``SPARSE_LABELS``
    bits of ``cat['fit_flags']`` (in place).

    These six bits are recomputed (cleared, then set where their test holds), so a catalogue can be
    re-flagged with other thresholds; the fit's own bits (``FAILED``, ``NOT_CONVERGED``,
    ``LABEL_EDGE``, ``HIGH_CHI2``) are kept.

    Parameters
    ----------
    cat : Table
        A catalogue with ``fit_flags``; ``snr_muse``, ``neighbour_frac``, ``hidden_frac``, ``chroma_shift``, the
        label errors
        (``X_err_stat`` before ``X_err``), ``misfit`` / ``misfit_err`` / ``misfit_ref`` and ``ref_dist``
        are used where present
        (``misfit`` is computed from ``red_chi2``, ``red_chi2_model`` and ``n_pix_used`` when a
        catalogue lacks it; it is not added).
    thresholds : FlagThresholds, optional
        Default :class:`musepayne.flags.FlagThresholds`.

    Returns
    -------
    Table
        ``cat``.
    """
    th = thresholds or FlagThresholds()
    mine = sum(FIT_FLAGS[k].value for k in ("LOW_SNR", "BLENDED", "HIDDEN_NEIGHBOUR", "LARGE_ERRORS", "MISFIT",
                                            "SPARSE_LABELS"))
    flags = np.asarray(cat["fit_flags"], np.int32).copy() & ~np.int32(mine)
    with np.errstate(invalid="ignore"):
        if "snr_muse" in cat.colnames:
            flags[np.asarray(cat["snr_muse"], np.float64) < th.min_snr] |= FIT_FLAGS["LOW_SNR"].value
        if "neighbour_frac" in cat.colnames:
            nf = np.asarray(cat["neighbour_frac"], np.float64)
            flags[nf > th.max_neighbour_frac] |= FIT_FLAGS["BLENDED"].value
        if "hidden_frac" in cat.colnames:
            hf = np.asarray(cat["hidden_frac"], np.float64)
            flags[hf > th.max_hidden_frac] |= FIT_FLAGS["HIDDEN_NEIGHBOUR"].value
        if "chroma_shift" in cat.colnames:
            cs = np.asarray(cat["chroma_shift"], np.float64)
            flags[cs > th.max_chroma_shift] |= FIT_FLAGS["HIDDEN_NEIGHBOUR"].value
        for name, limit in th.max_err:
            col = next((c for c in (f"{name}_err_stat", f"{name}_err") if c in cat.colnames), None)
            if col is not None:
                flags[np.asarray(cat[col], np.float64) > limit] |= FIT_FLAGS["LARGE_ERRORS"].value
        if "misfit" in cat.colnames and "misfit_err" in cat.colnames:
            mf, me = np.asarray(cat["misfit"], np.float64), np.asarray(cat["misfit_err"], np.float64)
        elif all(c in cat.colnames for c in ("red_chi2", "red_chi2_model", "n_pix_used")):
            mf, me = model_misfit(cat["red_chi2"], cat["red_chi2_model"], cat["n_pix_used"])
        else:
            mf = me = None
        if mf is not None:
            ref = (np.asarray(cat["misfit_ref"], np.float64) if "misfit_ref" in cat.colnames
                   else np.ones(len(cat)))
            ratio = (mf - th.misfit_sigma * me) / np.maximum(np.nan_to_num(ref, nan=1.0), MISFIT_REF_FLOOR)
            flags[ratio > th.max_misfit] |= FIT_FLAGS["MISFIT"].value
        if "ref_dist" in cat.colnames:
            flags[np.asarray(cat["ref_dist"], np.float64) > th.max_ref_dist] |= FIT_FLAGS["SPARSE_LABELS"].value
    cat["fit_flags"][:] = flags
    return cat


# --------------------------------------------------------------------------- catalogue
_DESC = {
    "uncal": "{p} as fitted by the model, before the benchmark-scale calibration",
    "err": "total uncertainty of {p}: sqrt({n}_err_stat^2 + {n}_err_sys^2)",
    "err_stat": ("statistical uncertainty of {p} (covariance, with the model's intrinsic scatter in the pixel "
                 "variances when it has one, scaled by sqrt(chi2/(n-n_par)) when > 1)"),
    "err_sys": ("systematic (model) uncertainty of {p} on the Gaia FGK benchmark scale, cross-validated "
                "against the benchmark stars (model file HDU BENCHCAL), with {n}_err_seed added in "
                "quadrature when present"),
    "err_seed": ("spread of {p} over the model and its seed members (networks of the same recipe trained "
                 "with other seeds), linearised at the solution: the model's own uncertainty"),
}


def apply_to_catalogue(tab: Table, calibration: BenchmarkCalibration) -> Table:
    """Calibrate a catalogue in place (and return it): ``X`` -> benchmark scale, ``X_uncal``,
    ``X_err_stat``, ``X_err_sys`` added, ``X_err`` total.  Needs teff, logg, fe_h columns."""
    if not all(n in tab.colnames and f"{n}_err" in tab.colnames for n in BENCH_LABELS):
        return tab
    if "teff_uncal" in tab.colnames:  # already calibrated
        return tab
    x = np.stack([np.asarray(tab[n], float) for n in BENCH_LABELS], 1)
    stat = np.stack([np.asarray(tab[f"{n}_err"], float) for n in BENCH_LABELS], 1)
    xc = calibration.apply(x)
    sys = calibration.sys(xc)
    seed = seed_spread(tab)  # the model's seed members' spread, when the fit reported it
    if seed is not None:
        sys = np.sqrt(sys ** 2 + np.nan_to_num(seed) ** 2)
    sys = np.where(np.isfinite(xc), sys, np.nan)
    for k, n in enumerate(BENCH_LABELS):
        unit = tab[n].unit
        p = _pretty(n)
        pos = tab.colnames.index(f"{n}_err")
        cols = {
            f"{n}_uncal": (x[:, k], _DESC["uncal"].format(p=p, n=n)),
            f"{n}_err_stat": (stat[:, k], _DESC["err_stat"].format(p=p, n=n)),
            f"{n}_err_sys": (sys[:, k], _DESC["err_sys"].format(p=p, n=n)),
        }
        tab[n] = Column(xc[:, k], name=n, unit=unit, description=f"{p} on the Gaia FGK benchmark scale "
                        "(benchmark calibration of the model applied; the model's value is in "
                        f"{n}_uncal)")
        tab[f"{n}_err"] = Column(np.sqrt(stat[:, k] ** 2 + sys[:, k] ** 2), name=f"{n}_err", unit=unit,
                                 description=_DESC["err"].format(p=p, n=n))
        for j, (c, (v, d)) in enumerate(cols.items()):
            tab.add_column(Column(v, name=c, unit=unit, description=d), index=pos + 1 + j)
    tab.meta["BENCHCAL"] = str(calibration.meta.get("id", "gaia-fgk-benchmark-v3"))
    return tab
