"""Wavelength masks by observing mode, and sky-emission residual cleaning.

All ranges are in Angstrom on the model grid (vacuum, LAMOST frame) unless
stated.  The bit each range sets is defined in :mod:`musepayne.flags`.

Standard mode (paper S3.2, X19)
    telluric bands :data:`TELLURIC_STANDARD`, ``lambda > 8750`` (RED_CUTOFF),
    the LAMOST dichroic 5720-6060 A (DICHROIC).  X19's exact telluric mask is
    not published; ours covers the O2 B (6870) and A (7605) bands and the H2O
    bands at 6300, 7200 and 8200 A generously.
Bulge mode (paper S4.2.1)
    ``lambda < 5991`` (BLUE_CUTOFF) and the paper's narrower telluric bands
    :data:`TELLURIC_BULGE`; sky residual cleaning on by default; the red
    cut-off at 8750 A still applies.
AO notch
    The NaD laser notch of MUSE AO modes (MUSE pipeline instrument constants,
    **air** wavelengths, converted to vacuum when applied): WFM-AO-N
    5805-5966, WFM-AO-E 5755-6008, NFM 5780-6050.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter

from ..flags import flag_value
from ..instrument.wavelength import air_to_vacuum

__all__ = [
    "TELLURIC_STANDARD",
    "TELLURIC_BULGE",
    "AO_NOTCH_AIR",
    "MODES",
    "mode_mask",
    "clean_sky_residuals",
]

TELLURIC_STANDARD = ((6270.0, 6330.0), (6850.0, 7000.0), (7150.0, 7350.0), (7570.0, 7730.0), (8100.0, 8340.0))
TELLURIC_BULGE = ((6270.0, 6305.0), (6850.0, 6966.0), (7160.0, 7320.0), (7585.0, 7715.0), (8130.0, 8310.0))
DICHROIC = (5720.0, 6060.0)
RED_CUTOFF = 8750.0
BLUE_CUTOFF_BULGE = 5991.0
AO_NOTCH_AIR = {
    "WFM-AO-N": (5805.0, 5966.0),
    "WFM-AO-E": (5755.0, 6008.0),
    "NFM": (5780.0, 6050.0),
}
MODES = ("standard", "bulge")


def _in_ranges(wave, ranges):
    w = np.asarray(wave)
    m = np.zeros(w.shape, bool)
    for lo, hi in ranges:
        m |= (w >= lo) & (w <= hi)
    return m


def mode_mask(wave, mode: str = "standard", ao_notch: str | None = None, user_ranges=()) -> np.ndarray:
    """Bit mask (int32) of the fixed wavelength masks of a mode on a vacuum grid.

    Parameters
    ----------
    wave : array_like
        Vacuum wavelengths in Angstrom (any shape).
    mode : {'standard', 'bulge'}, optional
        Observing mode (default 'standard'): standard sets TELLURIC (:data:`TELLURIC_STANDARD`) and
        DICHROIC; bulge sets TELLURIC (:data:`TELLURIC_BULGE`) and BLUE_CUTOFF (< 5991 A).  Both set
        RED_CUTOFF above 8750 A.
    ao_notch : {'WFM-AO-N', 'WFM-AO-E', 'NFM'}, optional
        MUSE AO mode whose NaD notch (air ranges converted to vacuum) gets AO_NOTCH; case-insensitive.
    user_ranges : sequence of (float, float), optional
        Extra (lo, hi) vacuum ranges in Angstrom, inclusive, flagged USER_MASK.

    Returns
    -------
    numpy.ndarray
        int32 bit mask of the shape of ``wave`` (bits from :mod:`musepayne.flags`).

    Raises
    ------
    ValueError
        For an unknown ``mode`` or ``ao_notch``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    w = np.asarray(wave, dtype=np.float64)
    m = np.zeros(w.shape, np.int32)
    if mode == "standard":
        m[_in_ranges(w, TELLURIC_STANDARD)] |= flag_value("TELLURIC")
        m[_in_ranges(w, (DICHROIC,))] |= flag_value("DICHROIC")
    else:
        m[_in_ranges(w, TELLURIC_BULGE)] |= flag_value("TELLURIC")
        m[w < BLUE_CUTOFF_BULGE] |= flag_value("BLUE_CUTOFF")
    m[w > RED_CUTOFF] |= flag_value("RED_CUTOFF")
    if ao_notch:
        key = ao_notch.upper()
        if key not in AO_NOTCH_AIR:
            raise ValueError(f"unknown AO mode {ao_notch!r}; choose one of {sorted(AO_NOTCH_AIR)}")
        lo, hi = air_to_vacuum(np.array(AO_NOTCH_AIR[key]))
        m[(w >= lo) & (w <= hi)] |= flag_value("AO_NOTCH")
    if user_ranges:
        m[_in_ranges(w, user_ranges)] |= flag_value("USER_MASK")
    return m


