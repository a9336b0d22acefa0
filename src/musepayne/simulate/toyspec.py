"""A small analytic stellar-like spectrum the package can make by itself.

The simulator's default spectrum source (:class:`~musepayne.simulate.ToySpectra`,
for cubes that need no physical labels) and the tests' spectrum with known, sharp
features: a smooth continuum times Gaussian
absorption lines at the positions of strong optical lines (air wavelengths),
observed at the MUSE LSF on the MUSE nominal grid.  It is **not** a stellar
atmosphere model and carries no labels.
"""

from __future__ import annotations

import numpy as np

from ..instrument.lsf import FWHM_TO_SIGMA, MUSE_LSF
from ..instrument.wavelength import linear_grid

__all__ = ["TOY_LINES", "muse_grid", "toy_spectrum"]

#: (air wavelength A, depth, intrinsic sigma A) of strong lines: Hbeta, Mg b, Fe, NaD, Halpha, Ca II triplet
TOY_LINES = (
    (4861.33, 0.55, 2.0), (5167.32, 0.35, 0.6), (5172.68, 0.40, 0.6), (5183.60, 0.45, 0.6),
    (5269.54, 0.30, 0.4), (5328.04, 0.25, 0.4), (5889.95, 0.45, 0.5), (5895.92, 0.40, 0.5),
    (6562.80, 0.50, 1.8), (6122.22, 0.25, 0.4), (6162.17, 0.25, 0.4), (6439.08, 0.20, 0.4),
    (8498.02, 0.35, 0.8), (8542.09, 0.45, 0.9), (8662.14, 0.40, 0.9),
)


def muse_grid(npix: int = 3681, crval: float = 4749.75, cdelt: float = 1.25) -> np.ndarray:
    """MUSE nominal-mode air wavelength grid (4749.75 + 1.25 i, 3681 layers).

    Parameters
    ----------
    npix : int, optional
        Number of layers (default 3681).
    crval : float, optional
        First wavelength, air Angstrom (default 4749.75).
    cdelt : float, optional
        Step in Angstrom (default 1.25).

    Returns
    -------
    numpy.ndarray
        Air wavelengths in Angstrom, shape (npix,).
    """
    return linear_grid(crval, cdelt, npix)


def toy_spectrum(wave, lsf=MUSE_LSF, rv_kms: float = 0.0, teff_like: float = 5000.0):
    """Noise-free toy spectrum on ``wave`` (air) at resolution ``lsf``.

    The continuum is a Planck-like slope for temperature ``teff_like``; lines
    are Gaussians whose width is the intrinsic width convolved with the LSF.

    Parameters
    ----------
    wave : array_like
        Air wavelengths in Angstrom, shape (n_pix,).
    lsf : LSF, optional
        Instrumental LSF (default MUSE).
    rv_kms : float, optional
        Radial velocity in km/s applied to the line centres (non-relativistic, ``1 + v/c``).
    teff_like : float, optional
        Temperature in K of the Planck-like continuum slope (a shape parameter, not a label).

    Returns
    -------
    numpy.ndarray
        Flux, shape (n_pix,), continuum normalised to median 1 (dimensionless).
    """
    w = np.asarray(wave, dtype=np.float64)
    x = 1.4388e8 / (w * teff_like)  # hc / (lambda k T) with lambda in A
    cont = (w / 6000.0) ** -5 / np.expm1(x)
    cont = cont / np.median(cont)
    doppler = 1.0 + rv_kms / 299792.458
    depth = np.zeros_like(w)
    for lam, d, sig in TOY_LINES:
        lam_obs = lam * doppler
        s = np.sqrt(sig**2 + (lsf.fwhm(lam_obs) * FWHM_TO_SIGMA) ** 2)
        # keep the equivalent width of the intrinsic line
        depth += d * (sig / s) * np.exp(-0.5 * ((w - lam_obs) / s) ** 2)
    return cont * np.exp(-depth)
