"""Line-spread functions.

Every LSF here is a Gaussian described by its FWHM in Angstrom as a function of
wavelength, ``lsf.fwhm(wave)``.  The FWHM is the *effective* resolution of the
recorded pixel values, i.e. it already includes the detector pixel.  Wavelengths
passed to ``fwhm`` are in the frame the spectrum is recorded in (air for MUSE
and the libraries, vacuum for LAMOST); the 3e-4 relative difference between the
frames is irrelevant for a resolution.

Adopted models
--------------
MUSE
    Bacon et al. (2017, A&A 608, A1, Eq. 8), measured on the UDF mosaic:
    ``FWHM = 5.866e-8 l^2 - 9.187e-4 l + 6.040`` Angstrom (3.00 A at 4750 A,
    2.64 A at 6000 A, 2.48 A at 7000 A, 2.58 A at 9350 A).  A user table
    (wavelength, FWHM) can replace it: :class:`TabulatedLSF`.
LAMOST
    Constant resolving power ``R = 1800`` (``FWHM = lambda / 1800``).  LAMOST's
    documentation quotes R ~ 1800 at 5500 A; the measured arc-line FWHM varies
    from fibre to fibre and night to night by ~10 %, and no public per-fibre
    LSF is distributed with the low-resolution spectra, so a constant R is the
    honest choice.  With it, MUSE is *coarser* than LAMOST below ~5150 A
    (3.00 vs 2.64 A at 4750 A); there the data cannot be degraded, and the
    pipeline flags the pixels and records the excess broadening so that a fit
    can forward-model it.  Use :class:`ConstantResolvingPower` with another R,
    or a :class:`TabulatedLSF`, to change it.
MILES
    2.50 A FWHM at all wavelengths (Falcon-Barroso et al. 2011).
STELIB
    ~3.0 A FWHM (Le Borgne et al. 2003, "about 3 A").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LSF",
    "MuseLSF",
    "ConstantFWHM",
    "ConstantResolvingPower",
    "TabulatedLSF",
    "LAMOST_LSF",
    "MUSE_LSF",
    "MILES_LSF",
    "STELIB_LSF",
    "lsf_from_spec",
    "lsf_to_spec",
    "FWHM_TO_SIGMA",
]

#: Gaussian FWHM -> sigma factor, 1 / (2 sqrt(2 ln 2)).
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


class LSF:
    """Base class: a Gaussian LSF with a wavelength-dependent FWHM (Angstrom)."""

    name = "lsf"

    def fwhm(self, wave) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def sigma(self, wave) -> np.ndarray:
        """Gaussian sigma in Angstrom."""
        return self.fwhm(wave) * FWHM_TO_SIGMA

    def resolving_power(self, wave) -> np.ndarray:
        w = np.asarray(wave, dtype=np.float64)
        return w / self.fwhm(w)

    def describe(self) -> str:
        """A short string that identifies the LSF (stored in file headers)."""
        return self.name


@dataclass(frozen=True)
class MuseLSF(LSF):
    """MUSE WFM LSF, Bacon et al. (2017) Eq. 8 quadratic in wavelength."""

    c2: float = 5.866e-8
    c1: float = -9.187e-4
    c0: float = 6.040
    name: str = field(default="muse-bacon17", compare=False)

    def fwhm(self, wave):
        w = np.asarray(wave, dtype=np.float64)
        return self.c2 * w * w + self.c1 * w + self.c0

    def describe(self):
        return f"muse-bacon17({self.c2:g},{self.c1:g},{self.c0:g})"


@dataclass(frozen=True)
class ConstantFWHM(LSF):
    """A constant FWHM in Angstrom (e.g. MILES 2.5 A, STELIB 3 A)."""

    value: float
    name: str = field(default="fwhm", compare=False)

    def __post_init__(self):
        if not np.isfinite(self.value) or self.value < 0:
            raise ValueError(f"FWHM must be a non-negative number, got {self.value!r}")

    def fwhm(self, wave):
        return np.full(np.shape(wave), float(self.value))

    def describe(self):
        return f"fwhm({self.value:g})"


@dataclass(frozen=True)
class ConstantResolvingPower(LSF):
    """A constant resolving power ``R = lambda / FWHM``."""

    R: float
    name: str = field(default="R", compare=False)

    def __post_init__(self):
        if not np.isfinite(self.R) or self.R <= 0:
            raise ValueError(f"resolving power must be positive, got {self.R!r}")

    def fwhm(self, wave):
        return np.asarray(wave, dtype=np.float64) / self.R

    def describe(self):
        return f"R({self.R:g})"


@dataclass(frozen=True)
class TabulatedLSF(LSF):
    """FWHM(lambda) from a table, linearly interpolated, constant beyond the ends."""

    wave: tuple
    fwhm_values: tuple
    name: str = field(default="table", compare=False)

    def __post_init__(self):
        w = np.asarray(self.wave, dtype=np.float64)
        f = np.asarray(self.fwhm_values, dtype=np.float64)
        if w.ndim != 1 or w.shape != f.shape or w.size < 1:
            raise ValueError("TabulatedLSF needs 1-D wave and fwhm arrays of equal length")
        if np.any(np.diff(w) <= 0):
            raise ValueError("TabulatedLSF wavelengths must be strictly increasing")
        if not np.all(np.isfinite(f)) or np.any(f < 0):
            raise ValueError("TabulatedLSF FWHM values must be finite and non-negative")
        object.__setattr__(self, "wave", tuple(w.tolist()))
        object.__setattr__(self, "fwhm_values", tuple(f.tolist()))

    @classmethod
    def from_file(cls, path) -> TabulatedLSF:
        """Read a two-column text file: wavelength (A), FWHM (A)."""
        data = np.loadtxt(path, ndmin=2)
        if data.shape[1] < 2:
            raise ValueError(f"{path}: an LSF table needs two columns (wavelength, FWHM)")
        return cls(tuple(data[:, 0]), tuple(data[:, 1]), name=f"table:{path}")

    def fwhm(self, wave):
        return np.interp(np.asarray(wave, dtype=np.float64), self.wave, self.fwhm_values)

    def describe(self):
        # the digest of the values makes the string identify the LSF (prepare caches its
        # operators by it: two tables over the same range must not share one)
        h = hashlib.sha1(np.asarray(self.wave + self.fwhm_values, np.float64).tobytes()).hexdigest()[:10]
        return f"table({len(self.wave)} rows, {self.wave[0]:.0f}-{self.wave[-1]:.0f} A, {h})"


MUSE_LSF = MuseLSF()
LAMOST_LSF = ConstantResolvingPower(1800.0, name="lamost")
MILES_LSF = ConstantFWHM(2.5, name="miles")
STELIB_LSF = ConstantFWHM(3.0, name="stelib")


def lsf_from_spec(spec) -> LSF:
    """Build an LSF from a user string.

    Accepted forms: ``"muse"``, ``"lamost"``, ``"miles"``, ``"stelib"``,
    ``"fwhm=2.7"`` (constant FWHM in A), ``"R=2000"`` (constant resolving power),
    or the path of a two-column table (wavelength, FWHM).
    """
    if isinstance(spec, LSF):
        return spec
    s = str(spec).strip()
    low = s.lower()
    named = {"muse": MUSE_LSF, "lamost": LAMOST_LSF, "miles": MILES_LSF, "stelib": STELIB_LSF}
    if low in named:
        return named[low]
    try:
        if low.startswith("fwhm="):
            return ConstantFWHM(float(s.split("=", 1)[1]))
        if low.startswith("r="):
            return ConstantResolvingPower(float(s.split("=", 1)[1]))
    except ValueError as exc:
        raise ValueError(f"cannot read LSF specification {s!r}: {exc}") from None

    if os.path.exists(s):
        return TabulatedLSF.from_file(s)
    raise ValueError(
        f"unknown LSF {s!r}: use muse, lamost, miles, stelib, fwhm=<A>, R=<value> or a table file"
    )


def lsf_to_spec(lsf: LSF) -> str:
    """The :func:`lsf_from_spec` string of an LSF (for configuration files and run records).

    Named LSFs give their name (``muse``, ``lamost``, ``miles``, ``stelib``), constant ones
    ``fwhm=<A>`` or ``R=<value>``, a table read from a file its path.

    Raises
    ------
    ValueError
        For an LSF that no specification string reproduces (a table made in memory).
    """
    for name, ref in (("muse", MUSE_LSF), ("lamost", LAMOST_LSF), ("miles", MILES_LSF), ("stelib", STELIB_LSF)):
        if lsf == ref and type(lsf) is type(ref):
            return name
    if isinstance(lsf, ConstantFWHM):
        return f"fwhm={lsf.value!r}"
    if isinstance(lsf, ConstantResolvingPower):
        return f"R={lsf.R!r}"
    if isinstance(lsf, TabulatedLSF) and str(lsf.name).startswith("table:"):
        return str(lsf.name)[len("table:"):]
    raise ValueError(f"the LSF {lsf.describe()} has no specification string (use a table file)")
