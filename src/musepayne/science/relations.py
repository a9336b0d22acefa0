"""The paper's fitted precision relations (Wang et al. 2022, S5) and their figures.

* Eq. 11, ``log10 sigma_X = A_X log10 SNR + B_X`` with the coefficients of Table 3
  (:data:`TABLE3`; Teff in units of 100 K inside the relation, K in the public functions,
  :data:`TABLE3_UNIT_SCALE`);
* Eq. 12-13, ``SNR = SNR_1hr(V) sqrt(T_exp / 3600 s)`` (MUSE ETC, K giant, airmass 1.5,
  seeing 0.8"), and the closed-form inverses (S/N for a sigma, limiting V, exposure time);
* the paper's Fig. 13 (:func:`plot_sigma_vs_snr`) and the S/N-magnitude figure
  (:func:`plot_snr_vs_vmag`).

:mod:`musepayne.science.forecast` re-exports every public name here and adds the Cramer-Rao
forecast from a model's Jacobian; see its docstring for the formulae.  Imports nothing from
musepayne but the plotting helpers (matplotlib only inside the plotting functions).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from ._plotting import new_figure, save_figure

if TYPE_CHECKING:
    from .forecast import CramerRaoResult

__all__ = [
    "TABLE3",
    "TABLE3_UNIT_SCALE",
    "SNR1HR_ZP",
    "canonical_label",
    "sigma_from_snr",
    "snr_for_sigma",
    "snr_1hr",
    "snr_from_vmag",
    "vmag_for_snr",
    "exptime_for_snr",
    "sigma_at",
    "limiting_vmag",
    "required_exptime",
    "plot_sigma_vs_snr",
    "plot_snr_vs_vmag",
]

#: Paper Table 3: ``label -> (A_X, B_X)`` of Eq. 11 (Teff in units of 100 K).
TABLE3 = MappingProxyType({
    "teff": (-0.9875, 1.652),
    "logg": (-0.9922, 1.052),
    "fe_h": (-0.9746, 0.5823),
    "mg_fe": (-0.9862, 0.4486),
    "si_fe": (-0.9886, 0.7546),
    "ca_fe": (-0.9834, 0.868),
    "ti_fe": (-0.991, 0.856),
    "c_fe": (-0.9891, 0.5737),
    "ni_fe": (-0.9925, 0.8681),
    "cr_fe": (-0.9835, 0.7855),
})

#: Catalogue units per Table 3 unit: Teff's relation is in 100 K, the others in dex.
TABLE3_UNIT_SCALE = MappingProxyType({k: (100.0 if k == "teff" else 1.0) for k in TABLE3})

#: Eq. 13 constants: (amplitude, zero point V, background term).
SNR1HR_ZP = (462.34, 14.83, 0.00223)

_ALIASES = MappingProxyType({"t_eff": "teff", "log_g": "logg", "feh": "fe_h"})


def canonical_label(name: str) -> str:
    """Catalogue column name of a label: ``'[Fe/H]' -> 'fe_h'``, ``'Teff' -> 'teff'``.

    Parameters
    ----------
    name : str
        Label name (brackets, slashes, spaces, dashes and case are normalised).

    Returns
    -------
    str
        The canonical column name.
    """
    s = str(name).strip().lower().replace("[", "").replace("]", "").replace("/", "_")
    s = s.replace(" ", "").replace("-", "_")
    return _ALIASES.get(s, s)


def _coeffs(label: str) -> tuple[float, float, float]:
    key = canonical_label(label)
    if key not in TABLE3:
        raise KeyError(f"no Table 3 relation for label {label!r}; known: {sorted(TABLE3)}")
    a, b = TABLE3[key]
    return a, b, TABLE3_UNIT_SCALE[key]


def sigma_from_snr(label: str, snr):
    """Eq. 11: uncertainty of ``label`` at S/N per pixel ``snr`` (Teff in K, else dex).

    Parameters
    ----------
    label : str
        Table 3 label in any spelling :func:`canonical_label` knows (teff, logg, fe_h, mg_fe, ...).
    snr : float or array_like
        S/N per pixel.

    Returns
    -------
    numpy.ndarray
        Uncertainty in K (Teff) or dex, shape of ``snr``.

    Raises
    ------
    KeyError
        If the label has no Table 3 relation.
    """
    a, b, scale = _coeffs(label)
    snr = np.asarray(snr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return scale * 10.0 ** (a * np.log10(snr) + b)


def snr_for_sigma(label: str, sigma):
    """Inverse of Eq. 11: S/N per pixel at which ``label`` reaches ``sigma`` (Teff in K).

    Parameters
    ----------
    label : str
        Table 3 label in any spelling :func:`canonical_label` knows (teff, logg, fe_h, mg_fe, ...).
    sigma : float or array_like
        Target uncertainty, K for Teff, else dex; positive.

    Returns
    -------
    numpy.ndarray
        S/N per pixel, shape of ``sigma``.

    Raises
    ------
    KeyError
        If the label has no Table 3 relation.
    ValueError
        If a ``sigma`` is not positive.
    """
    a, b, scale = _coeffs(label)
    sigma = np.asarray(sigma, dtype=float)
    if np.any(sigma <= 0):
        raise ValueError("sigma must be positive")
    return 10.0 ** ((np.log10(sigma / scale) - b) / a)


def snr_1hr(vmag):
    """Eq. 13: S/N per pixel of a K giant of magnitude V in a one-hour MUSE exposure.

    Parameters
    ----------
    vmag : float or array_like
        V magnitude (mag).

    Returns
    -------
    numpy.ndarray
        S/N per pixel, shape of ``vmag``.
    """
    amp, v0, bg = SNR1HR_ZP
    x = 10.0 ** (0.4 * (v0 - np.asarray(vmag, dtype=float)))
    return amp * x / np.sqrt(bg + x)


def snr_from_vmag(vmag, exptime=3600.0):
    """Eq. 12: S/N per pixel at magnitude V after ``exptime`` seconds.

    Parameters
    ----------
    vmag : float or array_like
        V magnitude (mag).
    exptime : float or array_like, optional
        Exposure time in s (default 3600), positive.

    Returns
    -------
    numpy.ndarray
        S/N per pixel, broadcast shape of the inputs.

    Raises
    ------
    ValueError
        If an exposure time is not positive.
    """
    exptime = np.asarray(exptime, dtype=float)
    if np.any(exptime <= 0):
        raise ValueError("exposure time must be positive")
    return snr_1hr(vmag) * np.sqrt(exptime / 3600.0)


def vmag_for_snr(snr, exptime=3600.0):
    """Inverse of Eq. 12-13: the faintest V reaching ``snr`` in ``exptime`` seconds.

    Parameters
    ----------
    snr : float or array_like
        S/N per pixel, positive.
    exptime : float or array_like, optional
        Exposure time in s (default 3600), positive.

    Returns
    -------
    numpy.ndarray
        V magnitude (mag), broadcast shape of the inputs.

    Raises
    ------
    ValueError
        If an S/N or exposure time is not positive.
    """
    amp, v0, bg = SNR1HR_ZP
    snr = np.asarray(snr, dtype=float)
    exptime = np.asarray(exptime, dtype=float)
    if np.any(snr <= 0) or np.any(exptime <= 0):
        raise ValueError("S/N and exposure time must be positive")
    y = snr / np.sqrt(exptime / 3600.0)
    a = amp ** 2
    x = (y ** 2 + np.sqrt(y ** 4 + 4.0 * a * y ** 2 * bg)) / (2.0 * a)
    return v0 - 2.5 * np.log10(x)


def exptime_for_snr(snr, vmag):
    """Inverse of Eq. 12: seconds needed to reach ``snr`` at magnitude V.

    Parameters
    ----------
    snr : float or array_like
        S/N per pixel, positive.
    vmag : float or array_like
        V magnitude (mag).

    Returns
    -------
    numpy.ndarray
        Exposure time in s, broadcast shape of the inputs.

    Raises
    ------
    ValueError
        If an S/N is not positive.
    """
    snr = np.asarray(snr, dtype=float)
    if np.any(snr <= 0):
        raise ValueError("S/N must be positive")
    return 3600.0 * (snr / snr_1hr(vmag)) ** 2


def sigma_at(label: str, vmag, exptime=3600.0):
    """Eq. 11-13 combined: uncertainty of ``label`` for a star of magnitude V.

    Parameters
    ----------
    label : str
        Table 3 label in any spelling :func:`canonical_label` knows (teff, logg, fe_h, mg_fe, ...).
    vmag : float or array_like
        V magnitude (mag).
    exptime : float or array_like, optional
        Exposure time in s (default 3600).

    Returns
    -------
    numpy.ndarray
        Uncertainty in K (Teff) or dex.

    Raises
    ------
    KeyError
        If the label has no Table 3 relation.
    ValueError
        If an exposure time is not positive.
    """
    return sigma_from_snr(label, snr_from_vmag(vmag, exptime))


def limiting_vmag(label: str, sigma, exptime=3600.0):
    """Faintest V at which ``label`` reaches ``sigma`` in ``exptime`` seconds.

    Parameters
    ----------
    label : str
        Table 3 label in any spelling :func:`canonical_label` knows (teff, logg, fe_h, mg_fe, ...).
    sigma : float or array_like
        Target uncertainty, K for Teff, else dex.
    exptime : float or array_like, optional
        Exposure time in s (default 3600).

    Returns
    -------
    numpy.ndarray
        V magnitude (mag).

    Raises
    ------
    KeyError
        If the label has no Table 3 relation.
    ValueError
        If ``sigma`` or ``exptime`` is not positive.
    """
    return vmag_for_snr(snr_for_sigma(label, sigma), exptime)


def required_exptime(label: str, sigma, vmag):
    """Exposure time (s) for ``label`` to reach ``sigma`` at magnitude V.

    Parameters
    ----------
    label : str
        Table 3 label in any spelling :func:`canonical_label` knows (teff, logg, fe_h, mg_fe, ...).
    sigma : float or array_like
        Target uncertainty, K for Teff, else dex.
    vmag : float or array_like
        V magnitude (mag).

    Returns
    -------
    numpy.ndarray
        Exposure time in s.

    Raises
    ------
    KeyError
        If the label has no Table 3 relation.
    ValueError
        If ``sigma`` is not positive.
    """
    return exptime_for_snr(snr_for_sigma(label, sigma), vmag)



def plot_sigma_vs_snr(path, labels=None, snr=(10.0, 300.0), crlb: CramerRaoResult | None = None,
                      crlb_snr: float | None = None):
    """Paper Fig. 13: sigma_X vs S/N from Eq. 11 (and, optionally, a model's CRLB).

    ``crlb`` evaluated at S/N ``crlb_snr`` is scaled as 1/SNR (exact for a
    Fisher bound) and drawn dashed.  Teff is plotted in units of 100 K, as in
    the paper.  Returns the list of plotted curve names.

    Parameters
    ----------
    path : str or os.PathLike
        Output image file.
    labels : sequence of str, optional
        Table 3 labels (default all).
    snr : tuple of (float, float), optional
        S/N range of the x axis (default 10-300).
    crlb : CramerRaoResult, optional
        A model's bounds to overlay (the ``rv`` label is skipped).
    crlb_snr : float, optional
        The S/N at which ``crlb`` was computed (needed with ``crlb``).

    Returns
    -------
    list of str
        Curve names (labels, and ``<label>_crlb``).

    Raises
    ------
    KeyError
        If a label has no Table 3 relation.
    ValueError
        If ``crlb`` is given without ``crlb_snr``.
    """

    labels = [canonical_label(x) for x in (labels or TABLE3)]
    grid = np.geomspace(snr[0], snr[1], 200)
    fig = new_figure()
    ax = fig.subplots()
    drawn = []
    for lab in labels:
        s = sigma_from_snr(lab, grid) / TABLE3_UNIT_SCALE[lab]
        ax.plot(grid, s, label=lab + (" (100 K)" if lab == "teff" else ""))
        drawn.append(lab)
    if crlb is not None:
        if crlb_snr is None:
            raise ValueError("crlb_snr: the S/N at which the CRLB was computed")
        for j, lab in enumerate(crlb.label_names):
            if lab == "rv":  # km/s, not on this axis
                continue
            s0 = np.nanmedian(crlb.sigma[:, j]) / (100.0 if lab == "teff" else 1.0)
            ax.plot(grid, s0 * crlb_snr / grid, ls="--", label=f"{lab} CRLB")
            drawn.append(f"{lab}_crlb")
    ax.axhline(0.1, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("S/N per pixel")
    ax.set_ylabel(r"$\sigma_X$ (dex; Teff in 100 K)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return drawn


def plot_snr_vs_vmag(path, labels=None, sigma=0.1, exptime=3600.0, vrange=(14.0, 22.0), sigma_teff=None):
    """Paper Fig. 14: S/N vs V (Eq. 12-13) with each label's limiting V for ``sigma``.

    ``sigma`` is in dex; Teff uses ``sigma_teff`` in K, by default
    ``100 K x sigma`` (the paper's "0.1 dex or 10 K").  Returns
    ``{label: limiting V}`` of the drawn thresholds.

    Parameters
    ----------
    path : str or os.PathLike
        Output image file.
    labels : sequence of str, optional
        Table 3 labels (default all).
    sigma : float, optional
        Target uncertainty in dex (default 0.1).
    exptime : float, optional
        Exposure time in s (default 3600).
    vrange : tuple of (float, float), optional
        V range of the x axis (mag).
    sigma_teff : float, optional
        Teff target in K (default ``100 * sigma``).

    Returns
    -------
    dict of str to float
        Limiting V (mag) per label.

    Raises
    ------
    KeyError
        If a label has no Table 3 relation.
    """
    sigma_teff = 100.0 * sigma if sigma_teff is None else sigma_teff

    labels = [canonical_label(x) for x in (labels or TABLE3)]
    v = np.linspace(vrange[0], vrange[1], 300)
    fig = new_figure()
    ax = fig.subplots()
    ax.plot(v, snr_from_vmag(v, exptime), color="purple", lw=2, label=f"S/N ({exptime:g} s)")
    lims = {}
    from matplotlib import colormaps  # noqa: PLC0415 - heavy optional dependency, loaded when used

    cmap = colormaps["tab10"]
    for k, lab in enumerate(labels):
        vl = float(limiting_vmag(lab, sigma_teff if lab == "teff" else sigma, exptime))
        lims[lab] = vl
        ax.axvline(vl, lw=1.2, color=cmap(k % 10), ls="-" if k < 10 else "--", label=f"{lab}: V={vl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("V (mag)")
    ax.set_ylabel("S/N per pixel")
    ax.set_title(rf"limiting V for $\sigma$ = {sigma:g} dex (Teff: {sigma_teff:g} K)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    return lims
