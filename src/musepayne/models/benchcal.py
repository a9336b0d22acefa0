"""Benchmark-scale calibration of fitted labels and their systematic errors (the stored part).

This module owns the calibration a model file carries (:class:`BenchmarkCalibration`, HDU
``BENCHCAL``) and how it is fitted from hold-out fits (:func:`fit_calibration`); building it
from the library and the benchmark stars is :mod:`musepayne.train.benchcal`, applying it to a
catalogue :func:`musepayne.fit.catalogue.apply_to_catalogue`.

The default model learns the MILES/STELIB catalogue labels and with them their
systematics.  The Gaia FGK Benchmark Stars v3 (Soubiran et al. 2024; Teff from
interferometric angular diameters and bolometric fluxes, log g from masses
and radii, [Fe/H] from a homogeneous spectroscopic analysis at those
Teff/log g) are independent of any library catalogue.  ~109 library spectra
(MILES, STELIB) match them by HD number (:func:`match_benchmarks`).

Calibration (:class:`BenchmarkCalibration`)
-------------------------------------------
* A **post-fit map** per label: ``x_bench = x_fit + c . phi(x_fit)`` with
  ``phi`` the low-order polynomial features of the fitted labels
  (scaled to ~unit range; clamped to the fitted-label box of the calibrating stars, so
  the polynomial never extrapolates); each label's inputs, degree (offset, linear,
  quadratic) and ridge penalty are chosen by cross-validation over the benchmark stars
  (:func:`musepayne.train.benchcal.select_maps`; unused coefficients are stored as zero),
  fitted by robust ridge-regularised least squares to
  ``bench - fit`` over benchmark stars fitted by a model that never saw them
  (the model is trained without the benchmark stars; every spectrum is
  simulated as a MUSE and a LAMOST observation at S/N 100, prepared and
  fitted: both instruments enter the map, so it is instrument-independent by
  construction and its CV figures are quoted per instrument).
* A **systematic error** per label (``sys``), a constant per star type bin
  (dwarf / giant / metal-poor giant; a type with fewer than :data:`MIN_BIN_STARS` stars is
  shrunk towards its parent type) or overall (see :attr:`BenchmarkCalibration.sys_err`): the extra variance
  that makes ``(fit_cal - bench) / sqrt(stat^2 + sys^2 + e_bench^2)`` have a
  dispersion of 1 (half the 15.87-84.13 percentile range), solved on the
  residuals of inner-CV maps (each star calibrated by a map that did not see it).  The
  benchmark table has no [Fe/H] error: :data:`FEH_BENCH_ERR` (0.05 dex) is used.
* Both are cross-validated over the benchmark stars (:func:`cross_validate_calibration`,
  K folds grouped by star: neither map nor sys error of a fold saw its stars).

The calibration is stored in the model file (HDU ``BENCHCAL``: a table of
coefficients and errors, and a JSON header with provenance and the CV
figures; :meth:`BenchmarkCalibration.to_hdu` / :meth:`from_hdu`; no pickle)
and applied by :class:`musepayne.fit.Fitter` unless
``FitConfig.benchmark_calibration`` is False (:func:`apply_to_catalogue`):
``X`` becomes the calibrated label, ``X_uncal`` keeps the model's,
``X_err_stat`` is the fit's (covariance) error, ``X_err_sys`` the systematic
one and ``X_err = sqrt(stat^2 + sys^2)``.
"""


from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Column, Table

__all__ = ["FEH_BENCH_ERR", "BENCH_LABELS", "HDU_NAME", "read_benchmarks", "hd_number", "match_benchmarks",
           "star_type", "BenchmarkCalibration", "info_lines", "DEFAULT_BENCHMARK_FILE", "BENCH_COLUMNS",
           "SEED_COLUMNS", "seed_spread",
           "attach_benchmark_labels", "strip_benchmark_labels"]

#: [Fe/H] error assumed for the benchmark stars (the v3 table gives none), dex
FEH_BENCH_ERR = 0.05
BENCH_LABELS = ("teff", "logg", "fe_h")
DEFAULT_BENCHMARK_FILE = Path("benchmarks") / "gbs_v3_gdr3_tmass.csv"  # relative to the shared data folder
HDU_NAME = "BENCHCAL"
#: columns of a hold-out fits table that are copied from the benchmark table (third-party data:
#: never written to files this package ships; re-attached from the benchmark table when read)
BENCH_COLUMNS = tuple(c for n in BENCH_LABELS for c in (f"{n}_bench", f"e_{n}_bench"))
#: a catalogue's or hold-out table's spread over the model's seed members (``X_err_seed``), per label
SEED_COLUMNS = tuple(f"{n}_err_seed" for n in BENCH_LABELS)
#: a star-type bin of the systematic errors needs this many distinct stars
MIN_BIN_STARS = 10
FORMAT_VERSION = 1
#: feature scales: labels enter the polynomial as (x - centre) / scale
_CENTRE = {"teff": 5000.0, "logg": 3.0, "fe_h": -0.5}
_SCALE = {"teff": 1000.0, "logg": 1.5, "fe_h": 1.0}


