"""In-memory container for a batch of spectra that share one wavelength grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..instrument.lsf import LSF

__all__ = ["SpectrumSet", "ReaderError", "META_COLUMNS"]

#: Per-spectrum metadata columns every reader fills (labels are optional extra columns).
META_COLUMNS = ("stellar_id", "ra", "dec", "source", "instrument")


class ReaderError(ValueError):
    """A file could not be read as the requested kind; the message says why."""


@dataclass(frozen=True, eq=False)
class SpectrumSet:
    """Spectra on one common grid.

    Attributes
    ----------
    wave : numpy.ndarray
        Shape (n_pix,), float64: wavelength of pixel centres in Angstrom, in ``frame``.
    flux : numpy.ndarray
        Shape (n_spec, n_pix): flux density (any unit; 1-D input is promoted to one row).
    variance : numpy.ndarray
        Shape (n_spec, n_pix): variance of ``flux`` in flux units squared; non-finite or <= 0 = unknown/bad.
    frame : str
        ``'air'`` or ``'vacuum'``: the wavelength frame of ``wave``.
    lsf : musepayne.instrument.lsf.LSF
        The instrument's line-spread function.
    meta : astropy.table.Table
        One row per spectrum: stellar_id, ra, dec (deg), source, instrument, and optionally
        labels (teff in K, logg in dex (cgs), fe_h in dex, ...).
    bad : numpy.ndarray or None
        Optional (n_spec, n_pix) bool, pixels flagged bad by the input file.
    synthetic_errors : bool
        True when the input had no errors and the reader assigned nominal ones (libraries).
    notes : tuple of str
        Free-text provenance notes (e.g. that the errors are nominal, or how a spectrum was simulated).
    n_spectra : int
        Number of spectra (n_spec).
    n_pix : int
        Number of pixels (n_pix).

    Raises
    ------
    ReaderError
        If ``wave`` is not 1-D, the shapes of flux, variance, wave and bad disagree, ``frame`` is not
        'air'/'vacuum', or ``meta`` has a different number of rows than ``flux``.
    """

    wave: np.ndarray
    flux: np.ndarray
    variance: np.ndarray
    frame: str
    lsf: LSF
    meta: Table
    bad: np.ndarray | None = None
    synthetic_errors: bool = False
    notes: tuple = field(default_factory=tuple)

    def __post_init__(self):
        w = np.asarray(self.wave, dtype=np.float64)
        f = np.atleast_2d(np.asarray(self.flux))
        v = np.atleast_2d(np.asarray(self.variance))
        if w.ndim != 1:
            raise ReaderError("wavelength array must be 1-D")
        if f.shape != v.shape or f.shape[-1] != w.size:
            raise ReaderError(
                f"flux {f.shape}, variance {v.shape} and wavelength ({w.size},) do not match"
            )
        if self.frame not in ("air", "vacuum"):
            raise ReaderError(f"frame must be 'air' or 'vacuum', got {self.frame!r}")
        if len(self.meta) != f.shape[0]:
            raise ReaderError(f"{len(self.meta)} metadata rows for {f.shape[0]} spectra")
        object.__setattr__(self, "wave", w)
        object.__setattr__(self, "flux", f)
        object.__setattr__(self, "variance", v)
        if self.bad is not None:
            b = np.atleast_2d(np.asarray(self.bad, dtype=bool))
            if b.shape != f.shape:
                raise ReaderError(f"bad-pixel mask {b.shape} does not match flux {f.shape}")
            object.__setattr__(self, "bad", b)

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    @property
    def n_pix(self) -> int:
        return self.wave.size

    def select(self, index) -> SpectrumSet:
        """A new set with the spectra at ``index`` (copies, never views into self).

        Parameters
        ----------
        index : int, array of int or array of bool
            Which spectra to keep (any numpy index along the first axis; a scalar gives a one-row set).

        Returns
        -------
        SpectrumSet
            The selected spectra, same grid, frame, LSF and notes.
        """
        idx = np.atleast_1d(np.asarray(index))
        return SpectrumSet(
            self.wave.copy(), self.flux[idx].copy(), self.variance[idx].copy(), self.frame,
            self.lsf, self.meta[idx], None if self.bad is None else self.bad[idx].copy(),
            self.synthetic_errors, self.notes,
        )
