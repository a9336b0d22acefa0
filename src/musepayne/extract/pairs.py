"""Close pairs in detection: one point source or two, fitted jointly over the broad bands.

Two stars closer than ~0.5 FWHM are one peak in every image, and the detector lists them as one
star.  When their spectra differ, their flux ratio changes from band to band, which a single
point source cannot follow (its light centroid and its profile are the same in every band);
that is what makes such a pair separable.  :func:`fit_pair` fits a stamp of ``K`` broad-band
images (the star's light alone: its neighbours subtracted) twice, with the band's PSF:

* one source: position ``(x, y)`` common to the bands, a flux per band;
* two sources: positions ``(x_a, y_a), (x_b, y_b)`` common to the bands, two fluxes per band;

both with a constant per band (a local error of the sky), the fluxes solved linearly at each
trial position (variable projection), the positions by :func:`scipy.optimize.least_squares`.  The
two-source fit starts from the best companion offset on a half-pixel grid (between ``min_sep`` and
``max_sep`` FWHM, the first source at the one-source position), scanned linearly.  The weights are
the inverse of the noise variance plus a fractional PSF-model error of the stars' fitted light per
pixel (the caller's; :data:`musepayne.extract.hidden.HIDDEN_MODEL_ERROR` as in
:mod:`.hidden` and :mod:`.chromatic`), so that the residual of an imperfect PSF model of a bright
single star is not taken for a companion.  The improvement ``chi2_1 - chi2_2`` (a likelihood ratio
for Gaussian noise: ``K + 2`` more parameters; the first source is kept within ``max_sep / 2`` of the one-source position,
the companion within ``max_sep`` of the first, per axis) is what the detector tests
(:class:`~musepayne.extract.detect.DetectConfig` ``split_chi2``).

May import: numpy, scipy and :mod:`musepayne.extract.psf`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from .psf import _integrate_bands

__all__ = ["fit_pair"]


def _design(params, xx, yy, pos, oversample):
    """``(K, npix, n_src + 1)``: each band's pixel-integrated PSF at each position, and a constant column."""
    K, m = len(params), len(pos)
    out = np.ones((K, xx.size, m + 1))
    prof = _integrate_bands(np.concatenate([xx - px for px, _ in pos]), np.concatenate([yy - py for _, py in pos]),
                            params, oversample)
    out[:, :, :m] = prof.reshape(K, m, xx.size).transpose(0, 2, 1)
    return out


def _solve(M, t, w):
    """Weighted linear fit per band: ``(coef (K, m), cov (K, m, m), chi2)``."""
    MW = M * w[:, :, None]
    N = np.einsum("bpi,bpj->bij", MW, M)
    N += np.eye(N.shape[1])[None] * 1e-12 * np.trace(N, axis1=1, axis2=2)[:, None, None]
    rhs = np.einsum("bpi,bp->bi", MW, t)
    try:
        cov = np.linalg.inv(N)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(N)
    coef = np.einsum("bij,bj->bi", cov, rhs)
    r = t - np.einsum("bpi,bi->bp", M, coef)
    return coef, cov, float(np.sum(w * r * r))


def _grid_start(params, xx, yy, t, w, xs, ys, fwhm, min_sep, max_sep, oversample):
    """Best companion offset on a half-pixel grid (linear fits, the first source at ``xs, ys``) or None."""
    rd = max_sep * fwhm
    g = np.arange(-np.ceil(2 * rd) / 2, np.ceil(2 * rd) / 2 + 0.25, 0.5)
    DX, DY = (a.ravel() for a in np.meshgrid(g, g))
    r = np.hypot(DX, DY)
    use = (r >= min_sep * fwhm) & (r <= rd)
    DX, DY = DX[use], DY[use]
    if not DX.size:
        return None
    chi = np.zeros(DX.size)
    comp = np.zeros(DX.size)  # the companion's band-summed flux
    prof = _integrate_bands(np.concatenate([xx - xs, (xx[None, :] - xs - DX[:, None]).ravel()]),
                            np.concatenate([yy - ys, (yy[None, :] - ys - DY[:, None]).ravel()]), params, oversample)
    for b in range(len(params)):
        p0, pj = prof[b, :xx.size], prof[b, xx.size:].reshape(DX.size, xx.size)
        one = np.ones_like(p0)
        wb, tb = w[b], t[b]
        cols = [np.broadcast_to(p0, pj.shape), pj, np.broadcast_to(one, pj.shape)]
        N = np.empty((DX.size, 3, 3))
        rhs = np.empty((DX.size, 3))
        for i in range(3):
            rhs[:, i] = cols[i] @ (wb * tb)
            for j in range(i, 3):
                N[:, i, j] = N[:, j, i] = np.sum(cols[i] * cols[j] * wb[None, :], axis=1)
        N += np.eye(3)[None] * 1e-12 * np.trace(N, axis1=1, axis2=2)[:, None, None]
        coef = np.linalg.solve(N, rhs[:, :, None])[:, :, 0]
        chi += np.sum(wb * tb * tb) - np.sum(coef * rhs, axis=1)
        comp += coef[:, 1]
    chi[~(comp > 0)] = np.inf  # a companion of positive light only
    if not np.isfinite(chi).any():
        return None
    j = int(np.argmin(chi))
    return xs + DX[j], ys + DY[j]


