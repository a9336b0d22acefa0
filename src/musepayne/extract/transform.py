"""The catalogue -> cube coordinate transformation and the single-star fits that start it.

Owns :class:`CoordinateTransform` (a similarity transform: offset, rotation, scale, fitted
with sigma clipping), the single-star Moffat fits of bright isolated stars that give its
robust start (:func:`_fit_single`, :func:`_single_star_start`) and the transform residual
from free per-star position offsets (:func:`_transform_residuals`).

May import: :mod:`musepayne.extract.psf`, :mod:`musepayne.extract.fields`,
:mod:`musepayne.extract.imagefit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from .fields import _psf_candidates
from .imagefit import BETA_RANGE, E12_MAX_SINGLE, _star_offsets
from .psf import _integrate

__all__ = ["CoordinateTransform"]


@dataclass(frozen=True)
class CoordinateTransform:
    """Similarity transformation catalogue pixels -> cube pixels about ``centre``.

    ``x' = cx + s (cos t dx - sin t dy) + ox``; ``y' = cy + s (sin t dx + cos t dy) + oy``.
    Calling it maps catalogue pixel positions ``(x, y)`` to cube pixels.

    Attributes
    ----------
    offset : tuple of float
        ``(ox, oy)`` shift (pixels).
    rotation : float
        Rotation ``t`` (degrees, counter-clockwise).
    scale : float
        Scale ``s`` (cube pixels per catalogue pixel).
    centre : tuple of float
        ``(cx, cy)`` centre of rotation and scaling (cube pixels).
    rms : float
        Residual rms (pixels) of the stars used (NaN: not measured).
    n_used, n_rejected : int
        Stars used and clipped in the fit.
    """

    offset: tuple = (0.0, 0.0)
    rotation: float = 0.0   # degrees
    scale: float = 1.0
    centre: tuple = (0.0, 0.0)
    rms: float = float("nan")  # residual rms (px) of the stars used
    n_used: int = 0
    n_rejected: int = 0

    def __call__(self, x, y):
        th = np.deg2rad(self.rotation)
        dx, dy = np.asarray(x) - self.centre[0], np.asarray(y) - self.centre[1]
        c, s = self.scale * np.cos(th), self.scale * np.sin(th)
        return self.centre[0] + c * dx - s * dy + self.offset[0], self.centre[1] + s * dx + c * dy + self.offset[1]

    #: fewest stars for rotation and scale; with fewer only the offset is fitted
    MIN_STARS_FULL = 6

    @property
    def offset_only(self) -> bool:
        return self.rotation == 0.0 and self.scale == 1.0

    @classmethod
    def fit(cls, xc, yc, xm, ym, centre, clip=3.0, weights=None, min_full=None):
        """Similarity transform from catalogue ``xc, yc`` to measured ``xm, ym`` (NaN: not measured).

        With fewer than ``min_full`` (default :attr:`MIN_STARS_FULL`) measured stars only
        the offset (median) is fitted: one or two stars cannot constrain rotation and
        scale against their own position errors.

        Parameters
        ----------
        xc, yc : array_like of float
            Catalogue positions (pixels).
        xm, ym : array_like of float
            Measured cube positions (pixels; NaN: not measured).
        centre : tuple of float
            Centre of rotation and scaling (cube pixels).
        clip : float
            Sigma clipping of the residuals (robust sigma, at least 0.02 px).
        weights : None
            Unused (kept for compatibility).
        min_full : int, optional
            Fewest measured stars for rotation and scale.

        Returns
        -------
        CoordinateTransform
            The fitted transform with its residual rms (pixels) and star counts.
        """
        min_full = cls.MIN_STARS_FULL if min_full is None else min_full
        xc, yc, xm, ym = (np.asarray(v, float) for v in (xc, yc, xm, ym))
        use = np.isfinite(xm) & np.isfinite(ym)
        if use.sum() == 0:
            return cls(centre=centre)
        dx, dy = xc - centre[0], yc - centre[1]
        for _ in range(5):
            n = int(use.sum())
            if n >= max(3, min_full):
                # unknowns a=s cos t, b=s sin t, ox, oy
                M = np.zeros((2 * n, 4))
                M[:n, 0], M[:n, 1], M[:n, 2] = dx[use], -dy[use], 1.0
                M[n:, 0], M[n:, 1], M[n:, 3] = dy[use], dx[use], 1.0
                rhs = np.concatenate([xm[use] - centre[0], ym[use] - centre[1]])
                a, b, ox, oy = np.linalg.lstsq(M, rhs, rcond=None)[0]
            else:  # too few stars: offset only
                a, b = 1.0, 0.0
                ox, oy = np.median(xm[use] - xc[use]), np.median(ym[use] - yc[use])
            px = centre[0] + a * dx - b * dy + ox
            py = centre[1] + b * dx + a * dy + oy
            res = np.hypot(xm - px, ym - py)
            sig = max(1.4826 * np.nanmedian(res[use]), 0.02)
            new = np.isfinite(res) & (res < clip * sig)
            if n < 5 or np.array_equal(new, use):
                break
            use = new
        rms = float(np.sqrt(np.mean(res[use] ** 2))) if use.any() else float("nan")
        return cls(offset=(float(ox), float(oy)), rotation=float(np.rad2deg(np.arctan2(b, a))),
                   scale=float(np.hypot(a, b)), centre=tuple(map(float, centre)), rms=rms,
                   n_used=int(use.sum()), n_rejected=int(np.isfinite(xm).sum() - use.sum()))


def _stamp(img, var, x, y, h):
    ny, nx = img.shape
    xi, yi = int(round(x)), int(round(y))
    x0, x1 = max(0, xi - h), min(nx, xi + h + 1)
    y0, y1 = max(0, yi - h), min(ny, yi + h + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = img[y0:y1, x0:x1]
    v = var[y0:y1, x0:x1]
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0)
    return xx[ok].astype(float), yy[ok].astype(float), d[ok], v[ok]


def _fit_single(img, var, x0, y0, fwhm0, beta0, oversample):
    """Moffat fit of one star (x, y, fwhm, beta, e1, e2; flux and sky linear) -> (x, y, fwhm).

    NaNs when the stamp has too few pixels, the fit does not converge or ends at a bound.
    """

    h = int(np.ceil(2.0 * fwhm0))
    xx, yy, d, v = _stamp(img, var, x0, y0, h)
    if d.size < 12:
        return (np.nan, np.nan, np.nan)
    sw = 1.0 / np.sqrt(v)

    def resid(p):
        e = np.hypot(p[4], p[5])
        ang = 0.5 * np.rad2deg(np.arctan2(p[5], p[4]))
        m = _integrate(xx - p[0], yy - p[1], p[2], p[3], e, ang, oversample)
        M = np.column_stack([m, np.ones_like(m)]) * sw[:, None]
        coef = np.linalg.lstsq(M, d * sw, rcond=None)[0]
        return d * sw - M @ coef

    try:
        r = least_squares(resid, [x0, y0, fwhm0, beta0, 0.0, 0.0],
                          bounds=([x0 - 2, y0 - 2, 0.4 * fwhm0, BETA_RANGE[0], -E12_MAX_SINGLE, -E12_MAX_SINGLE],
                                  [x0 + 2, y0 + 2, 2.5 * fwhm0, BETA_RANGE[1], E12_MAX_SINGLE, E12_MAX_SINGLE]),
                          x_scale=[0.1, 0.1, 0.1, 0.2, 0.02, 0.02], max_nfev=60)
    except (ValueError, np.linalg.LinAlgError):  # non-finite residuals at the start, SVD not converging
        return (np.nan, np.nan, np.nan)
    if not r.success or abs(r.x[0] - x0) > 1.9 or abs(r.x[1] - y0) > 1.9 or not 0.45 * fwhm0 < r.x[2] < 2.4 * fwhm0:
        return (np.nan, np.nan, np.nan)  # at a bound: a neighbour or noise took over
    return (r.x[0], r.x[1], r.x[2])


def _single_star_start(cfg, white, white_var, xc, yc, cand, centre, fwhm0, shape0, n_in, notes):
    """Robust start of the transform: single-star Moffat fits of the isolated stars ``cand``,
    similarity transform with clipping.  Returns ``(theta, fit_theta)``; sets ``shape0[0]`` to
    the median fitted FWHM (no fixed PSF) and appends warnings to ``notes``."""
    fit_theta = cfg.fit_transform
    fits_ = [_fit_single(white, white_var, xc[i], yc[i], fwhm0, cfg.beta_guess, cfg.image_oversample)
             for i in cand]
    xm = np.array([f[0] for f in fits_])
    ym = np.array([f[1] for f in fits_])
    t1 = CoordinateTransform.fit(xc[cand], yc[cand], xm, ym, centre, clip=cfg.clip)
    n_sup = int(np.isfinite(xm).sum())
    if n_in < CoordinateTransform.MIN_STARS_FULL:
        fit_theta = False  # offset only (median of the single-star fits) or nothing
        t1 = CoordinateTransform.fit(xc[cand], yc[cand], xm, ym, centre, clip=cfg.clip, min_full=10**9)
        notes.append(
            f"catalogue->cube transformation reduced to an offset: only {n_in} catalogue star(s) in "
            f"the field (rotation and scale need >= {CoordinateTransform.MIN_STARS_FULL})" if n_sup else
            "catalogue->cube transformation refused: no star in the field could be measured; "
            "catalogue positions used as they are")
    th = np.deg2rad(t1.rotation)
    theta = np.array([t1.scale * np.cos(th), t1.scale * np.sin(th), *t1.offset])
    fw = np.array([f[2] for f in fits_])
    if np.isfinite(fw).sum() >= 3 and cfg.psf is None:
        shape0[0] = float(np.nanmedian(fw))
    return theta, fit_theta


def _transform_residuals(cfg, white, white_var, x, y, mag, valid, nidx, free, shape_w, fl_w, rad0, transform,
                         notes):
    """The transform with its residual: free position offsets of the bright isolated stars among the
    modelled ones (``nidx``, free fluxes only), everything else held in the model; appends a warning
    to ``notes`` when the rms exceeds half the FWHM."""
    cand = _psf_candidates(x, y, mag, valid, shape_w[0], cfg)
    cand = cand[np.isin(cand, nidx if free is None else nidx[free])]
    if not (cfg.fit_transform and cand.size):
        return transform
    sub = np.searchsorted(nidx, cand)
    ddx, ddy = _star_offsets(white, white_var, x[nidx], y[nidx], shape_w, sub, fl_w, rad0,
                             cfg.image_oversample, cfg.sky_order, ridge=cfg.ridge,
                             dense_max=cfg.dense_max, free=free)
    res = np.hypot(ddx, ddy)
    keep = res < max(cfg.clip * 1.4826 * np.median(res), 0.05)
    transform = CoordinateTransform(transform.offset, transform.rotation, transform.scale, transform.centre,
                                    rms=float(np.sqrt(np.mean(res[keep] ** 2))),
                                    n_used=int(keep.sum()), n_rejected=int((~keep).sum()))
    if transform.rms > 0.5 * shape_w[0]:
        notes.append(f"catalogue->cube transformation residual rms {transform.rms:.2f} px "
                     f"(> 0.5 FWHM = {0.5 * shape_w[0]:.2f} px, {transform.n_used} stars): "
                     "positions are uncertain")
    return transform
