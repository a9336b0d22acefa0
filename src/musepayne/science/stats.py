"""The paper's label statistics: robust bias and dispersion, and which columns are labels.

For label differences ``d = X_cat - X_ref`` (Wang et al. 2022, S4.1, Fig. 5-7) the bias is
``median(d)`` and the dispersion half the difference between the 84.13th and 15.87th
percentiles (a robust 1-sigma); non-finite values are ignored (:func:`bias_dispersion`).
:mod:`musepayne.science.validation` re-exports every public name here.  Imports numpy only.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["LABEL_PATTERN", "bias_dispersion", "label_columns"]


#: Columns treated as labels by default: Teff, logg, vmic, [Fe/H], [M/H], [X/Fe], RV.
LABEL_PATTERN = re.compile(r"^(teff|logg|vmic|fe_h|m_h|alpha_m|alpha_fe|[a-z]{1,2}_fe|rv)$")

_P_LO, _P_HI = 15.87, 84.13


def bias_dispersion(values) -> tuple[float, float, int]:
    """``(median, (P84.13 - P15.87)/2, n_finite)`` of ``values`` (NaN, NaN, 0 if empty).

    Parameters
    ----------
    values : array_like
        Differences (any shape, flattened; any unit, e.g. K or dex); non-finite values are ignored.

    Returns
    -------
    bias : float
        Median, in the unit of ``values``.
    dispersion : float
        Robust 1-sigma (half the 15.87-84.13 percentile range), same unit.
    n : int
        Number of finite values used.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(v, [_P_LO, _P_HI])
    return float(np.median(v)), float(0.5 * (hi - lo)), int(v.size)


def label_columns(table, other=None) -> list[str]:
    """Label columns of ``table`` (and also in ``other`` when given), in table order.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue; columns matching :data:`LABEL_PATTERN` (teff, logg, fe_h, X_fe, rv, ...) are labels.
    other : astropy.table.Table, optional
        Keep only the labels this table also has.

    Returns
    -------
    list of str
        Column names.
    """
    cols = [c for c in table.colnames if LABEL_PATTERN.match(c)]
    if other is not None:
        cols = [c for c in cols if c in other.colnames]
    return cols


def _float(col):
    data = np.asarray(col, dtype=float)
    mask = getattr(col, "mask", None)
    if mask is not None:
        data = np.where(np.asarray(mask), np.nan, data)
    return data
