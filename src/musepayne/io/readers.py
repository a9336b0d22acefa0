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
:mod:`musepayne.io.specutils`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..instrument.lsf import LAMOST_LSF, LSF, MILES_LSF, MUSE_LSF, STELIB_LSF
from ..instrument.wavelength import linear_grid, log_linear_grid
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
    "EXTRACTION_QUALITY",
]

KINDS = ("muse", "lamost", "miles", "stelib")

#: nominal peak S/N assigned to noise-free library spectra (see ``library_variance``)
LIBRARY_SNR = 1000.0


# --------------------------------------------------------------------------- helpers
def _open(path, **kw):
    with warnings.catch_warnings():
        # STELIB headers repeat EXTEND; astropy fixes that silently for us
        warnings.filterwarnings("ignore", message=".*EXTEND.*already exists.*")
        return _open_checked(path, **kw)


def _open_checked(path, **kw):
    p = Path(path)
    if not p.exists():
        raise ReaderError(f"{path}: no such file")
    if p.is_dir():
        raise ReaderError(f"{path}: is a directory, not a FITS file")
    try:
        hdul = fits.open(p, **kw)
        hdul.verify("silentfix")
        # touch every header so truncated files fail here, not later
        for h in hdul:
            _ = h.header
        return hdul
    except ReaderError:
        raise
    except Exception as exc:  # astropy raises OSError/TypeError/ValueError variously
        raise ReaderError(f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})") from None


def _load(hdu, path, what):
    try:
        data = hdu.data
    except Exception as exc:
        raise ReaderError(f"{path}: {what} could not be read, file truncated? ({exc})") from None
    if data is None:
        raise ReaderError(f"{path}: {what} is empty")
    return data


def _wave_unit_factor(header, axis, path, wave_values=None):
    """Factor to convert the header's wavelength unit to Angstrom."""
    unit = str(header.get(f"CUNIT{axis}", "")).strip().lower()
    if unit in ("angstrom", "angstroms", "a", "aa", "0.1 nm"):
        return 1.0
    if unit in ("nm", "nanometer", "nanometers"):
        return 10.0
    if unit in ("um", "micron", "microns", "micrometer"):
        return 1e4
    if unit in ("m", "meter"):
        return 1e10
    if unit:
        raise ReaderError(f"{path}: unsupported wavelength unit CUNIT{axis}={unit!r}")
    if wave_values is not None:
        _check_angstrom(wave_values, path)
    return 1.0


def _check_angstrom(wave, path):
    w = np.asarray(wave, dtype=np.float64)
    fin = w[np.isfinite(w)]
    if fin.size == 0:
        raise ReaderError(f"{path}: wavelength array has no finite value")
    if np.nanmax(fin) < 2000.0:
        raise ReaderError(
            f"{path}: wavelengths {fin.min():.4g}-{fin.max():.4g} look like nm or microns, not "
            "Angstrom; give the unit in CUNIT1 (e.g. 'nm') or convert the file"
        )
    if np.any(np.diff(fin) <= 0):
        raise ReaderError(f"{path}: wavelengths are not strictly increasing")


def _frame_from_ctype(ctype, default):
    c = str(ctype).strip().upper()
    if c.startswith("AWAV"):
        return "air"
    if c.startswith("WAVE") and not c.startswith("WAVELENGTH"):
        return "vacuum"
    return default


def _meta(n, stellar_id, ra, dec, source, instrument, **labels):
    t = Table()
    t["stellar_id"] = np.asarray(stellar_id, dtype=str).reshape(n)
    t["ra"] = np.asarray(ra, dtype=np.float64).reshape(n)
    t["dec"] = np.asarray(dec, dtype=np.float64).reshape(n)
    t["source"] = np.asarray([str(source)] * n, dtype=str)
    t["instrument"] = np.asarray([instrument] * n, dtype=str)
    for k, v in labels.items():
        t[k] = np.asarray(v, dtype=np.float64).reshape(n)
    return t


def _hdr_float(h, *keys, default=np.nan):
    for k in keys:
        if k in h:
            try:
                return float(h[k])
            except (TypeError, ValueError):
                pass
    return default


