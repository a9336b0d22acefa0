"""Unmodelled light near each extracted star: a hidden point source fitted to the extraction residual.

A star the source list lacks (an undetected neighbour, typically within 1 FWHM of a brighter star)
is partly absorbed into the fitted fluxes of the listed stars near it and partly left in the
residual ``data - model``.  Its light contaminates their spectra, and nothing in the fit says so:
the PSF-weighted residual of a listed star is ~0 by construction of the least-squares fit.  The
part left over is not: summed over all layers, the residual of a hidden star of flux ``b`` at
offset ``s`` from a listed star of flux ``F`` is ``b (P_s - k(s) P_0)`` (``P`` the PSF,
``k(s)`` its normalised autocorrelation), whatever fraction ``k`` of it the listed star took.

:func:`hidden_light` fits, for every listed star, one extra point source at each pixel within
``radius`` FWHM of it (then on a 0.25 px grid around the best one), jointly with a correction to the
star's own flux (two PSF columns, uniform weights over the PSF footprint), keeps the position that
lowers the squared residual most, and reports the hidden source's light within 1 FWHM of the star
relative to the star's own light there -- the same measure as the extraction's ``neighbour_frac``
for listed neighbours -- from the ``nsigma`` lower bound of ``b`` (noise, and a fractional
PSF-model error of the star's flux, :data:`HIDDEN_MODEL_ERROR`), so that noise and an imperfect
PSF model alone give ~0.  The star's own flux is the fitted one less the absorbed part ``k b``.
Offsets where ``k > k_max`` (the two stars closer than ~0.3 FWHM) are not searched: there a
hidden star is indistinguishable from the listed one, and its light is in the spectrum unseen.

May import: numpy, scipy and :mod:`musepayne.extract.psf`.
"""

from __future__ import annotations

import numpy as np

from .psf import MoffatPSF, _integrate, _stamp_grid, psf_design_matrix

__all__ = ["hidden_light", "HIDDEN_MODEL_ERROR"]

#: fractional PSF-model error per pixel of the fitted stars' summed light, in the significance of a hidden source:
#: with the true source catalogue of simulated crowded fields (3 x 120 stars, mag 15-20 in 40 x 40 spaxels) no
#: hidden source reaches 5 sigma with 0.02 (0.01: 30 of 343 stars do; benchmarks/detect_vs_catalogue.py)
HIDDEN_MODEL_ERROR = 0.02