def hd_number(name) -> str | None:
    """The HD (or HDE) catalogue number of a star name ('HD 16765A' -> '16765'), else None."""
    s = re.sub(r"\s+", "", str(name).upper())
    m = re.match(r"^HDE?0*(\d+)", s)
    return m.group(1) if m else None


def read_benchmarks(path) -> Table:
    """The Gaia FGK benchmark table (csv of Soubiran et al. 2024) as a Table with
    ``hd, hd_number, teff, e_teff, logg, e_logg, fe_h, e_fe_h`` (e_fe_h = :data:`FEH_BENCH_ERR`)."""
    t = Table.read(str(path), format="ascii.csv", encoding="utf-8-sig")
    need = {"HD", "teff", "e_teff", "logg", "e_logg", "fe_h"}
    if not need <= set(t.colnames):
        raise ValueError(f"{path}: benchmark table lacks columns {sorted(need - set(t.colnames))}")
    hd = [str(x) if x is not np.ma.masked else "" for x in (t["HD"].filled("") if hasattr(t["HD"], "filled")
                                                             else t["HD"])]
    out = Table()
    out["hd"] = Column(hd, description="HD designation")
    out["hd_number"] = Column([hd_number(h) or "" for h in hd], description="HD number")
    out["hip"] = Column([str(x) for x in t["HIP"]] if "HIP" in t.colnames else [""] * len(t))
    for n, unit, desc in (("teff", "K", "benchmark Teff (interferometry)"),
                          ("logg", "", "benchmark log g (mass and radius)"),
                          ("fe_h", "", "benchmark [Fe/H]")):
        out[n] = Column(np.asarray(t[n], float), unit=unit or None, description=desc)
        e = np.asarray(t[f"e_{n}"], float) if f"e_{n}" in t.colnames else np.full(len(t), FEH_BENCH_ERR)
        out[f"e_{n}"] = Column(e, unit=unit or None, description=f"error of {n}"
                               + ("" if f"e_{n}" in t.colnames else f" (none in the table: {FEH_BENCH_ERR} assumed)"))
    return out


def match_benchmarks(names, bench: Table) -> np.ndarray:
    """Index into ``bench`` for each of ``names`` (library star names), -1 where no HD number matches."""
    lookup = {}
    for j, h in enumerate(bench["hd_number"]):
        if h and h not in lookup:
            lookup[str(h)] = j
    return np.array([lookup.get(hd_number(n) or "", -1) for n in names], int)


def strip_benchmark_labels(tab: Table) -> Table:
    """A copy of a hold-out fits table without the benchmark labels (:data:`BENCH_COLUMNS`).

    Parameters
    ----------
    tab : astropy.table.Table
        Hold-out fits (``train.benchcal.holdout_table``), with or without the benchmark columns.

    Returns
    -------
    astropy.table.Table
        The fits and identifiers only (``hd`` kept, so :func:`attach_benchmark_labels` restores
        the rest from the benchmark table).
    """
    out = tab.copy(copy_data=True)
    out.remove_columns([c for c in BENCH_COLUMNS if c in out.colnames])
    out.meta["BENCHLAB"] = ("not stored: re-attached by HD from the benchmark table "
                                    "(musepayne.models.benchcal.attach_benchmark_labels)")
    return out


def attach_benchmark_labels(tab: Table, bench: Table) -> Table:
    """A copy of a hold-out fits table with the benchmark labels and errors joined by HD.

    Parameters
    ----------
    tab : astropy.table.Table
        Hold-out fits with an ``hd`` column (HD designation or number).
    bench : astropy.table.Table
        The benchmark table of :func:`read_benchmarks`.

    Returns
    -------
    astropy.table.Table
        ``tab`` plus :data:`BENCH_COLUMNS` (K for Teff, dex for log g and [Fe/H]).

    Raises
    ------
    ValueError
        If a row's HD number is not in ``bench``.
    """
    idx = match_benchmarks([str(h) for h in tab["hd"]], bench)
    if np.any(idx < 0):
        missing = sorted({str(h) for h, j in zip(tab["hd"], idx) if j < 0})
        raise ValueError(f"hold-out table: {len(missing)} HD numbers not in the benchmark table, e.g. {missing[:3]}")
    out = strip_benchmark_labels(tab)
    out.meta.pop("BENCHLAB", None)
    for n in BENCH_LABELS:
        out[f"{n}_bench"] = np.asarray(bench[n], float)[idx]
        out[f"e_{n}_bench"] = np.asarray(bench[f"e_{n}"], float)[idx]
    return out


