"""[Mg/Fe]-Teff calibration of DD-Payne-A labels (paper Appendix A).

DD-Payne-A inherits a [Mg/Fe]-Teff trend from its APOGEE-Payne training labels.
The paper (Table A1) measures its slope, in dex per 1000 K, per [Fe/H] bin for
giants and dwarfs, in APOGEE-Payne and in LAMOST-DD-Payne-A (:data:`TABLE_A1`).

Two corrections are offered; both return a new table, keep the original
values in ``mg_fe_uncal`` and append a JSON record of what was done to
``meta['calibration']`` (a JSON list, one entry per step).

:class:`MgFeTeffCalibration` (slope correction)
    ``mg_fe_cal = mg_fe - slope([Fe/H], class) x (Teff - teff_ref) / 1000 K``:
    the trend is removed relative to a pivot temperature ``teff_ref``
    (default 4500 K, the middle of APOGEE's 4000-5000 K giant range where
    Ting et al. 2019 found ab-initio fits free of the trend; the paper does
    not state a pivot, so choose your own and it is recorded).
    **Giant/dwarf split** (the paper does not define it): giants have
    ``logg < 3.5`` (``giant_logg``), dwarfs ``logg >= 3.5``.  [Fe/H] bins are
    half-open ``[lo, hi)`` from -0.8 to 0.6; stars outside (or with missing
    Teff/logg/[Fe/H]) are left unchanged by default (``outside='skip'``) or
    get the nearest bin's slope (``outside='clip'``).  Column
    ``mg_fe_cal_flag`` is 1 where a correction was applied.

:func:`apply_region_offsets` (the paper's actual practice, §4.2.3 and App. A)
    adds a constant per region, regions given as selection expressions
    (:mod:`musepayne.science.selection`), first match wins.  The paper's values are
    :data:`PAPER_REGION_OFFSETS`: +0.08 dex for the bulge (R_gc < 3.5 kpc),
    +0.06 for 3 < R_gc < 5 kpc, +0.08 for 5 < R_gc < 7 kpc (needs an ``r_gc``
    column in kpc; the paper's bulge and 3-5 kpc ranges overlap, the bulge
    is listed first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from astropy.table import Column

from .selection import evaluate

__all__ = ["TABLE_A1", "FEH_BINS", "PAPER_REGION_OFFSETS", "slope_for", "MgFeTeffCalibration",
           "apply_region_offsets"]

#: [Fe/H] bin edges of Table A1.
FEH_BINS = np.array([-0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6])
FEH_BINS.setflags(write=False)

#: Table A1 slopes (dex / 1000 K) per [Fe/H] bin: ``source -> class -> 7 slopes``.
TABLE_A1 = MappingProxyType({
    "apogee_payne": MappingProxyType({
        "giant": (-0.025, -0.086, -0.125, -0.128, -0.118, -0.131, -0.165),
        "dwarf": (-0.117, -0.105, -0.080, -0.071, -0.064, -0.078, -0.130),
    }),
    "lamost_ddpayne_a": MappingProxyType({
        "giant": (-0.044, -0.092, -0.111, -0.142, -0.162, -0.186, -0.212),
        "dwarf": (-0.141, -0.132, -0.098, -0.093, -0.104, -0.132, -0.154),
    }),
})

#: The paper's [Mg/Fe] offsets per Galactocentric region (expression, offset dex, name).
PAPER_REGION_OFFSETS = (
    ("r_gc < 3.5", 0.08, "bulge"),
    ("r_gc >= 3 and r_gc < 5", 0.06, "3<R_gc<5 kpc"),
    ("r_gc >= 5 and r_gc < 7", 0.08, "5<R_gc<7 kpc"),
)


def slope_for(fe_h, logg, source: str = "lamost_ddpayne_a", giant_logg: float = 3.5, outside: str = "skip"):
    """Table A1 slope (dex/1000 K) per star; NaN where no correction applies.

    Parameters
    ----------
    fe_h : float or array_like
        [Fe/H] in dex; bins are half-open ``[lo, hi)`` between -0.8 and 0.6.
    logg : float or array_like
        Surface gravity log g in dex (cgs).
    source : {'lamost_ddpayne_a', 'apogee_payne'}, optional
        Which Table A1 column set to use.
    giant_logg : float, optional
        Giants have ``logg < giant_logg`` (default 3.5 dex).
    outside : {'skip', 'clip'}, optional
        NaN outside the [Fe/H] bins (``'skip'``) or the nearest bin's slope (``'clip'``).

    Returns
    -------
    numpy.ndarray
        Slope in dex per 1000 K, broadcast shape of ``fe_h`` and ``logg``; NaN for missing
        [Fe/H]/logg (and outside the bins with ``'skip'``).

    Raises
    ------
    KeyError
        For an unknown ``source``.
    ValueError
        For an ``outside`` other than 'skip'/'clip'.
    """
    if source not in TABLE_A1:
        raise KeyError(f"unknown Table A1 source {source!r}; known: {sorted(TABLE_A1)}")
    if outside not in ("skip", "clip"):
        raise ValueError("outside must be 'skip' or 'clip'")
    feh = np.asarray(fe_h, dtype=float)
    lg = np.asarray(logg, dtype=float)
    k = np.searchsorted(FEH_BINS, feh, side="right") - 1
    inside = (k >= 0) & (k < FEH_BINS.size - 1)
    kk = np.clip(k, 0, FEH_BINS.size - 2)
    giants = np.asarray(TABLE_A1[source]["giant"])[kk]
    dwarfs = np.asarray(TABLE_A1[source]["dwarf"])[kk]
    s = np.where(lg < giant_logg, giants, dwarfs)
    ok = np.isfinite(feh) & np.isfinite(lg) & (inside if outside == "skip" else True)
    return np.where(ok, s, np.nan)


def _append_record(meta, record):
    prev = meta.get("calibration", "[]") or "[]"
    try:
        lst = json.loads(prev)
    except (TypeError, ValueError):
        lst = [str(prev)]
    lst.append(record)
    meta["calibration"] = json.dumps(lst, sort_keys=True)


def _set_values(table, name, values):
    """Replace a column's values, keeping its unit, description and format."""

    old = table[name]
    table[name] = Column(np.asarray(values, dtype=float), name=name, unit=getattr(old, "unit", None),
                         description=getattr(old, "description", None), format=getattr(old, "format", None))


