"""Repeat-based error scale factors (Wang et al. 2022, Eq. 9-10).

``f_X = std((X_m - X_n) / sqrt(s_m**2 + s_n**2))`` over all pairs (m, n) of repeat observations
of one star (Eq. 10, with the square root that makes it dimensionless).  Each pair enters in both
orders, so the mean of the normalised differences is exactly zero and the std is their root mean
square.  ``f = 1`` for correct errors, ``f = 3`` for errors underestimated three times.
:func:`repeat_error_factor`, :func:`repeat_error_factors`, :func:`apply_error_factors` (Eq. 9:
``sigma = sigma_reported x f``).  :mod:`musepayne.science.validation` re-exports every public name.
"""

from __future__ import annotations

import json

import numpy as np
from astropy.table import Table

from .stats import _float, bias_dispersion, label_columns

__all__ = ["repeat_pairs", "repeat_error_factor", "repeat_error_factors", "apply_error_factors"]


# --------------------------------------------------------------------------- repeats (Eq. 10)


def repeat_pairs(table, id_col: str = "stellar_id", rows=None) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs ``(m, n)``, m < n, of rows sharing ``id_col`` (among ``rows``).

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue with repeat observations.
    id_col : str, optional
        Star identifier column (compared as stripped strings).
    rows : array_like of bool, optional
        Rows that may take part (default all).

    Returns
    -------
    m, n : numpy.ndarray
        int row indices, same length.

    Raises
    ------
    KeyError
        If ``id_col`` is missing.
    """
    if id_col not in table.colnames:
        raise KeyError(f"no id column {id_col!r}")
    ids = np.asarray(table[id_col]).astype(str)
    use = np.ones(len(table), bool) if rows is None else np.asarray(rows, bool)
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(use):
        groups.setdefault(ids[i].strip(), []).append(int(i))
    im, jn = [], []
    for members in groups.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                im.append(members[a])
                jn.append(members[b])
    return np.asarray(im, dtype=int), np.asarray(jn, dtype=int)


def repeat_error_factor(table, label: str, *, err_col: str | None = None, id_col: str = "stellar_id",
                        rows=None, robust: bool = False) -> tuple[float, int]:
    """Paper Eq. 10 (with the square root): error scale factor of ``label`` from repeats.

    ``f = std(z)`` with ``z = (X_m - X_n) / sqrt(s_m**2 + s_n**2)`` over all
    pairs of repeats (both orders, so mean(z) = 0).  ``robust=True`` uses
    half the 15.87-84.13 percentile range of z instead of the std.  Pairs with
    a non-finite value or a non-positive combined error are skipped.
    Returns ``(f, n_pairs)``; ``(nan, 0)`` without usable pairs.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue with repeat observations.
    label : str
        Label column (e.g. ``teff`` in K, ``fe_h`` in dex).
    err_col : str, optional
        Its error column (default ``<label>_err``, same unit).
    id_col : str, optional
        Star identifier column.
    rows : array_like of bool, optional
        Rows that may take part (default all).
    robust : bool, optional
        Use the percentile width instead of the std (default False).

    Returns
    -------
    f : float
        Dimensionless error scale factor.
    n_pairs : int
        Number of usable pairs.

    Raises
    ------
    KeyError
        If the label, error or id column is missing.
    """
    err_col = err_col or f"{label}_err"
    for c in (label, err_col):
        if c not in table.colnames:
            raise KeyError(f"no column {c!r}")
    x, s = _float(table[label]), _float(table[err_col])
    m, n = repeat_pairs(table, id_col, rows)
    den = np.sqrt(s[m] ** 2 + s[n] ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (x[m] - x[n]) / den
    z = z[np.isfinite(z) & (den > 0)]
    if z.size == 0:
        return float("nan"), 0
    zz = np.concatenate([z, -z])
    f = bias_dispersion(zz)[1] if robust else float(np.sqrt(np.mean(zz ** 2)))
    return float(f), int(z.size)


def repeat_error_factors(table, labels=None, *, id_col: str = "stellar_id", rows=None, robust: bool = False):
    """Table of Eq. 10 factors for every label with an ``_err`` column.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue with repeat observations.
    labels : sequence of str, optional
        Labels to scale (default: :func:`label_columns` that have ``<label>_err``).
    id_col : str, optional
        Star identifier column.
    rows : array_like of bool, optional
        Rows that may take part.
    robust : bool, optional
        See :func:`repeat_error_factor`.

    Returns
    -------
    astropy.table.Table
        Columns ``label``, ``factor`` (dimensionless) and ``n_pairs``; ``meta`` has ``n_rows``, ``n_ids``, ``robust``.

    Raises
    ------
    KeyError
        As :func:`repeat_error_factor`.
    """

    labels = list(labels) if labels else [c for c in label_columns(table) if f"{c}_err" in table.colnames]
    out = []
    for c in labels:
        f, n = repeat_error_factor(table, c, id_col=id_col, rows=rows, robust=robust)
        out.append((c, f, n))
    t = Table(rows=out or None, names=("label", "factor", "n_pairs"), dtype=(str, float, int))
    t["factor"].description = "std((X_m - X_n)/sqrt(s_m^2 + s_n^2)) over repeat pairs (Eq. 10)"
    n_stars = len({k for k in np.asarray(table[id_col]).astype(str)}) if id_col in table.colnames else 0
    t.meta["n_rows"], t.meta["n_ids"], t.meta["robust"] = len(table), n_stars, bool(robust)
    return t


def apply_error_factors(table, factors: dict, *, force: bool = False):
    """New table with ``<label>_err`` multiplied by ``factors[label]`` (Eq. 9).

    The factors are recorded in ``meta['error_scale']`` (JSON); applying again
    to a label already scaled raises unless ``force``.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue (not modified).
    factors : dict of str to float
        ``{label: factor}``, positive and finite.
    force : bool, optional
        Allow scaling a label again; factors then multiply in ``meta['error_scale']``.

    Returns
    -------
    astropy.table.Table
        A copy with the scaled error columns.

    Raises
    ------
    KeyError
        If ``<label>_err`` is missing.
    ValueError
        For a non-positive or non-finite factor, or a label already scaled without ``force``.
    """
    out = table.copy()
    done = json.loads(out.meta.get("error_scale", "{}") or "{}")
    for label, f in factors.items():
        col = f"{label}_err"
        if col not in out.colnames:
            raise KeyError(f"no column {col!r}")
        if not np.isfinite(f) or f <= 0:
            raise ValueError(f"error factor for {label} must be positive and finite, got {f}")
        if label in done and not force:
            raise ValueError(f"{col} was already scaled by {done[label]} (meta['error_scale']); use force")
        out[col] = out[col] * float(f)
        done[label] = float(f) * float(done.get(label, 1.0))
    out.meta["error_scale"] = json.dumps(done, sort_keys=True)
    return out
