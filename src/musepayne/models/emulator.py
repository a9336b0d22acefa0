"""The Cannon emulator of normalised synthetic spectra and the reference-star grid (paper S3.2).

Owns :class:`CannonEmulator` (Doppler's cubic Cannon model trained on a synthetic grid: air
wavelengths, 0.1 A sampling, effectively unconvolved; loaded from its ``.npz`` without pickle),
where its file is found (:func:`default_emulator_path`) and :func:`reference_grid`, the reference
stars inside the emulator's support.  :func:`musepayne.models.gradients.build_templates` turns both
into gradient templates; :mod:`musepayne.models.gradients` re-exports the names defined here.

May import :mod:`musepayne.io` only (no other model module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..io.fits import sha256_file
from ..io.spectra import ReaderError

__all__ = [
    "DEFAULT_EMULATOR",
    "EMULATOR_ENV",
    "CannonEmulator",
    "default_emulator_path",
    "reference_grid",
]

#: Default location of the emulator, relative to the current directory.
DEFAULT_EMULATOR = Path("..") / "shared" / "data" / "synthetic" / "doppler_cannon_coolstars_norm.npz"
#: Environment variable overriding :data:`DEFAULT_EMULATOR`.
EMULATOR_ENV = "MUSEPAYNE_EMULATOR"

#: Emulator label names -> musepayne label names.
_EMU_LABELS = {"TEFF": "teff", "LOGG": "logg", "FEH": "fe_h", "FE_H": "fe_h", "MH": "fe_h"}


def default_emulator_path() -> Path:
    """``$MUSEPAYNE_EMULATOR`` if set, else ``../shared/data/synthetic/...npz``.

    Returns
    -------
    pathlib.Path
        The emulator file (not checked for existence; relative paths are to the current directory).
    """
    env = os.environ.get(EMULATOR_ENV)
    return Path(env) if env else DEFAULT_EMULATOR


@dataclass(frozen=True, eq=False)
class CannonEmulator:
    """A polynomial Cannon emulator of normalised spectra.

    ``flux = theta @ v``, ``v_i = prod_j x_j ** exponents[i, j]``,
    ``x = (labels - fiducials) / scales``.

    Attributes
    ----------
    wave : numpy.ndarray
        (n_pix,) wavelengths in Angstrom, in ``frame``.
    theta : numpy.ndarray
        (n_pix, n_terms) coefficients.
    exponents : numpy.ndarray
        (n_terms, n_labels) int exponents.
    fiducials, scales : numpy.ndarray
        (n_labels,) label offsets and scales, physical units (K, dex).
    label_names : tuple of str
        musepayne label names (teff, logg, fe_h).
    frame : str
        'air' or 'vacuum'.
    training_labels : numpy.ndarray or None
        (n_train, n_labels) labels of the emulator's training grid.
    source : str
        File it was loaded from.
    sha256 : str
        sha256 hex digest of that file.
    """

    wave: np.ndarray  # (n_pix,), in ``frame``
    theta: np.ndarray  # (n_pix, n_terms)
    exponents: np.ndarray  # (n_terms, n_labels) int
    fiducials: np.ndarray
    scales: np.ndarray
    label_names: tuple
    frame: str = "air"
    training_labels: np.ndarray | None = None
    source: str = ""
    sha256: str = ""

    @classmethod
    def load(cls, path) -> CannonEmulator:
        """Load an emulator from its ``.npz`` file (no pickle).

        Parameters
        ----------
        path : str or os.PathLike
            The file (arrays ``theta``, ``exponents``, ``fiducials``, ``scales``, ``label_names`` and
            ``wavelength_air`` or ``wavelength``; optional ``training_labels``).

        Returns
        -------
        CannonEmulator
            The emulator.

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a file.
        ReaderError
            If an array is missing or the shapes are inconsistent.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"emulator file {p} not found: pass --emulator PATH or set ${EMULATOR_ENV} "
                f"(default {DEFAULT_EMULATOR}, relative to the current directory)"
            )
        try:
            with np.load(p, allow_pickle=False) as d:
                wave = np.array(d["wavelength_air"] if "wavelength_air" in d.files else d["wavelength"], np.float64)
                frame = "air" if "wavelength_air" in d.files else "vacuum"
                names = tuple(_EMU_LABELS.get(str(n).upper(), str(n).lower()) for n in d["label_names"])
                tl = np.array(d["training_labels"], np.float64) if "training_labels" in d.files else None
                emu = cls(wave, np.array(d["theta"], np.float64), np.array(d["exponents"], np.int64),
                          np.array(d["fiducials"], np.float64), np.array(d["scales"], np.float64),
                          names, frame, tl, str(p), sha256_file(p))
        except KeyError as exc:
            raise ReaderError(f"{p}: not a Cannon emulator file (missing array {exc})") from None
        if emu.theta.shape != (wave.size, emu.exponents.shape[0]) or emu.exponents.shape[1] != len(names):
            raise ReaderError(f"{p}: emulator arrays have inconsistent shapes")
        return emu

    def _x(self, labels):
        lab = np.atleast_2d(np.asarray(labels, np.float64))
        if lab.shape[1] != len(self.label_names):
            raise ValueError(f"labels must be (n, {len(self.label_names)}) in order {self.label_names}")
        return (lab - self.fiducials) / self.scales

    def design(self, labels):
        """The polynomial terms ``v`` (n, n_terms).

        Parameters
        ----------
        labels : array_like
            Shape (n, n_labels) or (n_labels,), in the order of ``label_names``, physical units.

        Returns
        -------
        numpy.ndarray
            Shape (n, n_terms).

        Raises
        ------
        ValueError
            If ``labels`` has the wrong number of columns.
        """
        x = self._x(labels)
        return np.prod(x[:, None, :] ** self.exponents[None, :, :], axis=2)

    def flux(self, labels):
        """Normalised model flux (n, n_pix) on :attr:`wave`.

        Parameters
        ----------
        labels : array_like
            Shape (n, n_labels) or (n_labels,), physical units.

        Returns
        -------
        numpy.ndarray
            Shape (n, n_pix), dimensionless.

        Raises
        ------
        ValueError
            If ``labels`` has the wrong number of columns.
        """
        return self.design(labels) @ self.theta.T

    def jacobian(self, labels):
        """Analytic ``d flux / d label`` (n, n_labels, n_pix), per physical unit.

        Parameters
        ----------
        labels : array_like
            Shape (n, n_labels) or (n_labels,), physical units.

        Returns
        -------
        numpy.ndarray
            Shape (n, n_labels, n_pix): per K for Teff, per dex for logg and [Fe/H].

        Raises
        ------
        ValueError
            If ``labels`` has the wrong number of columns.
        """
        x = self._x(labels)
        e = self.exponents
        n, nl = x.shape
        out = np.empty((n, nl, self.wave.size))
        for k in range(nl):
            ek = e[:, k]
            reduced = e.copy()
            reduced[:, k] = np.maximum(ek - 1, 0)
            dv = ek[None, :] * np.prod(x[:, None, :] ** reduced[None, :, :], axis=2)  # (n, n_terms)
            out[:, k, :] = (dv @ self.theta.T) / self.scales[k]
        return out