def fit_pair(data, var, xx, yy, params, x0, y0, fwhm, min_sep=0.2, max_sep=1.0, oversample=2):
    """One source or two: joint fits over ``K`` broad bands of a star's stamp, positions common to the bands.

    Parameters
    ----------
    data : numpy.ndarray, shape (K, npix)
        The star's light in each band on the stamp pixels (neighbours subtracted; flux units).
    var : numpy.ndarray, shape (K, npix)
        Variance of ``data`` (noise and any PSF-model error term; flux units squared; > 0).
    xx, yy : numpy.ndarray, shape (npix,)
        Pixel coordinates of the stamp pixels (0-based pixels).
    params : array_like, shape (K, 4)
        Each band's Moffat PSF: FWHM (pixels), beta, ellipticity, angle (degrees).
    x0, y0 : float
        Start of the one-source position (pixels).
    fwhm : float
        The unit of ``min_sep`` and ``max_sep`` (pixels).
    min_sep, max_sep : float
        The companion is searched between these separations (FWHM) from the one-source position.
    oversample : int
        Sub-pixel samples per axis of the PSF integration.

    Returns
    -------
    dict or None
        None when the stamp is too small (fewer than ``3 (K + 2)`` pixels) or a fit fails, else
        ``chi2_1, chi2_2`` (weighted squared residuals of the one- and two-source fits),
        ``dchi2 = chi2_1 - chi2_2``, ``lr`` (``dchi2`` over the reduced ``chi2_2`` when that exceeds 1: the
        improvement in units of the residual's actual scatter, e.g. unmodelled faint neighbours), ``x1, y1``
        (pixels: one source), ``xa, ya, xb, yb`` (pixels: the two sources, ``a`` the brighter summed over the
        bands), ``sep`` (pixels), ``f1`` (K,), ``fa, fb`` (K,) (fluxes, units of ``data`` per unit PSF),
        ``fa_err, fb_err`` (K,) (their errors at the fitted positions) and ``snr_a, snr_b`` (band-summed flux
        over its error).
    """
    data, var = np.atleast_2d(np.asarray(data, float)), np.atleast_2d(np.asarray(var, float))
    xx, yy = np.asarray(xx, float), np.asarray(yy, float)
    params = [tuple(float(v) for v in p) for p in np.atleast_2d(np.asarray(params, float))]
    K = len(params)
    if xx.size < 3 * (K + 2) or data.shape != (K, xx.size) or not np.all(var > 0):
        return None
    w = 1.0 / var
    sw = np.sqrt(w)

    def resid(q):
        M = _design(params, xx, yy, q.reshape(-1, 2), oversample)
        coef, _, _ = _solve(M, data, w)
        return (sw * (data - np.einsum("bpi,bi->bp", M, coef))).ravel()

    try:
        r1 = least_squares(resid, np.array([x0, y0], float), x_scale=0.1, max_nfev=60, ftol=1e-5, xtol=1e-4)
        start = _grid_start(params, xx, yy, data, w, r1.x[0], r1.x[1], fwhm, min_sep, max_sep, oversample)
        if start is None:
            return None
        # the first source within max_sep / 2 of the one-source position, the companion within max_sep of it (per
        # axis): the companion is not sent after unmodelled light farther out
        m = max_sep * fwhm
        lo = np.array([r1.x[0] - m / 2, r1.x[1] - m / 2, -m, -m])
        hi = np.array([r1.x[0] + m / 2, r1.x[1] + m / 2, m, m])
        q0 = np.clip(np.array([r1.x[0], r1.x[1], start[0] - r1.x[0], start[1] - r1.x[1]]), lo + 1e-6, hi - 1e-6)
        r2 = least_squares(lambda q: resid(q + np.r_[0.0, 0.0, q[:2]]), q0, bounds=(lo, hi), x_scale=0.1, ftol=1e-5, xtol=1e-4,
                           max_nfev=120)
        r2.x = r2.x + np.r_[0.0, 0.0, r2.x[:2]]
    except (ValueError, np.linalg.LinAlgError):
        return None
    c1, _, chi1 = _solve(_design(params, xx, yy, r1.x.reshape(1, 2), oversample), data, w)
    pos = r2.x.reshape(2, 2)
    c2, cov2, chi2 = _solve(_design(params, xx, yy, pos, oversample), data, w)
    if not (np.isfinite(chi1) and np.isfinite(chi2)):
        return None
    order = [0, 1] if c2[:, 0].sum() >= c2[:, 1].sum() else [1, 0]
    fl, err = c2[:, order], np.sqrt(np.maximum(np.stack([cov2[:, k, k] for k in order], axis=1), 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = fl.sum(axis=0) / np.sqrt(np.sum(err**2, axis=0))
    (xa, ya), (xb, yb) = pos[order[0]], pos[order[1]]
    dof = max(1, data.size - 3 * K - 4)
    return dict(chi2_1=chi1, chi2_2=chi2, dchi2=chi1 - chi2, lr=(chi1 - chi2) / max(1.0, chi2 / dof),
                x1=float(r1.x[0]), y1=float(r1.x[1]),
                xa=float(xa), ya=float(ya), xb=float(xb), yb=float(yb), sep=float(np.hypot(xa - xb, ya - yb)),
                f1=c1[:, 0], fa=fl[:, 0], fb=fl[:, 1], fa_err=err[:, 0], fb_err=err[:, 1],
                snr_a=float(snr[0]), snr_b=float(snr[1]))
