"""Field geometry shared by the extraction steps.

Owns the pixel scale of a cube, distances to the usable-field edge, blend fractions from
catalogue magnitudes and a PSF, the combination of binned layers into one image and the
choice of bright isolated stars for the single-star fits.  All private helpers of :mod:`musepayne.extract`.

May import: :mod:`musepayne.io`, :mod:`musepayne.extract.psf`, :mod:`musepayne.extract.apertures`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.ndimage import distance_transform_edt

from .apertures import aperture_matrix
from .psf import MoffatPSF, psf_design_matrix


def _pixscale_arcsec(c) -> float:
    try:

        s = float(np.mean(proj_plane_pixel_scales(c.wcs))) * 3600.0
        if np.isfinite(s) and s > 0:
            return s
    except Exception:
        pass
    return 0.2


def _combine_bins(bins):
    imgs = np.array([b[1] for b in bins])
    vars_ = np.array([b[2] for b in bins])
    n = len(bins)
    return np.mean(imgs, axis=0), np.sum(vars_, axis=0) / n**2


def _edge_distance(valid, x, y):

    ny, nx = valid.shape
    pad = np.zeros((ny + 2, nx + 2), bool)
    pad[1:-1, 1:-1] = valid
    din = distance_transform_edt(pad)[1:-1, 1:-1] - 0.5
    dout = distance_transform_edt(~pad)[1:-1, 1:-1]
    fin = np.isfinite(x) & np.isfinite(y)
    x, y = np.where(fin, x, -1e6), np.where(fin, y, -1e6)
    xi, yi = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
    out = np.empty(len(x))
    xc, yc = np.clip(xi, 0, nx - 1), np.clip(yi, 0, ny - 1)
    v = valid[yc, xc]
    out[:] = np.where(inside & v, din[yc, xc], -dout[yc, xc])
    # beyond the array: distance to the array box
    far = ~inside
    out[far] = -np.hypot(np.maximum(np.maximum(-x[far] - 0.5, x[far] - (nx - 0.5)), 0),
                         np.maximum(np.maximum(-y[far] - 0.5, y[far] - (ny - 0.5)), 0))
    out[~fin] = -np.inf
    return out


def _psf_candidates(x, y, mag, valid, fwhm, cfg):
    """Brightest stars well inside the field whose neighbours contribute little light.

    Isolation is measured as the blend fraction within ``isolation`` x FWHM
    (catalogue magnitudes, Moffat guess): stars below 5 % qualify; if fewer
    than 5 do, the least blended of the brightest quarter are taken.
    """
    ny, nx = valid.shape
    edge = _edge_distance(valid, x, y)
    inside = np.nonzero(edge > 2.0 * fwhm)[0]
    if inside.size == 0:
        return inside
    guess = MoffatPSF(fwhm=(fwhm,), beta=(cfg.beta_guess,))
    near = (x > -4 * fwhm) & (x < nx + 4 * fwhm) & (y > -4 * fwhm) & (y < ny + 4 * fwhm)
    idx = np.nonzero(near)[0]
    blend = np.full(len(x), np.nan)
    blend[idx] = _blend_fraction(guess, x[idx], y[idx], mag[idx], valid, guess.wave_ref, cfg.isolation * fwhm,
                                 cfg)
    order = inside[np.argsort(mag[inside])]
    chosen = [i for i in order if blend[i] < 0.05][: cfg.psf_stars]
    if len(chosen) < 5:
        top = order[: max(5, order.size // 4)]
        chosen = list(top[np.argsort(blend[top])][: max(5, min(cfg.psf_stars, top.size // 2))])
    return np.array(chosen, dtype=int)

def _blend_fraction(psf, x, y, mag, valid, wave, fwhm, cfg, neighbours=False):
    """Fraction of the light within 1 FWHM of each star that comes from its neighbours; with
    ``neighbours`` also the largest single neighbour's light there relative to the star's own."""
    ny, nx = valid.shape
    out = np.full(len(x), np.nan)
    neigh = np.full(len(x), np.nan)
    fin = np.isfinite(x) & np.isfinite(y) & np.isfinite(mag)
    if not fin.any():
        return (out, neigh) if neighbours else out
    x, y, mag = x[fin], y[fin], mag[fin]
    f = 10.0 ** (-0.4 * (mag - np.min(mag)))
    rad = min(cfg.psf_radius * fwhm, cfg.psf_radius_max_px)
    A = psf_design_matrix(psf, x, y, wave, (ny, nx), rad, 1)
    C = aperture_matrix(x, y, fwhm, (ny, nx))
    total = np.asarray(C.T @ (A @ f)).ravel()
    own = np.asarray(C.multiply(A).sum(axis=0)).ravel() * f
    with np.errstate(invalid="ignore", divide="ignore"):
        out[fin] = np.where(total > 0, 1.0 - own / total, np.nan)
    if not neighbours:
        return out
    M = (C.T @ A).tocsr() @ sp.diags(f)  # M[i, k]: light of star k inside star i's aperture
    M = M.tolil()
    M.setdiag(0.0)
    best = np.asarray(M.tocsr().max(axis=1).todense()).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        neigh[fin] = np.where(own > 0, best / own, np.nan)
    return out, neigh