def seed_spread(tab) -> np.ndarray | None:
    """The (n, 3) seed-member spread :data:`SEED_COLUMNS` of a table, or None when it lacks any of them.

    Parameters
    ----------
    tab : astropy.table.Table
        A catalogue or hold-out fits table.

    Returns
    -------
    numpy.ndarray or None
        ``X_err_seed`` of teff, logg, fe_h (K, dex, dex) as float64 columns.
    """
    if not set(SEED_COLUMNS) <= set(tab.colnames):
        return None
    return np.stack([np.asarray(tab[c], float) for c in SEED_COLUMNS], 1)


def star_type(labels) -> np.ndarray:
    """'dwarf' (log g > 3.5), 'giant', or 'mp_giant' (giant with [Fe/H] < -1) from (n, 3) labels."""
    lab = np.asarray(labels, float)
    g, f = lab[:, 1], lab[:, 2]
    return np.where(g > 3.5, "dwarf", np.where(f < -1.0, "mp_giant", "giant"))


# --------------------------------------------------------------------------- the map
def _features(x, degree: int) -> np.ndarray:
    """Polynomial features of the scaled labels (no constant: it is added by the caller)."""
    z = np.stack([(x[:, k] - _CENTRE[n]) / _SCALE[n] for k, n in enumerate(BENCH_LABELS)], 1)
    cols = [np.ones(len(z))]
    if degree >= 1:
        cols += [z[:, k] for k in range(3)]
    if degree >= 2:
        cols += [z[:, i] * z[:, j] for i in range(3) for j in range(i, 3)]
    return np.stack(cols, 1)


