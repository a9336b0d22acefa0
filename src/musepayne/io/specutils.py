"""Spectra in and out as specutils objects (optional: ``pip install "musepayne[specutils]"``).

* :func:`from_specutils` -- a :class:`specutils.Spectrum` (or ``Spectrum1D``; 1-D or a
  2-D stack on one grid) -> :class:`~musepayne.io.spectra.SpectrumSet`, with its
  uncertainty (``StdDevUncertainty``, ``VarianceUncertainty`` or
  ``InverseVariance``) propagated to the variance and its mask to bad pixels;
* :func:`read_specutils` -- any file specutils reads (its ``tabular-fits`` format,
  the SDSS/APOGEE/... loaders) -> :class:`~musepayne.io.spectra.SpectrumSet`;
* :func:`prepared_to_specutils` -- prepared spectra (normalised flux, inverse variance,
  excluded pixels masked) or best-fit model spectra -> :class:`specutils.Spectrum`.

specutils does not record whether wavelengths are in air or vacuum, nor the line-spread
function; both are needed to prepare a spectrum and must be given (``frame``, ``lsf``)
unless the spectrum's ``meta`` holds them (``frame``; ``lsf`` as an
:func:`~musepayne.instrument.lsf_from_spec` string, as :func:`prepared_to_specutils` writes).

Units: any spectral axis in wavelength, frequency or energy units is converted to
Angstrom (spectral equivalencies); flux keeps its values (normalisation removes the unit).
"""

from __future__ import annotations

import re

import numpy as np
from astropy import units as u
from astropy.nddata import InverseVariance
from astropy.table import Table

from ..flags import EXCLUDING_BITS
from ..instrument.lsf import lsf_from_spec
from .prepared import PreparedSpectra
from .spectra import ReaderError, SpectrumSet

__all__ = ["from_specutils", "read_specutils", "prepared_to_specutils"]


def _specutils():
    try:
        import specutils  # noqa: PLC0415 - optional dependency, loaded when used
    except ImportError:
        raise ImportError("specutils interoperability needs specutils: pip install 'musepayne[specutils]'") from None
    return specutils


def _spectrum_class():
    s = _specutils()
    return getattr(s, "Spectrum", None) or s.Spectrum1D  # specutils >= 2.0 / 1.x


def _variance(spectrum, shape):
    unc = spectrum.uncertainty
    if unc is None:
        raise ReaderError("the spectrum has no uncertainty: musepayne needs errors (StdDev, Variance or "
                          "InverseVariance uncertainty) to weight the fit")
    arr = np.asarray(unc.array, dtype=np.float64)
    kind = type(unc).__name__
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "StdDevUncertainty":
            var = arr**2
        elif kind == "VarianceUncertainty":
            var = arr.copy()
        elif kind == "InverseVariance":
            var = np.where(arr > 0, 1.0 / arr, np.nan)
        else:
            raise ReaderError(f"unsupported uncertainty type {kind}; use StdDev, Variance or InverseVariance")
    return np.broadcast_to(var, shape).copy()


def from_specutils(spectrum, *, frame: str | None = None, lsf=None, stellar_id=None,
                   instrument: str = "specutils") -> SpectrumSet:
    """Convert a specutils spectrum into a :class:`~musepayne.io.spectra.SpectrumSet`.

    Parameters
    ----------
    spectrum : specutils.Spectrum or specutils.Spectrum1D
        1-D, or 2-D with spectra along the first axis, on one spectral axis.  Its
        uncertainty is required; its mask (True = bad) flags pixels.  The caller's
        spectrum is not modified (arrays are copied).
    frame : {'air', 'vacuum'}, optional
        Wavelength frame of the spectral axis; default ``spectrum.meta['frame']``.
    lsf : LSF or str, optional
        Line-spread function (an :class:`~musepayne.instrument.LSF` or a specification
        such as ``'muse'``, ``'lamost'``, ``'fwhm=2.5'``, ``'R=2000'``); default
        ``spectrum.meta['lsf']``.
    stellar_id : str or sequence of str, optional
        Identifiers; default ``spectrum.meta['stellar_id']`` or ``spec0``, ``spec1``, ...
    instrument : str
        Value of the ``instrument`` metadata column.

    Returns
    -------
    SpectrumSet
        Wavelengths in Angstrom (ascending), flux values as given, variances from the
        uncertainty (non-finite or non-positive = unusable).

    Raises
    ------
    ReaderError
        Missing uncertainty, frame or LSF; a spectral axis not convertible to Angstrom.
    """
    meta = dict(spectrum.meta or {})
    frame = frame or meta.get("frame")
    if frame not in ("air", "vacuum"):
        raise ReaderError("specutils does not record air or vacuum wavelengths: pass frame='air' or 'vacuum' "
                          "(MUSE and most ground-based pipelines: air; LAMOST, SDSS: vacuum)")
    lsf = lsf if lsf is not None else meta.get("lsf")
    if lsf is None:
        raise ReaderError("pass the line-spread function: lsf='muse', 'lamost', 'fwhm=<A>', 'R=<value>' or an LSF")
    try:
        lsf = lsf_from_spec(lsf)
    except ValueError as exc:
        raise ReaderError(str(exc)) from None
    try:
        wave = spectrum.spectral_axis.to_value(u.AA, equivalencies=u.spectral())
    except u.UnitConversionError as exc:
        raise ReaderError(f"spectral axis not convertible to Angstrom: {exc}") from None
    wave = np.array(wave, dtype=np.float64)
    flux = np.array(np.atleast_2d(spectrum.flux.value), dtype=np.float64)
    var = _variance(spectrum, flux.shape)
    bad = None if spectrum.mask is None else np.broadcast_to(np.asarray(spectrum.mask, bool), flux.shape).copy()
    if wave.size > 1 and wave[0] > wave[-1]:  # frequency axes come out descending
        wave, flux, var = wave[::-1].copy(), flux[:, ::-1].copy(), var[:, ::-1].copy()
        bad = None if bad is None else bad[:, ::-1].copy()
    n = flux.shape[0]
    ids = stellar_id if stellar_id is not None else meta.get("stellar_id")
    ids = [f"spec{i}" for i in range(n)] if ids is None else [str(s) for s in np.atleast_1d(ids)]
    if len(ids) != n:
        raise ReaderError(f"{len(ids)} stellar ids for {n} spectra")
    table = Table({"stellar_id": ids, "ra": np.full(n, np.nan), "dec": np.full(n, np.nan),
                   "source": [str(meta.get("source", "specutils"))] * n, "instrument": [instrument] * n})
    return SpectrumSet(wave, flux, var, frame, lsf, table, bad)


