"""Source detection in a MUSE cube alone: the star list when no catalogue is given.

:class:`Detector` (configured by a frozen :class:`DetectConfig`) is called on a
cube (path or :class:`~musepayne.io.cube.MuseCube`) and returns an astropy
Table with ``stellar_id, x, y`` (0-based cube pixels), ``ra, dec`` (deg),
``mag, mag_err, flux, flux_err, snr`` and the provenance column ``detected``
(the detection pass, 1 = first).  The table is a source catalogue like any
other: pass it (or the file written from it) to
:class:`~musepayne.extract.extractor.Extractor`.

Steps:

1. *Images.*  The cube is streamed once into ``n_bands`` broad bands (mean of
   the usable layers and the variance of that mean, from ``STAT``) and their
   inverse-variance weighted white-light sum.
2. *PSF.*  A Moffat (FWHM, beta, ellipticity) is fitted to the bright peaks
   of every band and of the white-light image with all detected stars
   modelled at once (the extractor's crowded-field image fit), so each image
   has its own measured PSF.
3. *Matched filter.*  For each image the PSF-matched filter gives, at every
   pixel, the S/N of the optimal flux of a star centred there:
   ``snr = sum(P d / V) / sqrt(sum(P^2 / V))`` (exact for an isolated star,
   noise from ``STAT``).  The white-light map and the band maps (each with its
   own PSF; a band peak must pass ``threshold + band_penalty`` to pay for the
   extra trials) are searched for local maxima with
   :func:`photutils.detection.find_peaks`; the sky is taken out first with a
   sigma-clipped :class:`photutils.background.Background2D` (or a scalar
   ``MedianBackground`` on small images).
4. *Crowded-field PSF photometry, iterated.*  All stars found so far are
   fitted together on the white-light image (fluxes, sky polynomial, free
   per-star position offsets, Gauss-Newton on the sparse design matrix); the
   fitted stars are subtracted and the residual map is searched again
   (``n_iter`` passes), which reaches the faint stars in the wings of bright
   ones and in crowded cores.  Stars whose fitted flux falls below
   ``threshold`` times its error are dropped, and of two stars closer than
   ``min_separation`` FWHM the fainter is merged away.
5. *Magnitudes.*  ``mag = zeropoint - 2.5 log10(flux)`` with ``flux`` the
   fitted white-light flux (cube flux units per Angstrom, mean over the
   cube's wavelength range); the default zero point is the simulator's
   convention, so simulated magnitudes and detected ones compare directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from astropy.stats import SigmaClip
from astropy.table import Column, Table
from photutils.background import Background2D, MedianBackground
from photutils.detection import find_peaks
from scipy.ndimage import correlate
from scipy.optimize import least_squares

from ..io.cube import MuseCube, open_cube
from ..io.spectra import ReaderError
from .extractor import _fit_single, _pixscale_arcsec, _shape_psf, _sky_columns, _stamp
from .psf import _integrate, psf_design_matrix

__all__ = ["DetectConfig", "Detector", "matched_filter_snr"]


@dataclass(frozen=True)
class DetectConfig:
    """Detection settings.  Lengths in FWHM of the white-light PSF unless the name says otherwise."""

    threshold: float = 5.0         #: matched-filter S/N of a detection (and of its final fitted flux)
    band_penalty: float = 1.0      #: extra S/N a peak found only in one band must reach
    n_bands: int = 4               #: broad bands across the cube
    n_iter: int = 12               #: detection passes (the later ones on the residual of the fitted stars)
    model_error: float = 0.03      #: fractional PSF-model error added to the noise when searching residuals
    min_separation: float = 0.5    #: closer pairs are merged (the fainter one dropped)
    fwhm_guess: float = 0.8        #: arcsec; the first peaks are found with it, then the PSF is measured
    beta_guess: float = 2.5
    psf_stars: int = 30            #: bright peaks used for the PSF fit
    sky_order: int = 1             #: sky polynomial of the joint fit
    zeropoint: float = 28.9        #: magnitude of 1 flux unit / Angstrom (the simulator's convention)
    block: int = 200               #: layers read at a time
    max_sources: int = 20000

    def __post_init__(self):
        if not self.threshold > 0:
            raise ValueError("threshold must be > 0")
        if self.n_bands < 1 or self.n_iter < 1:
            raise ValueError("n_bands and n_iter must be >= 1")


def _fit_shape(img, var, xs, ys, p0, oversample):
    """Joint fit of (fwhm, beta, e1, e2) to several stars at fixed positions (flux, sky linear per star)."""
    h = int(np.ceil(2.0 * p0[0]))
    stamps = [s for s in (_stamp(img, var, x, y, h) for x, y in zip(xs, ys)) if s[2].size >= 12]
    if not stamps:
        return None

    def resid(p):
        e = np.hypot(p[2], p[3])
        if e >= 0.9:
            return np.full(sum(s[2].size for s in stamps), 1e6)
        ang = 0.5 * np.rad2deg(np.arctan2(p[3], p[2]))
        out = []
        for (xx, yy, d, v), x0, y0 in zip(stamps, xs, ys):
            sw = 1.0 / np.sqrt(v)
            m = _integrate(xx - x0, yy - y0, p[0], p[1], e, ang, oversample)
            M = np.column_stack([m, np.ones_like(m)]) * sw[:, None]
            coef = np.linalg.lstsq(M, d * sw, rcond=None)[0]
            out.append(d * sw - M @ coef)
        return np.concatenate(out)

    try:
        r = least_squares(resid, p0, bounds=([0.5, 1.2, -0.5, -0.5], [4 * p0[0] + 5, 10, 0.5, 0.5]),
                          x_scale=[0.05, 0.1, 0.01, 0.01], max_nfev=80)
    except Exception:
        return None
    return r.x if r.success else None


def _kernel(shape_p, fwhm):
    h = int(np.ceil(2.0 * fwhm))
    k = np.arange(-h, h + 1, dtype=float)
    xx, yy = np.meshgrid(k, k)
    e = float(np.hypot(shape_p[2], shape_p[3]))
    ang = 0.5 * float(np.rad2deg(np.arctan2(shape_p[3], shape_p[2])))
    p = _integrate(xx, yy, float(shape_p[0]), float(shape_p[1]), min(e, 0.85), ang, 3)
    return p / p.sum()


def matched_filter_snr(img, var, kernel):
    """``(snr, flux, flux_err)`` maps of the optimal PSF flux of a star centred on each pixel.

    ``snr = sum(P d / V) / sqrt(sum(P^2 / V))``; unusable pixels (NaN, var <= 0) carry no weight.
    """
    ok = np.isfinite(img) & np.isfinite(var) & (var > 0)
    iv = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    num = correlate(np.where(ok, img, 0.0) * iv, kernel, mode="constant")
    den = correlate(iv, kernel**2, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), np.nan)
        flux = np.where(den > 0, num / den, np.nan)
        err = np.where(den > 0, 1.0 / np.sqrt(den), np.nan)
    snr[~ok] = np.nan
    return snr, flux, err


def _background(img, ok, box):
    ny, nx = img.shape
    est = MedianBackground()
    clip = SigmaClip(sigma=3.0, maxiters=5)
    if min(ny, nx) >= 4 * box:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Background2D(np.where(ok, img, np.nan), box, filter_size=3, sigma_clip=clip,
                                    bkg_estimator=est, coverage_mask=~ok, fill_value=0.0).background
        except ValueError:
            pass
    v = img[ok]
    return np.full(img.shape, est.calc_background(clip(v, masked=False)) if v.size else 0.0)


def _peaks(snr, threshold, box):
    s = np.where(np.isfinite(snr), snr, -np.inf)
    if not np.isfinite(s).any() or np.nanmax(snr) < threshold:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_peaks(np.where(np.isfinite(s), s, np.nanmin(snr)), threshold, box_size=box,
                       mask=~np.isfinite(snr))
    if t is None:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return (np.asarray(t["x_peak"], float), np.asarray(t["y_peak"], float), np.asarray(t["peak_value"], float))


class Detector:
    """Configure once with :class:`DetectConfig`; call on a cube to get the detected star list."""

    def __init__(self, config: DetectConfig = DetectConfig()):
        self.config = config

    # ------------------------------------------------------------------ images
    def band_images(self, c: MuseCube):
        """``(waves, imgs, vars, white, white_var)``: band means over usable layers and their variances."""
        cfg = self.config
        nz, ny, nx = c.shape
        nb = max(1, min(cfg.n_bands, nz))
        edges = np.linspace(0, nz, nb + 1).astype(int)
        s_d = np.zeros((nb, ny, nx))
        s_v = np.zeros((nb, ny, nx))
        cnt = np.zeros((nb, ny, nx))
        wsum = np.zeros(nb)
        wn = np.zeros(nb)
        band_of = np.searchsorted(edges, np.arange(nz), side="right") - 1
        for i0 in range(0, nz, cfg.block):
            i1 = min(nz, i0 + cfg.block)
            d = c.data_block(i0, i1).astype(float)
            s = c.stat_block(i0, i1)
            if s is None:
                raise ReaderError(f"{c.path}: no STAT (variance) extension; detection and PSF fitting need it")
            s = s.astype(float)
            ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
            layer_ok = ok.reshape(i1 - i0, -1).mean(axis=1) > 0.5
            for j in np.nonzero(layer_ok)[0]:
                b = band_of[i0 + j]
                s_d[b] += np.where(ok[j], d[j], 0.0)
                s_v[b] += np.where(ok[j], s[j], 0.0)
                cnt[b] += ok[j]
                wsum[b] += c.wave[i0 + j]
                wn[b] += 1
        keep = wn > 0
        if not keep.any():
            raise ReaderError(f"{c.path}: every layer is NaN or has no usable STAT")
        with np.errstate(invalid="ignore", divide="ignore"):
            full = cnt >= 0.8 * wn[:, None, None]
            imgs = np.where(full, s_d / cnt, np.nan)[keep]
            vars_ = np.where(full, s_v / cnt**2, np.nan)[keep]
        waves = (wsum / np.maximum(wn, 1))[keep]
        ok = np.all(np.isfinite(imgs) & np.isfinite(vars_) & (vars_ > 0), axis=0)
        iv = np.where(ok, 1.0 / np.where(np.isfinite(vars_) & (vars_ > 0), vars_, 1.0), 0.0)
        # white light: mean of the bands weighted by each band's median inverse variance (one weight per band,
        # so the white-light PSF is the same everywhere)
        wb = np.array([np.median(v[ok]) for v in iv]) if ok.any() else np.ones(len(imgs))
        wb = wb / wb.sum()
        white = np.where(ok, np.tensordot(wb, np.where(ok, imgs, 0.0), 1), np.nan)
        wvar = np.where(ok, np.tensordot(wb**2, np.where(ok, vars_, 0.0), 1), np.nan)
        return waves, imgs, vars_, white, wvar

    # ------------------------------------------------------------------ fitting helpers
    def _measure_psf(self, img, var, x, y, flux, shape0):
        """Moffat shape of ``img`` from its brightest peaks, all given stars modelled."""
        cfg = self.config
        order = np.argsort(-flux)
        fw = []
        for i in order[:cfg.psf_stars]:
            r = _fit_single(img, var, x[i], y[i], shape0[0], shape0[1], 2)
            if np.isfinite(r[2]):
                fw.append(r[2])
        p0 = np.array(shape0, float)
        if len(fw) >= 3:
            # unmodelled neighbours only ever broaden a single-star fit: take the sharper quartile
            p0[0] = float(np.percentile(fw, 25))
        return p0

    def _joint_fit(self, img, var, x, y, shape_p, refine=True):
        """All stars at once: fluxes, flux errors, sky, positions (one Gauss-Newton position step per call)."""
        cfg = self.config
        ny, nx = img.shape
        mask = np.isfinite(img) & np.isfinite(var) & (var > 0)
        w = np.where(mask, 1.0 / np.where(mask, var, 1.0), 0.0).ravel()
        d = np.where(mask, img, 0.0).ravel()
        radius = min(4.0 * shape_p[0], 20.0)
        psf = _shape_psf(shape_p)
        S = sp.csc_matrix(_sky_columns((ny, nx), cfg.sky_order, mask))
        n = len(x)
        f = np.zeros(n)
        for it in range(4 if refine else 1):
            cen = (np.rint(x), np.rint(y))
            A = psf_design_matrix(psf, x, y, 0.0, (ny, nx), radius, 2, valid=mask, centres=cen)
            cols = [A, S]
            if refine and it > 0:
                h = 1e-3
                gx = (psf_design_matrix(psf, x + h, y, 0.0, (ny, nx), radius, 2, valid=mask, centres=cen) - A) / h
                gy = (psf_design_matrix(psf, x, y + h, 0.0, (ny, nx), radius, 2, valid=mask, centres=cen) - A) / h
                fpos = np.maximum(f, 0.0)
                cols += [gx @ sp.diags(fpos), gy @ sp.diags(fpos)]
            M = sp.hstack(cols, format="csc")
            MW = M.multiply(w[:, None]).tocsc()
            N = (M.T @ MW).tocsc()
            dg = N.diagonal()
            N = N + sp.diags(np.where(dg > 0, 1e-9 * dg, 1.0))
            lu = spla.splu(N, permc_spec="COLAMD")
            sol = lu.solve(np.asarray(MW.T @ d).ravel())
            f = sol[:n]
            sky = sol[n:n + S.shape[1]]
            if refine and it > 0:
                k = n + S.shape[1]
                x = x + np.clip(sol[k:k + n], -0.5, 0.5) * (f > 0)
                y = y + np.clip(sol[k + n:k + 2 * n], -0.5, 0.5) * (f > 0)
        # flux errors: diagonal of the inverse normal matrix of the final linear problem
        cen = (np.rint(x), np.rint(y))
        A = psf_design_matrix(psf, x, y, 0.0, (ny, nx), radius, 2, valid=mask, centres=cen)
        M = sp.hstack([A, S], format="csc")
        MW = M.multiply(w[:, None]).tocsc()
        N = (M.T @ MW).tocsc()
        dg = N.diagonal()
        N = N + sp.diags(np.where(dg > 0, 1e-9 * dg, 1.0))
        lu = spla.splu(N, permc_spec="COLAMD")
        sol = lu.solve(np.asarray(MW.T @ d).ravel())
        f, sky = sol[:n], sol[n:]
        ferr = np.empty(n)
        for i0 in range(0, n, 256):
            i1 = min(n, i0 + 256)
            E = np.zeros((N.shape[0], i1 - i0))
            E[np.arange(i0, i1), np.arange(i1 - i0)] = 1.0
            ferr[i0:i1] = np.sqrt(np.maximum(lu.solve(E)[np.arange(i0, i1), np.arange(i1 - i0)], 0.0))
        model = (A @ f + S @ sky).reshape(ny, nx)
        return x, y, f, ferr, model, (S @ sky).reshape(ny, nx)

    # ------------------------------------------------------------------ entry point
    def __call__(self, cube) -> Table:
        cfg = self.config
        own = not isinstance(cube, MuseCube)
        c = open_cube(cube) if own else cube
        try:
            waves, imgs, vars_, white, wvar = self.band_images(c)
            ny, nx = white.shape
            ok = np.isfinite(white) & np.isfinite(wvar) & (wvar > 0)
            if ok.sum() < 9:
                raise ReaderError(f"{c.path}: fewer than 9 usable spaxels; nothing to detect")
            fwhm0 = cfg.fwhm_guess / _pixscale_arcsec(c)
            shape0 = np.array([fwhm0, cfg.beta_guess, 0.0, 0.0])
            box = max(3, int(2 * np.ceil(0.5 * fwhm0)) + 1)
            bkg = _background(white, ok, max(8, int(round(8 * fwhm0))))
            # first peaks with the guessed PSF, then the white-light PSF measured on them
            snr, fl, _ = matched_filter_snr(white - bkg, wvar, _kernel(shape0, fwhm0))
            x, y, _ = _peaks(snr, cfg.threshold, box)
            shape_w = self._measure_psf(white - bkg, wvar, x, y, np.nan_to_num(fl[y.astype(int), x.astype(int)]),
                                        shape0) if x.size else shape0
            fwhm = float(shape_w[0])
            box = 3
            # pass 1: white light and each band with its own PSF-matched filter
            snr, _, _ = matched_filter_snr(white - bkg, wvar, _kernel(shape_w, fwhm))
            x, y, pk = _peaks(snr, cfg.threshold, box)
            cand = [(x, y, pk)]
            if len(imgs) > 1:
                for img, var in zip(imgs, vars_):
                    bb = _background(img, ok, max(8, int(round(8 * fwhm))))
                    sb = self._measure_psf(img - bb, var, x, y, pk, shape_w) if x.size else shape_w
                    s_b, _, _ = matched_filter_snr(img - bb, var, _kernel(sb, float(sb[0])))
                    cand.append(_peaks(s_b, cfg.threshold + cfg.band_penalty, box))
            x, y, pk = self._merge(cand, fwhm)
            passno = np.ones(x.size, int)
            x, y, f, ferr, passno = self._passes(c, white, wvar, ok, x, y, passno, shape_w, 0)
            # the PSF again, now on neighbour-subtracted bright stars, and the passes with it
            for _ in range(2):
                new_shape = self._refine_psf(white, wvar, ok, x, y, f, ferr, shape_w)
                if abs(new_shape[0] - shape_w[0]) <= 0.02 * shape_w[0] and abs(new_shape[1] - shape_w[1]) <= 0.1:
                    break
                shape_w = new_shape
                x, y, f, ferr, passno = self._passes(c, white, wvar, ok, x, y, passno, shape_w,
                                                     int(passno.max(initial=1)))
            return self._table(c, x, y, f, ferr, passno, shape_w, waves)
        finally:
            if own:
                c.close()

    def _passes(self, c, white, wvar, ok, x, y, passno, shape_w, first):
        """Joint fit of all stars, then search the residual for more; until nothing new or ``n_iter`` passes."""
        cfg = self.config
        fwhm = float(shape_w[0])
        f = ferr = np.zeros(0)
        model = sky_model = np.zeros_like(white)
        for it in range(cfg.n_iter):
            if it > 0:  # search the residual of all fitted stars
                res = np.where(ok, white - model, np.nan)
                # PSF-model errors near bright stars are not noise: inflate the variance by them
                eps = self._model_error(res, wvar, model - sky_model, x, y, f, ferr, fwhm)
                rvar = wvar + (eps * np.maximum(model - sky_model, 0.0)) ** 2
                s_r, _, _ = matched_filter_snr(res, rvar, _kernel(shape_w, fwhm))
                xn, yn, pn = _peaks(s_r, cfg.threshold, 3)
                if xn.size and x.size:
                    dmin = np.min(np.hypot(xn[:, None] - x[None, :], yn[:, None] - y[None, :]), axis=1)
                    new = dmin > cfg.min_separation * fwhm
                    xn, yn, pn = xn[new], yn[new], pn[new]
                if not xn.size:
                    break
                x, y = np.concatenate([x, xn]), np.concatenate([y, yn])
                passno = np.concatenate([passno, np.full(xn.size, first + it + 1)])
            if not x.size:
                break
            if x.size > cfg.max_sources:
                raise ReaderError(f"{c.path}: more than {cfg.max_sources} detections; raise the threshold")
            x, y, f, ferr, model, sky_model = self._joint_fit(white, wvar, x, y, shape_w)
            keep = self._prune(x, y, f, ferr, ok, fwhm)
            x, y, f, ferr, passno = x[keep], y[keep], f[keep], ferr[keep], passno[keep]
            if x.size:
                x, y, f, ferr, model, sky_model = self._joint_fit(white, wvar, x, y, shape_w, refine=False)
        return x, y, f, ferr, passno

    def _model_error(self, res, var, stars, x, y, f, ferr, fwhm):
        """Fractional PSF-model error: excess residual variance over the noise within 1 FWHM of bright stars.

        ``eps^2 = median((res^2 - var) / stars^2)`` over those pixels, at least ``model_error``.
        """
        floor = self.config.model_error
        bright = f > 50 * ferr
        if bright.sum() < 2:
            return floor
        ny, nx = res.shape
        yy, xx = np.mgrid[:ny, :nx]
        near = np.zeros((ny, nx), bool)
        for i in np.nonzero(bright)[0]:
            near |= (xx - x[i]) ** 2 + (yy - y[i]) ** 2 < fwhm**2
        use = near & np.isfinite(res) & (stars > 0)
        if use.sum() < 10:
            return floor
        e2 = np.median((res[use] ** 2 - var[use]) / stars[use] ** 2)
        return float(max(floor, np.sqrt(max(e2, 0.0)))) if np.isfinite(e2) else floor

    def _refine_psf(self, white, wvar, ok, x, y, f, ferr, shape_w):
        """Moffat (FWHM, beta, ellipticity) fitted jointly to the brightest stars, all other stars subtracted."""
        cfg = self.config
        if x.size < 3:
            return shape_w
        ny, nx = white.shape
        fw0 = float(shape_w[0])
        radius = min(4.0 * fw0, 20.0)
        A = psf_design_matrix(_shape_psf(shape_w), x, y, 0.0, (ny, nx), radius, 2, valid=ok)
        sel = []
        for i in np.argsort(-f):  # bright, well measured, stamps (2 FWHM) not overlapping
            if len(sel) >= cfg.psf_stars or not f[i] > 20 * ferr[i]:
                break
            if all(np.hypot(x[i] - x[j], y[i] - y[j]) > 4.0 * fw0 for j in sel):
                sel.append(i)
        if len(sel) < 3:
            return shape_w
        others = np.ones(x.size, bool)
        others[sel] = False
        img = np.where(ok, white - (A[:, others] @ f[others]).reshape(ny, nx), np.nan)
        p = _fit_shape(img, wvar, x[sel], y[sel], np.asarray(shape_w, float), 2)
        if p is None or not 0.5 * fw0 < p[0] < 2.0 * fw0:
            return shape_w
        return np.asarray(p, float)

    # ------------------------------------------------------------------ bookkeeping
    def _merge(self, cand, fwhm):
        x = np.concatenate([c[0] for c in cand])
        y = np.concatenate([c[1] for c in cand])
        pk = np.concatenate([c[2] for c in cand])
        order = np.argsort(-pk)
        kx, ky, kp = [], [], []
        for i in order:
            if kx and np.min(np.hypot(np.array(kx) - x[i], np.array(ky) - y[i])) <= max(1.0, self.config.min_separation
                                                                                       * fwhm):
                continue
            kx.append(x[i])
            ky.append(y[i])
            kp.append(pk[i])
        return np.array(kx, float), np.array(ky, float), np.array(kp, float)

    def _prune(self, x, y, f, ferr, ok, fwhm):
        """Drop faint fits (flux below threshold x error), stars off the usable field, and merge close pairs."""
        ny, nx = ok.shape
        xi, yi = np.clip(np.rint(x).astype(int), 0, nx - 1), np.clip(np.rint(y).astype(int), 0, ny - 1)
        keep = np.isfinite(f) & (f > self.config.threshold * ferr) & ok[yi, xi]
        keep &= (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
        idx = np.nonzero(keep)[0]
        for i in idx[np.argsort(-f[idx])]:
            if not keep[i]:
                continue
            close = keep & (np.hypot(x - x[i], y - y[i]) < self.config.min_separation * fwhm) & (f <= f[i])
            close[i] = False
            keep[close] = False
        return keep

    def _table(self, c, x, y, f, ferr, passno, shape_w, waves) -> Table:
        cfg = self.config
        order = np.argsort(-f) if f.size else np.zeros(0, int)
        x, y, f, ferr, passno = x[order], y[order], f[order], ferr[order], passno[order]
        ra, dec = c.wcs.pixel_to_world_values(x, y) if x.size else (np.zeros(0), np.zeros(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mag = cfg.zeropoint - 2.5 * np.log10(f)
            mag_err = 2.5 / np.log(10) * ferr / f
        t = Table()
        t["stellar_id"] = Column([f"det{i + 1:05d}" for i in range(x.size)], dtype="<U16",
                                 description="identifier of the detected star (brightest first)")
        t["x"] = Column(x, unit="pix", description="0-based cube pixel x (PSF fit on the white-light image)")
        t["y"] = Column(y, unit="pix", description="0-based cube pixel y")
        t["ra"] = Column(np.asarray(ra, float), unit="deg", description="right ascension from the cube WCS")
        t["dec"] = Column(np.asarray(dec, float), unit="deg", description="declination from the cube WCS")
        t["mag"] = Column(mag, unit="mag", description=f"white-light PSF magnitude, zeropoint {cfg.zeropoint} "
                                                           "(1 flux unit/Angstrom mean over the cube)")
        t["mag_err"] = Column(mag_err, unit="mag", description="magnitude error from the joint PSF fit")
        t["flux"] = Column(f, description="white-light PSF flux (cube flux units per Angstrom, mean over the cube)")
        t["flux_err"] = Column(ferr, description="error of flux (all stars and the sky fitted together)")
        t["snr"] = Column(f / np.where(ferr > 0, ferr, np.nan), description="flux / flux_err of the PSF fit")
        t["detected"] = Column(passno.astype(np.int16),
                               description="detection pass (1: first, >1: found in the residual of the fitted stars)")
        t.meta["DETECTOR"] = "musepayne.extract.detect"
        t.meta["FWHM_PX"] = round(float(shape_w[0]), 4)
        t.meta["BETA"] = round(float(shape_w[1]), 4)
        t.meta["THRESH"] = cfg.threshold
        t.meta["NBANDS"] = len(waves)
        return t