def _check_usable(flux, var, path):
    """Raise for files whose content is unusable as a whole (single-spectrum files)."""
    if not np.any(np.isfinite(flux)):
        raise ReaderError(f"{path}: flux is NaN/inf everywhere")
    good_var = np.isfinite(var) & (var > 0)
    if not np.any(good_var):
        raise ReaderError(f"{path}: variance/error is zero, negative or non-finite everywhere")


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
                      "status": "ext_status"}


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


# --------------------------------------------------------------------------- libraries
def library_variance(flux, snr: float = LIBRARY_SNR):
    """Nominal photon-like variance for noise-free library spectra.

    ``var = |f| * max(f) / snr^2``: S/N = ``snr`` at the flux peak and
    proportional to sqrt(flux) elsewhere, so the ivar-weighted continuum
    behaves as for real data.  Non-positive flux gets infinite variance.

    Parameters
    ----------
    flux : array_like
        Flux, shape (n_pix,) or (n_spec, n_pix); the peak is taken per spectrum.
    snr : float, optional
        Nominal S/N per pixel at the flux peak (default ``LIBRARY_SNR`` = 1000).

    Returns
    -------
    numpy.ndarray
        Variance in flux units squared, shape (n_spec, n_pix) (1-D input gives one row).
    """
    f = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    peak = np.nanmax(np.where(np.isfinite(f), f, np.nan), axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0)
    var = np.abs(f) * peak / snr**2
    return np.where(np.isfinite(f) & (f > 0), var, np.inf)


def read_miles_params(path) -> Table:
    """Parse ``paramsMILES_v9.1.txt``: MILES id, name, Teff, logg, [Fe/H].

    The file is fixed-width: the name in columns 0-22 (cluster stars have
    spaces and a 'Cl' tag in it), the 4-digit MILES id in columns 23-26, then
    CaT id, spectral type, Teff, log g, [Fe/H], references.  Missing values
    ('--') become NaN.  Rows whose id is not four digits (one row in v9.1
    reads '022.') are skipped: guessing the star would risk a wrong label.

    Parameters
    ----------
    path : str or os.PathLike
        The parameter file (latin-1 text).

    Returns
    -------
    astropy.table.Table
        Columns ``miles_id`` (str, 4 digits), ``name`` (str), ``teff`` (K), ``logg`` (dex, cgs)
        and ``fe_h`` (dex).

    Raises
    ------
    ReaderError
        If no parameter row is found.
    """
    num_re = re.compile(r"-?\d+\.\d+|--")
    rows = []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            mid = line[23:27]
            if len(line) < 40 or not re.fullmatch(r"\d{4}", mid):
                continue
            toks = line[27:].split()
            vals = None
            for i in range(len(toks) - 2):
                a, b, c = toks[i:i + 3]
                if re.fullmatch(r"\d{4,5}|--", a) and num_re.fullmatch(b) and num_re.fullmatch(c):
                    vals = (a, b, c)
                    break
            if vals is None:
                continue
            num = [np.nan if x == "--" else float(x) for x in vals]
            rows.append((mid, line[:23].strip(), *num))
    if not rows:
        raise ReaderError(f"{path}: no MILES parameter rows found")
    ids, names, teff, logg, feh = zip(*rows)
    return Table({"miles_id": ids, "name": names, "teff": teff, "logg": logg, "fe_h": feh})


def _miles_labels(path, params):
    m = re.search(r"m(\d{4})v", os.path.basename(str(path)).lower())
    if params is None:
        cand = Path(path).parent / "paramsMILES_v9.1.txt"
        params = cand if cand.exists() else None
    if m is None or params is None:
        return (m.group(1) if m else Path(path).stem), None, (np.nan, np.nan, np.nan)
    tab = params if isinstance(params, Table) else read_miles_params(params)
    sel = tab[tab["miles_id"] == m.group(1)]
    if len(sel) == 0:
        return m.group(1), None, (np.nan, np.nan, np.nan)
    r = sel[0]
    return m.group(1), r["name"], (r["teff"], r["logg"], r["fe_h"])


