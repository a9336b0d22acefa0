"""Crowded-field image fits: Gauss-Newton fits of a whole image with every star modelled at once.

Owns the broad-band transform + PSF-shape fit and the per-bin PSF-shape fit
(:func:`_image_fit`), the per-star position offsets that measure the transform residual
(:func:`_star_offsets`), their flux-column bookkeeping (free stars vs. stars at fixed
relative fluxes under one common scale), the sky polynomial columns and the bounds of
every PSF shape fit (:data:`BETA_RANGE`, :data:`E12_MAX`, :data:`E12_MAX_SINGLE`,
:data:`FWHM_RANGE_PX`).  Private helpers of :mod:`musepayne.extract`.

May import: :mod:`musepayne.extract.psf`, :mod:`musepayne.extract.linsolve`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .linsolve import factorise, normal_matrix
from .psf import MoffatPSF, _stamp_matrix, _stamp_pixels, psf_design_matrix

#: Moffat beta range of every PSF shape fit (single-star fits and crowded-field image fits)
BETA_RANGE = (1.2, 10.0)
#: bound on each ellipticity component ``|e1|, |e2|`` (``e1 = e cos 2PA``, ``e2 = e sin 2PA``) in every
#: PSF shape fit, so ``e <= sqrt(2) E12_MAX = 0.85``
E12_MAX = 0.6
#: the same bound in the single-star fits that start the transform (tighter: one star's stamp
#: constrains the shape less; 0.6 there moves the 500-star benchmark fluxes by up to 1e-2 sigma)
E12_MAX_SINGLE = 0.5
#: FWHM range (pixels) of the crowded-field image fits
FWHM_RANGE_PX = (0.8, 30.0)


def _flux_unknowns(n, free):
    """(star columns with their own flux, all flux unknowns) of an image fit."""
    if free is None:
        return n, n
    k = int(np.count_nonzero(free))
    return k, k + int(k < n)


def _flux_columns(A, free, rel_flux):
    """Flux columns of an image fit: every free star's column, then (if any star is not free) one
    column with the summed light of the others at their relative fluxes ``rel_flux``."""
    if free is None:
        return A
    cols = [A[:, np.nonzero(free)[0]]]
    if not np.all(free):
        fixed = np.nonzero(~free)[0]
        cols.append(sp.csc_matrix((A[:, fixed] @ rel_flux[fixed])[:, None]))
    return sp.hstack(cols, format="csc")


def _expand_fluxes(sol, free, rel_flux):
    """Per-star fluxes from the flux unknowns of an image fit (inverse of :func:`_flux_columns`)."""
    if free is None:
        return sol
    f = np.empty(free.size)
    f[free] = sol[: int(np.count_nonzero(free))]
    if not np.all(free):
        f[~free] = sol[-1] * rel_flux[~free]
    return f


def _shape_psf(p):
    """MoffatPSF from (fwhm, beta, e1, e2) at one wavelength."""
    e = float(np.hypot(p[2], p[3]))
    return MoffatPSF(fwhm=(float(p[0]),), beta=(float(p[1]),), ellip=(e,),
                     angle=(0.5 * float(np.rad2deg(np.arctan2(p[3], p[2]))),))


def _sky_columns(shape, order, mask):
    ny, nx = shape
    if order < 0:
        return np.zeros((ny * nx, 0))
    yy, xx = np.mgrid[:ny, :nx]
    u = (xx.ravel() - (nx - 1) / 2.0) / max(1.0, nx / 2.0)
    v = (yy.ravel() - (ny - 1) / 2.0) / max(1.0, ny / 2.0)
    terms = [np.ones_like(u)]
    if order >= 1:
        terms += [u, v]
    if order >= 2:
        terms += [u * u, u * v, v * v]
    return np.stack(terms, axis=1) * mask.ravel()[:, None]


def _theta_jacobian(A, shape_p, x, y, dx, dy, f, shape, radius, oversample, mask, cen):
    """Columns d model / d (a, b, ox, oy) of the similarity transform, by finite differences in x and y."""
    n = len(x)
    h = 1e-3
    x1, y1 = x + h, y
    Ax = psf_design_matrix(_shape_psf(shape_p), x1, y1, 0.0, shape, radius, oversample, valid=mask, centres=cen)
    Ay = psf_design_matrix(_shape_psf(shape_p), x, y + h, 0.0, shape, radius, oversample, valid=mask, centres=cen)
    gx = (Ax - A) / h
    gy = (Ay - A) / h
    # d model / d theta_k = sum_s f_s (gx_s dx_s/dtheta_k + gy_s dy_s/dtheta_k)
    return [gx @ (f * ddx) + gy @ (f * ddy)
            for ddx, ddy in ((dx, dy), (-dy, dx), (np.ones(n), np.zeros(n)), (np.zeros(n), np.ones(n)))]


def _apply_steps(theta, shape_p, names, step):
    """Add the clipped Gauss-Newton steps to ``theta`` and ``shape_p`` in place (bounds of the shape)."""
    for nm, st in zip(names, step):
        if nm == "a":
            theta[0] += np.clip(st, -0.01, 0.01)
        elif nm == "b":
            theta[1] += np.clip(st, -0.01, 0.01)
        elif nm == "ox":
            theta[2] += np.clip(st, -1.0, 1.0)
        elif nm == "oy":
            theta[3] += np.clip(st, -1.0, 1.0)
        elif nm == "fwhm":
            shape_p[0] = np.clip(shape_p[0] + np.clip(st, -0.2 * shape_p[0], 0.2 * shape_p[0]), *FWHM_RANGE_PX)
        elif nm == "beta":
            shape_p[1] = np.clip(shape_p[1] + np.clip(st, -0.5, 0.5), *BETA_RANGE)
        elif nm == "e1":
            shape_p[2] = np.clip(shape_p[2] + np.clip(st, -0.05, 0.05), -E12_MAX, E12_MAX)
        elif nm == "e2":
            shape_p[3] = np.clip(shape_p[3] + np.clip(st, -0.05, 0.05), -E12_MAX, E12_MAX)


def _image_fit(img, var, xc, yc, centre, theta, shape_p, fit_theta, fit_shape, radius, oversample, sky_order,
               n_iter=4, ridge=1e-9, dense_max=10000, free=None, rel_flux=None):
    """Gauss-Newton fit of an image with ALL stars modelled at once.

    Nonlinear parameters: the similarity transform ``theta = (a, b, ox, oy)``
    (``x = cx + a dx - b dy + ox``, ``y = cy + b dx + a dy + oy`` with
    ``dx, dy`` the catalogue pixel offsets from ``centre``) and/or the Moffat
    shape ``(fwhm, beta, e1, e2)``; linear: every star's flux and the sky
    polynomial.  Each iteration linearises the model (finite differences of
    the sparse design matrix) and solves one sparse weighted least-squares
    problem for fluxes, sky and parameter steps together.  With ``free``
    (bool per star) only those stars have free fluxes; the others keep the
    relative fluxes ``rel_flux`` under one common fitted scale (their light
    stays in the model at a bounded cost).  Returns ``(theta, shape_p,
    fluxes of all stars, ok)``.
    """
    ny, nx = img.shape
    mask = np.isfinite(img) & np.isfinite(var) & (var > 0)
    w = np.where(mask, 1.0 / np.where(mask, var, 1.0), 0.0).ravel()
    d = np.where(mask, img, 0.0).ravel()
    theta = np.asarray(theta, float).copy()
    shape_p = np.asarray(shape_p, float).copy()
    dx, dy = xc - centre[0], yc - centre[1]
    S = sp.csc_matrix(_sky_columns((ny, nx), sky_order, mask))
    n = len(xc)
    f = None
    nstar, nf = _flux_unknowns(n, free)

    def positions(th):
        return centre[0] + th[0] * dx - th[1] * dy + th[2], centre[1] + th[1] * dx + th[0] * dy + th[3]

    def design(stamps, sp_):  # the stamps' pixels serve every shape of one iteration
        return _stamp_matrix(stamps, _shape_psf(sp_).params(0.0), oversample, (ny, nx))

    for it in range(n_iter + 1):
        x, y = positions(theta)
        cen = (np.rint(x), np.rint(y))
        stamps = _stamp_pixels(x, y, (ny, nx), radius, mask, cen)
        A = design(stamps, shape_p)
        cols = [_flux_columns(A, free, rel_flux), S]
        jac, names = [], []
        if f is not None and it < n_iter:
            if fit_theta:
                jac += _theta_jacobian(A, shape_p, x, y, dx, dy, f, (ny, nx), radius, oversample, mask, cen)
                names += ["a", "b", "ox", "oy"]
            if fit_shape:
                model0 = A @ f
                steps = (0.02 * shape_p[0], 0.02, 0.01, 0.01)
                for k, hk in enumerate(steps):
                    p1 = shape_p.copy()
                    p1[k] += hk
                    jac.append((design(stamps, p1) @ f - model0) / hk)
                names += ["fwhm", "beta", "e1", "e2"]
        if jac:
            cols.append(sp.csc_matrix(np.column_stack(jac)))
        M = sp.hstack(cols, format="csc")
        MW = M.multiply(w[:, None]).tocsc()
        N, _ = normal_matrix(M, w, (ny, nx), ridge, AW=MW)
        try:
            solve, _ = factorise(N, dense_max, border=np.arange(nstar, N.shape[0]), need_diag=False)
            sol = solve(np.asarray(MW.T @ d).ravel())
        except (RuntimeError, np.linalg.LinAlgError):
            return theta, shape_p, f, False
        f = _expand_fluxes(sol[:nf], free, rel_flux)
        if not jac:
            if it > 0:
                break
            continue
        _apply_steps(theta, shape_p, names, sol[nf + S.shape[1]:])
    ok = bool(np.all(np.isfinite(theta)) and np.all(np.isfinite(shape_p)))
    return theta, shape_p, f, ok


def _star_offsets(img, var, x, y, shape_p, idx, f, radius, oversample, sky_order, ridge=1e-9, dense_max=10000,
                  free=None):
    """Per-star position offsets of stars ``idx`` (all other stars and the sky fitted at once; with
    ``free``, the stars not free keep their relative fluxes ``f`` under one common scale)."""
    ny, nx = img.shape
    mask = np.isfinite(img) & np.isfinite(var) & (var > 0)
    w = np.where(mask, 1.0 / np.where(mask, var, 1.0), 0.0).ravel()
    d = np.where(mask, img, 0.0).ravel()
    cen = (np.rint(x), np.rint(y))
    psf = _shape_psf(shape_p)
    A = psf_design_matrix(psf, x, y, 0.0, (ny, nx), radius, oversample, valid=mask, centres=cen)
    h = 1e-3
    xi, yi, ceni, Ai = x[idx], y[idx], (cen[0][idx], cen[1][idx]), A[:, idx]  # derivatives of stars idx only
    gx = (psf_design_matrix(psf, xi + h, yi, 0.0, (ny, nx), radius, oversample, valid=mask, centres=ceni) - Ai) / h
    gy = (psf_design_matrix(psf, xi, yi + h, 0.0, (ny, nx), radius, oversample, valid=mask, centres=ceni) - Ai) / h
    gx = gx @ sp.diags(f[idx])
    gy = gy @ sp.diags(f[idx])
    S = sp.csc_matrix(_sky_columns((ny, nx), sky_order, mask))
    nstar, nf = _flux_unknowns(len(x), free)
    M = sp.hstack([_flux_columns(A, free, f), S, gx, gy], format="csc")
    MW = M.multiply(w[:, None]).tocsc()
    N, _ = normal_matrix(M, w, (ny, nx), ridge, AW=MW)
    k = nf + S.shape[1]
    solve, _ = factorise(N, dense_max, border=np.arange(nstar, k), need_diag=False)
    sol = solve(np.asarray(MW.T @ d).ravel())
    return sol[k:k + idx.size], sol[k + idx.size:k + 2 * idx.size]
