"""Wavelength frames and grids.

Air <-> vacuum
--------------
MUSE cubes, PampelMUSE spectra and the MILES/STELIB libraries use **air**
wavelengths; LAMOST spectra (and therefore every model trained on LAMOST
spectra) use **vacuum** wavelengths.  Between 4750 and 9350 Angstrom the two
differ by 1.3-2.6 Angstrom, i.e. about 80 km/s, so the conversion must be done
before anything is compared.

We use the IAU standard conversion as given by Morton (2000, ApJS 130, 403),
which is based on the Ciddor (1996) refractive index of standard air
(15 C, 101 325 Pa, 0 % humidity, 450 ppm CO2):

``n - 1 = 8.34254e-5 + 2.406147e-2 / (130 - s^2) + 1.5998e-4 / (38.9 - s^2)``

with ``s = 1e4 / lambda_vac`` (lambda in Angstrom), ``lambda_air = lambda_vac / n``.
The inverse (air -> vacuum) uses the fitted inverse of the same relation by
N. Piskunov (VALD3 documentation), which round-trips to better than
1e-9 relative (<< 1 m/s) over 3000-11000 Angstrom; we refine it with one
Newton step on the Morton relation so the two directions are exact inverses.

Grids
-----
The LAMOST low-resolution grid is log-linear in vacuum:
``log10 lambda_i = 3.5682 + 1e-4 i``, ``i = 0 .. 3908`` (3909 px, 3700-9100 A,
69.0 km/s per pixel).  DR1 files hold the first 3904 of those pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "air_to_vacuum",
    "vacuum_to_air",
    "LAMOST_COEFF0",
    "LAMOST_COEFF1",
    "LAMOST_NPIX",
    "lamost_wavelength",
    "log_linear_grid",
    "linear_grid",
    "bin_edges",
    "C_KMS",
]

#: Speed of light in km/s (exact, SI definition).
C_KMS = 299792.458

LAMOST_COEFF0 = 3.5682
LAMOST_COEFF1 = 1e-4
LAMOST_NPIX = 3909


def _refractive_index_vac(wave_vac):
    """Refractive index of standard air at vacuum wavelength (Morton 2000)."""
    s2 = (1e4 / np.asarray(wave_vac, dtype=np.float64)) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wave_vac):
    """Convert vacuum wavelengths (Angstrom) to air (IAU standard, Morton 2000).

    Wavelengths below 2000 Angstrom are returned unchanged, following the IAU
    convention that air wavelengths are only quoted above 2000 Angstrom.

    Parameters
    ----------
    wave_vac : float or array_like
        Vacuum wavelengths in Angstrom.

    Returns
    -------
    numpy.ndarray
        Air wavelengths in Angstrom (float64), same shape as ``wave_vac``.
    """
    w = np.asarray(wave_vac, dtype=np.float64)
    out = w / _refractive_index_vac(w)
    return np.where(w < 2000.0, w, out)


def air_to_vacuum(wave_air):
    """Convert air wavelengths (Angstrom) to vacuum.

    The inverse of :func:`vacuum_to_air`: a first guess from the Piskunov
    (VALD3) inverse formula, refined by one Newton step so that
    ``vacuum_to_air(air_to_vacuum(x)) == x`` to ~1e-12 relative.

    Wavelengths below 2000 Angstrom are returned unchanged.

    Parameters
    ----------
    wave_air : float or array_like
        Air wavelengths in Angstrom.

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths in Angstrom (float64), same shape as ``wave_air``.
    """
    w = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / w) ** 2
    n = (
        1.0
        + 8.336624212083e-5
        + 2.408926869968e-2 / (130.1065924522 - s2)
        + 1.599740894897e-4 / (38.92568793293 - s2)
    )
    vac = w * n
    # One Newton step on f(v) = v / n(v) - w; d(v/n)/dv ~ 1/n (n varies slowly).
    for _ in range(2):
        nv = _refractive_index_vac(vac)
        vac = vac - (vac / nv - w) * nv
    return np.where(w < 2000.0, w, vac)


def log_linear_grid(coeff0: float, coeff1: float, npix: int) -> np.ndarray:
    """Pixel-centre wavelengths of a grid with ``log10 lambda = coeff0 + coeff1 * i``.

    Parameters
    ----------
    coeff0 : float
        log10 of the first pixel-centre wavelength (Angstrom).
    coeff1 : float
        Step in log10(wavelength) per pixel (dex).
    npix : int
        Number of pixels.

    Returns
    -------
    numpy.ndarray
        Wavelengths in Angstrom, shape (npix,), in the frame the coefficients describe.
    """
    return 10.0 ** (coeff0 + coeff1 * np.arange(npix, dtype=np.float64))


def linear_grid(crval: float, cdelt: float, npix: int, crpix: float = 1.0) -> np.ndarray:
    """Pixel-centre wavelengths of a linear FITS axis (1-based ``crpix``).

    Parameters
    ----------
    crval : float
        Wavelength at reference pixel ``crpix`` (Angstrom; FITS ``CRVAL``).
    cdelt : float
        Step per pixel in Angstrom (FITS ``CDELT``/``CD``).
    npix : int
        Number of pixels.
    crpix : float, optional
        1-based reference pixel (FITS ``CRPIX``), default 1.

    Returns
    -------
    numpy.ndarray
        Wavelengths in Angstrom, shape (npix,).
    """
    return crval + cdelt * (np.arange(npix, dtype=np.float64) + 1.0 - crpix)


def lamost_wavelength(npix: int = LAMOST_NPIX) -> np.ndarray:
    """The LAMOST low-resolution vacuum grid (3909 px by default).

    Parameters
    ----------
    npix : int, optional
        Number of pixels from the start of the grid, default ``LAMOST_NPIX`` (3909).

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths in Angstrom, shape (npix,), 69.0 km/s per pixel.
    """
    return log_linear_grid(LAMOST_COEFF0, LAMOST_COEFF1, npix)


def bin_edges(centres) -> np.ndarray:
    """Bin edges for pixel centres (mid-points inside, mirrored at both ends).

    For a log-linear grid the mid-points are arithmetic, which differs from the
    geometric mid-point by < 1e-9 relative for LAMOST's 1e-4 dex steps.

    Parameters
    ----------
    centres : array_like
        Pixel-centre wavelengths in Angstrom, shape (n_pix,), strictly increasing, n_pix >= 2.

    Returns
    -------
    numpy.ndarray
        Edges in Angstrom, shape (n_pix + 1,).

    Raises
    ------
    ValueError
        If ``centres`` is not 1-D with at least two values, or not strictly increasing.
    """
    c = np.asarray(centres, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError("bin_edges needs a 1-D array of at least two wavelengths")
    d = np.diff(c)
    if not np.all(d > 0):
        raise ValueError("wavelengths must be strictly increasing")
    edges = np.empty(c.size + 1)
    edges[1:-1] = 0.5 * (c[1:] + c[:-1])
    edges[0] = c[0] - 0.5 * d[0]
    edges[-1] = c[-1] + 0.5 * d[-1]
    return edges
