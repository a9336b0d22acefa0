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
* The statistics live in :mod:`musepayne.science.stats` and the repeat-based factors in
  :mod:`musepayne.science.repeats`; both are re-exported here.
* Plots in the style of Fig. 5 (differences vs [Fe/H], median and dispersion
  per panel) and Fig. 6-7 (bias and precision per label, sorted by precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ._plotting import new_figure, save_figure
from .repeats import apply_error_factors, repeat_error_factor, repeat_error_factors, repeat_pairs
from .stats import LABEL_PATTERN, _float, bias_dispersion, label_columns

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
