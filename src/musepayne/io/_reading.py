"""Low-level FITS reading helpers shared by the spectrum readers and the cube reader (private).

Safe opening (:func:`_open`: headers scanned and claimed sizes checked before astropy allocates
anything, every header touched so truncated files fail early), data access with a clear
:class:`~musepayne.io.spectra.ReaderError`, wavelength-unit and frame handling, header floats and
the metadata table of a :class:`~musepayne.io.spectra.SpectrumSet`.  Used by
:mod:`musepayne.io.readers`, :mod:`musepayne.io.libraries` and :mod:`musepayne.io.cube`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .fits import check_claimed_sizes, scan_fits_headers
from .spectra import ReaderError


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
    scan_fits_headers(p, ReaderError)  # lying headers are refused before astropy reads them
    try:
        hdul = fits.open(p, **kw)
        hdul.verify("silentfix")
        # touch every header so truncated files fail here, not later
        for h in hdul:
            _ = h.header
        check_claimed_sizes(hdul, p, ReaderError)  # before any data is allocated
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
