"""Validation statistics: catalogue comparisons, repeat-based error scaling, plots.

Paper (Wang et al. 2022) conventions implemented here:

* **Bias and dispersion** (§4.1, Fig. 5-7): for label differences
  ``d = X_cat - X_ref`` the bias is ``median(d)`` and the dispersion is half
  the difference between the 84.13th and 15.87th percentiles (a robust
  1-sigma).  Non-finite values are ignored.  :func:`bias_dispersion`.
* **Cross-match** by identifier or by sky position within a tolerance
  (astropy ``SkyCoord.match_to_catalog_sky``): :func:`crossmatch`;
  :func:`compare` matches two catalogues and returns per-label statistics.
* **Repeat-based error scale factor** (Eq. 10, with the square root that makes
  it dimensionless):
  ``f_X = std((X_m - X_n) / sqrt(s_m**2 + s_n**2))`` over all pairs (m, n) of
  repeat observations of one star.  Each pair enters in both orders, so the
  mean of the normalised differences is exactly zero and the std is their
  root mean square.  ``f = 1`` for correct errors, ``f = 3`` for errors
  underestimated three times.  :func:`repeat_error_factor`,
  :func:`apply_error_factors` (Eq. 9: ``sigma = sigma_reported x f``).
* Plots in the style of Fig. 5 (differences vs [Fe/H], median and dispersion
  per panel) and Fig. 6-7 (bias and precision per label, sorted by precision).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ._plotting import new_figure, save_figure

__all__ = [
    "LABEL_PATTERN",
    "bias_dispersion",
    "label_columns",
    "crossmatch",
    "attach_columns",
    "Comparison",
    "compare",
    "repeat_pairs",
    "repeat_error_factor",
    "repeat_error_factors",
    "apply_error_factors",
    "plot_differences",
    "plot_bias_precision",
]

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


def crossmatch(cat, ref, by: str = "id", *, id_col: str = "stellar_id", ref_id_col: str | None = None,
               tolerance_arcsec: float = 1.0, ra_col: str = "ra", dec_col: str = "dec",
               ref_ra_col: str | None = None, ref_dec_col: str | None = None):
    """Match rows of ``cat`` to rows of ``ref``.

    ``by='id'``: equal identifiers (as strings, stripped); a duplicated
    reference id matches its first row.  ``by='sky'``: nearest reference
    position (ra/dec in degrees) within ``tolerance_arcsec``.  Several ``cat``
    rows may match one ``ref`` row (repeat observations).

    Returns ``(i_cat, i_ref, sep_arcsec)`` integer index arrays and the
    separations (NaN for id matches).

    Parameters
    ----------
    cat, ref : astropy.table.Table
        Catalogue and reference.
    by : {'id', 'sky'}, optional
        Match on identifiers (default) or on sky position.
    id_col : str, optional
        Identifier column of ``cat`` (default ``stellar_id``).
    ref_id_col : str, optional
        Identifier column of ``ref`` (default ``id_col``).
    tolerance_arcsec : float, optional
        Maximum separation for ``by='sky'``, arcsec (default 1).
    ra_col, dec_col : str, optional
        Position columns of ``cat`` in degrees (ICRS).
    ref_ra_col, ref_dec_col : str, optional
        Position columns of ``ref`` (default ``ra_col``, ``dec_col``).

    Returns
    -------
    i_cat : numpy.ndarray
        int indices into ``cat``.
    i_ref : numpy.ndarray
        int indices into ``ref``, same length.
    sep_arcsec : numpy.ndarray
        Separations in arcsec (NaN for id matches).

    Raises
    ------
    KeyError
        If an id or position column is missing.
    ValueError
        If ``by`` is neither 'id' nor 'sky'.
    """
    if by == "id":
        rid = ref_id_col or id_col
        for t, c, what in ((cat, id_col, "catalogue"), (ref, rid, "reference")):
            if c not in t.colnames:
                raise KeyError(f"{what} has no id column {c!r}")
        first = {}
        for j, v in enumerate(np.asarray(ref[rid]).astype(str)):
            first.setdefault(v.strip(), j)
        pairs = [(i, first[v.strip()]) for i, v in enumerate(np.asarray(cat[id_col]).astype(str))
                 if v.strip() in first]
        i_cat = np.array([p[0] for p in pairs], dtype=int)
        i_ref = np.array([p[1] for p in pairs], dtype=int)
        return i_cat, i_ref, np.full(i_cat.size, np.nan)
    if by == "sky":
        rra, rdec = ref_ra_col or ra_col, ref_dec_col or dec_col
        for t, cs, what in ((cat, (ra_col, dec_col), "catalogue"), (ref, (rra, rdec), "reference")):
            for c in cs:
                if c not in t.colnames:
                    raise KeyError(f"{what} has no position column {c!r}")
        if len(cat) == 0 or len(ref) == 0:
            return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
        a = SkyCoord(_float(cat[ra_col]) * u.deg, _float(cat[dec_col]) * u.deg)
        b = SkyCoord(_float(ref[rra]) * u.deg, _float(ref[rdec]) * u.deg)
        idx, sep, _ = a.match_to_catalog_sky(b)
        sep_as = sep.to_value(u.arcsec)
        ok = np.isfinite(sep_as) & (sep_as <= tolerance_arcsec)
        return np.flatnonzero(ok), np.asarray(idx)[ok], sep_as[ok]
    raise ValueError(f"by must be 'id' or 'sky', not {by!r}")


def attach_columns(cat, ref, columns: dict, *, by: str = "id", **match_kw):
    """New ``cat`` with reference columns copied onto matched rows (NaN elsewhere).

    ``columns``: ``{reference column: new name}``; e.g. ``{'snr_g': 'snr_lamost'}``
    brings the LAMOST S/N onto MUSE rows so that the Eq. 5 preset can be
    applied before comparing.

    Parameters
    ----------
    cat, ref : astropy.table.Table
        Catalogue and reference (neither is modified).
    columns : dict of str to str
        ``{reference column: new name}``; the values are converted to float.
    by : {'id', 'sky'}, optional
        How to match (see :func:`crossmatch`).
    **match_kw
        Further :func:`crossmatch` options (``id_col``, ``tolerance_arcsec``, ...).

    Returns
    -------
    astropy.table.Table
        A copy of ``cat`` with the new float columns.

    Raises
    ------
    KeyError
        If a reference column is missing, or as :func:`crossmatch`.
    ValueError
        As :func:`crossmatch`.
    """
    out = cat.copy()
    i_cat, i_ref, _ = crossmatch(cat, ref, by=by, **match_kw)
    for src, dst in columns.items():
        if src not in ref.colnames:
            raise KeyError(f"reference has no column {src!r}")
        vals = np.full(len(cat), np.nan)
        vals[i_cat] = _float(ref[src])[i_ref]
        out[dst] = vals
    return out


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare`.

    Attributes
    ----------
    matched : astropy.table.Table
        One row per matched pair with ``i_cat``, ``i_ref``, ``sep_arcsec`` (and the id column when
        present), and ``<label>``, ``<label>_ref`` and ``d_<label>`` (catalogue minus reference)
        columns in the catalogue's unit.
    stats : astropy.table.Table
        One row per label: ``label, n, bias, dispersion, unit``; ``meta`` has ``n_matched`` and ``match``.
    """

    matched: object
    stats: object

    def as_dict(self) -> dict:
        """The statistics as plain Python values.

        Returns
        -------
        dict
            ``{label: {"n": int, "bias": float, "dispersion": float}}`` in the labels' units.
        """
        return {str(r["label"]): {"n": int(r["n"]), "bias": float(r["bias"]), "dispersion": float(r["dispersion"])}
                for r in self.stats}


