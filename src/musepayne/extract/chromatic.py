"""Unresolved companions of another colour: the wavelength dependence of each star's light centroid.

Two stars closer than ~0.3 FWHM are one point source to a white-light (or layer-summed) image:
:mod:`.hidden` cannot separate them, and the detector lists them as one star whose spectrum is
the sum of both.  Their light centroid, though, sits at the flux-weighted mean position, and when
the two spectra differ the weights change with wavelength: with separation ``s`` and the
companion's share ``q_b = f2_b / (f1_b + f2_b)`` of the light in band ``b``, the centroid moves by
``s (q_b - <q>)`` from band to band.  A single star, an error of the listed position (the same in
every band) and a symmetric PSF-model error (FWHM, beta, ellipticity) move nothing.

:func:`chromatic_shift` measures, per star and per broad band of layers, the offset of the light
centroid from the extracted position with a linearised fit of the band's residual
``data - model`` on the star's core pixels (within ``radius`` FWHM): three columns, the star's
pixel-integrated PSF at the band's wavelength (a flux correction) and its derivatives in x and y
(``flux x dx``, ``flux x dy``), weighted by the inverse of the noise variance plus a fractional
PSF-model error of all stars' fitted light per pixel (:data:`CHROMA_MODEL_ERROR`), so that an
imperfect model of a bright star or neighbour does not count as a shift.  The per-band offsets are
compared with their weighted mean: ``chi2 = sum_b (d_b - <d>)^T C_b^-1 (d_b - <d>)`` over
``2 (K - 1)`` degrees of freedom (``C_b`` the offsets' covariance), and the largest distance of a
band's offset from the mean at its 3-sigma lower bound (in FWHM; 0 unless significant) measures
the shift.  A shift common to the whole field (residual differential atmospheric refraction of a
real cube) is removed: per band, the median over the stars of their deviation from their own mean.

May import: numpy and :mod:`musepayne.extract.psf`.
"""

from __future__ import annotations

import numpy as np

from .psf import MoffatPSF, psf_design_matrix

__all__ = ["chromatic_shift", "CHROMA_MODEL_ERROR", "CHROMA_BANDS"]

#: fractional PSF-model error per pixel of the fitted stars' light in a band, in the noise of the per-band offsets
#: (as :data:`musepayne.extract.hidden.HIDDEN_MODEL_ERROR`).  With the complete true catalogue of simulated crowded
#: fields (seeds 7 11 12 of benchmarks/detect_vs_catalogue.py) no converged star has a significant shift with 0.02 or
#: 0.01 (0.005: 4 of 237); from the cube alone 0.01 flags 18 of the 25 otherwise clean rows (0.02: 10) and leaves
#: the rest no more accurate
CHROMA_MODEL_ERROR = 0.02

#: broad bands of layers (equal numbers of blocks) in which the centroid offsets are measured
CHROMA_BANDS = 6

_STEP = 0.05  # px, finite-difference step of the PSF derivatives


def chromatic_shift(resid, var, model, valid, x, y, flux, psf: MoffatPSF, waves, radius: float = 1.0,
                    model_error: float = CHROMA_MODEL_ERROR, min_common: int = 5, nsigma: float = 3.0):
    """Significance of the wavelength dependence of each star's light centroid.

    Parameters
    ----------
    resid : numpy.ndarray, shape (K, ny, nx)
        Extraction residual ``data - model`` summed over the layers of each of ``K`` bands (cube flux units x
        layers).
    var : numpy.ndarray, shape (K, ny, nx)
        Variance of ``resid`` (sum of the layers' variances; same units squared).
    model : numpy.ndarray, shape (K, ny, nx)
        The fitted stars' light summed over the same layers (units of ``resid``).
    valid : numpy.ndarray of bool, shape (ny, nx)
        Usable spaxels.
    x, y : numpy.ndarray, shape (n,)
        Extracted star positions (0-based pixels).
    flux : numpy.ndarray, shape (n, K)
        Fitted star fluxes summed over each band's layers (units of ``resid``).
    psf : MoffatPSF
        The extraction's PSF.
    waves : numpy.ndarray, shape (K,)
        Mean wavelength of each band (Angstrom).
    radius : float
        The fit uses the pixels within this many FWHM of the star (> 0).
    model_error : float
        Fractional PSF-model error per pixel of ``model``, added to the variance (>= 0).
    min_common : int
        The field-wide shift per band is removed when at least this many stars have offsets in every band.
    nsigma : float
        ``shift`` is taken at its ``nsigma`` lower bound (>= 0).

    Returns
    -------
    chi2 : numpy.ndarray, shape (n,)
        Reduced chi^2 of the per-band centroid offsets about their weighted mean (dimensionless; ~1 for a single
        star; NaN with fewer than 2 usable bands).
    shift : numpy.ndarray, shape (n,)
        Largest distance of a band's offset from the weighted mean over the bands, at its ``nsigma`` lower bound
        (units of the FWHM at the bands' median wavelength; 0: no significant shift; NaN as ``chi2``).  A companion
        at separation ``s`` whose share of the light changes by ``dq`` across the bands gives ``~ s dq / 2``.
    dx, dy : numpy.ndarray, shape (n, K)
        Per-band centroid offsets from the extracted position, the field-wide shift removed (pixels; NaN: band
        unusable).
    """
    resid, var, model = (np.asarray(a, float) for a in (resid, var, model))
    k, ny, nx = resid.shape
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    flux = np.asarray(flux, float).reshape(x.size, k)
    n = x.size
    dx, dy = np.full((n, k), np.nan), np.full((n, k), np.nan)
    cov = np.full((n, k, 2, 2), np.nan)
    ok = (np.asarray(valid, bool)[None] & np.isfinite(resid) & np.isfinite(var) & (var > 0)
          & np.isfinite(model))
    fin = np.isfinite(x) & np.isfinite(y)
    idx = np.nonzero(fin)[0]
    if idx.size and k:
        for b in range(k):
            _band(resid[b], var[b], model[b], ok[b], x[idx], y[idx], flux[idx, b], psf, float(waves[b]), radius,
                  model_error, dx, dy, cov, idx, b)
    chi2, shift = _scatter(dx, dy, cov, nsigma)
    full = np.isfinite(dx).all(axis=1) & np.isfinite(chi2)
    if full.sum() >= max(min_common, 1):  # field-wide chromatic shift (e.g. residual refraction): removed
        mx, my = _means(dx, dy, cov)
        cx = np.median((dx - mx[:, None])[full], axis=0)
        cy = np.median((dy - my[:, None])[full], axis=0)
        dx, dy = dx - cx[None], dy - cy[None]
        chi2, shift = _scatter(dx, dy, cov, nsigma)
    if k:
        shift = shift / float(psf.fwhm_at(float(np.median(waves))))
    return chi2, shift, dx, dy


