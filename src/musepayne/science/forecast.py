"""Precision forecasts: label uncertainty vs S/N, magnitude and exposure time.

Two families of forecast:

1. **The paper's fitted relations** (Wang et al. 2022, §5):

   * Eq. 11, ``log10 sigma_X = A_X log10 SNR + B_X`` with the coefficients of
     Table 3 (:data:`TABLE3`).  Logs are base 10, abundances in dex and, as in
     Chem-I-Calc, **Teff in units of 100 K** inside the relation (SNR 100 gives
     0.475, i.e. 47.5 K).  The public functions here take and return Teff
     uncertainties in **K** and convert internally (:data:`TABLE3_UNIT_SCALE`).
   * Eq. 12-13, ``SNR = SNR_1hr(V) sqrt(T_exp / 3600 s)`` with
     ``SNR_1hr(V) = 462.34 x / sqrt(0.00223 + x)``, ``x = 10**(0.4 (14.83 - V))``
     (MUSE ETC, K giant, airmass 1.5, seeing 0.8").
   * Their inverses in closed form: the S/N needed for a target sigma, the
     limiting V for a sigma at an exposure time, and the exposure time needed
     for a sigma at a magnitude.  With ``y = SNR_1hr`` and ``a = 462.34**2``,
     Eq. 13 inverts to ``x = (y**2 + sqrt(y**4 + 4 a y**2 0.00223)) / (2 a)``.

2. **A Cramér-Rao forecast from any model's Jacobian** (beyond the paper; the
   method of Chem-I-Calc, Sandford et al. 2020, which the paper used to build
   Fig. 13): the Fisher matrix ``F = J^T diag(ivar) J`` over the pixels a fit
   uses, with ``J = d flux / d label`` the model's own gradient spectra in
   physical label units and ``ivar = SNR**2`` per pixel of a normalised
   spectrum (``sigma_pix = 1/SNR``).  The bound is ``sqrt(diag(F^-1))``.
   The paper's Eq. 9 then multiplies by a per-label correction factor measured
   from repeat observations (Eq. 10, :func:`musepayne.science.validation.repeat_error_factor`).

The model is duck-typed: any object with ``label_names`` and
``predict_with_jacobian(labels) -> (flux (n, n_pix), jac (n, n_pix, n_labels))``.

Family 1 and its figures are defined in :mod:`musepayne.science.relations` and re-exported here;
this module defines the Cramér-Rao forecast and the two entry points (:func:`forecast_table3`,
:func:`crlb_forecast`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from scipy.interpolate import CubicSpline

from ..flags import EXCLUDING_BITS
from ..instrument.wavelength import C_KMS, air_to_vacuum
from ..prepare.masks import mode_mask
from .relations import (
    SNR1HR_ZP,
    TABLE3,
    TABLE3_UNIT_SCALE,
    canonical_label,
    exptime_for_snr,
    limiting_vmag,
    plot_sigma_vs_snr,
    plot_snr_vs_vmag,
    required_exptime,
    sigma_at,
    sigma_from_snr,
    snr_1hr,
    snr_for_sigma,
    snr_from_vmag,
    vmag_for_snr,
)

__all__ = [
    "forecast_table3",
    "crlb_forecast",
    "TABLE3",
    "TABLE3_UNIT_SCALE",
    "SNR1HR_ZP",
    "canonical_label",
    "sigma_from_snr",
    "snr_for_sigma",
    "snr_1hr",
    "snr_from_vmag",
    "vmag_for_snr",
    "exptime_for_snr",
    "sigma_at",
    "limiting_vmag",
    "required_exptime",
    "CramerRaoResult",
    "cramer_rao",
    "scatter_check",
    "MUSE_COVERAGE_AIR",
    "fit_mask",
    "plot_sigma_vs_snr",
    "plot_snr_vs_vmag",
]


# --------------------------------------------------------------------------- Cramér-Rao


@dataclass(frozen=True)
class CramerRaoResult:
    """Cramér-Rao bounds for a set of label vectors.

    Rows whose Fisher matrix is singular are NaN.

    Attributes
    ----------
    label_names : tuple of str
        Canonical label names (with a last ``rv`` when RV was marginalised over).
    labels : numpy.ndarray
        (n, n_labels) label vectors (K for Teff, dex otherwise; the ``rv`` column is 0 km/s).
    sigma : numpy.ndarray
        (n, n_labels): ``sqrt(diag(F^-1))`` times the correction factors (K, dex, km/s).
    sigma_theory : numpy.ndarray
        (n, n_labels): the same without the correction factors.
    covariance : numpy.ndarray
        (n, n_labels, n_labels): ``F^-1`` (uncorrected).
    n_used : numpy.ndarray
        (n,) int: the number of pixels in F.
    correction : dict of str to float
        Eq. 9 factors applied, by canonical label.
    """

    label_names: tuple
    labels: np.ndarray
    sigma: np.ndarray
    sigma_theory: np.ndarray
    covariance: np.ndarray
    n_used: np.ndarray
    correction: dict = field(default_factory=dict)

    def to_table(self):
        """Astropy Table: the input labels and ``<label>_crlb`` per label.

        Returns
        -------
        astropy.table.Table
            Columns ``<label>``, ``<label>_crlb`` (with descriptions) and ``n_used``.
        """

        t = Table()
        for j, name in enumerate(self.label_names):
            t[name] = self.labels[:, j]
        for j, name in enumerate(self.label_names):
            t[f"{name}_crlb"] = self.sigma[:, j]
            t[f"{name}_crlb"].description = (
                f"Cramer-Rao bound on {name} (Fisher matrix of the model Jacobian)"
                + (f" x correction {self.correction[name]:g} (Eq. 9)" if name in self.correction else ""))
        t["n_used"] = self.n_used
        t.meta["method"] = "Cramer-Rao: F = J^T diag(ivar) J, sigma = sqrt(diag(F^-1))"
        return t


#: Nominal MUSE WFM wavelength coverage (air, Angstrom); the extended mode starts at 4600.
MUSE_COVERAGE_AIR = (4750.0, 9350.0)


def fit_mask(wave, mode: str = "standard", ao_notch: str | None = None, coverage_air=MUSE_COVERAGE_AIR):
    """Boolean mask (True = excluded) of the pixels a MUSE fit cannot use on a vacuum model grid.

    The fixed masks of ``mode`` (:func:`musepayne.prepare.masks.mode_mask`: telluric
    bands, dichroic, red cut-off, bulge blue cut-off, AO notch) plus the
    pixels outside the instrument's coverage (``coverage_air``, converted to
    vacuum; ``None`` for no coverage limit, e.g. a LAMOST forecast).

    Parameters
    ----------
    wave : array_like
        Vacuum wavelengths of the model grid in Angstrom.
    mode : {'standard', 'bulge'}, optional
        Observing mode of the masks.
    ao_notch : str, optional
        MUSE AO mode ('WFM-AO-N', 'WFM-AO-E', 'NFM').
    coverage_air : tuple of (float, float) or None, optional
        Instrument coverage in air Angstrom (default MUSE nominal, 4750-9350).

    Returns
    -------
    numpy.ndarray
        bool, shape of ``wave``; True = excluded.

    Raises
    ------
    ValueError
        For an unknown mode or AO mode.
    """

    w = np.asarray(wave, dtype=float)
    excl = (mode_mask(w, mode, ao_notch).astype(np.int64) & EXCLUDING_BITS) != 0
    if coverage_air is not None:
        lo, hi = air_to_vacuum(np.asarray(coverage_air, dtype=float))
        excl |= (w < lo) | (w > hi)
    return excl


def _pixel_weights(n_pix, snr, ivar, mask):
    if ivar is not None:
        w = np.asarray(ivar, dtype=float)
    elif snr is not None:
        s = np.asarray(snr, dtype=float)
        w = s ** 2  # normalised spectrum: sigma_pix = 1 / SNR
    else:
        raise ValueError("give snr (scalar or per pixel) or ivar per pixel")
    w = np.broadcast_to(w, np.broadcast_shapes(w.shape, (n_pix,))).astype(float, copy=True)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype == bool:
            excl = m
        else:
            excl = (m.astype(np.int64) & EXCLUDING_BITS) != 0
        w = np.where(np.broadcast_to(excl, w.shape), 0.0, w)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    return w


def cramer_rao(model, labels, snr=None, *, ivar=None, mask=None, correction=None,
               fit_rv: bool = False) -> CramerRaoResult:
    """Cramér-Rao forecast of label uncertainties from a model's Jacobian.

    Parameters
    ----------
    model : object
        Any object with ``label_names`` and ``predict_with_jacobian(labels)``
        returning ``(flux (n, n_pix), jac (n, n_pix, n_labels))``, the
        Jacobian in physical label units (per K for Teff, per dex otherwise).
    labels : array_like
        One label vector (n_labels,) or several (n, n_labels), in the order of
        ``model.label_names``.
    snr : float or array_like, optional
        S/N per pixel of the normalised spectrum: a scalar, a per-pixel array
        (n_pix,) or (n, n_pix).  ``ivar = snr**2`` (Chem-I-Calc convention).
    ivar : array_like, optional
        Inverse variance per pixel of the normalised spectrum; overrides ``snr``.
    mask : array_like, optional
        Pixels excluded from the fit: boolean (True = excluded) or an integer
        pixel-flag mask (pixels with any bit of ``flags.EXCLUDING_BITS`` excluded).
    correction : dict of str to float, optional
        ``{label: factor}`` (paper Eq. 9: sigma = sigma_theory x
        f_corr, with f_corr from repeats, Eq. 10).
    fit_rv : bool, optional
        Also fit a radial velocity (as the pipeline's fitter does) and
        marginalise over it: an extra Jacobian column
        ``d f / d v = -(d f / d ln lambda) / c`` (cubic-spline derivative on
        the model grid; needs ``model.wave``);
        the result then has a last label ``rv`` in km/s.

    Returns
    -------
    CramerRaoResult
        Bounds per label vector (K for Teff, dex otherwise, km/s for RV).

    Raises
    ------
    ValueError
        If ``labels`` has the wrong number of columns, neither ``snr`` nor ``ivar`` is given, or
        ``fit_rv`` is set for a model without ``wave``.
    KeyError
        If ``correction`` names a label the model does not have.
    """
    names = tuple(canonical_label(n) for n in model.label_names)
    lab = np.atleast_2d(np.asarray(labels, dtype=float))
    if lab.shape[1] != len(names):
        raise ValueError(f"labels have {lab.shape[1]} columns, the model has {len(names)}: {names}")
    flux, jac = model.predict_with_jacobian(lab)
    jac = np.asarray(jac, dtype=float)
    if fit_rv:
        wave = getattr(model, "wave", None)
        if wave is None:
            raise ValueError("fit_rv needs a model with a wavelength grid (model.wave)")

        lnw = np.log(np.asarray(wave, dtype=float))
        fl = np.asarray(flux, dtype=float)
        finite = np.isfinite(fl)
        dfdlnl = CubicSpline(lnw, np.where(finite, fl, 1.0), axis=-1).derivative()(lnw)
        dfdlnl = np.where(finite, dfdlnl, np.nan)  # pixels without a model flux carry no information
        jac = np.concatenate([jac, (-dfdlnl / C_KMS)[:, :, None]], axis=2)
        names = names + ("rv",)
    bad = ~np.all(np.isfinite(jac), axis=2)
    jac = np.where(bad[:, :, None], 0.0, jac)
    n, n_pix, n_lab = jac.shape
    w = _pixel_weights(n_pix, snr, ivar, mask)
    w = np.where(bad, 0.0, np.broadcast_to(w, (n, n_pix)))
    jw = jac * w[:, :, None]
    fisher = np.einsum("npi,npj->nij", jw, jac)
    cov = np.full_like(fisher, np.nan)
    for k in range(n):
        try:
            c = np.linalg.inv(fisher[k])
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(c)) and np.all(np.diag(c) > 0):
            cov[k] = c
    sig = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    corr = {canonical_label(k): float(v) for k, v in (correction or {}).items()}
    unknown = set(corr) - set(names)
    if unknown:
        raise KeyError(f"correction for labels the model does not have: {sorted(unknown)}")
    factors = np.array([corr.get(nm, 1.0) for nm in names])
    lab_out = np.column_stack([lab, np.zeros(len(lab))]) if fit_rv else lab
    return CramerRaoResult(label_names=names, labels=lab_out, sigma=sig * factors, sigma_theory=sig,
                           covariance=cov, n_used=np.count_nonzero(w > 0, axis=1), correction=corr)


def scatter_check(model, labels, snr: float, fit, *, n_spec: int = 200, mask=None, seed: int = 0,
                  fit_rv: bool = False) -> dict:
    """Compare the Cramér-Rao bound with the scatter of labels fitted to noisy model spectra.

    Draws ``n_spec`` noisy copies (Gaussian, sigma = 1/snr per pixel) of the
    model spectrum at ``labels`` and fits them with ``fit(flux (n, n_pix),
    ivar (n, n_pix)) -> labels (n, n_labels)`` (any fitter: ivar is 0 on
    masked pixels).  Returns ``{'scatter', 'crlb', 'ratio', 'label_names'}``
    (per label, sample std with ddof=1; ratio = scatter / crlb, which should be
    1 within ~1/sqrt(2 n_spec) for an efficient, unbiased fitter).
    With ``fit_rv`` the bound is marginalised over RV (the fitter must fit it
    too; its returned columns are compared with the model labels only).

    Parameters
    ----------
    model : object
        As for :func:`cramer_rao`.
    labels : array_like
        One label vector (n_labels,), physical units.
    snr : float
        S/N per pixel of the normalised spectrum.
    fit : callable
        ``fit(flux, ivar) -> labels`` for (n_spec, n_pix) arrays; extra returned columns are ignored.
    n_spec : int, optional
        Number of noisy copies (default 200).
    mask : array_like, optional
        Excluded pixels, as for :func:`cramer_rao`.
    seed : int, optional
        Seed of the noise generator.
    fit_rv : bool, optional
        Marginalise the bound over RV.

    Returns
    -------
    dict
        ``label_names`` (tuple), ``scatter``, ``crlb`` and ``ratio`` (arrays of n_labels; K or dex)
        and ``n_fitted`` (int, fits with finite labels).
    """
    lab = np.asarray(labels, dtype=float).ravel()
    flux0, _ = model.predict_with_jacobian(lab[None, :])
    flux0 = np.asarray(flux0, dtype=float)[0]
    w = _pixel_weights(flux0.size, snr, None, mask)
    rng = np.random.default_rng(seed)
    noisy = flux0[None, :] + rng.normal(size=(n_spec, flux0.size)) / float(snr)
    ivar = np.broadcast_to(w, noisy.shape).copy()
    fitted = np.asarray(fit(noisy, ivar), dtype=float)[:, : lab.size]
    ok = np.all(np.isfinite(fitted), axis=1)
    scatter = np.std(fitted[ok] - lab, axis=0, ddof=1)
    bound = cramer_rao(model, lab, snr=snr, mask=mask, fit_rv=fit_rv).sigma[0, : lab.size]
    return {"label_names": tuple(canonical_label(n) for n in model.label_names), "scatter": scatter,
            "crlb": bound, "ratio": scatter / bound, "n_fitted": int(ok.sum())}


# --------------------------------------------------------------------------- plots


def forecast_table3(labels=(), *, sigma=None, sigma_teff=None, snr=None, vmag=None, exptime=None):
    """The paper's precision forecast (Eq. 11-13, Table 3) in the mode the given quantities ask for.

    ==========================  ==================  =========================
    given                       mode                each row adds
    ==========================  ==================  =========================
    ``sigma``                   ``required_snr``    ``required_snr``
    ``sigma``, ``exptime``      ``limiting_vmag``   ``required_snr``, ``limiting_vmag``
    ``sigma``, ``vmag``         ``required_exptime`` ``required_snr``, ``exptime_s``
    ``snr``                     ``sigma_at_snr``    ``sigma``
    ``vmag`` [, ``exptime``]    ``sigma_at_vmag``   ``snr``, ``sigma`` (default 3600 s)
    ==========================  ==================  =========================

    Parameters
    ----------
    labels : sequence of str
        Table 3 labels (any spelling :func:`canonical_label` knows); empty: all (Teff in a
        ``sigma`` forecast only with its own target ``sigma_teff``).
    sigma : float, optional
        Target uncertainty, dex (K when Teff is the only label).
    sigma_teff : float, optional
        Target Teff uncertainty in K when Teff is forecast with other labels.
    snr : float, optional
        S/N per pixel.
    vmag : float, optional
        V magnitude.
    exptime : float, optional
        Exposure time, s.

    Returns
    -------
    mode : str
        One of the modes above (``'none'`` when no quantity is given: plots only).
    rows : list of dict
        One per label: ``label``, ``sigma`` (K for Teff, else dex) and the mode's quantities.
    labels : list of str
        The canonical labels used.

    Raises
    ------
    KeyError
        A label without a Table 3 relation.
    ValueError
        Contradictory or non-positive quantities.
    """
    labs = [canonical_label(x) for x in labels]
    for lab in labs:
        if lab not in TABLE3:
            raise KeyError(f"no Table 3 relation for {lab!r}; known: {', '.join(TABLE3)}")
    if sigma is None and sigma_teff is not None and not labs:
        labs = ["teff"]
    if not labs:  # all; Teff in a sigma forecast only with its own target in K
        labs = [k for k in TABLE3 if k != "teff" or sigma is None or sigma_teff is not None]
    if sigma is None and sigma_teff is not None and labs == ["teff"]:
        sigma = sigma_teff
    if sigma is not None and "teff" in labs and labs != ["teff"] and sigma_teff is None:
        raise ValueError("Teff with dex labels: give its target in K with --sigma-teff")
    for name, v in (("sigma", sigma), ("snr", snr), ("exptime", exptime)):
        if v is not None and not v > 0:
            raise ValueError(f"--{name} must be positive")
    if sigma is not None and vmag is not None and exptime is not None:
        raise ValueError("give at most two of --sigma, --vmag, --exptime")
    if sigma is not None and snr is not None:
        raise ValueError("--sigma and --snr are exclusive")

    def target(lab):
        return sigma_teff if (lab == "teff" and sigma_teff is not None) else sigma

    rows = []
    if sigma is not None and vmag is not None:
        mode = "required_exptime"
        for lab in labs:
            need = float(snr_for_sigma(lab, target(lab)))
            rows.append({"label": lab, "sigma": target(lab), "vmag": vmag, "required_snr": need,
                         "exptime_s": float(exptime_for_snr(need, vmag))})
    elif sigma is not None and exptime is not None:
        mode = "limiting_vmag"
        for lab in labs:
            need = float(snr_for_sigma(lab, target(lab)))
            rows.append({"label": lab, "sigma": target(lab), "exptime_s": exptime, "required_snr": need,
                         "limiting_vmag": float(vmag_for_snr(need, exptime))})
    elif sigma is not None:
        mode = "required_snr"
        rows = [{"label": lab, "sigma": target(lab), "required_snr": float(snr_for_sigma(lab, target(lab)))}
                for lab in labs]
    elif snr is not None:
        mode = "sigma_at_snr"
        rows = [{"label": lab, "snr": snr, "sigma": float(sigma_from_snr(lab, snr))} for lab in labs]
    elif vmag is not None:
        mode = "sigma_at_vmag"
        t = exptime if exptime is not None else 3600.0
        s = float(snr_from_vmag(vmag, t))
        rows = [{"label": lab, "vmag": vmag, "exptime_s": t, "snr": s, "sigma": float(sigma_from_snr(lab, s))}
                for lab in labs]
    else:
        mode = "none"
    return mode, rows, labs


def crlb_forecast(model, at=None, *, snr=None, vmag=None, exptime=None, mask_mode="standard", ao_notch=None,
                  correction=None, fit_rv=True):
    """Cramer-Rao precision of a model's labels for one star observed as MUSE.

    Parameters
    ----------
    model : SpectralModel
        The model (its Jacobian gives the Fisher matrix).
    at : dict, optional
        Label values of the star (any spelling :func:`canonical_label` knows); missing labels
        take the middle of the model's training range.
    snr : float, optional
        S/N per pixel; or give ``vmag`` (and ``exptime``, default 3600 s) for Eq. 12-13.
    vmag : float, optional
        V magnitude (mag), used when ``snr`` is None.
    exptime : float, optional
        Exposure time in s with ``vmag`` (default 3600).
    mask_mode, ao_notch : str
        The fit's wavelength mask (:func:`fit_mask`).
    correction : dict, optional
        Eq. 9 factors per label (from repeats, Eq. 10).
    fit_rv : bool
        Marginalise over a fitted radial velocity, as the fitter does.

    Returns
    -------
    result : CramerRaoResult
    snr : float
        The S/N used.

    Raises
    ------
    ValueError
        Labels unknown to the model, or neither ``snr`` nor ``vmag``.
    """
    names = [canonical_label(n) for n in model.label_names]
    given = {canonical_label(k): float(v) for k, v in (at or {}).items()}
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"--at labels not in the model: {sorted(unknown)}; model labels: {names}")
    mid = 0.5 * (np.asarray(model.x_min, float) + np.asarray(model.x_max, float))
    labels = np.array([given.get(n, mid[i]) for i, n in enumerate(names)], float)
    if not np.all(np.isfinite(labels)):
        raise ValueError(f"give every label with --at (model labels: {names})")
    if snr is None:
        if vmag is None:
            raise ValueError("CRLB mode needs --snr or --vmag [--exptime]")
        snr = float(snr_from_vmag(vmag, exptime or 3600.0))
    mask = fit_mask(model.wave, mask_mode, ao_notch)
    corr = {canonical_label(k): float(v) for k, v in (correction or {}).items()}
    return cramer_rao(model, labels, snr=snr, mask=mask, correction=corr, fit_rv=fit_rv), float(snr)