def clean_sky_residuals(flux, variance, bad=None, nsigma: float = 5.0, window: int = 21, grow: int = 1):
    """Detect positive sky-emission residuals and replace them (paper S4.2.1).

    A pixel is an emission residual when it exceeds the running median (over
    ``window`` pixels) by more than ``nsigma`` times the larger of its own
    error and the robust scatter of the residuals.  Detected pixels (grown by
    ``grow`` pixels each side) are replaced by the mean of the nearest clean
    pixel on each side; their variance by the mean of those pixels' variances.

    Works on a batch ``(n_spec, n_pix)`` on the *native* grid; returns new
    arrays ``(flux, variance, replaced)`` and never modifies the inputs.

    Parameters
    ----------
    flux : array_like
        Flux, shape (n_spec, n_pix) or (n_pix,), native grid.
    variance : array_like
        Variance of ``flux``, same shape; non-finite or <= 0 marks a pixel invalid.
    bad : array_like of bool, optional
        Extra invalid pixels, same shape.
    nsigma : float, optional
        Detection threshold in units of the error (default 5).
    window : int, optional
        Running-median width in pixels (default 21).
    grow : int, optional
        Pixels added on each side of a detection (default 1).

    Returns
    -------
    flux : numpy.ndarray
        float64 (n_spec, n_pix), detected pixels replaced.
    variance : numpy.ndarray
        float64 (n_spec, n_pix), detected pixels replaced.
    replaced : numpy.ndarray
        bool (n_spec, n_pix), the pixels detected (after growing).
    """
    f = np.array(np.atleast_2d(flux), dtype=np.float64)
    v = np.array(np.atleast_2d(variance), dtype=np.float64)
    invalid = ~np.isfinite(f) | ~np.isfinite(v) | (v <= 0)
    if bad is not None:
        invalid |= np.atleast_2d(bad)
    ff = np.where(invalid, np.nan, f)
    # fill invalid pixels for the median filter with the row median
    rowmed = np.nanmedian(ff, axis=1, keepdims=True)
    rowmed = np.where(np.isfinite(rowmed), rowmed, 0.0)
    base = median_filter(np.where(invalid, rowmed, f), size=(1, window), mode="nearest")
    resid = np.where(invalid, 0.0, f - base)
    mad = 1.4826 * np.median(np.abs(resid), axis=1, keepdims=True)
    err = np.sqrt(np.where(invalid, np.inf, v))
    thresh = nsigma * np.maximum(err, mad)
    hit = (resid > thresh) & ~invalid
    if grow > 0 and hit.any():
        grown = hit.copy()
        for g in range(1, grow + 1):
            grown[:, g:] |= hit[:, :-g]
            grown[:, :-g] |= hit[:, g:]
        hit = grown & ~invalid
    replaced = hit
    if hit.any():
        n = f.shape[1]
        idx = np.arange(n)
        clean = ~hit & ~invalid
        for i in np.nonzero(hit.any(axis=1))[0]:
            ci = idx[clean[i]]
            if ci.size == 0:
                continue
            hi_pos = np.searchsorted(ci, idx[hit[i]])
            left = ci[np.clip(hi_pos - 1, 0, ci.size - 1)]
            right = ci[np.clip(hi_pos, 0, ci.size - 1)]
            f[i, hit[i]] = 0.5 * (f[i, left] + f[i, right])
            v[i, hit[i]] = 0.5 * (v[i, left] + v[i, right])
    return f, v, replaced
