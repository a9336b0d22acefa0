"""Readers for MUSE, LAMOST and stellar-library spectra.

Every reader returns a :class:`~musepayne.io.spectra.SpectrumSet` and raises :class:`~musepayne.io.spectra.ReaderError` with a
specific message for anything it cannot use: truncated or non-FITS files,
missing error extensions, wavelengths that look like nm, all-NaN flux, zero or
negative variance everywhere, wrong axis order.

Kinds (``read_spectra(path, kind=...)``; ``detect_kind`` guesses it):

``muse``
    PampelMUSE-style 1-D files (flux in HDU 0, ``SIGMA`` HDU, ``CRVAL1`` /
    ``CDELT1``, air), nominal or extended mode; the same with a 2-D flux
    image (many spectra, one per row); a binary table with wavelength, flux
    and error columns (one row per spectrum, or one spectrum in columns); and
    the ``WAVE``/``FLUX``/``ERR``/``SOURCES`` file written by
    ``musepayne extract``.
``lamost``
    DR1-DR8 5-row images (flux, ivar, wavelength, andmask, ormask; vacuum)
    and the DR9+ ``COADD`` table.
``miles``
    MILES v9.1 (0.9 A/px, FWHM 2.5 A, air); labels from
    ``paramsMILES_v9.1.txt`` found next to the file (or given).
``stelib``
    STELIB v3.2 (~1 A/px, FWHM ~3 A, air); labels from the ``TEFF``,
    ``LOG_G``, ``FE_H`` header keywords.

Cubes are opened by :mod:`musepayne.io.cube`; files that specutils reads by
:mod:`musepayne.io.specutils`.  The library readers (``miles``, ``stelib``) are defined in
:mod:`musepayne.io.libraries` (and re-exported here); the low-level helpers shared with the
cube reader are in :mod:`musepayne.io._reading`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..instrument.lsf import LAMOST_LSF, LSF, MUSE_LSF
from ..instrument.wavelength import linear_grid, log_linear_grid
from ._reading import (
    _check_angstrom,
    _check_usable,
    _frame_from_ctype,
    _hdr_float,
    _load,
    _meta,
    _open,
    _wave_unit_factor,
)
from .libraries import LIBRARY_SNR, library_variance, read_miles, read_miles_params, read_stelib
from .spectra import ReaderError, SpectrumSet

__all__ = [
    "read_spectra",
    "detect_kind",
    "KINDS",
    "read_muse_spectra",
    "read_lamost",
    "read_miles",
    "read_stelib",
    "read_miles_params",
    "library_variance",
    "LIBRARY_SNR",
    "EXTRACTION_QUALITY",
]

KINDS = ("muse", "lamost", "miles", "stelib")



# --------------------------------------------------------------------------- detection
def detect_kind(path) -> str:
    """Guess the kind of a spectrum file from its structure and headers.

    MILES and STELIB are recognised by their file names (``miles_*``, ``m0001V.fits``, ``stelib*``),
    LAMOST by a ``COADD`` extension, ``TELESCOP = LAMOST`` or a 2-D image with ``COEFF0``, MUSE by
    ``FLUX``+``WAVE`` or ``SIGMA`` extensions, an ``AWAV`` axis or a binary table.

    Parameters
    ----------
    path : str or os.PathLike
        The spectrum file.

    Returns
    -------
    str
        One of :data:`KINDS`: ``'muse'``, ``'lamost'``, ``'miles'`` or ``'stelib'``.

    Raises
    ------
    ReaderError
        If the file is missing, not FITS, or matches none of the kinds.
    """
    name = os.path.basename(str(path)).lower()
    if name.startswith("miles_") or re.search(r"m\d{4}v\.fits", name):
        return "miles"
    if name.startswith("stelib"):
        return "stelib"
    with _open(path) as h:
        names = [x.name.upper() for x in h]
        h0 = h[0].header
        if "COADD" in names:
            return "lamost"
        if "FLUX" in names and "WAVE" in names:
            return "muse"
        tel = str(h0.get("TELESCOP", "")).upper()
        if "LAMOST" in tel or ("COEFF0" in h0 and h0.get("NAXIS", 0) == 2):
            return "lamost"
        if "SIGMA" in names or "AWAV" in str(h0.get("CTYPE1", "")).upper():
            return "muse"
        if "STARIDEN" in h0 and "TEFF" in h0:
            return "stelib"
        if len(h) > 1 and isinstance(h[1], fits.BinTableHDU):
            return "muse"
    raise ReaderError(f"{path}: cannot tell what kind of spectrum file this is; pass --instrument")


def read_spectra(path, kind: str | None = None, **kw) -> SpectrumSet:
    """Read any supported spectrum file (see module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The spectrum file.
    kind : str, optional
        One of :data:`KINDS`; guessed by :func:`detect_kind` when None.
    **kw
        Passed to the reader of that kind (e.g. ``lsf``, ``frame``, ``params``, ``snr``).

    Returns
    -------
    SpectrumSet
        The spectra, in the frame of the file (air for MUSE and the libraries, vacuum for LAMOST).

    Raises
    ------
    ReaderError
        For an unknown ``kind`` and for any failure to read the file (other exceptions are
        turned into a ReaderError naming the file).
    """
    readers = {"muse": read_muse_spectra, "lamost": read_lamost, "miles": read_miles, "stelib": read_stelib}
    if kind is not None and kind not in readers:
        raise ReaderError(f"unknown instrument/kind {kind!r}; choose one of {KINDS}")
    try:
        kind = kind or detect_kind(path)
        return readers[kind](path, **kw)
    except ReaderError:
        raise
    except Exception as exc:  # anything astropy/numpy raise on a malformed file
        raise ReaderError(f"{path}: cannot read as {kind or 'spectrum'} file ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- MUSE
def read_muse_spectra(path, lsf: LSF = MUSE_LSF, frame: str | None = None) -> SpectrumSet:
    """MUSE spectra: PampelMUSE 1-D/2-D images, extract files, or tables.

    Parameters
    ----------
    path : str or os.PathLike
        The file: a PampelMUSE-style 1-D/2-D image with an error extension (SIGMA, ERR, STAT or
        VAR), a binary table with wavelength, flux and error columns, or a ``musepayne extract`` file.
    lsf : LSF, optional
        Line-spread function to attach (default the MUSE LSF of Bacon et al. 2017).
    frame : {'air', 'vacuum'}, optional
        Wavelength frame; by default from CTYPE1 (``AWAV`` air, ``WAVE`` vacuum) or the table's
        wavelength column name, falling back to air.

    Returns
    -------
    SpectrumSet
        One row per spectrum; wavelengths in Angstrom; variance in flux units squared.  Extract files
        also carry the :data:`EXTRACTION_QUALITY` columns in ``meta``.

    Raises
    ------
    ReaderError
        If no spectrum is found, the error extension/column is missing or mis-shaped, the
        wavelength solution is missing or log-linear, or the content is unusable.
    """
    with _open(path, memmap=False) as h:
        names = [x.name.upper() for x in h]
        if "FLUX" in names and "WAVE" in names:
            return _read_extract_file(h, path, lsf, frame)
        h0 = h[0]
        if h0.data is not None and h0.header.get("NAXIS", 0) in (1, 2):
            return _read_muse_image(h, path, lsf, frame)
        for ext in h[1:]:
            if isinstance(ext, fits.BinTableHDU):
                return _read_muse_table(ext, path, lsf, frame)
        # image in the first extension (MUSE pipeline style)
        if len(h) > 1 and h[1].header.get("NAXIS", 0) in (1, 2):
            return _read_muse_image(h, path, lsf, frame, data_ext=1)
    raise ReaderError(f"{path}: no MUSE spectrum found (expected a 1-D/2-D image with SIGMA, or a table)")


def _read_muse_image(h, path, lsf, frame, data_ext=0):
    hdr = h[data_ext].header
    flux = np.array(_load(h[data_ext], path, "flux HDU"), dtype=np.float64)
    names = [x.name.upper() for x in h]
    err_name = next((n for n in ("SIGMA", "ERR", "ERROR", "STAT", "VAR", "VARIANCE") if n in names), None)
    if err_name is None:
        raise ReaderError(f"{path}: no error extension (expected SIGMA, ERR, STAT or VAR); cannot weight the fit")
    err = np.array(_load(h[err_name], path, f"{err_name} HDU"), dtype=np.float64)
    if err.shape != flux.shape:
        raise ReaderError(f"{path}: {err_name} shape {err.shape} differs from flux shape {flux.shape}")
    var = err**2 if err_name in ("SIGMA", "ERR", "ERROR") else err
    var = np.where(err < 0, np.nan, var)  # a negative error or variance is no measurement: pixel unusable
    npix = flux.shape[-1]
    if "CRVAL1" not in hdr or not ("CDELT1" in hdr or "CD1_1" in hdr):
        raise ReaderError(f"{path}: no wavelength solution (CRVAL1 and CDELT1/CD1_1 missing)")
    cdelt = _hdr_float(hdr, "CDELT1", "CD1_1")
    ctype = str(hdr.get("CTYPE1", "AWAV")).upper()
    if "LOG" in ctype or hdr.get("DC-FLAG", 0) == 1:
        raise ReaderError(f"{path}: log-linear wavelength axis is not supported for MUSE spectra")
    factor = _wave_unit_factor(hdr, 1, path)
    wave = linear_grid(float(hdr["CRVAL1"]), cdelt, npix, float(hdr.get("CRPIX1", 1.0))) * factor
    _check_angstrom(wave, path)
    fr = frame or _frame_from_ctype(ctype, "air")
    flux2 = np.atleast_2d(flux)
    var2 = np.atleast_2d(var)
    n = flux2.shape[0]
    if n == 1:
        _check_usable(flux2, var2, path)
    h0 = h[0].header
    sid = h0.get("OBJNAME", h0.get("OBJECT", Path(path).stem))
    ids = [str(sid)] if n == 1 else [f"{sid}_{i}" for i in range(n)]
    meta = _meta(n, ids, [_hdr_float(h0, "RA")] * n, [_hdr_float(h0, "DEC")] * n, path, "muse")
    return SpectrumSet(wave, flux2, var2, fr, lsf, meta)


def _col(table, *candidates):
    lower = {c.lower(): c for c in table.colnames}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def _read_muse_table(ext, path, lsf, frame):
    t = Table(_load(ext, path, "table"))
    wcol = _col(t, "wave", "wavelength", "lambda", "lam", "wavelength_air", "awav")
    fcol = _col(t, "flux", "data", "spec")
    ecol = _col(t, "err", "error", "sigma", "flux_err", "ivar", "var", "variance", "stat")
    if wcol is None or fcol is None:
        raise ReaderError(f"{path}: table needs wavelength and flux columns; has {t.colnames}")
    if ecol is None:
        raise ReaderError(f"{path}: table has no error column (err/sigma/ivar/var); has {t.colnames}")
    unit = str(t[wcol].unit or "").lower()
    factor = {"nm": 10.0, "um": 1e4, "micron": 1e4}.get(unit, 1.0)
    w = np.asarray(t[wcol], dtype=np.float64)
    f = np.asarray(t[fcol], dtype=np.float64)
    e = np.asarray(t[ecol], dtype=np.float64)
    if f.ndim == 1:  # one spectrum in columns
        wave, flux, err = w * factor, f[None], e[None]
        ids = [Path(path).stem]
    else:  # one spectrum per row (vector columns)
        wave = (w[0] if w.ndim == 2 else w) * factor
        if w.ndim == 2 and not np.allclose(w, w[0]):
            raise ReaderError(f"{path}: table rows have different wavelength grids; split them into files")
        flux, err = f, e
        idc = _col(t, "stellar_id", "id", "star_id", "name")
        ids = [str(x) for x in t[idc]] if idc else [f"{Path(path).stem}_{i}" for i in range(len(t))]
    _check_angstrom(wave, path)
    el = ecol.lower()
    with np.errstate(divide="ignore"):
        var = 1.0 / err if el == "ivar" else (err if el in ("var", "variance", "stat") else err**2)
    n = flux.shape[0]
    if n == 1:
        _check_usable(flux, var, path)
    ra = np.asarray(t[_col(t, "ra")], float) if _col(t, "ra") and f.ndim == 2 else np.full(n, np.nan)
    dec = np.asarray(t[_col(t, "dec")], float) if _col(t, "dec") and f.ndim == 2 else np.full(n, np.nan)
    fr = frame or ("vacuum" if "vac" in wcol.lower() else "air")
    return SpectrumSet(wave, flux, var, fr, lsf, _meta(n, ids, ra, dec, path, "muse"))


def _read_extract_file(h, path, lsf, frame):
    """The ``musepayne extract`` output: WAVE, FLUX, ERR images and SOURCES table."""
    wave = np.array(_load(h["WAVE"], path, "WAVE"), dtype=np.float64).ravel()
    flux = np.array(_load(h["FLUX"], path, "FLUX"), dtype=np.float64)
    if "ERR" not in h:
        raise ReaderError(f"{path}: extract file without ERR extension")
    err = np.array(_load(h["ERR"], path, "ERR"), dtype=np.float64)
    flux, err = np.atleast_2d(flux), np.atleast_2d(err)
    if flux.shape != err.shape or flux.shape[1] != wave.size:
        raise ReaderError(f"{path}: FLUX {flux.shape}, ERR {err.shape} and WAVE ({wave.size},) disagree")
    _check_angstrom(wave, path)
    n = flux.shape[0]
    if "SOURCES" in h:
        src = Table(h["SOURCES"].data)
        if len(src) != n:
            raise ReaderError(f"{path}: SOURCES has {len(src)} rows for {n} spectra")
        ids = [str(x) for x in src["stellar_id"]] if "stellar_id" in src.colnames else list(map(str, range(n)))
        ra = np.asarray(src["ra"], float) if "ra" in src.colnames else np.full(n, np.nan)
        dec = np.asarray(src["dec"], float) if "dec" in src.colnames else np.full(n, np.nan)
        quality = _extraction_quality(src)
    else:
        ids, ra, dec = [f"{Path(path).stem}_{i}" for i in range(n)], np.full(n, np.nan), np.full(n, np.nan)
        quality = {}
    fr = frame or _frame_from_ctype(h["WAVE"].header.get("CTYPE1", "AWAV"), "air")
    meta = _meta(n, ids, ra, dec, path, "muse")
    for k, v in quality.items():
        meta[k] = v
    return SpectrumSet(wave, flux, err**2, fr, lsf, meta)


#: SOURCES columns of an extraction that travel with each spectrum (prepare keeps them and
#: the catalogue reports them): SOURCES name -> metadata name
EXTRACTION_QUALITY = {"x": "x", "y": "y", "mag": "mag", "snr": "ext_snr", "blend_frac": "blend_frac",
                      "neighbour_frac": "neighbour_frac", "edge_dist": "edge_dist", "psf_chi2": "ext_psf_chi2",
                      "hidden_frac": "hidden_frac", "chroma_shift": "chroma_shift", "status": "ext_status"}


def _extraction_quality(src: Table) -> dict:
    """The per-source quality columns of an extraction's SOURCES table, renamed for the metadata."""
    out = {}
    for name, meta_name in EXTRACTION_QUALITY.items():
        if name in src.colnames:
            col = np.asarray(src[name])
            out[meta_name] = col.astype(str) if col.dtype.kind in "SUO" else col.astype(np.float64)
    return out


# --------------------------------------------------------------------------- LAMOST
def read_lamost(path, lsf: LSF = LAMOST_LSF) -> SpectrumSet:
    """LAMOST low-resolution spectrum: DR1-DR8 image or DR9+ COADD table (vacuum).

    Parameters
    ----------
    path : str or os.PathLike
        A LAMOST DR1-DR8 (5, n_pix) image (flux, ivar, wavelength, andmask, ormask) or a DR9+ file
        with a ``COADD`` table.
    lsf : LSF, optional
        Line-spread function to attach (default ``LAMOST_LSF``, R = 1800).

    Returns
    -------
    SpectrumSet
        One spectrum on the vacuum wavelength grid (Angstrom); variance ``1 / ivar`` (inf where
        ivar <= 0); ``bad`` where andmask != 0 or ivar <= 0; ``meta`` adds ``lamost_z``,
        ``lamost_snrg`` and ``file_id``.

    Raises
    ------
    ReaderError
        If a COADD table lacks FLUX/IVAR/WAVELENGTH, the image is not (>=3, n_pix), the flux is
        non-finite everywhere, ivar is zero everywhere, or the wavelengths are not Angstrom.
    """
    with _open(path, memmap=False) as h:
        names = [x.name.upper() for x in h]
        h0 = h[0].header
        if "COADD" in names:
            t = Table(_load(h["COADD"], path, "COADD table"))
            cols = {c.upper(): c for c in t.colnames}
            for need in ("FLUX", "IVAR", "WAVELENGTH"):
                if need not in cols:
                    raise ReaderError(f"{path}: COADD table lacks column {need}")
            flux = np.asarray(t[cols["FLUX"]][0], np.float64)
            ivar = np.asarray(t[cols["IVAR"]][0], np.float64)
            wave = np.asarray(t[cols["WAVELENGTH"]][0], np.float64)
            andmask = np.asarray(t[cols["ANDMASK"]][0]) if "ANDMASK" in cols else np.zeros(flux.size, int)
        else:
            data = np.array(_load(h[0], path, "primary image"), dtype=np.float64)
            if data.ndim != 2 or data.shape[0] < 3:
                raise ReaderError(
                    f"{path}: LAMOST DR1-8 files hold a (5, npix) image; found shape {data.shape}"
                )
            flux, ivar = data[0], data[1]
            andmask = data[3].astype(np.int64) if data.shape[0] > 3 else np.zeros(flux.size, int)
            if "COEFF0" in h0 and "COEFF1" in h0:
                wave = log_linear_grid(float(h0["COEFF0"]), float(h0["COEFF1"]), flux.size)
            else:
                wave = data[2]
        _check_angstrom(wave, path)
        with np.errstate(divide="ignore"):
            var = np.where(ivar > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), np.inf)
        if not np.any(np.isfinite(flux)):
            raise ReaderError(f"{path}: flux is NaN/inf everywhere")
        if not np.any(ivar > 0):
            raise ReaderError(f"{path}: ivar is zero everywhere")
        bad = (andmask != 0) | (ivar <= 0)
        sid = h0.get("OBSID", h0.get("OBJNAME", Path(path).name.split(".fits")[0]))
        meta = _meta(1, [str(sid)], [_hdr_float(h0, "RA")], [_hdr_float(h0, "DEC")], path, "lamost")
        meta["lamost_z"] = [_hdr_float(h0, "Z")]
        meta["lamost_snrg"] = [_hdr_float(h0, "SNRG")]
        meta["file_id"] = [Path(path).name.split(".fits")[0]]
        return SpectrumSet(wave, flux[None], var[None], "vacuum", lsf, meta, bad=bad[None])