def compare(cat, ref, labels=None, *, by: str = "id", sort_by_dispersion: bool = False, **match_kw) -> Comparison:
    """Cross-match ``cat`` with ``ref`` and compute bias/dispersion per label.

    ``labels``: columns to compare (default: :func:`label_columns` common to
    both).  Extra keyword arguments go to :func:`crossmatch`.

    Parameters
    ----------
    cat, ref : astropy.table.Table
        Catalogue and reference.
    labels : sequence of str, optional
        Columns to compare, present in both tables.
    by : {'id', 'sky'}, optional
        How to match (see :func:`crossmatch`).
    sort_by_dispersion : bool, optional
        Sort the statistics rows by increasing dispersion (default: label order).
    **match_kw
        Further :func:`crossmatch` options.

    Returns
    -------
    Comparison
        Matched pairs and per-label bias (median) and dispersion (robust 1-sigma).

    Raises
    ------
    KeyError
        If a label is missing from either table, or as :func:`crossmatch`.
    ValueError
        As :func:`crossmatch`.
    """

    labels = list(labels) if labels else label_columns(cat, ref)
    missing = [c for c in labels if c not in cat.colnames or c not in ref.colnames]
    if missing:
        raise KeyError(f"labels missing from one of the catalogues: {missing}")
    i_cat, i_ref, sep = crossmatch(cat, ref, by=by, **match_kw)
    m = Table()
    id_col = match_kw.get("id_col", "stellar_id")
    if id_col in cat.colnames:
        m[id_col] = np.asarray(cat[id_col])[i_cat]
    m["i_cat"], m["i_ref"], m["sep_arcsec"] = i_cat, i_ref, sep
    rows = []
    for c in labels:
        x, y = _float(cat[c])[i_cat], _float(ref[c])[i_ref]
        m[c], m[f"{c}_ref"], m[f"d_{c}"] = x, y, x - y
        unit = getattr(cat[c], "unit", None)
        for k in (c, f"{c}_ref", f"d_{c}"):
            m[k].unit = unit
        b, d, n = bias_dispersion(x - y)
        rows.append((c, n, b, d, str(unit) if unit is not None else ""))
    stats = Table(rows=rows or None, names=("label", "n", "bias", "dispersion", "unit"),
                  dtype=(str, int, float, float, str))
    stats["bias"].description = "median of catalogue - reference"
    stats["dispersion"].description = "half of the 15.87-84.13 percentile range of catalogue - reference"
    if sort_by_dispersion and len(stats):
        stats.sort("dispersion")
    stats.meta["n_matched"] = int(i_cat.size)
    stats.meta["match"] = by
    return Comparison(matched=m, stats=stats)


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


