"""Aperture photometry: exact circle-pixel overlaps, annulus sky and the aperture flux loop.

Owns :func:`circle_overlap`, :func:`aperture_matrix` and :func:`aperture_fluxes` (the
``method='aperture'`` extraction of :class:`~musepayne.extract.extractor.Extractor`:
radius ``aperture_radius`` x FWHM or a fixed radius, sky = median of a local annulus, flux
corrected to total with the PSF model's enclosed fraction on the actual pixel footprint).

May import: :mod:`musepayne.io`, :mod:`musepayne.extract.psf`, :mod:`musepayne.extract.blocks`.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import scipy.sparse as sp

from .blocks import _accumulators, _layer_blocks
from .psf import psf_design_matrix

__all__ = ["circle_overlap", "aperture_matrix", "aperture_fluxes"]


def _quad_area(x, y, r):
    """Signed integral of the disc indicator over [0, x] x [0, y] (disc radius r at the origin)."""
    sx, sy = np.sign(x), np.sign(y)
    ax, ay = np.minimum(np.abs(x), r), np.abs(y)
    ustar = np.sqrt(np.maximum(r * r - ay * ay, 0.0))
    u1 = np.minimum(ustar, ax)

    def h(a):
        a = np.clip(a, 0.0, r)
        return 0.5 * (a * np.sqrt(np.maximum(r * r - a * a, 0.0)) + r * r * np.arcsin(a / r))

    # for u < ustar the disc is taller than the strip (height ay), beyond it the disc boundary
    g = ay * u1 + (h(ax) - h(u1))
    return sx * sy * g


def circle_overlap(xc, yc, r, xx, yy):
    """Exact area of the circle (centre ``xc, yc``, radius ``r``) inside unit pixels centred on ``xx, yy``.

    Parameters
    ----------
    xc, yc : float or array_like
        Circle centre (pixels; broadcast against ``xx, yy``).
    r : float or array_like
        Circle radius (pixels).
    xx, yy : array_like
        Pixel centres (pixels); pixel ``(i, j)`` covers ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``.

    Returns
    -------
    numpy.ndarray
        Overlap area of each pixel (pixel^2, in ``[0, 1]``).
    """
    x0, x1 = np.asarray(xx) - 0.5 - xc, np.asarray(xx) + 0.5 - xc
    y0, y1 = np.asarray(yy) - 0.5 - yc, np.asarray(yy) + 0.5 - yc
    a = _quad_area(x1, y1, r) - _quad_area(x0, y1, r) - _quad_area(x1, y0, r) + _quad_area(x0, y0, r)
    return np.clip(a, 0.0, 1.0)


def aperture_matrix(x, y, r, shape, valid=None, r_inner=None):
    """Sparse ``(ny*nx, n)`` exact-overlap weights of circles (or annuli with ``r_inner``).

    Parameters
    ----------
    x, y : array_like of float, shape (n,)
        Aperture centres (0-based pixels).
    r : float or array_like
        Outer radius (pixels), one or one per aperture.
    shape : tuple of int
        Image shape ``(ny, nx)``.
    valid : numpy.ndarray of bool, shape (ny, nx), optional
        Usable spaxels; the others get no weight.
    r_inner : float or array_like, optional
        Inner radius (pixels) of an annulus.

    Returns
    -------
    scipy.sparse.csc_matrix, shape (ny*nx, n)
        Column k: the area of aperture k in each pixel (pixel^2), rows in C order of the image.
    """
    ny, nx = shape
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    r = np.broadcast_to(np.asarray(r, float), x.shape)
    h = int(np.ceil(np.max(r) + 1)) if x.size else 1
    k = np.arange(-h, h + 1)
    ox, oy = np.meshgrid(k, k)
    ox, oy = ox.ravel(), oy.ravel()
    xi = np.rint(x).astype(np.int64)[:, None] + ox[None, :]
    yi = np.rint(y).astype(np.int64)[:, None] + oy[None, :]
    w = circle_overlap(x[:, None], y[:, None], r[:, None], xi, yi)
    if r_inner is not None:
        ri = np.broadcast_to(np.asarray(r_inner, float), x.shape)
        w = w - circle_overlap(x[:, None], y[:, None], ri[:, None], xi, yi)
    ok = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny) & (w > 0)
    if valid is not None:
        ok[ok] &= np.asarray(valid, bool)[yi[ok], xi[ok]]
    cols = np.broadcast_to(np.arange(x.size)[:, None], xi.shape)
    return sp.csc_matrix((w[ok], (yi[ok] * nx + xi[ok], cols[ok])), shape=(ny * nx, x.size))


def _annulus_median(ann, D, V, chunk=128):
    """Per-star, per-layer median of the annulus spaxels and the variance of that median."""
    ann = ann.tocsc()
    n = ann.shape[1]
    L = D.shape[1]
    sky = np.full((n, L), np.nan)
    var = np.full((n, L), np.nan)
    counts = np.diff(ann.indptr)
    Dp = np.vstack([D, np.full((1, L), np.nan)])  # padding row
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        m = int(counts[k0:k1].max()) if k1 > k0 else 0
        if m < 3:
            continue
        idx = np.full((k1 - k0, m), D.shape[0])
        for k in range(k0, k1):
            idx[k - k0, : counts[k]] = ann.indices[ann.indptr[k]:ann.indptr[k + 1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sky[k0:k1] = np.nanmedian(Dp[idx], axis=1)
        vsum = np.asarray(ann[:, k0:k1].T @ V)
        with np.errstate(invalid="ignore", divide="ignore"):
            var[k0:k1] = (np.pi / 2.0) * vsum / counts[k0:k1, None] ** 2
    few = counts < 3
    sky[few] = np.nan
    var[few] = np.nan
    return sky, var


def aperture_fluxes(cfg, c, psf, x, y, on, valid, timings):
    """Aperture fluxes of the stars ``on`` the field, streamed over the cube in blocks.

    Parameters
    ----------
    cfg : ExtractConfig
        ``block``, ``aperture_radius`` / ``aperture_radius_px``, ``annulus``,
        ``aperture_correction``, ``psf_radius``, ``psf_radius_max_px`` and ``oversample`` are used.
    c : musepayne.io.cube.MuseCube
        The open cube (DATA and STAT read block by block).
    psf : MoffatPSF
        PSF model (FWHM for the radii, enclosed fraction for the correction).
    x, y : numpy.ndarray of float, shape (n,)
        Star positions (0-based cube pixels).
    on : numpy.ndarray of bool, shape (n,)
        Stars whose centre is on the usable field (the others keep NaN).
    valid : numpy.ndarray of bool, shape (ny, nx)
        Usable spaxels.
    timings : dict
        Step timings (s); ``read`` and ``solve`` are added to.

    Returns
    -------
    flux, err : numpy.ndarray of float32, shape (n, nz)
        Flux and its 1-sigma error (cube BUNIT x pixel), NaN where not measured.
    chi2 : numpy.ndarray, shape (n,)
        NaN (no model residuals for apertures).
    layer_flag : numpy.ndarray of int16, shape (nz,)
        Per-layer flags (:data:`~musepayne.extract.result.LAYER_FLAGS`).
    """
    nz, ny, nx = c.shape
    n = len(x)
    flux, err, layer_flag = _accumulators(n, nz)
    cols = np.nonzero(on)[0]
    for i0, i1, d, s, good, mask in _layer_blocks(c, valid, cfg.block, layer_flag, timings):
        if cols.size == 0:
            continue
        t = time.perf_counter()
        wmid = float(np.mean(c.wave[i0:i1][good]))
        fw = psf.fwhm_at(wmid)
        rap = cfg.aperture_radius_px if cfg.aperture_radius_px else cfg.aperture_radius * fw
        Wap = aperture_matrix(x[cols], y[cols], rap, (ny, nx), valid=mask)
        L = int(good.sum())
        D = np.where(mask.ravel()[None, :], d[good].reshape(L, -1), 0.0).T
        V = np.where(mask.ravel()[None, :], s[good].reshape(L, -1), 0.0).T
        f = np.asarray(Wap.T @ D)
        v = np.asarray(Wap.multiply(Wap).T @ V)
        area = np.asarray(Wap.sum(axis=0)).ravel()
        if cfg.annulus is not None:
            ann = aperture_matrix(x[cols], y[cols], cfg.annulus[1] * fw, (ny, nx), valid=mask,
                                  r_inner=cfg.annulus[0] * fw)
            ann = (ann >= 0.999).astype(float).tocsc()  # whole spaxels inside the annulus
            sky, sky_var = _annulus_median(ann, D, V)
            f = f - area[:, None] * sky
            v = v + area[:, None] ** 2 * sky_var
        if cfg.aperture_correction:
            P = psf_design_matrix(psf, x[cols], y[cols], wmid, (ny, nx),
                                  min(cfg.psf_radius * fw, cfg.psf_radius_max_px) + rap, cfg.oversample)
            enc = np.asarray(Wap.multiply(P).sum(axis=0)).ravel()
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = np.where(enc > 0.05, 1.0 / enc, np.nan)
            f = f * corr[:, None]
            v = v * corr[:, None] ** 2
        gi = np.nonzero(good)[0] + i0
        flux[np.ix_(cols, gi)] = f
        err[np.ix_(cols, gi)] = np.sqrt(v)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return flux, err, np.full(n, np.nan), layer_flag
