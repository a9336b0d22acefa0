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
   overlap graph, by dense Cholesky each, the sky by its Schur complement)
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
(reduced chi^2 of the fit residuals within 1 FWHM of the star) and a status:
``ok``, ``edge`` (centre less than 1 FWHM from the edge), ``low_snr``,
``off_field`` (centre outside the usable field: not fitted, NaN spectrum; its
light is still modelled when it falls inside) or ``failed``.
Layers that are NaN everywhere are flagged (``LAYER_FLAG`` bit 1) and get NaN.
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg as sl
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.ndimage import distance_transform_edt
from scipy.optimize import least_squares
from scipy.sparse.csgraph import connected_components

from ..io.cube import MuseCube, open_cube
from ..io.fits import atomic_write_fits
from ..io.spectra import ReaderError
from .psf import MoffatPSF, _integrate, psf_design_matrix

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

#: status values of the SOURCES table
EXTRACT_STATUS = {
    "ok": "fitted, centre >= 1 FWHM inside the field",
    "edge": "fitted, centre < 1 FWHM from the field edge or unusable spaxels",
    "low_snr": "fitted, median S/N below ExtractConfig.snr_min",
    "off_field": "centre outside the usable field; not fitted (NaN spectrum)",
    "failed": "no finite flux in any layer",
}

#: bits of the per-layer LAYER_FLAG image
LAYER_FLAGS = {1: "layer NaN (or unusable) in DATA/STAT: no fluxes", 2: "some spaxels masked in this block"}

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


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ExtractConfig:
    """Extraction settings.  Lengths in FWHM units unless the name says px."""

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


# --------------------------------------------------------------------------- catalogue
def _find_col(t, names):
    low = {c.lower(): c for c in t.colnames}
    for n in names:
        if n in low:
            return low[n]
    return None


def _stellar_ids(col) -> list:
    """The catalogue's ids as strings; refuses missing/blank ids and ids FITS cannot store."""
    mask = np.asarray(np.ma.getmaskarray(col)) if hasattr(col, "mask") else np.zeros(len(col), bool)
    ids = []
    for i, (v, m) in enumerate(zip(col, mask)):
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        if m or not s.strip():
            raise ReaderError(f"source catalogue row {i + 1}: empty stellar id; every star needs an id")
        if not (s.isascii() and s.isprintable()):
            raise ReaderError(f"source catalogue row {i + 1}: stellar id {s!r} has non-ASCII or control "
                              "characters (FITS stores ASCII only)")
        ids.append(s)
    return ids


def per_star_file_name(stellar_id: str, max_stem: int = 80) -> str:
    """File name of a star's 1-D spectrum: injective in the id, safe on any file system.

    An id made only of ASCII letters, digits and ``-_+.`` (not starting with ``.``) of at
    most ``max_stem`` characters is used as it is; any other id becomes its sanitised,
    shortened stem plus ``~`` and 16 hex digits of its sha256 -- ``~`` never occurs in an
    unchanged id, so two different ids never share a file name (``a/b``, ``a_b``, ``a?b``).
    """
    sid = str(stellar_id)
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_+." else "_" for ch in sid)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == sid and 0 < len(sid) <= max_stem:
        return f"{sid}.fits"
    digest = hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:max_stem]}~{digest}.fits"


#: magnitude columns recognised without --mag-column, in order of preference (case-insensitive)
MAG_COLUMNS = (
    "mag", "magnitude",
    # HST (ACS/WFC3/WFPC2; also with a _mag/_vega suffix or an m/mag_ prefix, matched below)
    "f606w", "f814w", "f555w", "f435w", "f475w", "f625w", "f775w", "f850lp", "f438w", "f336w", "f275w",
    "f110w", "f160w", "m606", "m814",
    # Gaia
    "phot_g_mean_mag", "gmag", "g_mag", "phot_rp_mean_mag", "phot_bp_mean_mag", "rpmag", "bpmag",
    # ground-based
    "vmag", "v", "imag", "i", "rmag", "r", "bmag", "b", "jmag", "j", "kmag", "ks", "hmag", "zmag",
    "g", "i_mag", "r_mag", "v_mag",
)