# --------------------------------------------------------------------------- plots


def plot_differences(path, comparison: Comparison, labels=None, x: str = "fe_h", ncols: int = 2) -> dict:
    """Paper Fig. 5: ``d_<label>`` vs ``x`` (default [Fe/H] of the catalogue), one panel per label.

    Each panel carries the median and dispersion as text, as in the paper.
    Returns ``{label: number of points drawn}``.

    Parameters
    ----------
    path : str or os.PathLike
        Output image file (format from the suffix).
    comparison : Comparison
        Output of :func:`compare`; ``x`` must be one of its compared labels.
    labels : sequence of str, optional
        Panels to draw (default every compared label).
    x : str, optional
        Column of ``comparison.matched`` on the x axis (default ``fe_h``, dex).
    ncols : int, optional
        Panels per row (default 2).

    Returns
    -------
    dict of str to int
        Points drawn per label.

    Raises
    ------
    KeyError
        If ``x`` is not a column of the matched table.
    """

    m = comparison.matched
    labels = list(labels) if labels else [str(r) for r in comparison.stats["label"]]
    if x not in m.colnames:
        raise KeyError(f"x column {x!r} is not among the compared labels {labels}")
    nrows = max(1, int(np.ceil(len(labels) / ncols)))
    fig = new_figure(figsize=(4.0 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    counts = {}
    xv = np.asarray(m[x], dtype=float)
    for ax, lab in zip(axes, labels):
        d = np.asarray(m[f"d_{lab}"], dtype=float)
        ok = np.isfinite(d) & np.isfinite(xv)
        b, disp, n = bias_dispersion(d[ok])
        # y range: +-6 dispersions around the median; outliers drawn at the edge as triangles
        half = 6.0 * disp if np.isfinite(disp) and disp > 0 else None
        if half is not None:
            lo, hi = b - half, b + half
            inside = ok & (d >= lo) & (d <= hi)
            ax.scatter(xv[inside], d[inside], s=8, alpha=0.7)
            out_hi, out_lo = ok & (d > hi), ok & (d < lo)
            ax.scatter(xv[out_hi], np.full(out_hi.sum(), hi), marker="^", s=14, color="C3")
            ax.scatter(xv[out_lo], np.full(out_lo.sum(), lo), marker="v", s=14, color="C3")
            ax.set_ylim(lo - 0.05 * half, hi + 0.05 * half)
            n_out = int(out_hi.sum() + out_lo.sum())
        else:
            ax.scatter(xv[ok], d[ok], s=8, alpha=0.7)
            n_out = 0
        ax.axhline(0.0, color="k", lw=0.7)
        ax.text(0.03, 0.95, f"median {b:.3g}\ndispersion {disp:.3g}\nN={n}"
                + (f" ({n_out} beyond the axis)" if n_out else ""), transform=ax.transAxes, va="top", fontsize=7)
        ax.set_ylabel(rf"$\Delta$ {lab}")
        ax.set_xlabel(x)
        counts[lab] = int(np.count_nonzero(ok))
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, path)
    return counts


def plot_bias_precision(path, stats: dict) -> list[str]:
    """Paper Fig. 6-7: bias (top) and precision (bottom) per label, sorted by precision.

    ``stats``: ``{name: stats Table from compare}``, e.g. one per wavelength
    region; labels are ordered by the first entry's dispersion.  Teff is
    drawn in units of 100 K so that it shares the dex axis.  Returns the
    label order drawn.

    Parameters
    ----------
    path : str or os.PathLike
        Output image file.
    stats : dict of str to astropy.table.Table
        Statistics tables (``label, bias, dispersion``) by name; dex, Teff in K.

    Returns
    -------
    list of str
        Labels in the order drawn.

    Raises
    ------
    ValueError
        If ``stats`` is empty.
    """

    names = list(stats)
    if not names:
        raise ValueError("nothing to plot")
    def unit_scale(lab):
        return 0.01 if lab == "teff" else 1.0  # Teff in 100 K so it shares the dex axis

    first = stats[names[0]]
    disp0 = np.array([float(r["dispersion"]) * unit_scale(str(r["label"])) for r in first])
    order = [str(first["label"][i]) for i in np.argsort(disp0, kind="stable")]
    fig = new_figure(figsize=(max(5.0, 0.5 * len(order) + 2), 5.0))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    xs = np.arange(len(order))
    for name in names:
        t = stats[name]
        look = {str(r["label"]): (float(r["bias"]) * unit_scale(str(r["label"])),
                                  float(r["dispersion"]) * unit_scale(str(r["label"]))) for r in t}
        b = [look.get(k, (np.nan, np.nan))[0] for k in order]
        d = [look.get(k, (np.nan, np.nan))[1] for k in order]
        ax1.plot(xs, b, "o-", label=name)
        ax2.plot(xs, d, "o-", label=name)
    ax1.axhline(0, color="k", lw=0.7)
    ax2.axhline(0.1, color="k", lw=0.7, ls=":")
    ax1.set_ylabel(r"bias $\mu$ (dex; Teff 100 K)")
    ax2.set_ylabel(r"precision $\sigma$ (dex; Teff 100 K)")
    ax2.set_xticks(xs)
    ax2.set_xticklabels(order, rotation=45, fontsize=8)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return order