def _col(table, name):
    if name not in table.colnames:
        raise KeyError(f"catalogue has no column {name!r}")
    col = table[name]
    data = np.asarray(col, dtype=float)
    mask = getattr(col, "mask", None)
    return np.where(np.asarray(mask), np.nan, data) if mask is not None else data


@dataclass(frozen=True)
class MgFeTeffCalibration:
    """Remove the Table A1 [Mg/Fe]-Teff trend (see the module docstring).

    Calling the instance on a catalogue, ``cal(table)``, returns a corrected copy with
    ``<label>_uncal`` (if absent), ``<label>_cal_flag`` and a record appended to
    ``meta['calibration']``; it needs ``fe_h``, ``logg``, ``teff`` and ``label`` columns
    (KeyError otherwise).

    Attributes
    ----------
    source : str
        Table A1 source, 'lamost_ddpayne_a' (default) or 'apogee_payne'.
    teff_ref : float
        Pivot temperature in K (default 4500) where the correction is zero.
    giant_logg : float
        Giants have ``logg < giant_logg`` dex (default 3.5).
    outside : str
        'skip' (default) or 'clip', as for :func:`slope_for`.
    label : str
        The column corrected (default ``mg_fe``, dex).

    Raises
    ------
    KeyError
        For an unknown ``source``.
    ValueError
        For an ``outside`` other than 'skip'/'clip'.
    """

    source: str = "lamost_ddpayne_a"
    teff_ref: float = 4500.0
    giant_logg: float = 3.5
    outside: str = "skip"
    label: str = "mg_fe"

    def __post_init__(self):
        if self.source not in TABLE_A1:
            raise KeyError(f"unknown Table A1 source {self.source!r}; known: {sorted(TABLE_A1)}")
        if self.outside not in ("skip", "clip"):
            raise ValueError("outside must be 'skip' or 'clip'")

    def correction(self, table) -> np.ndarray:
        """Additive correction per row (0 where none applies).

        Parameters
        ----------
        table : astropy.table.Table
            Catalogue with ``fe_h`` (dex), ``logg`` (dex) and ``teff`` (K) columns.

        Returns
        -------
        numpy.ndarray
            Correction in dex, shape (len(table),).

        Raises
        ------
        KeyError
            If a needed column is missing.
        """
        s = slope_for(_col(table, "fe_h"), _col(table, "logg"), self.source, self.giant_logg, self.outside)
        d = -s * (_col(table, "teff") - self.teff_ref) / 1000.0
        return np.where(np.isfinite(d), d, 0.0)

    def __call__(self, table):
        out = table.copy()
        x = _col(out, self.label)
        delta = self.correction(out)
        applied = (delta != 0.0) & np.isfinite(x)
        if f"{self.label}_uncal" not in out.colnames:
            out[f"{self.label}_uncal"] = x
            out[f"{self.label}_uncal"].unit = getattr(out[self.label], "unit", None)
            out[f"{self.label}_uncal"].description = f"{self.label} before calibration"
        _set_values(out, self.label, np.where(applied, x + delta, x))
        out[f"{self.label}_cal_flag"] = applied.astype(np.int16)
        out[f"{self.label}_cal_flag"].description = "1 where the Table A1 Teff-trend correction was applied"
        _append_record(out.meta, {
            "step": "mg_fe_teff_trend", "paper": "Wang et al. 2022 App. A, Table A1",
            "formula": f"{self.label} - slope(fe_h, class) * (teff - {self.teff_ref:g}) / 1000",
            "source": self.source, "teff_ref": self.teff_ref, "giant_logg": self.giant_logg,
            "giant_definition": f"logg < {self.giant_logg:g}", "outside": self.outside,
            "n_corrected": int(np.count_nonzero(applied)),
        })
        return out


