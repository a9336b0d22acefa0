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
    use, W = _weights(dx, dy, cov)  # the same bands and weights before and after the field-wide shift
    mx, my = _means(dx, dy, use, W)
    chi2, shift = _scatter(dx, dy, cov, use, W, mx, my, nsigma)
    full = np.isfinite(dx).all(axis=1) & np.isfinite(chi2)
    if full.sum() >= max(min_common, 1):  # field-wide chromatic shift (e.g. residual refraction): removed
        cx = np.median((dx - mx[:, None])[full], axis=0)
        cy = np.median((dy - my[:, None])[full], axis=0)
        dx, dy = dx - cx[None], dy - cy[None]
        mx, my = _means(dx, dy, use, W)
        chi2, shift = _scatter(dx, dy, cov, use, W, mx, my, nsigma)
    if k:
        shift = shift / float(psf.fwhm_at(float(np.median(waves))))
    return chi2, shift, dx, dy


def _band(r, v, m, ok, x, y, f, psf, wave, radius, model_error, dx, dy, cov, idx, b):
    """Offsets of the stars ``idx`` (positions ``x, y``, band fluxes ``f``) in band ``b`` into ``dx, dy, cov``.

    All stars at once: each star's 3 x 3 normal matrix and right-hand side are sums over its core pixels
    (``numpy.bincount`` by star), inverted as a batch."""
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
    # the five columns of a star share their stamp (same centre, same usable pixels): same rows, same order
    ip = A.indptr
    cnt = np.diff(ip[:n + 1])
    if not all(np.array_equal(np.diff(ip[c * n:(c + 1) * n + 1]), cnt) for c in range(1, 5)):
        raise RuntimeError("chromatic_shift: the shifted stamps do not share their pixels")  # pragma: no cover
    rows = A.indices[:ip[n]]
    d = [A.data[ip[c * n]:ip[(c + 1) * n]] for c in range(5)]
    star = np.repeat(np.arange(n), cnt)
    py, px = np.divmod(rows, nx)
    core = np.hypot(px - x[star], py - y[star]) <= radius * fwhm
    rows, star = rows[core], star[core]
    M = (d[0][core], (d[1][core] - d[2][core]) / (2 * h), (d[3][core] - d[4][core]) / (2 * h))
    ww, rr = w[rows], r.ravel()[rows]
    N = np.empty((n, 3, 3))
    for a in range(3):
        for c in range(a, 3):
            N[:, a, c] = N[:, c, a] = np.bincount(star, weights=ww * M[a] * M[c], minlength=n)
    rhs = np.stack([np.bincount(star, weights=ww * M[a] * rr, minlength=n) for a in range(3)], axis=1)
    use = (np.bincount(star, minlength=n) >= 6) & np.isfinite(f) & (f > 0) & np.all(np.isfinite(N), axis=(1, 2))
    use &= np.abs(np.linalg.det(np.where(use[:, None, None], N, np.eye(3)))) > 0
    if not use.any():
        return
    Ni = np.linalg.inv(N[use])
    good = (np.all(np.isfinite(Ni), axis=(1, 2)) & np.all(np.diagonal(Ni, axis1=1, axis2=2) > 0, axis=1)
            & (np.linalg.det(Ni[:, 1:, 1:]) > 0))  # the offsets' covariance must be positive definite
    j = np.nonzero(use)[0][good]
    s = np.einsum("kab,kb->ka", Ni[good], rhs[j])
    # residual = F (P(x0 + d) - P(x0)) ~ F d . grad_x0 P: the centroid offset is the derivative term / F
    i = idx[j]
    dx[i, b], dy[i, b] = s[:, 1] / f[j], s[:, 2] / f[j]
    cov[i, b] = Ni[good][:, 1:, 1:] / f[j][:, None, None] ** 2


def _weights(dx, dy, cov):
    """Usable bands (finite offsets) and the inverse covariance of each band's offset (zero where unusable)."""
    use = np.isfinite(dx) & np.isfinite(dy)
    W = np.zeros(cov.shape)
    if use.any():
        W[use] = np.linalg.inv(cov[use])
    return use, W


def _means(dx, dy, use, W):
    """Inverse-covariance weighted mean offset per star over its usable bands (``use``, ``W``: :func:`_weights`)."""
    d = np.where(use[..., None], np.stack([dx, dy], axis=-1), 0.0)
    mean = np.full((dx.shape[0], 2), np.nan)
    has = use.any(axis=1)
    if has.any():
        mean[has] = np.linalg.solve(W[has].sum(axis=1), np.einsum("nkab,nkb->na", W[has], d[has])[..., None])[..., 0]
    return mean[:, 0], mean[:, 1]


def _scatter(dx, dy, cov, use, W, mx, my, nsigma):
    """Reduced chi^2 of the per-band offsets about their weighted mean ``mx, my`` (:func:`_means`), and the largest
    distance from it at its ``nsigma`` lower bound (px)."""
    n, k = dx.shape
    chi2, shift = np.full(n, np.nan), np.full(n, np.nan)
    two = use.sum(axis=1) >= 2
    if not two.any():
        return chi2, shift
    e = np.where(use[..., None], np.stack([dx - mx[:, None], dy - my[:, None]], axis=-1), 0.0)
    chi2[two] = np.einsum("nka,nkab,nkb->n", e, W, e)[two] / (2.0 * (use.sum(axis=1)[two] - 1))
    dist = np.hypot(e[..., 0], e[..., 1])
    u = e / np.maximum(dist, 1e-300)[..., None]  # the error of each band's offset along its deviation
    c = np.where(use[..., None, None], cov, 0.0)
    sig = np.sqrt(np.maximum(np.einsum("nka,nkab,nkb->nk", u, c, u), 0.0))
    excess = np.where(use, np.maximum(dist - nsigma * sig, 0.0), 0.0)
    shift[two] = excess.max(axis=1)[two]
    return chi2, shift
