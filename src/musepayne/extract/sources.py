"""Source catalogues for extraction: reading, column recognition and validation.

Owns :func:`read_source_catalogue` (CSV, ECSV, FITS, VOTable or an astropy Table ->
``Table(stellar_id, ra, dec | x_cat, y_cat, mag)``) and the magnitude-column names it
recognises (:data:`MAG_COLUMNS`).  Bad catalogues raise
:class:`~musepayne.io.spectra.ReaderError` with a message naming the problem.

May import: :mod:`musepayne.io`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from ..io.spectra import ReaderError

__all__ = ["read_source_catalogue", "MAG_COLUMNS"]


def _find_col(t, names):
    low = {c.lower(): c for c in t.colnames}
    for n in names:
        if n in low:
            return low[n]
    return None


def _stellar_ids(col) -> list:
    """The catalogue's ids as strings; refuses missing/blank ids and ids FITS cannot store."""
    mask = np.asarray(np.ma.getmaskarray(col)) if hasattr(col, "mask") else np.zeros(len(col), bool)
    ids = []
    for i, (v, m) in enumerate(zip(col, mask)):
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        if m or not s.strip():
            raise ReaderError(f"source catalogue row {i + 1}: empty stellar id; every star needs an id")
        if not (s.isascii() and s.isprintable()):
            raise ReaderError(f"source catalogue row {i + 1}: stellar id {s!r} has non-ASCII or control "
                              "characters (FITS stores ASCII only)")
        ids.append(s)
    return ids


#: magnitude columns recognised without --mag-column, in order of preference (case-insensitive)
MAG_COLUMNS = (
    "mag", "magnitude",
    # HST (ACS/WFC3/WFPC2; also with a _mag/_vega suffix or an m/mag_ prefix, matched below)
    "f606w", "f814w", "f555w", "f435w", "f475w", "f625w", "f775w", "f850lp", "f438w", "f336w", "f275w",
    "f110w", "f160w", "m606", "m814",
    # Gaia
    "phot_g_mean_mag", "gmag", "g_mag", "phot_rp_mean_mag", "phot_bp_mean_mag", "rpmag", "bpmag",
    # ground-based
    "vmag", "v", "imag", "i", "rmag", "r", "bmag", "b", "jmag", "j", "kmag", "ks", "hmag", "zmag",
    "g", "i_mag", "r_mag", "v_mag",
)


def _mag_column(t, mag_column=None):
    if mag_column is not None:
        c = _find_col(t, (str(mag_column).lower(),))
        if c is None:
            raise ReaderError(f"source catalogue has no column {mag_column!r} (columns: {', '.join(t.colnames)})")
        return c
    c = _find_col(t, MAG_COLUMNS)
    if c:
        return c
    def not_err(n):
        n = n.lower()
        return not (n.startswith(("e_", "err", "sig", "sigma")) or "err" in n or n.endswith(("_e", "_sig", "_unc")))

    filt = re.compile(r"(^|[_-])(m|mag)?[_-]?f\d{3,4}(w|m|n|lp|x)($|[_-])", re.I)
    for n in t.colnames:  # HST filter names with a prefix or suffix (F606W_VEGA, mag_f814w, m_f606w)
        if filt.search(n) and not_err(n):
            return n
    return next((n for n in t.colnames if "mag" in n.lower() and not_err(n)), None)


def _coordinate_columns(t, ra, dec):
    """RA/Dec in degrees from degree numbers or sexagesimal strings (RA in hours, Dec in degrees)."""
    a, d = t[ra], t[dec]
    if a.dtype.kind in "USO" or d.dtype.kind in "USO":
        sa = [str(v).strip() for v in np.ma.filled(a, "")]
        sd = [str(v).strip() for v in np.ma.filled(d, "")]
        try:
            return np.array(sa, float), np.array(sd, float)
        except ValueError:
            pass
        sexa = any((":" in v or " " in v or "h" in v.lower()) for v in sa)
        try:
            sc = SkyCoord(sa, sd, unit=(u.hourangle if sexa else u.deg, u.deg))
        except Exception as exc:
            raise ReaderError(f"source catalogue: cannot parse {ra}/{dec} as degrees or sexagesimal "
                              f"(e.g. '{sa[0]}', '{sd[0]}'): {exc}") from None
        return sc.ra.deg, sc.dec.deg
    ua = getattr(a, "unit", None)
    if ua is not None and str(ua) not in ("", "deg"):
        try:
            return ((np.asarray(a, float) * ua).to_value(u.deg), (np.asarray(d, float) * d.unit).to_value(u.deg))
        except Exception:
            pass
    return np.asarray(np.ma.filled(a, np.nan), float), np.asarray(np.ma.filled(d, np.nan), float)


