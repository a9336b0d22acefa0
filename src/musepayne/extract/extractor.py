"""Spectral extraction from MUSE cubes: simultaneous PSF fitting and aperture photometry.

Configure an :class:`Extractor` once with a frozen :class:`ExtractConfig`,
call it on a cube (path or :class:`~musepayne.io.readers.MuseCube`) and a source
catalogue (path or Table with ra/dec or x/y and mag), get an
:class:`ExtractionResult` (WAVE, FLUX, ERR, SOURCES table, fitted PSF,
coordinate transformation, per-layer flags, timings) and ``write`` it.

PSF method (paper Sect. 2.1.3; the PampelMUSE approach of Kamann et al. 2013):

1. *Positions.*  Catalogue RA/Dec go through the cube WCS (x/y are taken as
   0-based pixels).  A broad-band image is made of a few binned layer ranges.
   A starting similarity transformation (offset, rotation, scale) comes from
   single-star Moffat fits of the brightest isolated stars (3-sigma clipped);
   it is then refined by a crowded-field Gauss-Newton fit of the whole image
   (the fluxes of all stars -- the brightest ``image_fit_stars`` in denser
   fields, so the cost is bounded -- the sky, the 4 transform parameters and
   the Moffat shape at once, :func:`_image_fit`).  The reported residual is the rms of
   free per-star position offsets of the bright isolated stars fitted with
   everything else held in the model.
2. *PSF.*  On each binned layer range the Moffat FWHM, beta and ellipticity
   (``e1 = e cos 2PA``, ``e2 = e sin 2PA``) are fitted the same way with the
   same stars modelled; low-order polynomials in wavelength
   (:class:`musepayne.extract.psf.MoffatPSF`) are fitted to the per-bin values.
3. *Fluxes.*  The cube is streamed in blocks of ``block`` layers.  Each block
   gets one sparse design matrix ``A`` (every star's pixel-integrated PSF at
   the block's central wavelength plus a polynomial sky of order
   ``sky_order``) and one weight per spaxel ``w = 1 / median_block(STAT)``.
   The normal matrix ``N = A^T W A`` is factorised once (:func:`factorise`:
   groups of stars whose stamps overlap, i.e. connected components of the
   overlap graph, by dense Cholesky each -- large groups by a block envelope Cholesky in a
   bandwidth-reducing order, stars of large fields in image-tile order -- the sky by its
   Schur complement; the groups and orders are reused while the design's pattern stays)
   and serves all layers of the block as right-hand sides:
   ``x_l = N^-1 A^T W d_l`` (weighted linear least squares, unbiased for any
   fixed weights).  Errors: ``var(x_l,s) = [N^-1]_ss * r_sl`` with
   ``r_sl = sum_p A_ps^2 w_p^2 V_lp / sum_p A_ps^2 w_p`` (exact when the
   layer variance equals the block median; the ratio carries the per-layer
   change of the noise, e.g. sky lines).

Aperture method: exact circle-pixel overlap weights (:func:`circle_overlap`),
radius ``aperture_radius`` x FWHM (or a fixed radius in pixels), sky per layer
= median of a local annulus, flux corrected to total with the PSF model's
enclosed fraction on the actual pixel footprint (optional).

Per star the SOURCES table carries snr (median flux/err), edge_dist (pixels
from the centre to the nearest unusable spaxel or field edge; negative
outside), blend_frac (fraction of the flux within 1 FWHM of the star that
neighbours contribute, from catalogue magnitudes and the PSF), psf_chi2
(reduced chi^2 of the fit residuals within 1 FWHM of the star), hidden_frac,
hidden_snr, hidden_flux, hidden_x, hidden_y (an unmodelled point source fitted
to the layer-summed residual near the star, :mod:`.hidden`), chroma_chi2 and
chroma_shift (the wavelength dependence of the star's light centroid in broad
bands of the residual: an unresolved companion of another colour,
:mod:`.chromatic`) and a status:
``ok``, ``edge`` (centre less than 1 FWHM from the edge), ``low_snr``,
``off_field`` (centre outside the usable field: not fitted, NaN spectrum; its
light is still modelled when it falls inside) or ``failed``.
Layers that are NaN everywhere are flagged (``LAYER_FLAG`` bit 1) and get NaN.

This module owns :class:`ExtractConfig` and :class:`Extractor` (the steps above in order);
the steps' machinery lives in :mod:`.sources` (catalogues), :mod:`.transform` (coordinate
transformation), :mod:`.imagefit` (crowded-field image fits), :mod:`.linsolve` (normal
equations), :mod:`.apertures`, :mod:`.fields` (field geometry), :mod:`.blocks` (cube
streaming) and :mod:`.result` (:class:`ExtractionResult`, SOURCES table).  The names other
modules imported from here before the split are re-exported.  An :class:`Extractor` keeps no
per-call state: one instance can be shared between threads.

May import: :mod:`musepayne.io`, the modules of :mod:`musepayne.extract` except ``detect``.
"""