def _band(r, v, m, ok, x, y, f, psf, wave, radius, model_error, dx, dy, cov, idx, b):
    """Offsets of the stars ``idx`` (positions ``x, y``, band fluxes ``f``) in band ``b`` into ``dx, dy, cov``."""
    ny, nx = r.shape
    fwhm = float(psf.fwhm_at(wave))
    rad = radius * fwhm + 2.0  # stamp radius: the core plus the finite-difference margin
    n = x.size
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    cen = (np.tile(cx, 5), np.tile(cy, 5))
    h = _STEP
    A = psf_design_matrix(psf, np.r_[x, x + h, x - h, x, x], np.r_[y, y, y, y + h, y - h], wave, (ny, nx), rad, 3,
                          valid=ok, centres=cen)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ok, 1.0 / (v + (model_error * m) ** 2), 0.0).ravel()
    rr = r.ravel()
    for j in range(n):
        if not (np.isfinite(f[j]) and f[j] > 0):
            continue
        # the five columns share their stamp (same centre, same usable pixels): same rows, same order
        a0, a1 = A.indptr[j], A.indptr[j + 1]
        rows = A.indices[a0:a1]
        py, px = np.divmod(rows, nx)
        core = np.hypot(px - x[j], py - y[j]) <= radius * fwhm
        rows = rows[core]
        if rows.size < 6:
            continue
        C = np.stack([A.data[A.indptr[c * n + j]:A.indptr[c * n + j + 1]][core] for c in range(5)], axis=1)
        M = np.stack([C[:, 0], (C[:, 1] - C[:, 2]) / (2 * h), (C[:, 3] - C[:, 4]) / (2 * h)], axis=1)
        ww = w[rows]
        N = (M * ww[:, None]).T @ M
        try:
            Ni = np.linalg.inv(N)
        except np.linalg.LinAlgError:
            continue
        if not np.all(np.isfinite(Ni)) or not np.all(np.diag(Ni) > 0) or not np.linalg.det(Ni[1:, 1:]) > 0:
            continue  # the offsets' covariance must be positive definite (inverted below)
        s = Ni @ (M.T @ (ww * rr[rows]))
        # residual = F (P(x0 + d) - P(x0)) ~ F d . grad_x0 P: the centroid offset is the derivative term / F
        i = idx[j]
        dx[i, b], dy[i, b] = s[1] / f[j], s[2] / f[j]
        cov[i, b] = Ni[1:, 1:] / f[j] ** 2


def _means(dx, dy, cov):
    """Inverse-covariance weighted mean offset per star over its usable bands."""
    n, k = dx.shape
    mx, my = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        use = np.isfinite(dx[i]) & np.isfinite(dy[i])
        if use.sum() < 1:
            continue
        W = np.linalg.inv(cov[i, use])  # (m, 2, 2)
        d = np.stack([dx[i, use], dy[i, use]], axis=1)
        mean = np.linalg.solve(W.sum(axis=0), np.einsum("kab,kb->a", W, d))
        mx[i], my[i] = mean
    return mx, my


def _scatter(dx, dy, cov, nsigma):
    """Reduced chi^2 of the per-band offsets about their weighted mean, and the largest distance from it at its
    ``nsigma`` lower bound (px)."""
    n, k = dx.shape
    chi2, shift = np.full(n, np.nan), np.full(n, np.nan)
    mx, my = _means(dx, dy, cov)
    for i in range(n):
        use = np.isfinite(dx[i]) & np.isfinite(dy[i])
        if use.sum() < 2:
            continue
        W = np.linalg.inv(cov[i, use])
        e = np.stack([dx[i, use] - mx[i], dy[i, use] - my[i]], axis=1)
        chi2[i] = float(np.einsum("ka,kab,kb->", e, W, e)) / (2.0 * (use.sum() - 1))
        dist = np.hypot(e[:, 0], e[:, 1])
        u = e / np.maximum(dist, 1e-300)[:, None]  # the error of each band's offset along its deviation
        sig = np.sqrt(np.maximum(np.einsum("ka,kab,kb->k", u, cov[i, use], u), 0.0))
        shift[i] = float(np.max(np.maximum(dist - nsigma * sig, 0.0)))
    return chi2, shift