def _mag_column(t, mag_column=None):
    if mag_column is not None:
        c = _find_col(t, (str(mag_column).lower(),))
        if c is None:
            raise ReaderError(f"source catalogue has no column {mag_column!r} (columns: {', '.join(t.colnames)})")
        return c
    c = _find_col(t, MAG_COLUMNS)
    if c:
        return c
    def not_err(n):
        n = n.lower()
        return not (n.startswith(("e_", "err", "sig", "sigma")) or "err" in n or n.endswith(("_e", "_sig", "_unc")))

    filt = re.compile(r"(^|[_-])(m|mag)?[_-]?f\d{3,4}(w|m|n|lp|x)($|[_-])", re.I)
    for n in t.colnames:  # HST filter names with a prefix or suffix (F606W_VEGA, mag_f814w, m_f606w)
        if filt.search(n) and not_err(n):
            return n
    return next((n for n in t.colnames if "mag" in n.lower() and not_err(n)), None)


def _coordinate_columns(t, ra, dec):
    """RA/Dec in degrees from degree numbers or sexagesimal strings (RA in hours, Dec in degrees)."""
    a, d = t[ra], t[dec]
    if a.dtype.kind in "USO" or d.dtype.kind in "USO":
        sa = [str(v).strip() for v in np.ma.filled(a, "")]
        sd = [str(v).strip() for v in np.ma.filled(d, "")]
        try:
            return np.array(sa, float), np.array(sd, float)
        except ValueError:
            pass
        sexa = any((":" in v or " " in v or "h" in v.lower()) for v in sa)
        try:
            sc = SkyCoord(sa, sd, unit=(u.hourangle if sexa else u.deg, u.deg))
        except Exception as exc:
            raise ReaderError(f"source catalogue: cannot parse {ra}/{dec} as degrees or sexagesimal "
                              f"(e.g. '{sa[0]}', '{sd[0]}'): {exc}") from None
        return sc.ra.deg, sc.dec.deg
    ua = getattr(a, "unit", None)
    if ua is not None and str(ua) not in ("", "deg"):
        try:
            return ((np.asarray(a, float) * ua).to_value(u.deg), (np.asarray(d, float) * d.unit).to_value(u.deg))
        except Exception:
            pass
    return np.asarray(np.ma.filled(a, np.nan), float), np.asarray(np.ma.filled(d, np.nan), float)


def read_source_catalogue(src, mag_column=None) -> Table:
    """Source catalogue (CSV, ECSV, FITS or VOTable, or a Table) -> Table(stellar_id, ra, dec | x, y, mag).

    Accepted column names (case-insensitive): ra/raj2000/ra_icrs/alpha, dec/dej2000/
    dec_icrs/delta (degrees, or sexagesimal strings: RA in hours); x/y (0-based cube
    pixels); the magnitude ``mag_column`` or else the first of :data:`MAG_COLUMNS`
    (common HST, Gaia and ground-based names), an HST filter name with a prefix or
    suffix, or a column whose name contains 'mag' (error columns excluded);
    stellar_id/id/source_id/name.
    """
    if isinstance(src, Table):
        t = src
    else:
        p = Path(src)
        if not p.exists():
            raise ReaderError(f"{p}: source catalogue not found")
        suf = p.suffix.lower()
        fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".xml": "votable", ".vot": "votable",
               ".votable": "votable", ".fits": "fits", ".fit": "fits", ".fts": "fits"}.get(suf)
        try:
            t = Table.read(p, format=fmt) if fmt else Table.read(p)
        except Exception as exc:
            raise ReaderError(f"{p}: cannot read source catalogue ({exc})") from None
    ra = _find_col(t, ("ra", "raj2000", "ra_icrs", "ra_deg", "alpha", "ra_j2000"))
    dec = _find_col(t, ("dec", "dej2000", "de", "dec_icrs", "dec_deg", "delta", "decl", "dec_j2000"))
    x, y = _find_col(t, ("x", "x_cat")), _find_col(t, ("y", "y_cat"))  # x_cat: a table this function made
    mag = _mag_column(t, mag_column)
    sid = _find_col(t, ("stellar_id", "id", "source_id", "name"))
    if mag is None:
        raise ReaderError("source catalogue needs a magnitude column: give its name with --mag-column "
                          f"(columns: {', '.join(t.colnames)})")
    if not ((ra and dec) or (x and y)):
        raise ReaderError("source catalogue needs ra/dec or x/y columns")
    out = Table()
    n = len(t)
    if n == 0:
        raise ReaderError("source catalogue has no rows")
    out["stellar_id"] = _stellar_ids(t[sid]) if sid else [f"star{i:06d}" for i in range(n)]
    if ra and dec:
        out["ra"], out["dec"] = _coordinate_columns(t, ra, dec)
    if x and y:
        out["x_cat"] = np.asarray(t[x], float)
        out["y_cat"] = np.asarray(t[y], float)
    try:
        out["mag"] = np.asarray(np.ma.filled(t[mag], np.nan), float)
    except (TypeError, ValueError):
        raise ReaderError(f"source catalogue: magnitude column {mag!r} is not numeric") from None
    out.meta["mag_column"] = mag
    ids, counts = np.unique(np.asarray(out["stellar_id"]), return_counts=True)
    if np.any(counts > 1):
        dup = ", ".join(map(str, ids[counts > 1][:5]))
        raise ReaderError(f"source catalogue has duplicated stellar ids ({dup}{', ...' if (counts > 1).sum() > 5 else ''}); "
                          "every star must have a unique id")
    return out


