"""Readers for the stellar libraries used for training: MILES v9.1 and STELIB v3.2.

``miles``
    MILES v9.1 (0.9 A/px, FWHM 2.5 A, air); labels from ``paramsMILES_v9.1.txt`` found next to
    the file (or given, :func:`read_miles_params`).
``stelib``
    STELIB v3.2 (~1 A/px, FWHM ~3 A, air); labels from the ``TEFF``, ``LOG_G``, ``FE_H`` header
    keywords.

Library spectra are noise free; they get the photon-like variance of :func:`library_variance`
(peak S/N :data:`LIBRARY_SNR`) and ``synthetic_errors=True``.  :mod:`musepayne.io.readers`
re-exports every public name here and dispatches to these readers by kind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..instrument.lsf import LSF, MILES_LSF, STELIB_LSF
from ..instrument.wavelength import linear_grid
from ._reading import _check_angstrom, _hdr_float, _load, _meta, _open, _wave_unit_factor
from .spectra import ReaderError, SpectrumSet

__all__ = ["LIBRARY_SNR", "library_variance", "read_miles_params", "read_miles", "read_stelib"]

#: nominal peak S/N assigned to noise-free library spectra (see ``library_variance``)
LIBRARY_SNR = 1000.0


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
