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
5. *Extraction-residual passes.*  The white-light PSF is one Moffat for a colour-dependent mixture
   of the layers' PSFs, too coarse at high S/N to split pairs closer than ~1 FWHM.  So all stars
   found so far are extracted layer by layer with the wavelength-dependent PSF
   (:class:`~musepayne.extract.extractor.Extractor`), an unmodelled point source is fitted to the
   layer-summed residual near each (:func:`~musepayne.extract.hidden.hidden_light`), and those
   above ``threshold`` (noise and a PSF-model error of the fitted light) are added
   (``residual_passes`` times, or until none is found).
6. *Close pairs.*  A star that is two stars closer than ~0.5 FWHM (one peak in every image) is
   split when the broad-band images say so: each star with S/N above ``2 threshold`` is fitted,
   its neighbours subtracted, with one point source and with two, positions common to the bands and
   fluxes free per band (:func:`~musepayne.extract.pairs.fit_pair`, the extraction's
   wavelength-dependent PSF at each band's wavelength); a pair of different colours has
   band-dependent flux ratios that one source cannot follow.  The split is kept when the
   improvement ``chi2_1 - chi2_2`` exceeds ``split_chi2`` (noise and a PSF-model error
   ``split_model_error`` of the stars' light in the weights; in units of the two-source fit's reduced
   chi-square where that exceeds 1, e.g. with unmodelled faint neighbours in the stamp), the two are between
   ``split_min_separation`` and ``split_max_separation`` FWHM apart and each passes ``threshold``
   (its band-summed flux over its error) and lies more than ``min_separation`` from every other
   star.
7. *Magnitudes.*  ``mag = zeropoint - 2.5 log10(flux)`` with ``flux`` the
   fitted white-light flux (cube flux units per Angstrom, mean over the
   cube's wavelength range); the default zero point is the simulator's
   convention, so simulated magnitudes and detected ones compare directly.

Length: over 600 lines because :class:`DetectConfig` documents each of its ~25 settings and the
:class:`Detector` passes (images, PSF, matched filter, iterated photometry, pair splitting, caps) share its state;
the array helpers are module functions that tests call directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from astropy.stats import SigmaClip
from astropy.table import Column, Table
from photutils.background import Background2D, MedianBackground
from photutils.detection import find_peaks
from scipy.ndimage import correlate
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from ..io.cube import MuseCube, open_cube
from ..io.spectra import ReaderError
from .extractor import ExtractConfig, Extractor
from .fields import _pixscale_arcsec
from .hidden import HIDDEN_MODEL_ERROR
from .imagefit import _shape_psf, _sky_columns
from .linsolve import factorise, normal_matrix
from .pairs import fit_pair
from .psf import _integrate, psf_design_matrix
from .transform import _fit_single, _stamp

__all__ = ["DetectConfig", "Detector", "matched_filter_snr", "model_flux_error"]


@dataclass(frozen=True)
class DetectConfig:
    """Detection settings (the ``[detect]`` table of a run configuration).

    Lengths are in FWHM of the white-light PSF unless the name says otherwise.

    Parameters
    ----------
    threshold : float
        S/N of a detection: matched-filter S/N of a peak, and fitted flux over its error (including
        the PSF-model error of the neighbours' light) of a kept star (> 0).
    band_penalty : float
        Extra S/N a peak found only in one broad band must reach (>= 0; pays for the extra trials).
    n_bands : int
        Broad bands across the cube (>= 1).
    n_iter : int
        Detection passes; the later ones search the residual of the fitted stars (>= 1).
    model_error : float
        Fractional PSF-model error floor added to the noise of the neighbours' light (>= 0).
    min_separation : float
        Pairs closer than this (FWHM) are merged, the fainter dropped (> 0).
    fwhm_guess : float
        Arcsec; the first peaks are found with it, then the PSF is measured (> 0).
    beta_guess : float
        Moffat beta of the first guess (> 1).
    psf_stars : int
        Bright stars used for the PSF fit (>= 3).
    sky_order : int
        Sky polynomial of the joint fit (-1: none, 0, 1 or 2).
    zeropoint : float
        Magnitude of 1 flux unit per Angstrom (the simulator's convention).
    block : int
        Layers read at a time (>= 1); fewer on large fields, so a block stays below ``memory_mb``.
    max_sources : int
        Most stars fitted together (>= 1).  Beyond it only the highest-S/N candidates are kept,
        with a warning (``meta['warnings']``, ``meta['TRUNC']``): a bound on memory and work
        for noise-dominated or hostile cubes.
    memory_mb : float
        Rough bound (MB) on the arrays of one block of layers while the images are built (> 0).
    psf_radius : float
        Radius (FWHM) of the PSF model in the joint fits (> 0).
    psf_radius_max : float
        The PSF model radius in pixels at most (> 0).
    beta_error_max : float
        The Moffat beta is refitted on the neighbour-subtracted bright stars only when its error
        is below this; otherwise it keeps ``beta_guess`` (> 0).
    residual_passes : int
        Extraction passes after the white-light passes (>= 0; 0: none): all stars found so far are extracted
        layer by layer with the wavelength-dependent PSF (:class:`~musepayne.extract.extractor.Extractor`,
        default settings, no transform), and an unmodelled point source fitted to the layer-summed residual
        near a star (:func:`~musepayne.extract.hidden.hidden_light`) is added when its flux passes
        ``threshold`` times its error (noise and ``residual_error`` of the star's flux): close pairs the
        white-light PSF (a colour-dependent mixture of the layers' PSFs) cannot split.
    residual_error : float
        Fractional PSF-model error of a star's flux in the residual search (>= 0).
    split_pairs : bool
        Test every star with S/N above ``2 threshold`` for an unresolved companion and split it when the
        broad bands say so (module docstring, step 6; needs ``n_bands >= 2``: the colour is what separates a close
        pair).
    split_chi2 : float
        Least improvement ``chi2_1 - chi2_2`` of the two-source fit over the one-source fit for a split, divided by
        the two-source fit's reduced chi-square where that exceeds 1 (> 0; ``K + 2`` more parameters for ``K``
        bands, and the companion's position searched).  Chosen on the
        development fields of ``benchmarks/detect_vs_catalogue.py`` (seeds 7, 11, 12).
    split_min_separation : float
        FWHM; no companion is searched closer than this, and a split whose components end closer is refused
        (> 0; there the two-source fit is degenerate).
    split_max_separation : float
        FWHM; the companion is searched up to this separation (> ``split_min_separation``; wider pairs are two
        peaks for the matched filter and the residual passes).
    split_model_error : float
        Fractional PSF-model error per pixel of the stars' fitted light in each band, in the weights of the pair
        fits (>= 0; as :data:`~musepayne.extract.hidden.HIDDEN_MODEL_ERROR`): a bright single star's imperfect
        PSF model is not a companion.
    split_radius : float
        FWHM; radius of the stamp the pair fits see (> ``split_max_separation``): the star's core, so that the light
        of unlisted stars farther out does not pull the companion.
    """

    threshold: float = 5.0
    band_penalty: float = 1.0
    n_bands: int = 4
    n_iter: int = 12
    model_error: float = 0.03
    min_separation: float = 0.5
    fwhm_guess: float = 0.8
    beta_guess: float = 2.5
    psf_stars: int = 30
    sky_order: int = 1
    zeropoint: float = 28.9
    block: int = 200
    max_sources: int = 2000
    memory_mb: float = 512.0
    psf_radius: float = 4.5
    psf_radius_max: float = 16.0
    beta_error_max: float = 0.1
    residual_passes: int = 3
    residual_error: float = HIDDEN_MODEL_ERROR
    split_pairs: bool = True
    split_chi2: float = 30.0
    split_min_separation: float = 0.2
    split_max_separation: float = 0.7
    split_model_error: float = HIDDEN_MODEL_ERROR
    split_radius: float = 1.7

    @property
    def split_pass(self) -> int:
        """The ``detected`` pass number of a split pair's companion: ``n_iter + residual_passes + 1``."""
        return self.n_iter + self.residual_passes + 1

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("threshold", "min_separation", "fwhm_guess", "memory_mb", "psf_radius", "psf_radius_max",
                     "beta_error_max", "split_chi2", "split_min_separation", "split_max_separation"):
            if not _finite(getattr(self, name)) or not getattr(self, name) > 0:
                bad(name, "a finite number > 0")
        for name in ("band_penalty", "model_error", "residual_error", "split_model_error"):
            if not _finite(getattr(self, name)) or not getattr(self, name) >= 0:
                bad(name, "a finite number >= 0")
        if not _finite(self.zeropoint):
            bad("zeropoint", "a finite number")
        if not _finite(self.beta_guess) or not self.beta_guess > 1:
            bad("beta_guess", "a finite number > 1")
        for name, lo in (("n_bands", 1), ("n_iter", 1), ("psf_stars", 3), ("block", 1), ("max_sources", 1),
                         ("residual_passes", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                bad(name, f"an integer >= {lo}")
        if isinstance(self.sky_order, bool) or self.sky_order not in (-1, 0, 1, 2):
            bad("sky_order", "-1, 0, 1 or 2")
        if not isinstance(self.split_pairs, (bool, np.bool_)):
            bad("split_pairs", "true or false")
        if not self.split_max_separation > self.split_min_separation:
            bad("split_max_separation", f"> split_min_separation = {self.split_min_separation}")
        if not _finite(self.split_radius) or not self.split_radius > self.split_max_separation:
            bad("split_radius", f"a finite number > split_max_separation = {self.split_max_separation}")


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _fit_shape(img, var, xs, ys, p0, oversample, free=(True, True, True, True)):
    """Joint fit of (fwhm, beta, e1, e2) to several stars at fixed positions (flux, sky linear per star).

    Only the ``free`` parameters are fitted (the others keep ``p0``).  Returns ``(params, errors)``
    (errors from the Jacobian, scaled by the reduced chi-square; NaN for fixed parameters) or None.
    """
    h = int(np.ceil(2.0 * p0[0]))
    stamps = [s for s in (_stamp(img, var, x, y, h) for x, y in zip(xs, ys)) if s[2].size >= 12]
    if not stamps:
        return None
    free = np.asarray(free, bool)
    p0 = np.asarray(p0, float)

    def full(q):
        p = p0.copy()
        p[free] = q
        return p

    def resid(q):
        p = full(q)
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

    lo = np.array([0.5, 1.2, -0.5, -0.5])[free]
    hi = np.array([4 * p0[0] + 5, 10, 0.5, 0.5])[free]
    try:
        r = least_squares(resid, np.clip(p0[free], lo + 1e-9, hi - 1e-9), bounds=(lo, hi),
                          x_scale=np.array([0.05, 0.1, 0.01, 0.01])[free], max_nfev=80)
    except Exception:
        return None
    if not r.success:
        return None
    err = np.full(4, np.nan)
    try:
        dof = max(1, r.fun.size - free.sum() - 2 * len(stamps))
        cov = np.linalg.inv(r.jac.T @ r.jac) * max(1.0, float(r.fun @ r.fun) / dof)
        err[free] = np.sqrt(np.maximum(np.diag(cov), 0.0))
    except np.linalg.LinAlgError:
        pass
    return full(r.x), err


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

    Parameters
    ----------
    img, var : numpy.ndarray, shape (ny, nx)
        Image (flux units) and its variance (flux units squared).
    kernel : numpy.ndarray, shape (k, k)
        The PSF ``P`` (odd size, centred, normalised to sum 1).

    Returns
    -------
    snr, flux, flux_err : numpy.ndarray, shape (ny, nx)
        S/N, optimal flux and its error (flux units) of a star centred on each pixel (NaN where unusable).
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


def model_flux_error(A, w, f, eps):
    """Error of each star's PSF flux caused by a fractional PSF-model error ``eps`` of the other stars' light.

    With the other stars' model ``M_i = sum_j f_j a_j - f_i a_i`` uncertain by ``eps M_i`` per pixel,
    the optimal flux ``sum(a w d) / sum(a^2 w)`` of star ``i`` gets the variance
    ``eps^2 sum(a^2 w^2 M_i^2) / (sum(a^2 w))^2``.

    Parameters
    ----------
    A : scipy.sparse matrix, shape (n_pix, n_stars)
        Pixel-integrated PSF of each star (columns).
    w : numpy.ndarray, shape (n_pix,)
        Inverse variance of each pixel (0: unusable).
    f : numpy.ndarray, shape (n_stars,)
        Fitted fluxes (negative ones count as 0 in the neighbours' light).
    eps : float
        Fractional PSF-model error.

    Returns
    -------
    numpy.ndarray, shape (n_stars,)
        Flux error (flux units) from the neighbours' model error; 0 for an isolated star.
    """
    A = sp.csc_matrix(A)
    fp = np.maximum(np.asarray(f, float), 0.0)
    if not A.shape[1] or not eps > 0:
        return np.zeros(A.shape[1])
    m = A @ fp
    A2 = A.multiply(A).tocsc()
    w2 = w * w
    num = (A2.T @ (w2 * m * m) - 2.0 * fp * (A2.multiply(A).T @ (w2 * m)) + fp**2 * (A2.multiply(A2).T @ w2))
    den = A2.T @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = eps * np.sqrt(np.maximum(num, 0.0)) / den
    return np.where(den > 0, out, 0.0)


def _disc_mask(shape, x, y, r):
    """Boolean image: pixels within ``r`` of any of the points ``x, y`` (work ~ points x r^2, not x pixels)."""
    ny, nx = shape
    near = np.zeros((ny, nx), bool)
    if not np.size(x):
        return near
    h = int(np.ceil(r))
    k = np.arange(-h, h + 1)
    ox, oy = np.meshgrid(k, k)
    xi = np.rint(np.asarray(x, float)).astype(np.int64)[:, None] + ox.ravel()[None, :]
    yi = np.rint(np.asarray(y, float)).astype(np.int64)[:, None] + oy.ravel()[None, :]
    use = ((xi - np.asarray(x, float)[:, None]) ** 2 + (yi - np.asarray(y, float)[:, None]) ** 2 < r * r)
    use &= (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
    near[yi[use], xi[use]] = True
    return near


def _thin(x, y, rank, sep):
    """Mask keeping, of points closer than ``sep``, the one with the highest ``rank`` (greedy, highest first)."""
    n = len(x)
    keep = np.zeros(n, bool)
    if not n:
        return keep
    tree = cKDTree(np.column_stack([x, y]))
    gone = np.zeros(n, bool)
    for i in np.argsort(-np.asarray(rank, float), kind="stable"):
        if gone[i]:
            continue
        keep[i] = True
        gone[tree.query_ball_point((x[i], y[i]), sep)] = True
    return keep


def _cap_note(c, n):
    return (f"{c.path}: more candidate stars than max_sources = {n} (a noise-dominated or damaged cube, or a "
            "threshold too low); only the highest-S/N ones were fitted")


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


def _peaks(snr, threshold, box, limit=None):
    s = np.where(np.isfinite(snr), snr, -np.inf)
    if not np.isfinite(s).any() or np.nanmax(snr) < threshold:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = find_peaks(np.where(np.isfinite(s), s, np.nanmin(snr)), threshold, box_size=box,
                       mask=~np.isfinite(snr))
    if t is None:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    x, y, p = (np.asarray(t["x_peak"], float), np.asarray(t["y_peak"], float), np.asarray(t["peak_value"], float))
    if limit is not None and p.size > limit:  # bounded work on noise-dominated maps: the highest peaks
        best = np.argsort(-p, kind="stable")[:limit]
        x, y, p = x[best], y[best], p[best]
    return x, y, p


def _weighted_solve(M, w, d, shape, border=(), need_diag=False):
    """Weighted linear least squares ``min |sqrt(w) (M p - d)|^2`` by the normal equations.

    The normal matrix (:func:`~musepayne.extract.linsolve.normal_matrix`: a relative ridge of 1e-9
    on its diagonal, 1 where a column is empty) is factorised by
    :func:`~musepayne.extract.linsolve.factorise`: stars coupled only through shared pixels, so
    connected components, each by dense or envelope Cholesky, with the ``border`` columns (the
    sky, coupled to every star) by their Schur complement (the extraction's solver; SuperLU with
    a COLAMD ordering took 5-10x longer on crowded images).  Returns ``(p, diag)``: the solution
    and, with ``need_diag``, the diagonal of the inverse normal matrix (else None).
    """
    MW = M.multiply(w[:, None]).tocsc()
    N, _ = normal_matrix(M, w, shape, 1e-9, AW=MW)
    solve, diag = factorise(N, border=np.asarray(border, dtype=np.int64), need_diag=need_diag)
    return solve(np.asarray(MW.T @ d).ravel()), diag


class Detector:
    """Configure once with :class:`DetectConfig`; call on a cube to get the detected star list.

    Parameters
    ----------
    config : DetectConfig
        Detection settings.

    Notes
    -----
    ``Detector(config)(cube)`` takes a path or an open :class:`~musepayne.io.cube.MuseCube` and returns
    the table described in the module docstring; ``meta['warnings']`` lists what was bounded
    (``meta['TRUNC']``: the candidate list hit ``max_sources``), and the same sentences are issued as
    :class:`UserWarning`.
    """

    def __init__(self, config: DetectConfig = DetectConfig()):
        self.config = config

    # ------------------------------------------------------------------ images
    def band_images(self, c: MuseCube):
        """Band means over the usable layers, their variances and the white-light image.

        Parameters
        ----------
        c : MuseCube
            The open cube (``DATA`` and ``STAT`` are streamed in blocks of layers).

        Returns
        -------
        waves : numpy.ndarray, shape (n_bands,)
            Mean wavelength of each band (Angstrom, the cube's frame).
        imgs, vars : numpy.ndarray, shape (n_bands, ny, nx)
            Band images (mean flux per layer) and their variances (NaN where too few layers are usable).
        white, white_var : numpy.ndarray, shape (ny, nx)
            Inverse-variance weighted mean of the bands and its variance.
        """
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
        # layers per block: at most cfg.block, and few enough that the block's float arrays stay below memory_mb
        block = int(max(1, min(cfg.block, cfg.memory_mb * 2**20 // (3 * 8 * max(1, ny * nx)))))
        for i0 in range(0, nz, block):
            i1 = min(nz, i0 + block)
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
        radius = min(cfg.psf_radius * shape_p[0], cfg.psf_radius_max)
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
            sol, _ = _weighted_solve(sp.hstack(cols, format="csc"), w, d, (ny, nx), border=np.arange(n, n + S.shape[1]))
            f = sol[:n]
            sky = sol[n:n + S.shape[1]]
            if refine and it > 0:
                k = n + S.shape[1]
                x = x + np.clip(sol[k:k + n], -0.5, 0.5) * (f > 0)
                y = y + np.clip(sol[k + n:k + 2 * n], -0.5, 0.5) * (f > 0)
        # flux errors: diagonal of the inverse normal matrix of the final linear problem
        cen = (np.rint(x), np.rint(y))
        A = psf_design_matrix(psf, x, y, 0.0, (ny, nx), radius, 2, valid=mask, centres=cen)
        sol, ninv = _weighted_solve(sp.hstack([A, S], format="csc"), w, d, (ny, nx),
                                    border=np.arange(n, n + S.shape[1]), need_diag=True)
        f, sky = sol[:n], sol[n:]
        ferr = np.sqrt(np.maximum(ninv[:n], 0.0))
        model = (A @ f + S @ sky).reshape(ny, nx)
        return x, y, f, ferr, model, (S @ sky).reshape(ny, nx), (A, w)

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
            lim = 4 * cfg.max_sources
            x, y, _ = _peaks(snr, cfg.threshold, box, lim)
            shape_w = self._measure_psf(white - bkg, wvar, x, y, np.nan_to_num(fl[y.astype(int), x.astype(int)]),
                                        shape0) if x.size else shape0
            fwhm = float(shape_w[0])
            box = 3
            # pass 1: white light and each band with its own PSF-matched filter
            snr, _, _ = matched_filter_snr(white - bkg, wvar, _kernel(shape_w, fwhm))
            x, y, pk = _peaks(snr, cfg.threshold, box, lim)
            cand = [(x, y, pk)]
            if len(imgs) > 1:
                for img, var in zip(imgs, vars_):
                    bb = _background(img, ok, max(8, int(round(8 * fwhm))))
                    sb = self._measure_psf(img - bb, var, x, y, pk, shape_w) if x.size else shape_w
                    s_b, _, _ = matched_filter_snr(img - bb, var, _kernel(sb, float(sb[0])))
                    cand.append(_peaks(s_b, cfg.threshold + cfg.band_penalty, box, lim))
            x, y, pk = self._merge(cand, fwhm)
            notes = set()
            if x.size > cfg.max_sources:  # bounded work: the highest-S/N peaks only
                notes.add(_cap_note(c, cfg.max_sources))
                best = np.argsort(-pk, kind="stable")[:cfg.max_sources]
                x, y, pk = x[best], y[best], pk[best]
            x1, y1 = x, y
            passno = np.ones(x.size, int)
            x, y, f, ferr, passno = self._passes(c, white, wvar, ok, x, y, passno, shape_w, 0, notes)
            # the PSF again (FWHM, beta, ellipticity), now on neighbour-subtracted bright stars; the passes are
            # redone from the first-pass peaks with it, so residual peaks of the first PSF's errors do not stay
            for _ in range(0 if notes else 3):  # no refinement of a capped (noise-dominated) list
                new_shape = self._refine_psf(white, wvar, ok, x, y, f, ferr, shape_w)
                d = np.abs(np.asarray(new_shape) - shape_w)
                if not d.any():
                    break
                shape_w = new_shape
                x, y, f, ferr, passno = self._passes(c, white, wvar, ok, x1, y1, np.ones(x1.size, int), shape_w, 0,
                                                     notes)
                if d[0] <= 0.005 * shape_w[0] and d[1] <= 0.02 and max(d[2], d[3]) <= 0.005:
                    break
            if not notes and x.size:  # no extraction passes on a capped (noise-dominated) list
                x, y, f, ferr, passno, psf = self._residual_passes(c, white, wvar, ok, x, y, f, ferr, passno,
                                                                   shape_w)
                if cfg.split_pairs and len(imgs) >= 2:
                    if psf is None:  # no extraction pass ran: the wavelength-dependent PSF from one extraction
                        psf = self._extraction(c, x, y, f).psf
                    x, y, f, ferr, passno = self._split(imgs, vars_, waves, psf, x, y, f, ferr, passno, shape_w)
            for note in sorted(notes):
                warnings.warn(note, UserWarning, stacklevel=2)
            t = self._table(c, x, y, f, ferr, passno, shape_w, waves)
            t.meta["TRUNC"] = bool(notes)
            t.meta["warnings"] = sorted(notes)
            return t
        finally:
            if own:
                c.close()

    def _passes(self, c, white, wvar, ok, x, y, passno, shape_w, first, notes):
        """Joint fit of all stars, then search the residual for more; until nothing new or ``n_iter`` passes."""
        cfg = self.config
        fwhm = float(shape_w[0])
        f = ferr = np.zeros(0)
        model = sky_model = np.zeros_like(white)
        capped = False
        for it in range(cfg.n_iter):
            if capped:  # the candidate list hit max_sources: no further passes (bounded work)
                break
            if it > 0:  # search the residual of all fitted stars
                res = np.where(ok, white - model, np.nan)
                # PSF-model errors near bright stars are not noise: inflate the variance by them
                eps = self._model_error(res, wvar, model - sky_model, x, y, f, ferr, fwhm)
                rvar = wvar + (eps * np.maximum(model - sky_model, 0.0)) ** 2
                s_r, _, _ = matched_filter_snr(res, rvar, _kernel(shape_w, fwhm))
                xn, yn, pn = _peaks(s_r, cfg.threshold, 3, 4 * cfg.max_sources)
                if xn.size and x.size:
                    dmin = cKDTree(np.column_stack([x, y])).query(np.column_stack([xn, yn]))[0]
                    new = dmin > cfg.min_separation * fwhm
                    xn, yn, pn = xn[new], yn[new], pn[new]
                room = cfg.max_sources - x.size
                if xn.size > room:  # bounded work: the highest-S/N new peaks only
                    notes.add(_cap_note(c, cfg.max_sources))
                    capped = True
                    best = np.argsort(-pn, kind="stable")[:max(room, 0)]
                    xn, yn, pn = xn[best], yn[best], pn[best]
                if not xn.size:
                    break
                x, y = np.concatenate([x, xn]), np.concatenate([y, yn])
                passno = np.concatenate([passno, np.full(xn.size, first + it + 1)])
            if not x.size:
                break
            x, y, f, ferr, model, sky_model, (A, w) = self._joint_fit(white, wvar, x, y, shape_w)
            # significance of each fitted flux against the noise and the PSF-model error of its neighbours'
            # light: residual peaks of bright stars' imperfect PSF model are not stars
            eps = self._model_error(np.where(ok, white - model, np.nan), wvar, model - sky_model, x, y, f, ferr, fwhm)
            keep = self._prune(x, y, f, np.hypot(ferr, model_flux_error(A, w, f, eps)), ok, fwhm)
            x, y, f, ferr, passno = x[keep], y[keep], f[keep], ferr[keep], passno[keep]
            if x.size:
                x, y, f, ferr, model, sky_model, _ = self._joint_fit(white, wvar, x, y, shape_w, refine=False)
        return x, y, f, ferr, passno

    def _residual_passes(self, c, white, wvar, ok, x, y, f, ferr, passno, shape_w):
        """Extract all stars layer by layer; add the unmodelled point sources significant in the residual; repeat."""
        cfg = self.config
        ny, nx = ok.shape
        fwhm = float(shape_w[0])
        n0 = x.size
        psf = None
        for it in range(cfg.residual_passes):
            res = self._extraction(c, x, y, f)
            s, psf = res.sources, res.psf
            hf = np.asarray(s["hidden_flux"], float)
            sn = np.asarray(s["hidden_snr"], float)
            xh, yh = np.asarray(s["hidden_x"], float), np.asarray(s["hidden_y"], float)
            with np.errstate(invalid="ignore"):
                new = (sn > cfg.threshold) & (hf > 0) & np.isfinite(xh) & np.isfinite(yh)
            new &= (xh > -0.5) & (xh < nx - 0.5) & (yh > -0.5) & (yh < ny - 0.5)
            idx = np.nonzero(new)[0]
            idx = idx[ok[np.clip(np.rint(yh[idx]).astype(int), 0, ny - 1), np.clip(np.rint(xh[idx]).astype(int), 0,
                                                                                      nx - 1)]]
            idx = idx[_thin(xh[idx], yh[idx], sn[idx], cfg.min_separation * fwhm)]
            if idx.size:  # not on a star already listed (two stars may point at one hidden source)
                dmin = cKDTree(np.column_stack([x, y])).query(np.column_stack([xh[idx], yh[idx]]))[0]
                idx = idx[dmin > 0.25 * fwhm]
            if not idx.size:
                break
            x, y = np.concatenate([x, xh[idx]]), np.concatenate([y, yh[idx]])
            f = np.concatenate([f, hf[idx]])
            ferr = np.concatenate([ferr, hf[idx] / sn[idx]])
            passno = np.concatenate([passno, np.full(idx.size, cfg.n_iter + 1 + it)])
            # positions of all stars refitted together on the white-light image; a star that would move more
            # than 0.5 FWHM or onto another (pairs the white-light PSF cannot split) keeps its position
            x1, y1, f1, ferr1, *_ = self._joint_fit(white, wvar, x, y, shape_w)
            moved = np.hypot(x1 - x, y1 - y) > 0.5 * fwhm
            dmin = cKDTree(np.column_stack([x1, y1])).query(np.column_stack([x1, y1]), k=2)[0][:, 1]
            back = moved | (dmin < 0.25 * fwhm) | ~(f1 > 0) | (x1 < -0.5) | (x1 > nx - 0.5) | (y1 < -0.5) | (y1 > ny - 0.5)
            x, y = np.where(back, x, x1), np.where(back, y, y1)
        if x.size > n0:  # fluxes of all stars at these positions together (the first ones carried their new neighbours')
            for _ in range(3):
                _, _, f1, ferr1, model, sky_model, (A, w) = self._joint_fit(white, wvar, x, y, shape_w, refine=False)
                # an added star must pass the white-light test too: flux over its error with the PSF-model error of
                # its neighbours' light (the white-light passes' test, without their merging of close pairs)
                eps = self._model_error(np.where(ok, white - model, np.nan), wvar, model - sky_model, x, y, f1, ferr1,
                                        fwhm)
                keep = (f1 > cfg.threshold * np.hypot(ferr1, model_flux_error(A, w, f1, eps))) | (np.arange(x.size) < n0)
                if keep.all():
                    break
                x, y, f, ferr, passno = x[keep], y[keep], f[keep], ferr[keep], passno[keep]
                f1, ferr1 = f1[keep], ferr1[keep]
            good = f1 > 0
            f, ferr = np.where(good, f1, f), np.where(good, ferr1, ferr)
        return x, y, f, ferr, passno, psf

    def _extraction(self, c, x, y, f):
        """Extraction of the stars at ``x, y`` (fluxes ``f``) with the wavelength-dependent PSF, no transform."""
        mag = self.config.zeropoint - 2.5 * np.log10(np.maximum(f, 1e-30))
        src = Table({"stellar_id": [f"s{i}" for i in range(x.size)], "x": x, "y": y, "mag": mag})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Extractor(ExtractConfig(fit_transform=False))(c, src)

    def _split(self, imgs, vars_, waves, psf, x, y, f, ferr, passno, shape_w):
        """Split the close pairs :meth:`split_pairs` finds; the components share the star's white-light flux."""
        cfg = self.config
        fwhm = float(shape_w[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = f / ferr
        t = self.split_pairs(imgs, vars_, waves, psf, x, y, snr, fwhm)
        idx = np.nonzero(np.asarray(t["split"]))[0]
        if not idx.size:
            return x, y, f, ferr, passno
        x, y = x.copy(), y.copy()
        x[idx], y[idx] = np.asarray(t["xa"])[idx], np.asarray(t["ya"])[idx]
        x, y = np.concatenate([x, np.asarray(t["xb"])[idx]]), np.concatenate([y, np.asarray(t["yb"])[idx]])
        passno = np.concatenate([passno, np.full(idx.size, cfg.split_pass)])
        # the two components' white-light fluxes: the star's, shared as in the broad-band fit, with that fit's S/N (a
        # white-light refit is degenerate for a close pair and can hand a neighbour's light to it); the other stars
        # keep theirs
        q = np.asarray(t["frac_b"])[idx]
        fa, fb = f[idx] * (1.0 - q), f[idx] * q
        f = np.concatenate([f, fb])
        ferr = np.concatenate([ferr, fb / np.asarray(t["snr_b"])[idx]])
        f[idx], ferr[idx] = fa, fa / np.asarray(t["snr_a"])[idx]
        return x, y, f, ferr, passno

    def split_pairs(self, imgs, vars_, waves, psf, x, y, snr, fwhm) -> Table:
        """Test each star for an unresolved companion: one point source or two, fitted over the broad bands.

        Every band is fitted with all stars at ``x, y`` (fluxes and sky, the band's PSF from ``psf``); for each
        star with ``snr > 2 threshold`` the others' light is subtracted and :func:`~musepayne.extract.pairs.fit_pair`
        fits a stamp of ``split_radius`` FWHM, weighted by the noise and ``split_model_error``
        times all stars' fitted light.  A split is accepted (column ``split``) as described in the module docstring
        (step 6); of accepted splits whose new components come closer than ``min_separation`` to one another, the
        one with the larger improvement is kept.

        Parameters
        ----------
        imgs, vars_ : numpy.ndarray, shape (K, ny, nx)
            Broad-band images and their variances (:meth:`band_images`; flux units and their square).
        waves : numpy.ndarray, shape (K,)
            Mean wavelength of each band (Angstrom).
        psf : MoffatPSF
            Wavelength-dependent PSF (e.g. an extraction's).
        x, y : numpy.ndarray, shape (n,)
            Star positions (0-based pixels).
        snr : numpy.ndarray, shape (n,)
            White-light S/N of each star (only those above ``2 threshold`` are tested).
        fwhm : float
            Unit of the separations (pixels; the white-light FWHM).

        Returns
        -------
        astropy.table.Table
            One row per star: ``dchi2`` (``chi2_1 - chi2_2``; NaN: not tested), ``lr`` (the statistic tested against
            ``split_chi2``: ``dchi2`` over the reduced ``chi2_2`` where that exceeds 1), ``sep`` (FWHM), ``xa, ya, xb, yb``
            (pixels: the two components, ``a`` the brighter), ``snr_a, snr_b`` (band-summed flux over its error),
            ``frac_b`` (``b``'s share of the band-summed flux) and ``split`` (bool).
        """
        cfg = self.config
        imgs, vars_ = np.asarray(imgs, float), np.asarray(vars_, float)
        x, y = np.asarray(x, float), np.asarray(y, float)
        K, ny, nx = imgs.shape
        ok = np.all(np.isfinite(imgs) & np.isfinite(vars_) & (vars_ > 0), axis=0)
        params = np.column_stack([np.broadcast_to(p, (K,)) for p in psf.params(np.asarray(waves, float))])
        t = Table({k: np.full(x.size, np.nan) for k in ("dchi2", "lr", "sep", "xa", "ya", "xb", "yb", "snr_a",
                                                          "snr_b", "frac_b")})
        t["split"] = np.zeros(x.size, bool)
        test = np.nonzero(np.asarray(snr, float) > 2.0 * cfg.threshold)[0]
        if not test.size:
            return t
        fits = []
        for b in range(K):  # all stars in each band: fluxes, their model (for the neighbours' light) and the sky
            ang = np.deg2rad(params[b, 3])
            shape_b = (params[b, 0], params[b, 1], params[b, 2] * np.cos(2 * ang), params[b, 2] * np.sin(2 * ang))
            _, _, fb, _, model, sky, (A, _) = self._joint_fit(np.where(ok, imgs[b], np.nan), vars_[b], x, y, shape_b,
                                                              refine=False)
            fits.append((fb, model, model - sky, sp.csc_matrix(A)))
        rad = cfg.split_radius * fwhm
        h = int(np.ceil(rad))
        for i in test:
            xi, yi = int(np.rint(x[i])), int(np.rint(y[i]))
            yy, xx = np.mgrid[max(0, yi - h):min(ny, yi + h + 1), max(0, xi - h):min(nx, xi + h + 1)]
            use = ok[yy, xx] & (np.hypot(xx - x[i], yy - y[i]) <= rad)
            yy, xx = yy[use], xx[use]
            pix = yy * nx + xx
            d = np.empty((K, pix.size))
            v = np.empty((K, pix.size))
            for b, (fb, model, stars, A) in enumerate(fits):
                rows, vals = A.indices[A.indptr[i]:A.indptr[i + 1]], A.data[A.indptr[i]:A.indptr[i + 1]]
                at = np.clip(np.searchsorted(pix, rows), 0, max(pix.size - 1, 0))  # pix is sorted (C order)
                hit = pix[at] == rows if pix.size else np.zeros(rows.size, bool)
                own = np.zeros(pix.size)
                own[at[hit]] = fb[i] * vals[hit]
                d[b] = imgs[b][yy, xx] - model[yy, xx] + own
                v[b] = vars_[b][yy, xx] + (cfg.split_model_error * stars[yy, xx]) ** 2
            r = fit_pair(d, v, xx.astype(float), yy.astype(float), params, x[i], y[i], fwhm,
                         cfg.split_min_separation, cfg.split_max_separation)
            if r is None:
                continue
            for k in ("dchi2", "lr", "xa", "ya", "xb", "yb", "snr_a", "snr_b"):
                t[k][i] = r[k]
            t["sep"][i] = r["sep"] / fwhm
            t["frac_b"][i] = r["fb"].sum() / (r["fa"].sum() + r["fb"].sum())
        self._accept_splits(t, x, y, ok, fwhm)
        return t

    def _accept_splits(self, t, x, y, ok, fwhm):
        """Set ``t['split']``: significant, separation in range, both components significant, on the usable field
        and apart from the other stars and the other splits' components (largest improvement first)."""
        cfg = self.config
        ny, nx = ok.shape
        with np.errstate(invalid="ignore"):
            cand = ((t["lr"] > cfg.split_chi2) & (t["sep"] >= cfg.split_min_separation)
                    & (t["sep"] <= cfg.split_max_separation) & (t["snr_a"] > cfg.threshold)
                    & (t["snr_b"] > cfg.threshold))
        px, py = list(x), list(y)
        for i in np.nonzero(cand)[0][np.argsort(-np.asarray(t["lr"])[cand], kind="stable")]:
            new = [(t["xa"][i], t["ya"][i]), (t["xb"][i], t["yb"][i])]
            inside = all(-0.5 < u < nx - 0.5 and -0.5 < w < ny - 0.5 and ok[int(np.rint(w)), int(np.rint(u))]
                         for u, w in new)
            others = np.array([(u, w) for j, (u, w) in enumerate(zip(px, py)) if j != i])
            apart = not others.size or all(np.min(np.hypot(others[:, 0] - u, others[:, 1] - w))
                                           > cfg.min_separation * fwhm for u, w in new)
            if inside and apart:
                t["split"][i] = True
                px[i], py[i] = new[0]
                px.append(new[1][0])
                py.append(new[1][1])

    def _model_error(self, res, var, stars, x, y, f, ferr, fwhm):
        """Fractional PSF-model error: excess residual variance over the noise within 1 FWHM of bright stars.

        ``eps^2 = median((res^2 - var) / stars^2)`` over those pixels, at least ``model_error``.
        """
        floor = self.config.model_error
        bright = f > 50 * ferr
        if bright.sum() < 2:
            return floor
        near = _disc_mask(res.shape, x[bright], y[bright], fwhm)
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
        radius = min(cfg.psf_radius * fw0, cfg.psf_radius_max)
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
        got = _fit_shape(img, wvar, x[sel], y[sel], np.asarray(shape_w, float), 2)
        if got is not None and not got[1][1] <= cfg.beta_error_max:
            # too little light in the wings to measure beta: FWHM and ellipticity only, beta as it was
            got = _fit_shape(img, wvar, x[sel], y[sel], np.asarray(shape_w, float), 2, free=(True, False, True, True))
        if got is None or not 0.5 * fw0 < got[0][0] < 2.0 * fw0:
            return shape_w
        return np.asarray(got[0], float)

    # ------------------------------------------------------------------ bookkeeping
    def _merge(self, cand, fwhm):
        x = np.concatenate([c[0] for c in cand])
        y = np.concatenate([c[1] for c in cand])
        pk = np.concatenate([c[2] for c in cand])
        keep = _thin(x, y, pk, max(1.0, self.config.min_separation * fwhm))
        return x[keep], y[keep], pk[keep]

    def _prune(self, x, y, f, ferr, ok, fwhm):
        """Drop faint fits (flux below threshold x error), stars off the usable field, and merge close pairs."""
        ny, nx = ok.shape
        xi, yi = np.clip(np.rint(x).astype(int), 0, nx - 1), np.clip(np.rint(y).astype(int), 0, ny - 1)
        keep = np.isfinite(f) & (f > self.config.threshold * ferr) & ok[yi, xi]
        keep &= (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
        idx = np.nonzero(keep)[0]
        keep[idx] = _thin(x[idx], y[idx], f[idx], self.config.min_separation * fwhm)
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
                               description="detection pass (1: first, >1: found in the residual of the fitted stars; "
                                           "> n_iter: in the extraction residual, DetectConfig.residual_passes; "
                                           "n_iter + residual_passes + 1: the companion of a split close pair, "
                                           "DetectConfig.split_pairs)")
        t.meta["DETECTOR"] = "musepayne.extract.detect"
        t.meta["FWHM_PX"] = round(float(shape_w[0]), 4)
        t.meta["BETA"] = round(float(shape_w[1]), 4)
        t.meta["E1"] = round(float(shape_w[2]), 4)
        t.meta["E2"] = round(float(shape_w[3]), 4)
        t.meta["THRESH"] = cfg.threshold
        t.meta["NBANDS"] = len(waves)
        return t
