"""The prepared-spectra interchange format (what ``prepare`` writes, ``fit`` reads).

One FITS file:

========== ===================================================================
HDU        content
========== ===================================================================
primary    header only: ``MPFORMAT='musepayne-prepared'``, ``MPVERS`` (format
           version), ``FRAME='vacuum'``, ``MODE``, ``TGTLSF`` (target LSF),
           ``CONTWID`` (continuum kernel sigma, A), software version
``WAVE``   (n_pix,) float64, vacuum Angstrom, pixel centres
``FLUX``   (n_spectra, n_pix) float32, continuum-normalised flux
``IVAR``   (n_spectra, n_pix) float32, inverse variance of ``FLUX``; 0 where masked
``MASK``   (n_spectra, n_pix) int32 bit mask (:mod:`musepayne.flags`)
``LSF_EXCESS`` (n_spectra, n_pix) float32, FWHM (A) by which the data are
           broader than the target LSF (0 where matched); a fit may convolve
           its model by it
``CONT``   (n_spectra, n_pix) float32, the pseudo-continuum divided out
           (in the input's flux units, after resolution matching)
``SPECTRA`` table, one row per spectrum: stellar_id, ra, dec, snr,
           snr_prepared, status, reason, source, instrument, n_used, plus any
           label columns the input carried (teff, logg, fe_h, ...)
========== ===================================================================

Rows of failed spectra are kept (flux NaN, ivar 0, status says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from .. import __version__
from ..flags import PIXEL_FLAGS
from .fits import atomic_write_fits, check_claimed_sizes, check_format, fits_ascii, scan_fits_headers
from .spectra import ReaderError

__all__ = ["PreparedSpectra", "FORMAT_NAME", "FORMAT_VERSION", "SPECTRA_COLUMNS"]

FORMAT_NAME = "musepayne-prepared"
FORMAT_VERSION = 1

#: Descriptions (and units) of the standard SPECTRA columns.
SPECTRA_COLUMNS = {
    "stellar_id": ("", "identifier of the star / spectrum"),
    "ra": ("deg", "right ascension (ICRS) if known"),
    "dec": ("deg", "declination (ICRS) if known"),
    "snr": ("", "median S/N per native pixel over used wavelengths (bulge mode: lambda > 5991 A)"),
    "snr_prepared": ("", "median S/N per prepared (model-grid) pixel over used pixels"),
    "n_used": ("", "number of prepared pixels with IVAR > 0"),
    "status": ("", "spectrum status (musepayne.flags.SPECTRUM_STATUS)"),
    "reason": ("", "human-readable reason when status is not 'ok'"),
    "source": ("", "input file"),
    "instrument": ("", "input kind: muse, lamost, miles, stelib"),
    "teff": ("K", "literature effective temperature (libraries, training sets)"),
    "logg": ("", "literature surface gravity log10(g / cm s^-2), dex"),
    "fe_h": ("", "literature [Fe/H], dex"),
}


@dataclass(frozen=True, eq=False)
class PreparedSpectra:
    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    lsf_excess: np.ndarray
    cont: np.ndarray
    spectra: Table
    meta: dict = field(default_factory=dict)

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    # ------------------------------------------------------------------ I/O
    def to_hdulist(self) -> fits.HDUList:
        ph = fits.Header()
        ph["MPFORMAT"] = (FORMAT_NAME, "musepayne interchange format")
        ph["MPVERS"] = (FORMAT_VERSION, "format version")
        ph["MPSOFT"] = (__version__, "musepayne version that wrote the file")
        ph["FRAME"] = ("vacuum", "wavelength frame of WAVE")
        for k, v in self.meta.items():
            key = k.upper()[:8]
            ph[key] = v if not isinstance(v, str) else v[:68]
        hw = fits.ImageHDU(np.asarray(self.wave, np.float64), name="WAVE")
        hw.header["BUNIT"] = "Angstrom"
        hw.header["CTYPE1"] = "WAVE"
        hf = fits.ImageHDU(np.asarray(self.flux, np.float32), name="FLUX")
        hf.header["BUNIT"] = ("", "continuum-normalised flux")
        hi = fits.ImageHDU(np.asarray(self.ivar, np.float32), name="IVAR")
        hm = fits.ImageHDU(np.asarray(self.mask, np.int32), name="MASK")

        for f in PIXEL_FLAGS.values():
            hm.header[f"MASKB{f.bit}"] = (f.name, f.description[:47])
        he = fits.ImageHDU(np.asarray(self.lsf_excess, np.float32), name="LSF_EXCESS")
        he.header["BUNIT"] = ("Angstrom", "FWHM of data broadening beyond the target LSF")
        hc = fits.ImageHDU(np.asarray(self.cont, np.float32), name="CONT")
        tab = self.spectra.copy(copy_data=True)
        for name, (unit, desc) in SPECTRA_COLUMNS.items():
            if name in tab.colnames:
                tab[name].description = desc
                if unit:
                    tab[name].unit = unit
        ht = fits.table_to_hdu(fits_ascii(tab))
        ht.name = "SPECTRA"
        return fits.HDUList([fits.PrimaryHDU(header=ph), hw, hf, hi, hm, he, hc, ht])

    def write(self, path, overwrite: bool = True):
        """Write atomically (temporary file in the same folder, then rename)."""
        atomic_write_fits(self.to_hdulist(), path, overwrite=overwrite)

    @classmethod
    def read(cls, path) -> PreparedSpectra:
        try:
            scan_fits_headers(path, ReaderError)
            with fits.open(path, memmap=False) as h:
                ph = h[0].header
                check_format(ph, path, FORMAT_NAME, FORMAT_VERSION, "prepared-spectra", ReaderError)
                check_claimed_sizes(h, path, ReaderError)
                wave = np.array(h["WAVE"].data, np.float64)
                flux = np.array(h["FLUX"].data, np.float64, ndmin=2)
                ivar = np.array(h["IVAR"].data, np.float64, ndmin=2)
                mask = np.array(h["MASK"].data, np.int32, ndmin=2)
                exc = (np.array(h["LSF_EXCESS"].data, np.float64, ndmin=2) if "LSF_EXCESS" in h
                       else np.zeros_like(flux))
                cont = np.array(h["CONT"].data, np.float64, ndmin=2) if "CONT" in h else np.ones_like(flux)
                spectra = Table.read(h["SPECTRA"])
                meta = {k.lower(): ph[k] for k in ("MODE", "TGTLSF", "CONTWID", "AONOTCH", "MPSOFT") if k in ph}
        except ReaderError:
            raise
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReaderError(f"{path}: cannot read prepared spectra ({type(exc).__name__}: {exc})") from None
        if not (flux.shape == ivar.shape == mask.shape) or flux.shape[1] != wave.size:
            raise ReaderError(f"{path}: FLUX/IVAR/MASK/WAVE shapes disagree")
        if len(spectra) != flux.shape[0]:
            raise ReaderError(f"{path}: SPECTRA has {len(spectra)} rows for {flux.shape[0]} spectra")
        return cls(wave, flux, ivar, mask, exc, cont, spectra, meta)

    def take(self, index) -> PreparedSpectra:
        """A new object with the rows at ``index`` (in that order)."""
        idx = np.asarray(index)
        return PreparedSpectra(self.wave.copy(), self.flux[idx], self.ivar[idx], self.mask[idx],
                               self.lsf_excess[idx], self.cont[idx], self.spectra[idx], dict(self.meta))

    @staticmethod
    def concatenate(parts) -> PreparedSpectra:
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        w = parts[0].wave
        for p in parts[1:]:
            if p.wave.shape != w.shape or not np.allclose(p.wave, w, rtol=1e-10, atol=0):
                raise ValueError("prepared spectra on different grids cannot be concatenated")
        return PreparedSpectra(
            w.copy(),
            np.vstack([p.flux for p in parts]),
            np.vstack([p.ivar for p in parts]),
            np.vstack([p.mask for p in parts]),
            np.vstack([p.lsf_excess for p in parts]),
            np.vstack([p.cont for p in parts]),
            vstack([p.spectra for p in parts], metadata_conflicts="silent"),
            dict(parts[0].meta),
        )