def read_specutils(path, format: str | None = None, **kw) -> SpectrumSet:
    """Read a file with specutils (any of its formats) into a :class:`SpectrumSet`.

    Parameters
    ----------
    path : str or path-like
        The file.
    format : str, optional
        specutils format name (e.g. ``'tabular-fits'``); default: specutils identifies it.
    **kw
        ``frame``, ``lsf``, ``stellar_id``, ``instrument`` as in :func:`from_specutils`.

    Raises
    ------
    ReaderError
        The file cannot be read by specutils, or :func:`from_specutils` refuses it.
    """
    cls = _spectrum_class()
    try:
        spec = cls.read(str(path), format=format) if format else cls.read(str(path))
    except Exception as exc:  # noqa: BLE001 - specutils/astropy raise anything on a foreign file
        raise ReaderError(f"{path}: specutils cannot read it ({type(exc).__name__}: {exc})") from None
    return from_specutils(spec, **kw)


def prepared_to_specutils(prepared: PreparedSpectra, model_flux=None):
    """Prepared spectra (or best-fit models on their grid) as one :class:`specutils.Spectrum`.

    Parameters
    ----------
    prepared : PreparedSpectra
        The output of the prepare stage.
    model_flux : (n_spec, n_pix) array, optional
        Best-fit model spectra on the prepared grid (the catalogue's ``model_flux`` column
        or ``models.fits`` of a run).  When given they replace the data's flux; the data's
        inverse variance and mask are kept, so residuals can be formed.

    Returns
    -------
    specutils.Spectrum
        Spectral axis in vacuum Angstrom; flux normalised (dimensionless); uncertainty
        ``InverseVariance``; mask True where a pixel is excluded from fits
        (:data:`musepayne.flags.EXCLUDING_BITS`) or has no weight.  ``meta`` holds
        ``frame='vacuum'``, ``lsf`` (the model grid's LSF specification), ``stellar_id``,
        and, for the data, the ``LSF_EXCESS`` array (``lsf_excess``, FWHM in Angstrom).
    """
    cls = _spectrum_class()
    flux = np.array(prepared.flux if model_flux is None else model_flux, dtype=np.float64)
    if flux.shape != prepared.flux.shape:
        raise ValueError(f"model_flux {flux.shape} does not match the prepared spectra {prepared.flux.shape}")
    ivar = np.array(prepared.ivar, dtype=np.float64)
    mask = ((np.asarray(prepared.mask).astype(np.int64) & EXCLUDING_BITS) != 0) | ~(ivar > 0)
    lsf = _describe_to_spec(str(prepared.meta.get("tgtlsf", "R(1800)")))
    meta = {"frame": "vacuum", "lsf": lsf, "stellar_id": [str(x) for x in prepared.spectra["stellar_id"]],
            "kind": "prepared" if model_flux is None else "best-fit model"}
    if model_flux is None:
        meta["lsf_excess"] = np.array(prepared.lsf_excess, dtype=np.float64)
    return cls(flux=flux * u.dimensionless_unscaled, spectral_axis=np.array(prepared.wave, np.float64) * u.AA,
               uncertainty=InverseVariance(ivar), mask=mask, meta=meta)


def _describe_to_spec(desc: str) -> str:
    """The specification string of an ``LSF.describe()`` text (``R(1800)`` -> ``R=1800``)."""
    m = re.fullmatch(r"(R|fwhm)\(([-+0-9.eE]+)\)", desc.strip())
    return f"{m.group(1)}={m.group(2)}" if m else desc
