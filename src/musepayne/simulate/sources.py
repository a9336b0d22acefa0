"""Spectrum sources for the simulator: ``labels -> rest-frame spectrum`` on the MUSE air grid.

A source has ``label_names``, ``sample(rng, n) -> dict of label arrays`` and is called as
``src(labels, wave)`` (flux at the MUSE LSF, rest frame); a source with ``shifts_rv = True`` takes
``rv`` (km/s) too and applies it itself.  :class:`ToySpectra` (default, analytic, no physical
labels), :class:`CallableSpectra` (any function, e.g. a trained model) and :class:`LibrarySpectra`
(real library spectra degraded to the MUSE LSF).  :mod:`musepayne.simulate.simulator` re-exports them.

May import :mod:`musepayne.instrument`, :mod:`musepayne.prepare` and :mod:`musepayne.simulate.toyspec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..instrument.lsf import MUSE_LSF, TabulatedLSF
from ..instrument.wavelength import C_KMS
from ..prepare.resample import build_operator, effective_lsf
from .toyspec import toy_spectrum

__all__ = ["ToySpectra", "CallableSpectra", "LibrarySpectra"]


# --------------------------------------------------------------------------- spectrum sources
class ToySpectra:
    """Default source: :func:`~musepayne.simulate.toyspec.toy_spectrum` with a ``teff_like`` label (not physical).

    Calling it, ``src(labels, wave)``, returns the rest-frame toy spectrum at the MUSE LSF on air
    wavelengths ``wave`` (Angstrom).

    Attributes
    ----------
    label_names : tuple of str
        ``("teff_like",)``, a continuum temperature in K (shape parameter only).
    """

    label_names = ("teff_like",)

    def sample(self, rng, n):
        """Draw ``teff_like`` uniformly in 3800-7500 K.

        Parameters
        ----------
        rng : numpy.random.Generator
            Random generator.
        n : int
            Number of stars.

        Returns
        -------
        dict of str to numpy.ndarray
            ``{"teff_like": (n,) array in K}``.
        """
        return {"teff_like": rng.uniform(3800.0, 7500.0, n)}

    def __call__(self, labels, wave):
        return toy_spectrum(wave, lsf=MUSE_LSF, rv_kms=0.0, teff_like=float(labels["teff_like"]))


@dataclass(frozen=True)
class CallableSpectra:
    """Wrap ``fn(labels: dict, wave) -> rest-frame flux`` (MUSE air grid, MUSE LSF).

    ``sampler(rng, n) -> dict of label arrays`` draws the labels; e.g. a
    trained model's label ranges.

    Calling it, ``src(labels, wave)``, returns ``fn(labels, wave)`` as float64.

    Attributes
    ----------
    fn : callable
        ``fn(labels: dict, wave) -> flux``: rest-frame flux on air wavelengths ``wave`` (Angstrom) at the MUSE LSF.
    sampler : callable
        ``sampler(rng, n) -> dict`` of label arrays of shape (n,).
    label_names : tuple of str
        Names of the labels ``sampler`` draws (columns of the truth table).
    """

    fn: Callable
    sampler: Callable
    label_names: tuple

    def sample(self, rng, n):
        """Draw labels with ``sampler``.

        Parameters
        ----------
        rng : numpy.random.Generator
            Random generator.
        n : int
            Number of stars.

        Returns
        -------
        dict of str to numpy.ndarray
            Label arrays of shape (n,).
        """
        return self.sampler(rng, n)

    def __call__(self, labels, wave):
        return np.asarray(self.fn(labels, wave), dtype=np.float64)


class LibrarySpectra:
    """Real library spectra (one or several :class:`~musepayne.io.spectra.SpectrumSet`) as the source.

    Each star draws one library spectrum at random; it is converted to air,
    degraded to the MUSE LSF and rebinned flux-conservingly onto the cube grid
    (:func:`musepayne.prepare.resample.build_operator`; where the library is already
    coarser than MUSE it is left as it is, not sharpened).  Spectra that do not
    cover the whole cube range are rejected.  Labels are the sets' ``teff``,
    ``logg``, ``fe_h`` meta columns where present plus ``lib_index``.

    ``lsf`` is the LSF the cube's spectra then really have
    (:func:`musepayne.prepare.resample.effective_lsf`, the broadest over the sets): STELIB's
    3 A is coarser than MUSE almost everywhere, so a cube of STELIB stars is *not* at
    the MUSE LSF; pass ``lsf`` (e.g. written with :meth:`write_lsf` and given as
    ``cube_lsf``) to ``prepare`` instead of 'muse'.

    Radial velocities (``shifts_rv``): the library's own wavelengths are Doppler-shifted
    and the spectrum then goes through the same degradation + rebinning operator, whose
    kernel accounts for the rebinning.  (Shifting the already-rebinned cube-grid spectrum
    by a second flux-conserving rebinning, the simulator's generic path, smooths it by an
    undeclared ``t (1 - t) * 1.25^2`` A^2 -- up to 0.6 A FWHM in quadrature -- and pulled
    STELIB stars' [Fe/H] by -0.025 dex in cubes.)

    Calling it, ``src(labels, wave, rv=0.0)``, returns the spectrum ``labels["lib_index"]`` on the
    cube grid, Doppler-shifted by ``rv`` km/s (ValueError if ``wave`` is not the grid it was built for).

    Parameters
    ----------
    spectra : SpectrumSet or iterable of SpectrumSet
        Library spectra with wavelengths in Angstrom in their own frame and LSF.
    wave : array_like
        Cube air wavelengths in Angstrom, shape (n_layers,).

    Attributes
    ----------
    lsf : LSF
        Effective LSF of the simulated spectra (MUSE where the library could be degraded to it).
    label_names : tuple of str
        ``("teff", "logg", "fe_h", "lib_index")`` (K, dex, dex; NaN where a set lacks the column).
    shifts_rv : bool
        True: radial velocities are applied here, on the library's own grid.
    spectra : numpy.ndarray
        Copy of the kept library spectra on the cube grid, (n, n_layers).

    Raises
    ------
    ValueError
        If no library spectrum covers the cube wavelength range.
    """

    shifts_rv = True

    def __init__(self, spectra, wave):
        sets = [spectra] if hasattr(spectra, "flux") else list(spectra)
        wave = np.asarray(wave, dtype=np.float64)
        flux, labels = [], {"teff": [], "logg": [], "fe_h": []}
        fwhm = MUSE_LSF.fwhm(wave)
        self._native = []  # (set, row) of every kept spectrum, for Doppler-shifted versions
        for s in sets:
            op = build_operator(s.wave, s.frame, s.lsf, wave, MUSE_LSF, frame_out="air")
            if np.min(op.coverage) < 0.999:
                continue
            fwhm = np.maximum(fwhm, effective_lsf(op, wave, MUSE_LSF).fwhm(wave))
            f = op.apply(np.nan_to_num(s.flux))
            for k in range(s.n_spectra):
                if np.all(np.isfinite(f[k])) and np.median(f[k]) > 0:
                    flux.append(f[k])
                    self._native.append((s, k))
                    for lab in labels:
                        labels[lab].append(float(s.meta[lab][k]) if lab in s.meta.colnames else np.nan)
        if not flux:
            raise ValueError("no library spectrum covers the cube wavelength range")
        self._flux = np.array(flux)
        self._labels = {k: np.array(v) for k, v in labels.items()}
        self.label_names = tuple(self._labels) + ("lib_index",)
        self._wave = wave
        self.lsf = (MUSE_LSF if np.allclose(fwhm, MUSE_LSF.fwhm(wave), rtol=1e-3)
                    else TabulatedLSF(tuple(wave), tuple(fwhm), name="library-effective"))

    def write_lsf(self, path):
        """Write :attr:`lsf` as a two-column text table (wavelength, FWHM in A) for ``cube_lsf``.

        Parameters
        ----------
        path : str or os.PathLike
            Output text file (overwritten).

        Returns
        -------
        str
            ``str(path)``.
        """
        np.savetxt(path, np.c_[self._wave, self.lsf.fwhm(self._wave)], fmt="%.6f",
                   header="air wavelength (A), effective FWHM (A) of the simulated library spectra")
        return str(path)

    @property
    def spectra(self) -> np.ndarray:
        """The library spectra on the cube grid at the MUSE LSF (rest frame), ``(n, n_layers)``."""
        return self._flux.copy()

    def sample(self, rng, n):
        """Draw one library spectrum per star, uniformly with replacement.

        Parameters
        ----------
        rng : numpy.random.Generator
            Random generator.
        n : int
            Number of stars.

        Returns
        -------
        dict of str to numpy.ndarray
            ``teff`` (K), ``logg`` (dex), ``fe_h`` (dex) and ``lib_index`` (float) arrays of shape (n,).
        """
        idx = rng.integers(0, len(self._flux), n)
        out = {k: v[idx] for k, v in self._labels.items()}
        out["lib_index"] = idx.astype(float)
        return out

    def __call__(self, labels, wave, rv: float = 0.0):
        if len(wave) != len(self._wave):
            raise ValueError("LibrarySpectra was built for another wavelength grid")
        i = int(labels["lib_index"])
        if rv == 0.0:
            return self._flux[i]
        s, k = self._native[i]
        beta = float(rv) / C_KMS
        op = build_operator(s.wave * np.sqrt((1.0 + beta) / (1.0 - beta)), s.frame, s.lsf, self._wave, MUSE_LSF,
                            frame_out="air")
        return op.apply(np.nan_to_num(s.flux[k]))[0]
