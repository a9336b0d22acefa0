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
    """Base class: a Gaussian LSF with a wavelength-dependent FWHM (Angstrom).

    Subclasses implement :meth:`fwhm`; :meth:`sigma`, :meth:`resolving_power` and
    :meth:`describe` follow from it.

    Attributes
    ----------
    name : str
        Short identifier of the LSF family (class attribute, ``"lsf"`` here).
    """

    name = "lsf"

    def fwhm(self, wave) -> np.ndarray:  # pragma: no cover - interface
        """Gaussian FWHM of the LSF at the given wavelengths.

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom, in the frame the spectrum is recorded in (air or vacuum).

        Returns
        -------
        numpy.ndarray
            FWHM in Angstrom, same shape as ``wave``.

        Raises
        ------
        NotImplementedError
            Always, on the base class; subclasses implement it.
        """
        raise NotImplementedError

    def sigma(self, wave) -> np.ndarray:
        """Gaussian sigma in Angstrom, ``fwhm(wave) * FWHM_TO_SIGMA``.

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom.

        Returns
        -------
        numpy.ndarray
            Sigma in Angstrom, same shape as ``wave``.
        """
        return self.fwhm(wave) * FWHM_TO_SIGMA

    def resolving_power(self, wave) -> np.ndarray:
        """Resolving power ``R = lambda / FWHM`` at the given wavelengths.

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom.

        Returns
        -------
        numpy.ndarray
            Dimensionless resolving power, same shape as ``wave``.
        """
        w = np.asarray(wave, dtype=np.float64)
        return w / self.fwhm(w)

    def describe(self) -> str:
        """A short string that identifies the LSF (stored in file headers).

        Returns
        -------
        str
            The identifier; subclasses include their parameters so that two different LSFs never share one.
        """
        return self.name


@dataclass(frozen=True)
class MuseLSF(LSF):
    """MUSE WFM LSF, Bacon et al. (2017) Eq. 8 quadratic in wavelength.

    ``FWHM = c2 * lambda**2 + c1 * lambda + c0`` with lambda and FWHM in Angstrom (air).

    Attributes
    ----------
    c2 : float
        Quadratic coefficient, 1/Angstrom (default 5.866e-8).
    c1 : float
        Linear coefficient, dimensionless (default -9.187e-4).
    c0 : float
        Constant term, Angstrom (default 6.040).
    name : str
        Identifier, ``"muse-bacon17"`` (not compared).
    """

    c2: float = 5.866e-8
    c1: float = -9.187e-4
    c0: float = 6.040
    name: str = field(default="muse-bacon17", compare=False)

    def fwhm(self, wave):
        """FWHM in Angstrom of the Bacon et al. (2017) quadratic.

        Parameters
        ----------
        wave : float or array_like
            Air wavelengths in Angstrom.

        Returns
        -------
        numpy.ndarray
            FWHM in Angstrom, same shape as ``wave``.
        """
        w = np.asarray(wave, dtype=np.float64)
        return self.c2 * w * w + self.c1 * w + self.c0

    def describe(self):
        """Identifier with the three coefficients.

        Returns
        -------
        str
            ``"muse-bacon17(c2,c1,c0)"``.
        """
        return f"muse-bacon17({self.c2:g},{self.c1:g},{self.c0:g})"


@dataclass(frozen=True)
class ConstantFWHM(LSF):
    """A constant FWHM in Angstrom (e.g. MILES 2.5 A, STELIB 3 A).

    Attributes
    ----------
    value : float
        The FWHM in Angstrom, finite and >= 0.
    name : str
        Identifier, ``"fwhm"`` by default (not compared).

    Raises
    ------
    ValueError
        If ``value`` is not finite or is negative.
    """

    value: float
    name: str = field(default="fwhm", compare=False)

    def __post_init__(self):
        if not np.isfinite(self.value) or self.value < 0:
            raise ValueError(f"FWHM must be a non-negative number, got {self.value!r}")

    def fwhm(self, wave):
        """The constant FWHM, broadcast to the shape of ``wave``.

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom (only the shape is used).

        Returns
        -------
        numpy.ndarray
            FWHM in Angstrom, shape of ``wave``.
        """
        return np.full(np.shape(wave), float(self.value))

    def describe(self):
        """Identifier with the FWHM.

        Returns
        -------
        str
            ``"fwhm(<value>)"``.
        """
        return f"fwhm({self.value:g})"