def _read_library(path, lsf, instrument, labels, sid, extra_meta=None, snr=LIBRARY_SNR):
    with _open(path, memmap=False) as h:
        hdr = h[0].header
        flux = np.array(_load(h[0], path, "primary image"), dtype=np.float64)
        if flux.ndim != 1:
            raise ReaderError(f"{path}: expected a 1-D library spectrum, found shape {flux.shape}")
        if "CRVAL1" not in hdr:
            raise ReaderError(f"{path}: no wavelength solution (CRVAL1)")
        cdelt = _hdr_float(hdr, "CDELT1", "CD1_1")
        factor = _wave_unit_factor(hdr, 1, path)
        wave = linear_grid(float(hdr["CRVAL1"]), cdelt, flux.size, float(hdr.get("CRPIX1", 1.0))) * factor
        _check_angstrom(wave, path)
        if not np.any(np.isfinite(flux) & (flux > 0)):
            raise ReaderError(f"{path}: flux is non-positive or NaN everywhere")
        ra, dec = _hdr_float(hdr, "RA"), _hdr_float(hdr, "DEC")
    var = library_variance(flux, snr)
    meta = _meta(1, [sid], [ra], [dec], path, instrument,
                 teff=[labels[0]], logg=[labels[1]], fe_h=[labels[2]])
    for k, v in (extra_meta or {}).items():
        meta[k] = [v]
    return SpectrumSet(wave, flux[None], var, "air", lsf, meta, synthetic_errors=True,
                       notes=(f"library spectrum without errors: nominal photon-like variance at peak S/N {snr:g}",))


def read_miles(path, params=None, lsf: LSF = MILES_LSF, snr: float = LIBRARY_SNR) -> SpectrumSet:
    """One MILES spectrum with its labels from ``paramsMILES_v9.1.txt``.

    Parameters
    ----------
    path : str or os.PathLike
        A MILES v9.1 FITS spectrum (1-D, linear air wavelength axis).
    params : str, os.PathLike or astropy.table.Table, optional
        The parameter file or the table :func:`read_miles_params` made of it; by default
        ``paramsMILES_v9.1.txt`` next to ``path`` if it exists.  Without it (or without a matching
        row) the labels are NaN.
    lsf : LSF, optional
        Line-spread function (default ``MILES_LSF``, 2.5 A FWHM).
    snr : float, optional
        Peak S/N of the nominal variance (see :func:`library_variance`).

    Returns
    -------
    SpectrumSet
        One spectrum in air with ``synthetic_errors=True``; ``meta`` has ``teff`` (K), ``logg``
        (dex), ``fe_h`` (dex) and ``name``; ``stellar_id`` is ``MILES<id>``.

    Raises
    ------
    ReaderError
        If the file is not a 1-D spectrum with a wavelength solution in Angstrom, or its flux is
        non-positive or NaN everywhere.
    """
    mid, name, labels = _miles_labels(path, params)
    return _read_library(path, lsf, "miles", labels, f"MILES{mid}", {"name": name or ""}, snr)


def read_stelib(path, lsf: LSF = STELIB_LSF, snr: float = LIBRARY_SNR) -> SpectrumSet:
    """One STELIB spectrum with labels from the TEFF, LOG_G, FE_H header keywords.

    Parameters
    ----------
    path : str or os.PathLike
        A STELIB v3.2 FITS spectrum (1-D, linear air wavelength axis).
    lsf : LSF, optional
        Line-spread function (default ``STELIB_LSF``, 3.0 A FWHM).
    snr : float, optional
        Peak S/N of the nominal variance (see :func:`library_variance`).

    Returns
    -------
    SpectrumSet
        One spectrum in air with ``synthetic_errors=True``; ``meta`` has ``teff`` (K), ``logg``
        (dex) and ``fe_h`` (dex) (NaN where the keyword is missing) and ``name``.

    Raises
    ------
    ReaderError
        If the file is not a 1-D spectrum with a wavelength solution in Angstrom, or its flux is
        non-positive or NaN everywhere.
    """
    with _open(path) as h:
        hdr = h[0].header
        labels = (_hdr_float(hdr, "TEFF"), _hdr_float(hdr, "LOG_G"), _hdr_float(hdr, "FE_H"))
        sid = str(hdr.get("OBJECT", hdr.get("STARIDEN", Path(path).stem))).strip()
    return _read_library(path, lsf, "stelib", labels, sid, {"name": sid}, snr)