from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..io.cube import MuseCube, open_cube
from ..io.spectra import ReaderError

# names marked F401 are re-exported: importable from here as before the split (detect.py, tests, benchmarks)
from .apertures import aperture_fluxes, aperture_matrix, circle_overlap
from .blocks import _accumulators, _core_pixels, _layer_blocks, _read_block, _solve_block  # noqa: F401
from .chromatic import CHROMA_BANDS, chromatic_shift
from .fields import _blend_fraction, _combine_bins, _edge_distance, _pixscale_arcsec, _psf_candidates
from .hidden import hidden_light
from .imagefit import _image_fit, _shape_psf, _sky_columns  # noqa: F401
from .linsolve import TILE_PX, TILED_DENSE_MIN, factorise, normal_matrix
from .psf import MoffatPSF, psf_design_matrix
from .result import (  # noqa: F401
    EXTRACT_STATUS,
    LAYER_FLAGS,
    RESIDUAL_COLUMNS,
    ExtractionResult,
    _sources_table,
    per_star_file_name,
)
from .sources import MAG_COLUMNS, read_source_catalogue  # noqa: F401
from .transform import CoordinateTransform, _fit_single, _single_star_start, _stamp, _transform_residuals  # noqa: F401
from .transform_guard import moved_off_field

__all__ = [
    "ExtractConfig",
    "Extractor",
    "ExtractionResult",
    "CoordinateTransform",
    "read_source_catalogue",
    "circle_overlap",
    "aperture_matrix",
    "EXTRACT_STATUS",
    "factorise",
    "LAYER_FLAGS",
]