@dataclass(frozen=True)
class ConstantResolvingPower(LSF):
    """A constant resolving power ``R = lambda / FWHM``.

    Attributes
    ----------
    R : float
        The resolving power (dimensionless), finite and > 0.
    name : str
        Identifier, ``"R"`` by default (not compared).

    Raises
    ------
    ValueError
        If ``R`` is not finite or not positive.
    """

    R: float
    name: str = field(default="R", compare=False)

    def __post_init__(self):
        if not np.isfinite(self.R) or self.R <= 0:
            raise ValueError(f"resolving power must be positive, got {self.R!r}")

    def fwhm(self, wave):
        """FWHM ``lambda / R`` in Angstrom.

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom.

        Returns
        -------
        numpy.ndarray
            FWHM in Angstrom, same shape as ``wave``.
        """
        return np.asarray(wave, dtype=np.float64) / self.R

    def describe(self):
        """Identifier with the resolving power.

        Returns
        -------
        str
            ``"R(<R>)"``.
        """
        return f"R({self.R:g})"


@dataclass(frozen=True)
class TabulatedLSF(LSF):
    """FWHM(lambda) from a table, linearly interpolated, constant beyond the ends.

    Attributes
    ----------
    wave : tuple of float
        Table wavelengths in Angstrom, strictly increasing (stored as a tuple).
    fwhm_values : tuple of float
        FWHM in Angstrom at ``wave``, finite and >= 0.
    name : str
        Identifier, ``"table"`` or ``"table:<path>"`` when read by :meth:`from_file` (not compared).

    Raises
    ------
    ValueError
        If the arrays are not 1-D of equal non-zero length, the wavelengths are not strictly
        increasing, or a FWHM is not finite or negative.
    """

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
        """Read a two-column text file: wavelength (A), FWHM (A).

        Parameters
        ----------
        path : str or os.PathLike
            Text file readable by :func:`numpy.loadtxt`; extra columns are ignored.

        Returns
        -------
        TabulatedLSF
            The table, named ``"table:<path>"``.

        Raises
        ------
        ValueError
            If the file has fewer than two columns, or the values fail the checks of the class.
        """
        data = np.loadtxt(path, ndmin=2)
        if data.shape[1] < 2:
            raise ValueError(f"{path}: an LSF table needs two columns (wavelength, FWHM)")
        return cls(tuple(data[:, 0]), tuple(data[:, 1]), name=f"table:{path}")

    def fwhm(self, wave):
        """FWHM in Angstrom interpolated linearly in the table (constant beyond its ends).

        Parameters
        ----------
        wave : float or array_like
            Wavelengths in Angstrom.

        Returns
        -------
        numpy.ndarray
            FWHM in Angstrom, same shape as ``wave``.
        """
        return np.interp(np.asarray(wave, dtype=np.float64), self.wave, self.fwhm_values)

    def describe(self):
        # the digest of the values makes the string identify the LSF (prepare caches its
        # operators by it: two tables over the same range must not share one)
        """Identifier with the number of rows, the range and a digest of the values.

        Returns
        -------
        str
            ``"table(<n> rows, <w0>-<w1> A, <sha1[:10]>)"``; two different tables never share one
            (prepare caches its operators by it).
        """
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

    Parameters
    ----------
    spec : str or LSF
        The specification (case-insensitive names); an :class:`LSF` instance is returned as is.

    Returns
    -------
    LSF
        The named singleton (``MUSE_LSF``, ``LAMOST_LSF``, ...), a :class:`ConstantFWHM`,
        a :class:`ConstantResolvingPower` or a :class:`TabulatedLSF`.

    Raises
    ------
    ValueError
        If the string is none of the accepted forms, or its number is not valid.
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

    Parameters
    ----------
    lsf : LSF
        The line-spread function.

    Returns
    -------
    str
        A string that :func:`lsf_from_spec` turns back into an equal LSF.
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