def _robust_disp(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return np.nan
    lo, hi = np.percentile(x, [15.87, 84.13])
    return 0.5 * (hi - lo)


@dataclass(frozen=True)
class BenchmarkCalibration:
    """Post-fit map to the benchmark scale plus systematic errors (see the module docstring).

    ``coef``: {label: coefficients of :func:`_features` (degree ``degree``)} of ``bench - fit``;
    ``sys_err``: {label: {bin: sys error}} with bins 'all' and, optionally, star types
    (:func:`star_type` of the calibrated labels; 'mp_giant' falls back to 'giant', any type to
    'all'); ``meta``: provenance and cross-validated figures (JSON-able).
    """

    degree: int
    coef: dict
    sys_err: dict
    meta: dict = field(default_factory=dict)
    #: {label: [lo, hi]} fitted-label range of the calibrating stars; outside it the correction
    #: is that at the nearest point of the box (no polynomial extrapolation); None: no clamp
    domain: dict | None = None

    # ---- applying
    def correction(self, labels) -> np.ndarray:
        x = np.asarray(labels, float)
        ok = np.all(np.isfinite(x), axis=1)
        out = np.full(x.shape, np.nan)
        if ok.any():
            xo = x[ok]
            if self.domain:
                xo = np.column_stack([np.clip(xo[:, k], *self.domain[n]) for k, n in enumerate(BENCH_LABELS)])
            phi = _features(xo, self.degree)
            for k, n in enumerate(BENCH_LABELS):
                out[ok, k] = phi @ np.asarray(self.coef[n], float)
        return out

    def apply(self, labels) -> np.ndarray:
        """Calibrated (n, 3) labels (teff, logg, fe_h) from fitted ones; NaN rows stay NaN."""
        return np.asarray(labels, float) + self.correction(labels)

    def sys(self, labels_cal) -> np.ndarray:
        """(n, 3) systematic errors at the calibrated labels."""
        x = np.asarray(labels_cal, float)
        types = star_type(np.nan_to_num(x, nan=0.0))
        out = np.empty(x.shape)
        for k, n in enumerate(BENCH_LABELS):
            s = self.sys_err[n]
            fallback = {"dwarf": ("dwarf", "all"), "giant": ("giant", "all"), "mp_giant": ("mp_giant", "giant", "all")}
            out[:, k] = [next((s[b] for b in fallback[t] if b in s), np.nan) for t in types]
        return out

    # ---- storage
    def to_hdu(self) -> fits.BinTableHDU:
        nf = _features(np.zeros((1, 3)), self.degree).shape[1]
        t = Table()
        t["label"] = list(BENCH_LABELS)
        t["coef"] = np.array([np.asarray(self.coef[n], float) for n in BENCH_LABELS]).reshape(3, nf)
        bins = sorted({b for n in BENCH_LABELS for b in self.sys_err[n]})
        for b in bins:
            t[f"sys_{b}"] = [float(self.sys_err[n].get(b, np.nan)) for n in BENCH_LABELS]
        if self.domain:
            t["dom_lo"] = [float(self.domain[n][0]) for n in BENCH_LABELS]
            t["dom_hi"] = [float(self.domain[n][1]) for n in BENCH_LABELS]
        h = fits.table_to_hdu(t)
        h.name = HDU_NAME
        h.header["BCVERS"] = (FORMAT_VERSION, "benchmark calibration format version")
        h.header["BCDEGREE"] = (int(self.degree), "polynomial degree of the post-fit map")
        h.header["COMMENT"] = ("x_bench = x_fit + coef . phi((teff-5000)/1000, (logg-3)/1.5, fe_h+0.5); "
                               "phi = 1, z, z_i z_j (i<=j), x_fit clipped to [dom_lo, dom_hi]; "
                               "sys_<bin>: systematic error per label")
        prov = json.dumps(self.meta, sort_keys=True, default=str)
        h.header["BCMETA"] = prov  # long string: CONTINUE cards
        return h

    @classmethod
    def from_hdu(cls, hdu) -> BenchmarkCalibration:
        hdr = hdu.header
        if int(hdr.get("BCVERS", 0)) > FORMAT_VERSION:
            raise ValueError(f"benchmark calibration format {hdr.get('BCVERS')} is newer than this software")
        t = Table.read(hdu)
        labels = [str(x).strip() for x in t["label"]]
        coef = {n: [float(v) for v in np.atleast_1d(t["coef"][labels.index(n)])] for n in BENCH_LABELS}
        sys_err = {n: {c[4:]: float(t[c][labels.index(n)]) for c in t.colnames if c.startswith("sys_")
                       and np.isfinite(t[c][labels.index(n)])} for n in BENCH_LABELS}
        meta = json.loads(str(hdr.get("BCMETA", "{}")))
        domain = ({n: [float(t["dom_lo"][labels.index(n)]), float(t["dom_hi"][labels.index(n)])] for n in BENCH_LABELS}
                  if "dom_lo" in t.colnames else None)
        return cls(int(hdr["BCDEGREE"]), coef, sys_err, meta, domain)

    def describe(self) -> dict:
        return {"degree": self.degree, "sys_err": self.sys_err, "domain": self.domain, **self.meta}


def info_lines(cal: BenchmarkCalibration) -> list:
    """Lines for ``musepayne model info``: the calibration and its cross-validated figures."""
    m = cal.meta
    out = [f"  benchmark calibration: {m.get('reference', '')}; {m.get('n_stars', '?')} stars, "
           f"{m.get('n_spectra', '?')} library spectra observed as {'/'.join(m.get('instruments', []))} at "
           f"S/N {m.get('snr', '?')}; hold-out seeds {m.get('seeds', [])}",
           "    sys errors: " + ", ".join(f"{n} {', '.join(f'{b}={v:.3g}' for b, v in cal.sys_err[n].items())}"
                                         for n in BENCH_LABELS),
           f"    command: {m.get('command', '')}"]
    if m.get("map"):
        out.append("    map chosen by CV over the stars: " + ", ".join(f"{n} {v['choice']}" for n, v in m["map"].items()))
    for inst, o in (m.get("cv") or {}).items():
        for stage in ("uncal", "cal"):
            g = o[stage]["all"]
            out.append(f"    CV {inst} {stage:5s}: " + "; ".join(
                f"{n} bias {g[n]['bias']:+.3g} disp {g[n]['dispersion']:.3g} pulls {g[n]['pull_dispersion']:.2f}"
                for n in BENCH_LABELS))
    for inst, per in (m.get("cv_pulls") or {}).items():
        out.append(f"    CV {inst} pulls teff/logg/fe_h by S/N and type (seeds pooled; stars): " + "; ".join(
            f"S/N {sn}: " + ", ".join(f"{g} {'/'.join(format(v[n], '.2f') for n in BENCH_LABELS)} ({v['n_stars']})"
                                      for g, v in o.items())
            for sn, o in sorted(per.items(), key=lambda kv: float(kv[0]))))
    return out