def reference_grid(emulator: CannonEmulator | None = None, teff=(4000.0, 7000.0, 250.0),
                   logg=(1.0, 5.0, 0.5), fe_h=(-2.5, 0.5, 0.5), support=(250.0, 0.5, 0.5)) -> Table:
    """Reference stars on a regular grid (inclusive ranges ``(lo, hi, step)``).

    With an emulator that carries its training labels, grid points farther
    than ``support`` (Teff, logg, [Fe/H], in a max-norm) from every training
    label are dropped, so no template is an extrapolation of the emulator
    (e.g. Teff > 6000 K giants, absent from its synthetic grid).

    Parameters
    ----------
    emulator : CannonEmulator, optional
        Drop grid points outside its training labels' support.
    teff : tuple of (float, float, float), optional
        (lo, hi, step) in K (default 4000-7000 by 250).
    logg : tuple of (float, float, float), optional
        (lo, hi, step) in dex (default 1-5 by 0.5).
    fe_h : tuple of (float, float, float), optional
        (lo, hi, step) in dex (default -2.5-0.5 by 0.5).
    support : tuple of (float, float, float), optional
        Max-norm support radius in (K, dex, dex) (default (250, 0.5, 0.5)).

    Returns
    -------
    astropy.table.Table
        Columns ``teff`` (K), ``logg`` and ``fe_h`` (dex).
    """
    axes = [np.arange(lo, hi + 0.5 * st, st) for lo, hi, st in (teff, logg, fe_h)]
    T, G, F = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    keep = np.ones(T.size, bool)
    if emulator is not None and emulator.training_labels is not None:
        order = [emulator.label_names.index(n) for n in ("teff", "logg", "fe_h")]
        tl = emulator.training_labels[:, order]
        pts = np.stack([T, G, F], 1)
        dist = np.max(np.abs(pts[:, None, :] - tl[None, :, :]) / np.asarray(support)[None, None, :], axis=2)
        keep = dist.min(axis=1) <= 1.0 + 1e-9
    t = Table({"teff": T[keep], "logg": G[keep], "fe_h": F[keep]})
    t["teff"].unit = "K"
    t["logg"].description = "log10(g / cm s^-2), dex"
    t["fe_h"].description = "[Fe/H], dex"
    return t