def hidden_light(resid, var, valid, x, y, flux, psf: MoffatPSF, wave: float, radius: float = 1.0,
                 nsigma: float = 3.0, k_max: float = 0.9, model_error: float = HIDDEN_MODEL_ERROR, model=None):
    """Light of the most significant unmodelled point source within ``radius`` FWHM of each star.

    Parameters
    ----------
    resid : numpy.ndarray, shape (ny, nx)
        Extraction residual ``data - model`` summed over the layers (cube flux units x layers).
    var : numpy.ndarray, shape (ny, nx)
        Variance of ``resid`` (sum of the layers' variances; same units squared).
    valid : numpy.ndarray of bool, shape (ny, nx)
        Usable spaxels (the others carry no weight).
    x, y : numpy.ndarray, shape (n,)
        Star positions (0-based pixels).
    flux : numpy.ndarray, shape (n,)
        Fitted star fluxes summed over the same layers as ``resid`` (same units).
    psf : MoffatPSF
        The extraction's PSF; evaluated at ``wave``.
    wave : float
        Wavelength of the PSF used for the summed residual (Angstrom; e.g. the cube's median).
    radius : float
        Search radius around each star (FWHM at ``wave``; > 0).
    nsigma : float
        The hidden flux is taken at its ``nsigma`` lower bound (>= 0): 0 unless significant.
    k_max : float
        Offsets where the normalised PSF autocorrelation exceeds this are not searched (0 < k_max < 1).
    model_error : float
        Fractional PSF-model error per pixel of ``model`` (or of the star's own ``flux`` when no ``model`` is given),
        added in quadrature to the noise of ``b`` (>= 0): the residual of an imperfect PSF model of a bright star
        (the star itself or a neighbour) is not a hidden star.
    model : numpy.ndarray, shape (ny, nx), optional
        The fitted stars' light summed over the same layers as ``resid`` (same units).

    Returns
    -------
    frac : numpy.ndarray, shape (n,)
        Light of the hidden source within 1 FWHM of the star relative to the star's own light there
        (dimensionless; 0: nothing significant; inf: the star's own flux is used up by the hidden one;
        NaN: no usable residual or a non-positive fitted flux).
    snr : numpy.ndarray, shape (n,)
        Significance ``b / sigma_b`` of the hidden source at the chosen offset, ``sigma_b`` from ``var`` and the
        PSF-model error (NaN where not searched).
    flux : numpy.ndarray, shape (n,)
        Its flux ``b`` (units of ``resid``; NaN where not searched, 0 where nothing was found).
    own : numpy.ndarray, shape (n,)
        The star's own flux, ``flux`` less the part ``k b`` it took of the hidden source's light.
    xh, yh : numpy.ndarray, shape (n,)
        Position of the hidden source (0-based pixels; NaN where none).
    """
    resid = np.asarray(resid, float)
    var = np.asarray(var, float)
    x, y, flux = (np.atleast_1d(np.asarray(v, float)) for v in (x, y, flux))
    n = x.size
    frac, snr, bh, own, xh, yh = (np.full(n, np.nan) for _ in range(6))
    if not n:
        return frac, snr, bh, own, xh, yh
    ny, nx = resid.shape
    fwhm = float(psf.fwhm_at(wave))
    half = int(np.ceil((2.0 + radius) * fwhm))
    ok = np.asarray(valid, bool) & np.isfinite(resid) & np.isfinite(var) & (var > 0)
    r = np.where(ok, resid, 0.0).ravel()
    v = np.where(ok, var, 0.0).ravel()
    mod = None if model is None else np.where(ok, np.asarray(model, float), 0.0).ravel()
    if mod is not None:  # the model error enters as a variance per pixel
        v = v + (model_error * mod) ** 2
    rd = int(np.ceil(radius * fwhm))
    dd = np.arange(-rd, rd + 1, dtype=float)
    DX, DY = (a.ravel() for a in np.meshgrid(dd, dd))
    cand = np.hypot(DX, DY) <= radius * fwhm
    DX, DY = np.r_[0.0, DX[cand]], np.r_[0.0, DY[cand]]  # the star itself first
    fine = np.arange(-0.75, 0.76, 0.25)
    FX, FY = (a.ravel() for a in np.meshgrid(fine, fine))
    r, v = r.reshape(ny, nx), v.reshape(ny, nx)
    for i in range(n):
        if not np.isfinite(flux[i]) or not flux[i] > 0 or not np.isfinite(x[i] + y[i]):
            continue
        # the window of pixels within `half` of the star (the fits see nothing else)
        x0, x1 = max(0, int(np.ceil(x[i] - half))), min(nx - 1, int(np.floor(x[i] + half)))
        y0, y1 = max(0, int(np.ceil(y[i] - half))), min(ny - 1, int(np.floor(y[i] + half)))
        if x1 < x0 or y1 < y0:
            continue
        okw = ok[y0:y1 + 1, x0:x1 + 1]
        rows = np.flatnonzero(okw)
        if rows.size < 9:
            continue
        rw, vw = r[y0:y1 + 1, x0:x1 + 1].ravel(), v[y0:y1 + 1, x0:x1 + 1].ravel()
        xs, ys = x[i] - x0, y[i] - y0  # the star in window coordinates
        got = _best_offset(psf, wave, half, okw, rows, rw, vw, xs, ys, DX, DY, k_max)
        if got is not None:  # refine on a 0.25 px grid around the best pixel offset
            got = _best_offset(psf, wave, half, okw, rows, rw, vw, xs, ys, np.r_[0.0, got[0] + FX],
                               np.r_[0.0, got[1] + FY], k_max) or got
        if got is None:
            snr[i] = frac[i] = bh[i] = 0.0
            own[i] = flux[i]
            continue
        dx, dy, b, sb, c, es, e0 = got
        if mod is None:
            sb = float(np.hypot(sb, model_error * flux[i]))
        snr[i], bh[i], own[i], xh[i], yh[i] = b / sb, b, flux[i] + c, x[i] + dx, y[i] + dy
        lo = max(b - nsigma * sb, 0.0)
        frac[i] = 0.0 if lo == 0 else (lo * es / (own[i] * e0) if own[i] > 0 and e0 > 0 else np.inf)
    return frac, snr, bh, own, xh, yh