def apply_region_offsets(table, offsets, label: str = "mg_fe"):
    """Add a constant to ``label`` per region; regions are selection expressions.

    ``offsets``: sequence of ``(expression, offset)`` or ``(expression,
    offset, name)``; the first matching region wins.  Adds ``<label>_uncal``
    (if absent) and ``<label>_region`` (name, '' where none matched), and
    records the step in ``meta['calibration']``.

    Parameters
    ----------
    table : astropy.table.Table
        Catalogue (not modified); the expressions may use any of its columns (e.g. ``r_gc`` in kpc).
    offsets : sequence of tuple
        ``(expression, offset)`` or ``(expression, offset, name)``; offset in the unit of
        ``label`` (dex), e.g. :data:`PAPER_REGION_OFFSETS`.
    label : str, optional
        Column to shift (default ``mg_fe``).

    Returns
    -------
    astropy.table.Table
        The shifted copy.

    Raises
    ------
    KeyError
        If ``label`` is missing.
    SelectionError
        If an expression is not valid for the table.
    """

    out = table.copy()
    x = _col(out, label)
    done = np.zeros(len(out), bool)
    delta = np.zeros(len(out))
    region = np.full(len(out), "", dtype=object)
    rec = []
    for item in offsets:
        expr, off = item[0], float(item[1])
        name = item[2] if len(item) > 2 else expr
        m = evaluate(out, expr) & ~done
        delta[m] = off
        region[m] = name
        done |= m
        rec.append({"region": name, "expression": expr, "offset": off, "n": int(np.count_nonzero(m))})
    if f"{label}_uncal" not in out.colnames:
        out[f"{label}_uncal"] = x
    _set_values(out, label, x + delta)
    out[f"{label}_region"] = region.astype(str)
    _append_record(out.meta, {"step": "region_offsets", "label": label,
                              "paper": "Wang et al. 2022 Sect. 4.2.3 / App. A", "regions": rec})
    return out