def read_source_catalogue(src, mag_column=None) -> Table:
    """Source catalogue (CSV, ECSV, FITS or VOTable, or a Table) -> Table(stellar_id, ra, dec | x, y, mag).

    Accepted column names (case-insensitive): ra/raj2000/ra_icrs/alpha, dec/dej2000/
    dec_icrs/delta (degrees, or sexagesimal strings: RA in hours); x/y (0-based cube
    pixels); the magnitude ``mag_column`` or else the first of :data:`MAG_COLUMNS`
    (common HST, Gaia and ground-based names), an HST filter name with a prefix or
    suffix, or a column whose name contains 'mag' (error columns excluded);
    stellar_id/id/source_id/name.

    Parameters
    ----------
    src : str, pathlib.Path or astropy.table.Table
        The catalogue file or table (not modified).
    mag_column : str, optional
        Name of the magnitude column (case-insensitive); default: recognised automatically.

    Returns
    -------
    astropy.table.Table
        Columns ``stellar_id`` (str), ``ra``, ``dec`` (deg; when given), ``x_cat``, ``y_cat``
        (0-based cube pixels; when given) and ``mag`` (mag, NaN where missing);
        ``meta['mag_column']`` names the magnitude column used.

    Raises
    ------
    musepayne.io.spectra.ReaderError
        Unreadable file, no magnitude or coordinate columns, no rows, blank, non-ASCII or
        duplicated ids.
    """
    if isinstance(src, Table):
        t = src
    else:
        p = Path(src)
        if not p.exists():
            raise ReaderError(f"{p}: source catalogue not found")
        suf = p.suffix.lower()
        fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".xml": "votable", ".vot": "votable",
               ".votable": "votable", ".fits": "fits", ".fit": "fits", ".fts": "fits"}.get(suf)
        try:
            t = Table.read(p, format=fmt) if fmt else Table.read(p)
        except Exception as exc:
            raise ReaderError(f"{p}: cannot read source catalogue ({exc})") from None
    ra = _find_col(t, ("ra", "raj2000", "ra_icrs", "ra_deg", "alpha", "ra_j2000"))
    dec = _find_col(t, ("dec", "dej2000", "de", "dec_icrs", "dec_deg", "delta", "decl", "dec_j2000"))
    x, y = _find_col(t, ("x", "x_cat")), _find_col(t, ("y", "y_cat"))  # x_cat: a table this function made
    mag = _mag_column(t, mag_column)
    sid = _find_col(t, ("stellar_id", "id", "source_id", "name"))
    if mag is None:
        raise ReaderError("source catalogue needs a magnitude column: give its name with --mag-column "
                          f"(columns: {', '.join(t.colnames)})")
    if not ((ra and dec) or (x and y)):
        raise ReaderError("source catalogue needs ra/dec or x/y columns")
    out = Table()
    n = len(t)
    if n == 0:
        raise ReaderError("source catalogue has no rows")
    out["stellar_id"] = _stellar_ids(t[sid]) if sid else [f"star{i:06d}" for i in range(n)]
    if ra and dec:
        out["ra"], out["dec"] = _coordinate_columns(t, ra, dec)
    if x and y:
        out["x_cat"] = np.asarray(t[x], float)
        out["y_cat"] = np.asarray(t[y], float)
    try:
        out["mag"] = np.asarray(np.ma.filled(t[mag], np.nan), float)
    except (TypeError, ValueError):
        raise ReaderError(f"source catalogue: magnitude column {mag!r} is not numeric") from None
    out.meta["mag_column"] = mag
    ids, counts = np.unique(np.asarray(out["stellar_id"]), return_counts=True)
    if np.any(counts > 1):
        dup = ", ".join(map(str, ids[counts > 1][:5]))
        raise ReaderError(f"source catalogue has duplicated stellar ids ({dup}{', ...' if (counts > 1).sum() > 5 else ''}); "
                          "every star must have a unique id")
    return out