# --------------------------------------------------------------------------- apertures
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
    """Exact area of the circle (centre ``xc, yc``, radius ``r``) inside unit pixels centred on ``xx, yy``."""
    x0, x1 = np.asarray(xx) - 0.5 - xc, np.asarray(xx) + 0.5 - xc
    y0, y1 = np.asarray(yy) - 0.5 - yc, np.asarray(yy) + 0.5 - yc
    a = _quad_area(x1, y1, r) - _quad_area(x0, y1, r) - _quad_area(x1, y0, r) + _quad_area(x0, y0, r)
    return np.clip(a, 0.0, 1.0)


def aperture_matrix(x, y, r, shape, valid=None, r_inner=None):
    """Sparse ``(ny*nx, n)`` exact-overlap weights of circles (or annuli with ``r_inner``)."""
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


# --------------------------------------------------------------------------- transform
@dataclass(frozen=True)
class CoordinateTransform:
    """Similarity transformation catalogue pixels -> cube pixels about ``centre``.

    ``x' = cx + s (cos t dx - sin t dy) + ox``; ``y' = cy + s (sin t dx + cos t dy) + oy``.
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


# --------------------------------------------------------------------------- result
@dataclass
class ExtractionResult:
    wave: np.ndarray
    flux: np.ndarray
    err: np.ndarray
    sources: Table
    psf: MoffatPSF
    transform: CoordinateTransform
    layer_flag: np.ndarray
    config: ExtractConfig
    cube_path: str = ""
    bunit: str = ""
    timings: dict = field(default_factory=dict)

    def write(self, path, overwrite: bool = True):
        """Write WAVE, FLUX, ERR, SOURCES (+ LAYER_FLAG) atomically; PSF and transform in the primary header."""
        h = fits.Header()
        h["ORIGIN"] = "musepayne.extract"
        h["METHOD"] = (self.config.method, "extraction method")
        h["CUBE"] = Path(self.cube_path).name[:60]
        self.psf.to_header(h)
        t = self.transform
        h["TRF_OX"] = (t.offset[0], "catalogue->cube offset x [px]")
        h["TRF_OY"] = (t.offset[1], "catalogue->cube offset y [px]")
        h["TRF_ROT"] = (t.rotation, "catalogue->cube rotation [deg]")
        h["TRF_SCL"] = (t.scale, "catalogue->cube scale")
        h["TRF_RMS"] = (t.rms if np.isfinite(t.rms) else -1.0, "transform residual rms [px] (-1: none)")
        h["TRF_N"] = (t.n_used, "stars used in the transform fit")
        h["BLOCK"] = (self.config.block, "layers per PSF/factorisation block")
        h["SKYORD"] = (self.config.sky_order, "sky polynomial order")
        wave = fits.ImageHDU(self.wave.astype(np.float64), name="WAVE")
        wave.header["CTYPE1"] = "AWAV"
        wave.header["BUNIT"] = "Angstrom"
        fl = fits.ImageHDU(self.flux.astype(np.float32), name="FLUX")
        er = fits.ImageHDU(self.err.astype(np.float32), name="ERR")
        for x in (fl, er):
            x.header["BUNIT"] = self.bunit
        lf = fits.ImageHDU(self.layer_flag.astype(np.int16), name="LAYER_FLAG")
        for bit, txt in LAYER_FLAGS.items():
            lf.header[f"FLAG{bit}"] = txt
        src = fits.BinTableHDU(self.sources, name="SOURCES")
        atomic_write_fits(fits.HDUList([fits.PrimaryHDU(header=h), wave, fl, er, src, lf]), path, overwrite)


    def write_per_star(self, folder, statuses=("ok", "edge", "low_snr")) -> list:
        """PampelMUSE-style 1-D files (flux in HDU 0, ``SIGMA`` HDU, ``CRVAL1``/``CDELT1``, air), one per star.

        Only stars whose status is in ``statuses``; each file is written
        atomically as ``<folder>/<stellar_id>.fits``.  Returns the paths.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        step = float(np.median(np.diff(self.wave))) if self.wave.size > 1 else 1.0
        paths = []
        for k, row in enumerate(self.sources):
            if row["status"] not in statuses:
                continue
            h = fits.Header()
            h["OBJECT"] = str(row["stellar_id"])
            h["RA"] = float(row["ra"])
            h["DEC"] = float(row["dec"])
            h["CRVAL1"] = float(self.wave[0])
            h["CDELT1"] = step
            h["CRPIX1"] = 1.0
            h["CTYPE1"] = "AWAV"
            h["CUNIT1"] = "Angstrom"
            h["BUNIT"] = self.bunit
            h["SNR"] = (float(row["snr"]) if np.isfinite(row["snr"]) else -1.0, "median flux/err")
            h["EDGEDIST"] = (float(row["edge_dist"]), "distance to the field edge [px]")
            h["BLENDFR"] = (float(row["blend_frac"]) if np.isfinite(row["blend_frac"]) else -1.0,
                            "flux fraction from neighbours within 1 FWHM")
            h["STATUS"] = str(row["status"])
            self.psf.to_header(h)
            path = folder / per_star_file_name(row["stellar_id"])
            hdul = fits.HDUList([fits.PrimaryHDU(self.flux[k].astype(np.float32), header=h),
                                 fits.ImageHDU(self.err[k].astype(np.float32), name="SIGMA")])
            atomic_write_fits(hdul, path)
            paths.append(path)
        return paths