def _best_offset(psf, wave, half, ok, rows, r, v, x0, y0, dx, dy, k_max):
    """Uniform-weight fits of ``[P_s, P_0]`` to the residual ``r`` (variance ``v``; pixels ``rows`` of the image
    ``ok``, e.g. a window around the star at ``x0, y0``) for the offsets ``dx[1:], dy[1:]`` (``dx[0] = dy[0] = 0``:
    the star); the offset that lowers the squared residual most with ``b > 0``, as ``(dx, dy, b, sigma_b, c,
    light of P_s within 1 FWHM of the star, same of P_0)``, or None."""
    ny, nx = ok.shape
    fwhm = float(psf.fwhm_at(wave))
    dx, dy = np.asarray(dx, float), np.asarray(dy, float)
    if np.array_equal(dx, np.round(dx)) and np.array_equal(dy, np.round(dy)):  # whole pixels: one stamp, moved
        A = _shifted_stamps(psf, wave, float(half), nx, rows, x0, y0, dx, dy)
    else:
        A = np.asarray(psf_design_matrix(psf, x0 + dx, y0 + dy, wave, (ny, nx), float(half), 2,
                                         valid=ok)[rows].toarray())
    a0, Aj = A[:, 0], A[:, 1:]
    n00, njj, nj0 = a0 @ a0, np.sum(Aj * Aj, axis=0), Aj.T @ a0
    det = njj * n00 - nj0 * nj0
    use = (njj > 0) & (det > (1.0 - k_max * k_max) * njj * n00)  # k = nj0 / sqrt(njj n00) < k_max
    if not n00 > 0 or not use.any():
        return None
    Aj, njj, nj0, det, dx, dy = Aj[:, use], njj[use], nj0[use], det[use], dx[1:][use], dy[1:][use]
    rj, r0 = Aj.T @ r[rows], a0 @ r[rows]
    b = (n00 * rj - nj0 * r0) / det  # hidden flux
    c = (njj * r0 - nj0 * rj) / det  # correction to the star's own flux
    gain = np.where(b > 0, b * b * det / n00, -np.inf)  # drop of the uniform squared residual
    j = int(np.argmax(gain))
    if not b[j] > 0:
        return None
    g = (n00 * Aj[:, j] - a0 * nj0[j]) / det[j]  # b = g^T r
    sb = float(np.sqrt(max((g * g) @ v[rows], 0.0)))
    if not sb > 0:
        return None
    yr, xr = np.divmod(rows, nx)
    disc = np.hypot(xr - x0, yr - y0) <= fwhm
    return float(dx[j]), float(dy[j]), float(b[j]), sb, float(c[j]), float(Aj[disc, j].sum()), float(a0[disc].sum())


def _shifted_stamps(psf, wave, radius, nx, rows, x0, y0, dx, dy):
    """The columns of :func:`~musepayne.extract.psf.psf_design_matrix` (oversampling 2, stamp ``radius``) for point
    sources at ``(x0 + dx, y0 + dy)`` with whole-pixel ``dx, dy``, on the pixels ``rows`` (C order, image width
    ``nx``; the caller's usable ones): each is the stamp of a source at ``(x0, y0)`` moved by ``(dx, dy)`` pixels,
    so the profile is integrated once (same values up to the rounding of the pixel offsets, ~1e-15)."""
    ox, oy, disc = _stamp_grid(radius)  # the stamp psf_design_matrix fills
    r = ox.shape[0] // 2
    cx, cy = np.rint(x0), np.rint(y0)
    fwhm, beta, ellip, angle = (float(v) for v in psf.params(wave))
    stamp = np.where(disc, _integrate((cx + ox) - x0, (cy + oy) - y0, fwhm, beta, ellip, angle, 2), 0.0)
    py, px = np.divmod(np.asarray(rows), nx)
    ix = px[:, None] - (cx + dx[None, :]).astype(np.int64) + r
    iy = py[:, None] - (cy + dy[None, :]).astype(np.int64) + r
    inside = (ix >= 0) & (ix <= 2 * r) & (iy >= 0) & (iy <= 2 * r)
    return np.where(inside, stamp[np.clip(iy, 0, 2 * r), np.clip(ix, 0, 2 * r)], 0.0)