@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings (frozen, validated).  Lengths in FWHM units unless the name says px.

    Attributes
    ----------
    method : str
        ``'psf'`` (simultaneous PSF fitting) or ``'aperture'``.
    block : int
        Layers per block sharing one PSF, one design matrix and one factorisation.
    sky_order : int
        Polynomial order of the sky (-1 none, 0 constant, 1 plane, 2 quadratic).
    psf_radius, psf_radius_max_px : float
        PSF stamp radius (FWHM) and its cap (pixels).
    oversample, image_oversample : int
        Sub-pixel sampling per axis for pixel integration (fluxes and PSF fit; broad-band fits).
    fwhm_guess : float
        Initial FWHM (arcsec).
    beta_guess : float
        Initial Moffat beta.
    psf : MoffatPSF or None
        A fixed PSF (skips the PSF fit).
    psf_bins, psf_bin_layers : int
        Binned layer ranges of the PSF fit and layers per bin.
    psf_stars : int
        Most bright isolated stars in the single-star fits and transform residuals.
    image_fit_stars : int
        The crowded-field image fits give free fluxes to the brightest this many stars.
    psf_deg : tuple of int
        Polynomial degrees in wavelength of FWHM, beta, ellipticity, angle.
    isolation : float
        Isolation radius (FWHM) of the PSF/transform stars.
    fit_transform : bool
        Fit the catalogue -> cube similarity transform.
    clip : float
        Sigma clipping of the transform fit.
    aperture_radius, aperture_radius_px : float
        Aperture radius (FWHM), or fixed (pixels, overrides).
    annulus : tuple of float or None
        Sky annulus radii (FWHM); None: no sky subtraction.
    aperture_correction : bool
        Scale aperture fluxes to total with the PSF model.
    snr_min : float
        Median S/N below which a star is ``low_snr``.
    ridge : float
        Relative Tikhonov term on the normal-matrix diagonal.
    dense_max : int
        Largest group of coupled stars factorised dense (memory ``8 n^2`` bytes).
    """

    method: str = "psf"                 #: 'psf' or 'aperture'
    block: int = 50                     #: layers per block sharing one PSF and one factorisation
    sky_order: int = 1                  #: polynomial order of the sky (0 constant, 1 plane, 2 quadratic)
    psf_radius: float = 4.0             #: PSF stamp radius (FWHM)
    psf_radius_max_px: float = 20.0
    oversample: int = 3                 #: sub-pixel sampling per axis for pixel integration (PSF fit, fluxes)
    image_oversample: int = 2           #: sub-pixel sampling in the broad-band transform fit and its residuals
    fwhm_guess: float = 0.8             #: initial FWHM (arcsec) for star selection
    beta_guess: float = 2.5
    psf: MoffatPSF | None = None        #: fixed PSF: skip the PSF fit
    psf_bins: int = 6                   #: binned layer ranges for the PSF fit
    psf_bin_layers: int = 30            #: layers per bin
    psf_stars: int = 40                 #: max. bright isolated stars for the single-star fits and transform residuals
    image_fit_stars: int = 2000         #: the crowded-field image fits (transform, PSF) model the brightest this many
    psf_deg: tuple = (2, 1, 0, 0)       #: polynomial degrees of FWHM, beta, ellipticity, angle
    isolation: float = 1.5              #: PSF/transform stars: < 5 % neighbour light within this many FWHM
    fit_transform: bool = True          #: fit offset/rotation/scale catalogue -> cube
    clip: float = 3.0                   #: sigma clipping of the transform fit
    aperture_radius: float = 1.0        #: aperture radius (FWHM)
    aperture_radius_px: float | None = None  #: fixed aperture radius (px), overrides aperture_radius
    annulus: tuple | None = (3.0, 5.0)  #: sky annulus radii (FWHM); None: no sky subtraction
    aperture_correction: bool = True    #: scale aperture fluxes to total with the PSF model
    snr_min: float = 3.0
    ridge: float = 1e-9                 #: relative Tikhonov term on the normal-matrix diagonal
    dense_max: int = 10000              #: largest group of coupled stars factorised dense (memory: 8 n^2 bytes)

    def __post_init__(self):
        if self.method not in ("psf", "aperture"):
            raise ValueError(f"method must be 'psf' or 'aperture', got {self.method!r}")
        if self.block < 1:
            raise ValueError("block must be >= 1")
        if self.sky_order not in (-1, 0, 1, 2):
            raise ValueError("sky_order must be -1 (no sky), 0, 1 or 2")
        if self.image_fit_stars < 1:
            raise ValueError("image_fit_stars must be >= 1")


class Extractor:
    """Spectral extraction of catalogued stars from a MUSE cube (PSF fitting or apertures).

    Configure once with :class:`ExtractConfig`; call on ``(cube, sources)``.  Keeps no
    per-call state, so one instance can be shared between threads.

    Parameters
    ----------
    config : ExtractConfig
        The extraction settings.
    """

    def __init__(self, config: ExtractConfig = ExtractConfig()):
        self.config = config

    # ------------------------------------------------------------------ entry point
    def __call__(self, cube, sources) -> ExtractionResult:
        """Extract one spectrum per catalogued star.

        Parameters
        ----------
        cube : str, pathlib.Path or musepayne.io.cube.MuseCube
            The cube (opened and closed here when given as a path; never modified).
        sources : str, pathlib.Path or astropy.table.Table
            Source catalogue (:func:`~musepayne.extract.sources.read_source_catalogue`).

        Returns
        -------
        ExtractionResult
            Spectra, errors, SOURCES table, PSF, transform, layer flags and step timings (s).

        Raises
        ------
        musepayne.io.spectra.ReaderError
            Unusable cube (no finite spaxel, no STAT) or catalogue, or a failed broad-band fit.
        """
        cfg = self.config
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        def lap(name):
            nonlocal t0
            t1 = time.perf_counter()
            timings[name] = round(timings.get(name, 0.0) + t1 - t0, 4)
            t0 = t1

        own = not isinstance(cube, MuseCube)
        c = open_cube(cube) if own else cube
        try:
            cat = read_source_catalogue(sources)
            xc, yc, mag = _catalogue_positions(c, cat)
            # ---- binned layers (one pass over a few layer ranges)
            bins = self._bins(c)
            lap("read_bins")
            white, white_var = _combine_bins(bins)
            valid = np.isfinite(white) & np.isfinite(white_var) & (white_var > 0)
            if not valid.any():
                raise ReaderError(f"{c.path}: no finite spaxel in the binned layers")
            # ---- coordinate transformation
            transform, x, y, nidx, free, relf, shape_w, rad0, notes = self._fit_transform(
                c, white, white_var, valid, xc, yc, mag)
            for note in notes:
                warnings.warn(note, UserWarning, stacklevel=2)
            lap("transform")
            # ---- PSF
            if cfg.psf is not None:
                psf = cfg.psf
            else:
                psf = self._fit_psf(bins, x[nidx], y[nidx], shape_w, rad0, c.wave, free, relf)
            lap("psf_fit")
            # ---- per-star geometry and status before fluxes
            wref = float(np.median(c.wave))
            fwhm_ref = psf.fwhm_at(wref)
            edge = _edge_distance(valid, x, y)
            on = edge >= 0
            blend, neigh = _blend_fraction(psf, x, y, mag, valid, wref, fwhm_ref, cfg, neighbours=True)
            lap("geometry")
            # ---- fluxes, streamed in blocks
            if cfg.method == "psf":
                flux, err, chi2, layer_flag, hidden = self._psf_fluxes(c, psf, x, y, on, valid, timings)
            else:
                flux, err, chi2, layer_flag = aperture_fluxes(cfg, c, psf, x, y, on, valid, timings)
                hidden = None  # no residual diagnostics: NaN columns
            t0 = time.perf_counter()
            # ---- quality table
            src = _sources_table(cat, c, x, y, flux, err, chi2, edge, blend, neigh, fwhm_ref, cfg.snr_min, notes,
                                 hidden=hidden)
            lap("quality")
            return ExtractionResult(np.asarray(c.wave, float), flux, err, src, psf, transform, layer_flag,
                                    cfg, str(c.path), str(c.header.get("BUNIT", "")), timings)
        finally:
            if own:
                c.close()

    # ------------------------------------------------------------------ steps
    def _fit_transform(self, c, white, white_var, valid, xc, yc, mag):
        """Catalogue -> cube transformation and broad-band PSF shape from the binned image.

        Single-star fits of isolated stars give a robust start; a crowded-field fit of the
        whole image (the brightest ``image_fit_stars`` with free fluxes) refines it.  Returns
        ``(transform, x, y, nidx, free, rel_flux, shape, radius, notes)``: cube positions of
        all stars, the modelled stars ``nidx`` and their flux bookkeeping, the broad-band
        shape ``(fwhm, beta, e1, e2)``, the stamp radius (px) and the warnings to issue.
        """
        cfg = self.config
        nz, ny, nx = c.shape
        fwhm0 = cfg.fwhm_guess / _pixscale_arcsec(c)
        centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
        cand = _psf_candidates(xc, yc, mag, valid, fwhm0, cfg)
        theta = np.array([1.0, 0.0, 0.0, 0.0])
        shape0 = np.array([fwhm0, cfg.beta_guess, 0.0, 0.0])
        if cfg.psf is not None:  # a given PSF: its shape at the median wavelength for the broad-band fit
            pf, pb, pe, pa = (float(v) for v in cfg.psf.params(float(np.median(c.wave))))
            shape0 = np.array([pf, pb, pe * np.cos(np.deg2rad(2 * pa)), pe * np.sin(np.deg2rad(2 * pa))])
            fwhm0 = pf
        notes = []
        fit_theta = cfg.fit_transform
        n_in = int((_edge_distance(valid, xc, yc) >= 0).sum())  # catalogue stars on the usable field
        if cfg.fit_transform and cand.size:
            theta, fit_theta = _single_star_start(cfg, white, white_var, xc, yc, cand, centre, fwhm0, shape0, n_in,
                                                  notes)
        # crowded-field refinement: all stars, transform + PSF shape on the broad-band image
        rad0 = min(cfg.psf_radius * shape0[0], cfg.psf_radius_max_px)
        near = (xc > -rad0) & (xc < nx - 1 + rad0) & (yc > -rad0) & (yc < ny - 1 + rad0)
        nidx = np.nonzero(near)[0]
        if cfg.fit_transform and not cand.size and n_in < CoordinateTransform.MIN_STARS_FULL:
            fit_theta = False
            notes.append(f"catalogue->cube transformation refused: {n_in} catalogue star(s) in the field and "
                         "none bright and isolated; catalogue positions used as they are")
        # bounded cost: beyond image_fit_stars only the brightest have free fluxes in the image fits,
        # the others keep their catalogue flux ratios (one common scale)
        free, relf = None, 10.0 ** (-0.4 * (mag[nidx] - np.min(mag[nidx]))) if nidx.size else None
        if nidx.size > cfg.image_fit_stars:
            free = np.zeros(nidx.size, bool)
            free[np.argsort(mag[nidx], kind="stable")[: cfg.image_fit_stars]] = True
        theta, shape_w, fl_w, ok_w = _image_fit(
            white, white_var, xc[nidx], yc[nidx], centre, theta, shape0, fit_theta,
            cfg.psf is None, rad0, cfg.image_oversample, cfg.sky_order, ridge=cfg.ridge, dense_max=cfg.dense_max,
            free=free, rel_flux=relf)
        if not ok_w:
            raise ReaderError(f"{c.path}: the broad-band image fit failed")
        transform = CoordinateTransform(offset=(float(theta[2]), float(theta[3])),
                                        rotation=float(np.rad2deg(np.arctan2(theta[1], theta[0]))),
                                        scale=float(np.hypot(theta[0], theta[1])), centre=centre)
        x, y = transform(xc, yc)
        x, y = np.asarray(x, float), np.asarray(y, float)
        transform = _transform_residuals(cfg, white, white_var, x, y, mag, valid, nidx, free, shape_w, fl_w, rad0,
                                         transform, notes)
        moved = moved_off_field(_edge_distance(valid, xc, yc), _edge_distance(valid, x, y), x - xc, y - yc,
                                transform.rms, shape_w[0])
        if moved.any() and cfg.fit_transform:
            notes.append(f"{int(moved.sum())} catalogue star(s) inside the field were moved off it by the "
                         f"fitted transformation (rotation {transform.rotation:.3f} deg, scale "
                         f"{transform.scale:.4f}, rms {transform.rms:.2f} px); check the catalogue or use "
                         "--no-transform")
        return transform, x, y, nidx, free, relf, shape_w, rad0, notes

    # ------------------------------------------------------------------ helpers
    def _bins(self, c):
        """Binned images: list of (wave, mean image, variance of the mean)."""
        cfg = self.config
        nz = c.shape[0]
        nb = max(1, min(cfg.psf_bins, nz // max(1, cfg.psf_bin_layers) or 1))
        centres = np.linspace(0, nz - 1, 2 * nb + 1)[1::2].astype(int)
        out = []
        for ic in centres:
            i0 = max(0, ic - cfg.psf_bin_layers // 2)
            i1 = min(nz, i0 + cfg.psf_bin_layers)
            d = c.data_block(i0, i1)
            s = c.stat_block(i0, i1)
            if s is None:
                s = np.full_like(d, np.nan)
            ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
            layer_ok = ok.reshape(i1 - i0, -1).mean(axis=1) > 0.5
            if not layer_ok.any():
                continue
            d, s, ok = d[layer_ok], s[layer_ok], ok[layer_ok]
            n = ok.sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                img = np.where(n > 0, np.where(ok, d, 0).sum(axis=0) / n, np.nan)
                var = np.where(n > 0, np.where(ok, s, 0).sum(axis=0) / n**2, np.nan)
            img[n < layer_ok.sum()] = np.nan  # spaxels not usable in every layer of the bin
            out.append((float(np.mean(c.wave[i0:i1][layer_ok])), img, var))
        if not out:
            raise ReaderError(f"{c.path}: every layer is NaN or has no usable STAT")
        return out

    def _fit_psf(self, bins, xs, ys, shape0, radius, cube_wave, free=None, rel_flux=None) -> MoffatPSF:
        """Moffat shape per binned layer range (all stars modelled), then polynomials in wavelength."""
        cfg = self.config
        waves, pars = [], []
        p0 = np.asarray(shape0, float)
        centre = (0.0, 0.0)
        for w, img, var in bins:
            _, p, _, ok = _image_fit(img, var, xs, ys, centre, (1.0, 0.0, 0.0, 0.0), p0, False, True, radius,
                                     cfg.oversample, cfg.sky_order, n_iter=3, ridge=cfg.ridge,
                                     dense_max=cfg.dense_max, free=free, rel_flux=rel_flux)
            if ok:
                waves.append(w)
                pars.append(p)
        if not pars:
            warnings.warn("PSF fit failed in every bin; using the broad-band shape", RuntimeWarning, stacklevel=2)
            waves, pars = [float(np.mean(cube_wave))], [p0]
        pars = np.array(pars)
        e1, e2 = np.mean(pars[:, 2]), np.mean(pars[:, 3])
        e = np.full(len(waves), np.hypot(e1, e2))
        pa = np.full(len(waves), 0.5 * np.rad2deg(np.arctan2(e2, e1)))
        # polynomials in t = (wave - mid) / half-range of the cube: no extrapolation inside the cube
        wl, wh = float(np.min(cube_wave)), float(np.max(cube_wave))
        deg = tuple(min(d, max(0, len(waves) - 2)) for d in cfg.psf_deg)
        return MoffatPSF.fit(waves, pars[:, 0], pars[:, 1], e, pa, deg=deg, wave_ref=0.5 * (wl + wh),
                             wave_scale=max(0.5 * (wh - wl), 1.0))

    def _design(self, psf, x, y, cols, wave, shape, mask, cache=None):
        """Star columns (only ``cols``) + sky polynomial columns, rows masked by ``mask``
        (``cache``: a dict kept by the caller across blocks for the same stars; stamps reused)."""
        cfg = self.config
        ny, nx = shape
        rad = min(cfg.psf_radius * psf.fwhm_at(wave), cfg.psf_radius_max_px)
        A = psf_design_matrix(psf, x[cols], y[cols], wave, shape, rad, cfg.oversample, valid=mask, cache=cache)
        if cfg.sky_order >= 0:
            S = _sky_columns(shape, cfg.sky_order, mask)
            A = sp.hstack([A, sp.csc_matrix(S)], format="csc")
        return A

    def _psf_fluxes(self, c, psf, x, y, on, valid, timings):
        """PSF-fitted fluxes: per block one design matrix and factorisation for all its layers.

        Returns ``(flux, err, chi2, layer_flag, hidden)`` (see :func:`~musepayne.extract.apertures.aperture_fluxes`;
        ``chi2`` is the reduced chi^2 of the residuals within ~1 FWHM of each star, ``hidden`` the light of an
        unmodelled point source near it, :func:`~musepayne.extract.hidden.hidden_light`, and in its last two rows the
        wavelength dependence of its light centroid, :func:`~musepayne.extract.chromatic.chromatic_shift`).
        """
        cfg = self.config
        nz, ny, nx = c.shape
        n = len(x)
        flux, err, layer_flag = _accumulators(n, nz)
        chi_num = np.zeros(n)
        chi_den = np.zeros(n)
        r_sum = np.zeros(ny * nx)  # residual and its variance summed over the layers (hidden_light)
        v_sum = np.zeros(ny * nx)
        m_sum = np.zeros(ny * nx)  # the stars' model summed over the layers
        # the same summed over the layers of each broad band (chromatic_shift)
        nband = max(1, min(CHROMA_BANDS, nz))
        r_band, v_band, m_band = (np.zeros((nband, ny * nx)) for _ in range(3))
        band_of = np.full(nz, -1)  # band of each layer (-1: in no block)
        band_wave = np.zeros((2, nband))  # layer-weighted sum of the blocks' wavelengths, layers
        # columns: stars whose stamp reaches usable spaxels (includes off-field neighbours' light)
        rmax = min(cfg.psf_radius * float(np.max(psf.params(c.wave)[0])), cfg.psf_radius_max_px)
        near = (x > -rmax) & (x < nx - 1 + rmax) & (y > -rmax) & (y < ny - 1 + rmax)
        cols = np.nonzero(near)[0]
        if cols.size > TILED_DENSE_MIN:  # large fields: stars in image-tile order (a tile's stars: few index runs)
            ty = np.clip(np.rint(y[cols]), 0, ny - 1) // TILE_PX
            tx = np.clip(np.rint(x[cols]), 0, nx - 1) // TILE_PX
            cols = cols[np.lexsort((tx, ty))]
        ns = cols.size
        plan, pattern, stamps = {}, None, {}  # normal matrix structure, stamps: reused while unchanged
        for i0, i1, d, s, good, mask in _layer_blocks(c, valid, cfg.block, layer_flag, timings):
            if ns == 0:
                continue
            t = time.perf_counter()
            wmid = float(np.mean(c.wave[i0:i1][good]))
            A = self._design(psf, x, y, cols, wmid, (ny, nx), mask, stamps)
            if pattern is None or not (np.array_equal(pattern[0], A.indptr) and np.array_equal(pattern[1], A.indices)):
                plan, pattern = {}, (A.indptr, A.indices)
            w = np.zeros(ny * nx)
            sg = s[good].reshape(good.sum(), -1)
            # median over the block's layers, pixel by pixel (layers contiguous: ~1.6x faster, same values)
            w[mask.ravel()] = 1.0 / np.median(np.ascontiguousarray(sg.T[mask.ravel()]), axis=1)
            # = A.multiply(w[:, None]) (own index arrays: eliminate_zeros works in place)
            AW = sp.csc_matrix((A.data * w[A.indices], A.indices.copy(), A.indptr.copy()), shape=A.shape)
            AW.eliminate_zeros()
            N, dg_ok = normal_matrix(A, w, (ny, nx), cfg.ridge, AW=AW)
            timings["design"] = timings.get("design", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            solve, ninv_diag = factorise(N, cfg.dense_max, border=np.arange(ns, N.shape[0]), plan=plan)
            del N  # dense for large fields: free it before the next block's
            timings["factorise"] = timings.get("factorise", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            X, var, core, chi_pix, sums = _solve_block(A, AW, w, ns, solve, ninv_diag, d[good], sg, mask)
            chi_num[cols] += np.asarray(core.T @ chi_pix).ravel()
            kb = min(nband - 1, int(0.5 * (i0 + i1) * nband / nz))
            for tot, band, v in zip((r_sum, v_sum, m_sum), (r_band, v_band, m_band), sums):
                tot += v
                band[kb] += v
            band_of[i0:i1] = kb
            band_wave[:, kb] += wmid * good.sum(), good.sum()
            chi_den[cols] += np.asarray(core.T @ mask.ravel().astype(float)).ravel() * good.sum()
            gi = np.nonzero(good)[0] + i0
            okc = dg_ok[:ns]
            flux[np.ix_(cols[okc], gi)] = X[:ns][okc]
            err[np.ix_(cols[okc], gi)] = np.sqrt(var[okc])
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2 = np.where(chi_den > 0, chi_num / chi_den, np.nan)
        hidden = np.full((len(RESIDUAL_COLUMNS), n), np.nan)  # rows: result.RESIDUAL_COLUMNS
        if ns:
            t = time.perf_counter()
            fsum = np.nansum(flux.astype(float), axis=1)
            fr, sn, b, _, xh, yh = hidden_light(r_sum.reshape(ny, nx), v_sum.reshape(ny, nx), valid, x[cols],
                                                y[cols], fsum[cols], psf, float(np.median(c.wave)),
                                                model=m_sum.reshape(ny, nx))
            nl = np.maximum(np.isfinite(flux[cols]).sum(axis=1), 1)
            hidden[:5, cols] = fr, sn, b / nl, xh, yh
            timings["hidden"] = timings.get("hidden", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            used = band_wave[1] > 0
            fc = flux[cols]
            fband = np.stack([np.nansum(fc[:, band_of == kb], axis=1, dtype=float) for kb in np.nonzero(used)[0]],
                             axis=1)
            shape3 = (int(used.sum()), ny, nx)
            hidden[5:, cols] = chromatic_shift(r_band[used].reshape(shape3), v_band[used].reshape(shape3),
                                               m_band[used].reshape(shape3), valid, x[cols], y[cols], fband, psf,
                                               band_wave[0, used] / band_wave[1, used])[:2]
            timings["chroma"] = timings.get("chroma", 0.0) + time.perf_counter() - t
        return flux, err, chi2, layer_flag, hidden


def _catalogue_positions(c, cat):
    """Catalogue positions in the catalogue's pixel frame (RA/Dec through the cube WCS, else x/y as
    0-based pixels) and magnitudes (missing: 1 mag fainter than the faintest)."""
    if "ra" in cat.colnames and np.isfinite(cat["ra"]).any():
        xc, yc = c.wcs.world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
    else:
        xc, yc = np.asarray(cat["x_cat"], float), np.asarray(cat["y_cat"], float)
    xc, yc = np.asarray(xc, float), np.asarray(yc, float)
    mag = np.asarray(cat["mag"], float)
    mag = np.where(np.isfinite(mag), mag, np.nanmax(mag) + 1.0 if np.isfinite(mag).any() else 99.0)
    return xc, yc, mag