# --------------------------------------------------------------------------- the extractor
class Extractor:
    """Configure once with :class:`ExtractConfig`; call on ``(cube, sources)``."""

    def __init__(self, config: ExtractConfig = ExtractConfig()):
        self.config = config

    # ------------------------------------------------------------------ entry point
    def __call__(self, cube, sources) -> ExtractionResult:
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
            nz, ny, nx = c.shape
            pixscale = _pixscale_arcsec(c)
            fwhm0 = cfg.fwhm_guess / pixscale
            # ---- positions in the (catalogue) pixel frame
            if "ra" in cat.colnames and np.isfinite(cat["ra"]).any():
                xc, yc = c.wcs.world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
            else:
                xc, yc = np.asarray(cat["x_cat"], float), np.asarray(cat["y_cat"], float)
            xc, yc = np.asarray(xc, float), np.asarray(yc, float)
            mag = np.asarray(cat["mag"], float)
            mag = np.where(np.isfinite(mag), mag, np.nanmax(mag) + 1.0 if np.isfinite(mag).any() else 99.0)
            # ---- binned layers (one pass over a few layer ranges)
            bins = self._bins(c)
            lap("read_bins")
            white, white_var = _combine_bins(bins)
            valid = np.isfinite(white) & np.isfinite(white_var) & (white_var > 0)
            if not valid.any():
                raise ReaderError(f"{c.path}: no finite spaxel in the binned layers")
            # ---- coordinate transformation
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
                # robust start: single-star Moffat fits of isolated stars, similarity transform with clipping
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
            # transform residuals: free position offsets of the bright isolated stars
            cand = _psf_candidates(x, y, mag, valid, shape_w[0], cfg)
            cand = cand[np.isin(cand, nidx if free is None else nidx[free])]
            if cfg.fit_transform and cand.size:
                sub = np.searchsorted(nidx, cand)
                ddx, ddy = _star_offsets(white, white_var, x[nidx], y[nidx], shape_w, sub, fl_w, rad0,
                                         cfg.image_oversample, cfg.sky_order, ridge=cfg.ridge,
                                         dense_max=cfg.dense_max, free=free)
                res = np.hypot(ddx, ddy)
                keep = res < max(cfg.clip * 1.4826 * np.median(res), 0.05)
                transform = CoordinateTransform(transform.offset, transform.rotation, transform.scale, centre,
                                                rms=float(np.sqrt(np.mean(res[keep] ** 2))),
                                                n_used=int(keep.sum()), n_rejected=int((~keep).sum()))
                if transform.rms > 0.5 * shape_w[0]:
                    notes.append(f"catalogue->cube transformation residual rms {transform.rms:.2f} px "
                                 f"(> 0.5 FWHM = {0.5 * shape_w[0]:.2f} px, {transform.n_used} stars): "
                                 "positions are uncertain")
            moved = (_edge_distance(valid, xc, yc) >= 0) & (_edge_distance(valid, x, y) < 0)
            if moved.any() and cfg.fit_transform:
                notes.append(f"{int(moved.sum())} catalogue star(s) inside the field were moved off it by the "
                             f"fitted transformation (rotation {transform.rotation:.3f} deg, scale "
                             f"{transform.scale:.4f}, rms {transform.rms:.2f} px); check the catalogue or use "
                             "--no-transform")
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
                flux, err, chi2, layer_flag = self._psf_fluxes(c, psf, x, y, on, valid, timings)
            else:
                flux, err, chi2, layer_flag = self._aperture_fluxes(c, psf, x, y, on, valid, timings)
            t0 = time.perf_counter()
            # ---- quality table
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: off-field stars
                snr = np.nanmedian(np.where(err > 0, flux / err, np.nan), axis=1) if nz else np.full(len(x), np.nan)
            status = np.full(len(x), "ok", dtype="<U9")
            status[edge < fwhm_ref] = "edge"
            status[(snr < cfg.snr_min) & on] = "low_snr"
            status[on & ~np.isfinite(flux).any(axis=1)] = "failed"
            status[~on] = "off_field"
            flux[~on] = np.nan
            err[~on] = np.nan
            ra, dec = c.wcs.pixel_to_world_values(x, y)
            src = Table()
            src["stellar_id"] = np.asarray(cat["stellar_id"]).astype(str)
            src["ra"] = np.asarray(ra, float)
            src["ra"].unit = "deg"
            src["dec"] = np.asarray(dec, float)
            src["dec"].unit = "deg"
            src["x"] = x
            src["x"].description = "0-based cube pixel x (after the catalogue->cube transformation)"
            src["y"] = y
            src["mag"] = np.asarray(cat["mag"], float)
            src["snr"] = snr
            src["snr"].description = "median over layers of flux/err"
            src["edge_dist"] = edge
            src["edge_dist"].unit = "pix"
            src["edge_dist"].description = "distance to the nearest unusable spaxel or field edge (negative outside)"
            src["blend_frac"] = blend
            src["blend_frac"].description = "fraction of the flux within 1 FWHM contributed by neighbours"
            src["neighbour_frac"] = neigh
            src["neighbour_frac"].description = ("flux within 1 FWHM of the star from its brightest-there single "
                                                 "neighbour, relative to the star's own flux there")
            src["psf_chi2"] = chi2
            src["psf_chi2"].description = "reduced chi^2 of the fit residuals within 1 FWHM (aperture: NaN)"
            src["status"] = status
            src.meta["warnings"] = notes
            lap("quality")
            return ExtractionResult(np.asarray(c.wave, float), flux, err, src, psf, transform, layer_flag,
                                    cfg, str(c.path), str(c.header.get("BUNIT", "")), timings)
        finally:
            if own:
                c.close()

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

    def _design(self, psf, x, y, cols, wave, shape, mask):
        """Star columns (only ``cols``) + sky polynomial columns, rows masked by ``mask``."""
        cfg = self.config
        ny, nx = shape
        rad = min(cfg.psf_radius * psf.fwhm_at(wave), cfg.psf_radius_max_px)
        A = psf_design_matrix(psf, x[cols], y[cols], wave, shape, rad, cfg.oversample, valid=mask)
        if cfg.sky_order >= 0:
            S = _sky_columns(shape, cfg.sky_order, mask)
            A = sp.hstack([A, sp.csc_matrix(S)], format="csc")
        return A

    def _psf_fluxes(self, c, psf, x, y, on, valid, timings):
        cfg = self.config
        nz, ny, nx = c.shape
        n = len(x)
        flux, err, layer_flag = _accumulators(n, nz)
        chi_num = np.zeros(n)
        chi_den = np.zeros(n)
        # columns: stars whose stamp reaches usable spaxels (includes off-field neighbours' light)
        rmax = min(cfg.psf_radius * float(np.max(psf.params(c.wave)[0])), cfg.psf_radius_max_px)
        near = (x > -rmax) & (x < nx - 1 + rmax) & (y > -rmax) & (y < ny - 1 + rmax)
        cols = np.nonzero(near)[0]
        ns = cols.size
        for i0, i1, d, s, good, mask in _layer_blocks(c, valid, cfg.block, layer_flag, timings):
            if ns == 0:
                continue
            t = time.perf_counter()
            wmid = float(np.mean(c.wave[i0:i1][good]))
            A = self._design(psf, x, y, cols, wmid, (ny, nx), mask)
            w = np.zeros(ny * nx)
            sg = s[good].reshape(good.sum(), -1)
            w[mask.ravel()] = 1.0 / np.median(sg[:, mask.ravel()], axis=0)
            AW = A.multiply(w[:, None]).tocsc()
            N = (A.T @ AW).tocsc()
            dg = N.diagonal()
            dg_ok = dg > 0
            N = N + sp.diags(np.where(dg_ok, cfg.ridge * dg, 1.0))
            timings["design"] = timings.get("design", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            solve, ninv_diag = factorise(N, cfg.dense_max, border=np.arange(ns, N.shape[0]))
            timings["factorise"] = timings.get("factorise", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            D = np.where(mask.ravel()[None, :], d[good].reshape(good.sum(), -1), 0.0).T  # (npix, L)
            V = np.where(mask.ravel()[None, :], sg, 0.0).T
            B = AW.T @ D
            X = solve(np.asarray(B))
            As = A[:, :ns]
            A2 = As.multiply(As).tocsc()
            num = A2.T @ (V * (w**2)[:, None])
            den = A2.T @ w
            with np.errstate(invalid="ignore", divide="ignore"):
                var = ninv_diag[:ns, None] * num / den[:, None]
            R = D - A @ X
            core = A2.multiply(1.0 / np.maximum(A2.max(axis=0).toarray(), 1e-300)) >= 0.25  # ~ within 1 FWHM
            core = sp.csc_matrix(core, dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                chi = np.where(V > 0, R**2 / V, 0.0)
            chi_num[cols] += np.asarray(core.T @ chi.sum(axis=1)).ravel()
            chi_den[cols] += np.asarray(core.T @ mask.ravel().astype(float)).ravel() * good.sum()
            gi = np.nonzero(good)[0] + i0
            okc = dg_ok[:ns]
            flux[np.ix_(cols[okc], gi)] = X[:ns][okc]
            err[np.ix_(cols[okc], gi)] = np.sqrt(var[okc])
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        with np.errstate(invalid="ignore", divide="ignore"):
            chi2 = np.where(chi_den > 0, chi_num / chi_den, np.nan)
        return flux, err, chi2, layer_flag

    def _aperture_fluxes(self, c, psf, x, y, on, valid, timings):
        cfg = self.config
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


def factorise(N, dense_max: int = 10000, border=(), need_diag: bool = True):
    """Factorise a symmetric positive-definite normal matrix once; return ``(solve, diag(N^-1))``.

    The factorisation follows the structure of ``N``.  The ``border`` unknowns
    (sky polynomial, global nonlinear parameters: columns coupled to every
    star) are eliminated last through their Schur complement; the remaining
    (star) unknowns split into the connected components of their coupling
    graph (stars whose stamps share no pixel are independent), each
    factorised by a dense Cholesky (LAPACK ``potrf``; ``diag(N_c^-1)`` as the
    row sums of squares of ``U_c^-1`` from ``trtri``).  This is exact block
    elimination: the answer is that of one Cholesky of the whole matrix
    (to rounding), and the cost is the sum over components instead of the
    cube of the total.  A component larger than ``dense_max`` unknowns (the
    dense memory limit: ``8 dense_max^2`` bytes per copy) is factorised by
    sparse LU (SuperLU, symmetric mode, minimum-degree ordering), as is a
    component that is not positive definite.  ``need_diag=False`` skips the
    inverse's diagonal (returns ``None``).
    """

    N = sp.csr_matrix(N)
    n = N.shape[0]
    isb = np.zeros(n, bool)
    isb[np.asarray(border, dtype=np.int64)] = True
    bidx, sidx = np.nonzero(isb)[0], np.nonzero(~isb)[0]
    Nss = N[sidx][:, sidx] if bidx.size else N
    ncomp, lab = connected_components(Nss, directed=False)
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(ncomp + 1))
    Nss = Nss.tocsc()
    sizes = np.diff(bounds)
    single = order[bounds[:-1][sizes == 1]]  # 1x1 components: scalars, vectorised
    dsingle = Nss.diagonal()[single] if single.size else np.zeros(0)
    blocks = []  # (indices, kind, factor)
    for k in np.nonzero(sizes > 1)[0]:
        I = order[bounds[k]:bounds[k + 1]]
        sub = Nss[I][:, I]
        fac = None
        if I.size <= dense_max:
            try:
                fac = ("chol", sl.cholesky(sub.toarray(), lower=False, check_finite=False))
            except sl.LinAlgError:
                fac = None
        if fac is None:  # too large for dense memory, or not positive definite
            fac = ("lu", spla.splu(sp.csc_matrix(sub), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                   options={"SymmetricMode": True}))
        blocks.append((I, *fac))
    if np.any(dsingle <= 0):
        bad = single[dsingle <= 0]
        for i in bad:  # a zero pivot: leave it to the LU path (raises like a singular matrix would)
            blocks.append((np.array([i]), "lu", spla.splu(sp.csc_matrix(Nss[[i]][:, [i]]))))
        keep = dsingle > 0
        single, dsingle = single[keep], dsingle[keep]

    def solve_s(B):
        """``Nss^-1 B`` for the star unknowns (B: (ns,) or (ns, m))."""
        X = np.empty_like(B, dtype=np.float64)
        if single.size:
            X[single] = B[single] / (dsingle if B.ndim == 1 else dsingle[:, None])
        for I, kind, f in blocks:
            X[I] = sl.cho_solve((f, False), B[I], check_finite=False) if kind == "chol" else f.solve(B[I])
        return X

    def diag_s():
        d = np.empty(sidx.size)
        if single.size:
            d[single] = 1.0 / dsingle
        for I, kind, f in blocks:
            if kind == "chol":
                ui, info = sl.lapack.dtrtri(f, lower=0)
                if info != 0:
                    raise np.linalg.LinAlgError("triangular inverse failed")
                d[I] = np.einsum("ij,ij->i", ui, ui)
            else:
                for j0 in range(0, I.size, 512):
                    j1 = min(I.size, j0 + 512)
                    E = np.zeros((I.size, j1 - j0))
                    E[np.arange(j0, j1), np.arange(j1 - j0)] = 1.0
                    d[I[j0:j1]] = f.solve(E)[np.arange(j0, j1), np.arange(j1 - j0)]
        return d

    if bidx.size == 0:
        return solve_s, (diag_s() if need_diag else None)
    # border unknowns: Schur complement S = Nbb - Nbs Nss^-1 Nsb (small, dense)
    Nsb = N[sidx][:, bidx].toarray()
    Nbb = N[bidx][:, bidx].toarray()
    Z = solve_s(Nsb)  # Nss^-1 Nsb
    S = Nbb - Nsb.T @ Z
    S = 0.5 * (S + S.T)
    try:
        Sc = sl.cho_factor(S, lower=False, check_finite=False)

        def solve_b(R):
            return sl.cho_solve(Sc, R, check_finite=False)
    except sl.LinAlgError:  # rounding made the small Schur complement indefinite: LU
        Sl = sl.lu_factor(S, check_finite=False)

        def solve_b(R):
            return sl.lu_solve(Sl, R, check_finite=False)

    def solve(B):
        B = np.asarray(B, dtype=np.float64)
        Ys = solve_s(B[sidx])
        Xb = solve_b(B[bidx] - Nsb.T @ Ys)
        X = np.empty_like(B)
        X[sidx] = Ys - Z @ Xb
        X[bidx] = Xb
        return X

    if not need_diag:
        return solve, None
    Sinv = solve_b(np.eye(bidx.size))
    d = np.empty(n)
    d[sidx] = diag_s() + np.einsum("ij,ij->i", Z @ Sinv, Z)
    d[bidx] = np.diag(Sinv)
    return solve, d


# --------------------------------------------------------------------------- internals
def _pixscale_arcsec(c) -> float:
    try:

        s = float(np.mean(proj_plane_pixel_scales(c.wcs))) * 3600.0
        if np.isfinite(s) and s > 0:
            return s
    except Exception:
        pass
    return 0.2


def _read_block(c, i0, i1, valid):
    """DATA/STAT block, usable layers, common spaxel mask and layer flags."""
    d = c.data_block(i0, i1)
    s = c.stat_block(i0, i1)
    if s is None:
        raise ReaderError(f"{c.path}: no STAT extension; weights and errors need the variance")
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0) & valid[None]
    frac = ok.reshape(i1 - i0, -1).sum(axis=1) / max(1, valid.sum())
    good = frac > 0.5
    mask = ok[good].all(axis=0) if good.any() else np.zeros_like(valid)
    lflag = np.where(good, 0, 1).astype(np.int16)
    if good.any() and mask.sum() < valid.sum():
        lflag[good] |= 2
    return d, s, good, mask, lflag


def _accumulators(n, nz):
    """Output arrays of an extraction: flux and error (n_stars x n_layers, NaN until solved)
    and the per-layer flags."""
    return (np.full((n, nz), np.nan, dtype=np.float32), np.full((n, nz), np.nan, dtype=np.float32),
            np.zeros(nz, np.int16))


def _layer_blocks(c, valid, block, layer_flag, timings):
    """Read the cube ``block`` layers at a time; yield ``(i0, i1, data, var, good, mask)`` for
    blocks with a usable layer.  Fills ``layer_flag`` for every block and adds the read time
    to ``timings['read']``."""
    nz = c.shape[0]
    for i0 in range(0, nz, block):
        i1 = min(nz, i0 + block)
        t = time.perf_counter()
        d, s, good, mask, lflag = _read_block(c, i0, i1, valid)
        layer_flag[i0:i1] = lflag
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t
        if good.any():
            yield i0, i1, d, s, good, mask


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


# --------------------------------------------------------------------------- crowded-field image fit
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

    def design(th, sp_, cen):
        x, y = positions(th)
        return psf_design_matrix(_shape_psf(sp_), x, y, 0.0, (ny, nx), radius, oversample, valid=mask, centres=cen)

    for it in range(n_iter + 1):
        x, y = positions(theta)
        cen = (np.rint(x), np.rint(y))
        A = design(theta, shape_p, cen)
        cols = [_flux_columns(A, free, rel_flux), S]
        jac, names = [], []
        if f is not None and it < n_iter:
            model0 = A @ f
            if fit_theta:
                h = 1e-3
                x1, y1 = x + h, y
                Ax = psf_design_matrix(_shape_psf(shape_p), x1, y1, 0.0, (ny, nx), radius, oversample, valid=mask,
                                       centres=cen)
                Ay = psf_design_matrix(_shape_psf(shape_p), x, y + h, 0.0, (ny, nx), radius, oversample,
                                       valid=mask, centres=cen)
                gx = (Ax - A) / h
                gy = (Ay - A) / h
                # d model / d theta_k = sum_s f_s (gx_s dx_s/dtheta_k + gy_s dy_s/dtheta_k)
                for ddx, ddy in ((dx, dy), (-dy, dx), (np.ones(n), np.zeros(n)), (np.zeros(n), np.ones(n))):
                    jac.append(gx @ (f * ddx) + gy @ (f * ddy))
                names += ["a", "b", "ox", "oy"]
            if fit_shape:
                steps = (0.02 * shape_p[0], 0.02, 0.01, 0.01)
                for k, hk in enumerate(steps):
                    p1 = shape_p.copy()
                    p1[k] += hk
                    jac.append((design(theta, p1, cen) @ f - model0) / hk)
                names += ["fwhm", "beta", "e1", "e2"]
        if jac:
            cols.append(sp.csc_matrix(np.column_stack(jac)))
        M = sp.hstack(cols, format="csc")
        MW = M.multiply(w[:, None]).tocsc()
        N = (M.T @ MW).tocsc()
        dg = N.diagonal()
        N = N + sp.diags(np.where(dg > 0, ridge * dg, 1.0))
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
        step = sol[nf + S.shape[1]:]
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
    gx = (psf_design_matrix(psf, x + h, y, 0.0, (ny, nx), radius, oversample, valid=mask, centres=cen) - A) / h
    gy = (psf_design_matrix(psf, x, y + h, 0.0, (ny, nx), radius, oversample, valid=mask, centres=cen) - A) / h
    gx = gx[:, idx] @ sp.diags(f[idx])
    gy = gy[:, idx] @ sp.diags(f[idx])
    S = sp.csc_matrix(_sky_columns((ny, nx), sky_order, mask))
    nstar, nf = _flux_unknowns(len(x), free)
    M = sp.hstack([_flux_columns(A, free, f), S, gx, gy], format="csc")
    MW = M.multiply(w[:, None]).tocsc()
    N = (M.T @ MW).tocsc()
    dg = N.diagonal()
    N = N + sp.diags(np.where(dg > 0, ridge * dg, 1.0))
    k = nf + S.shape[1]
    solve, _ = factorise(N, dense_max, border=np.arange(nstar, k), need_diag=False)
    sol = solve(np.asarray(MW.T @ d).ravel())
    return sol[k:k + idx.size], sol[k + idx.size:k + 2 * idx.size]
