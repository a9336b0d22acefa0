"""Extraction results: the :class:`ExtractionResult` container, its files and the SOURCES table.

Owns the status values of the SOURCES table (:data:`EXTRACT_STATUS`), the per-layer flag
bits (:data:`LAYER_FLAGS`), the multi-extension output file and the PampelMUSE-style
per-star files (:func:`per_star_file_name`), and the assembly of the SOURCES quality table
(:func:`_sources_table`).

May import: :mod:`musepayne.io`, :mod:`musepayne.extract.psf`, :mod:`musepayne.extract.transform`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Column, Table

from ..io.fits import atomic_write_fits
from .psf import MoffatPSF
from .transform import CoordinateTransform

if TYPE_CHECKING:  # annotation only (extractor imports this module)
    from .extractor import ExtractConfig

__all__ = ["ExtractionResult", "per_star_file_name", "EXTRACT_STATUS", "LAYER_FLAGS"]

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


def per_star_file_name(stellar_id: str, max_stem: int = 80) -> str:
    """File name of a star's 1-D spectrum: injective in the id, safe on any file system.

    An id made only of ASCII letters, digits and ``-_+.`` (not starting with ``.``) of at
    most ``max_stem`` characters is used as it is; any other id becomes its sanitised,
    shortened stem plus ``~`` and 16 hex digits of its sha256 -- ``~`` never occurs in an
    unchanged id, so two different ids never share a file name (``a/b``, ``a_b``, ``a?b``).

    Parameters
    ----------
    stellar_id : str
        The star's catalogue id.
    max_stem : int
        Longest stem (characters) kept as it is.

    Returns
    -------
    str
        File name ending in ``.fits``.
    """
    sid = str(stellar_id)
    safe = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_+." else "_" for ch in sid)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == sid and 0 < len(sid) <= max_stem:
        return f"{sid}.fits"
    digest = hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:max_stem]}~{digest}.fits"


@dataclass
class ExtractionResult:
    """Spectra of one extraction with everything needed to judge them.

    Attributes
    ----------
    wave : numpy.ndarray, shape (nz,)
        Air wavelengths of the cube layers (Angstrom).
    flux, err : numpy.ndarray, shape (n_stars, nz)
        Flux and 1-sigma error per star and layer (cube BUNIT x pixel; NaN: not measured).
    sources : astropy.table.Table
        One row per catalogue star: id, ra/dec (deg), x/y (cube pixels), mag, snr, edge_dist
        (pix), blend_frac, neighbour_frac, psf_chi2, status (:data:`EXTRACT_STATUS`).
    psf : MoffatPSF
        The fitted (or given) PSF.
    transform : CoordinateTransform
        The catalogue -> cube transformation.
    layer_flag : numpy.ndarray of int16, shape (nz,)
        Per-layer flags (:data:`LAYER_FLAGS`).
    config : ExtractConfig
        The configuration used.
    cube_path : str
        Path of the cube.
    bunit : str
        The cube's BUNIT.
    timings : dict
        Wall time per step (s).
    """

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
        """Write WAVE, FLUX, ERR, SOURCES (+ LAYER_FLAG) atomically; PSF and transform in the primary header.

        Parameters
        ----------
        path : str or pathlib.Path
            Output FITS file.
        overwrite : bool
            Replace an existing file.
        """
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
        atomically as ``<folder>/<stellar_id>.fits`` (:func:`per_star_file_name`).

        Parameters
        ----------
        folder : str or pathlib.Path
            Output folder (created).
        statuses : tuple of str
            Statuses of the stars written.

        Returns
        -------
        list of pathlib.Path
            The files written.
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


#: the SOURCES columns of the residual diagnostics, in the row order of ``_sources_table``'s ``hidden``:
#: (name, unit, description); :mod:`.hidden` gives the first five, :mod:`.chromatic` the last two
RESIDUAL_COLUMNS = (
    ("hidden_frac", "", "light within 1 FWHM of an unmodelled point source (not in the source list) relative "
                        "to the star's own, from the extraction residual (3-sigma lower bound; 0: none "
                        "significant; aperture: NaN)"),
    ("hidden_snr", "", "significance of that unmodelled source's flux in the layer-summed residual (noise "
                       "and a 2 % PSF-model error of the stars' light)"),
    ("hidden_flux", "", "flux of that unmodelled source (cube flux units, mean over the layers)"),
    ("hidden_x", "pix", "0-based cube pixel x of that unmodelled source (NaN: none)"),
    ("hidden_y", "pix", "0-based cube pixel y of that unmodelled source"),
    ("chroma_chi2", "", "reduced chi^2 of the star's light centroid in broad bands of layers about its mean "
                        "(extraction residual; noise and a 2 % PSF-model error): an unresolved companion of "
                        "another colour moves it with wavelength (~1: none; aperture: NaN)"),
    ("chroma_shift", "", "largest distance of a band's light centroid from its mean over the bands, at its "
                         "3-sigma lower bound (FWHM; 0: none significant; aperture: NaN)"),
)


def _sources_table(cat, c, x, y, flux, err, chi2, edge, blend, neigh, fwhm_ref, snr_min, notes, hidden=None):
    """Per-star status (sets ``flux``/``err`` of off-field stars to NaN in place) and the SOURCES table."""
    nz = flux.shape[1]
    on = edge >= 0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: off-field stars
        snr = np.nanmedian(np.where(err > 0, flux / err, np.nan), axis=1) if nz else np.full(len(x), np.nan)
    status = np.full(len(x), "ok", dtype="<U9")
    status[edge < fwhm_ref] = "edge"
    status[(snr < snr_min) & on] = "low_snr"
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
    hidden = np.full((len(RESIDUAL_COLUMNS), len(x)), np.nan) if hidden is None else np.asarray(hidden, float)
    for k, (name, unit, desc) in enumerate(RESIDUAL_COLUMNS):
        src[name] = Column(hidden[k], unit=unit or None, description=desc)
    src["status"] = status
    src.meta["warnings"] = notes
    return src
