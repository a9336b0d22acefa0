"""An offline HTML report of a run: figures (PNG) and an index page.

``make_report(outdir, catalogue, ...)`` writes ``outdir/index.html`` and the
PNGs next to it.  Every figure is optional and drawn only when its inputs
exist; the page says what is missing instead of failing.

Figures (paper figure in brackets):

``white_light.png``  white-light image of the cube with the extracted sources
``kiel.png``         Teff-log g (Kiel) diagram coloured by [Fe/H] [Fig. 10]
``abundances.png``   [X/Fe] against [Fe/H] for every abundance column [Fig. 12]
``quality.png``      distributions of S/N, red_chi2 and corr_flux
``fits.png``         gallery of example fits: observed vs model, residuals and
                     masked pixels [Fig. 3, 9]
``truth.png``        recovered minus true labels with bias and dispersion
                     (simulated inputs only) [Fig. 5]
``truth_snr_blend.png`` recovered minus true against S/N and against the
                     extraction's ``blend_frac`` (simulated inputs only)

:func:`injection_budget` is the short error budget of a simulation (bias,
dispersion and median pull per label for isolated stars at S/N > 50, and by
``blend_frac`` and S/N bin); ``musepayne demo`` prints it and
``benchmarks/bias_budget.py`` uses it for every step of the full budget.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..flags import FIT_FLAGS, decode_fit_flags, fit_status_counts
from ..io.fits import atomic_write_text
from ..science.selection import SelectionError, select
from ..science.validation import bias_dispersion

__all__ = ["make_report", "injection_budget", "BLEND_BINS", "SNR_BINS"]

#: ``blend_frac`` bins of :func:`injection_budget` (the first one is "isolated")
BLEND_BINS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
#: S/N bins of :func:`injection_budget`
SNR_BINS = (10.0, 20.0, 50.0, 100.0, 1e9)

_LABEL_TEX = {"teff": r"$T_{\rm eff}$ [K]", "logg": r"$\log g$", "fe_h": "[Fe/H]", "rv": "RV [km/s]"}


def _plt():
    import matplotlib  # noqa: PLC0415 - heavy optional dependency, loaded when used

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy optional dependency, loaded when used

    return plt


def _label_tex(name):
    if name in _LABEL_TEX:
        return _LABEL_TEX[name]
    if name.endswith("_fe"):
        return f"[{name[:-3].capitalize()}/Fe]"
    return name


def _col(t, name):
    if t is None or name not in t.colnames:
        return None
    c = t[name]
    return np.asarray(c.filled(np.nan) if hasattr(c, "filled") else c, dtype=np.float64)


def _model_scale(cat, label, what=""):
    """Column of ``label`` on the model's own scale: ``X_uncal`` (``X_err_stat`` for ``what='_err'``)
    when the catalogue is benchmark-calibrated, else ``X`` (``X_err``)."""
    alt = f"{label}_uncal" if not what else f"{label}{what}_stat"
    return alt if alt in cat.colnames else f"{label}{what}"


def _good(cat):
    """Rows with a converged fit inside the model's label range (not 'edge', not failed)."""
    if "status" not in cat.colnames:
        return np.ones(len(cat), bool)
    return np.array([str(s).startswith(("converged", "ok")) for s in cat["status"]])


def plot_white_light(path, image, sources=None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    img = np.asarray(image, dtype=np.float64)
    finite = img[np.isfinite(img)]
    vmin, vmax = (np.percentile(finite, [1, 99.5]) if finite.size else (0, 1))
    ax.imshow(np.arcsinh((img - vmin) / max(vmax - vmin, 1e-30) * 10), origin="lower", cmap="gray")
    if sources is not None and len(sources) and "x" in sources.colnames:
        ok = np.array([str(s) == "ok" for s in sources["status"]]) if "status" in sources.colnames else None
        x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
        if ok is None:
            ax.plot(x, y, "o", mfc="none", mec="tab:orange", ms=5, lw=0.6)
        else:
            ax.plot(x[ok], y[ok], "o", mfc="none", mec="tab:orange", ms=5, label=f"extracted ({ok.sum()})")
            ax.plot(x[~ok], y[~ok], "x", color="tab:red", ms=4, label=f"not extracted ({(~ok).sum()})")
            ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("x [spaxel]")
    ax.set_ylabel("y [spaxel]")
    ax.set_title("White-light image")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kiel(path, cat):
    plt = _plt()
    good = _good(cat)
    teff, logg, feh = _col(cat, "teff"), _col(cat, "logg"), _col(cat, "fe_h")
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(teff[good], logg[good], c=feh[good] if feh is not None else None, s=12, cmap="viridis")
    if feh is not None:
        fig.colorbar(sc, ax=ax, label="[Fe/H]")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel(_label_tex("teff"))
    ax.set_ylabel(_label_tex("logg"))
    ax.set_title(f"Kiel diagram ({good.sum()} stars with a converged fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return int(good.sum())


def plot_abundances(path, cat):
    ab = [c for c in cat.colnames if c.endswith("_fe") and c != "fe_h" and not c.endswith(("_err", "_flag"))]
    if not ab:
        return 0
    plt = _plt()
    good = _good(cat)
    feh = _col(cat, "fe_h")
    fig, axes = plt.subplots(1, len(ab), figsize=(4 * len(ab), 3.6), squeeze=False)
    for ax, name in zip(axes[0], ab):
        ax.scatter(feh[good], _col(cat, name)[good], s=8)
        ax.set_xlabel("[Fe/H]")
        ax.set_ylabel(_label_tex(name))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(ab)


def plot_quality(path, cat):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, name, log in zip(axes, ("snr_muse", "red_chi2", "corr_flux"), (False, True, False)):
        v = _col(cat, name)
        if v is None:
            ax.set_title(f"{name}: not in catalogue")
            continue
        v = v[np.isfinite(v)]
        if log:
            v = np.log10(np.clip(v, 1e-3, None))
        ax.hist(v, bins=30, color="tab:blue", alpha=0.8)
        ax.set_xlabel(("log10 " if log else "") + name)
        ax.set_ylabel("N")
        if v.size:
            ax.set_title(f"median {np.median(10**v if log else v):.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gallery_rows(cat, has_model, n_show):
    """Example rows: spread in S/N over the ``reliable`` preset's rows (converged rows when none
    pass), plus one row with a fit flag set, to show what a flagged fit looks like."""
    good = _good(cat) & has_model
    try:
        rel = np.isin(np.asarray(cat["stellar_id"]).astype(str),
                      np.asarray(select(cat, preset="reliable")["stellar_id"]).astype(str))
    except SelectionError:
        rel = np.zeros(len(cat), bool)
    pool = np.nonzero(rel & good)[0]
    if pool.size == 0:
        pool = np.nonzero(good)[0]
    snr = _col(cat, "snr_muse")
    order = pool[np.argsort(-np.nan_to_num(snr[pool] if snr is not None else np.zeros(pool.size), nan=-1))]
    pick = list(order[np.linspace(0, order.size - 1, min(n_show - 1, order.size)).astype(int)]) if order.size else []
    if "fit_flags" in cat.colnames:
        flagged = np.nonzero((np.asarray(cat["fit_flags"], np.int64) != 0) & has_model)[0]
        if flagged.size:
            pick.append(int(flagged[np.argmax(np.nan_to_num(snr[flagged], nan=-1))] if snr is not None
                            else flagged[0]))
    return pick


def _fit_title(cat, i):
    parts = [str(cat["stellar_id"][i])]
    snr = _col(cat, "snr_muse")
    if snr is not None:
        parts.append(f"S/N={snr[i]:.0f}")
    for n, fmt in (("teff", ".0f"), ("logg", ".2f"), ("fe_h", ".2f")):
        if n in cat.colnames:
            err = f" +- {float(cat[n + '_err'][i]):{fmt}}" if n + "_err" in cat.colnames else ""
            parts.append(f"{'Teff' if n == 'teff' else n}={float(cat[n][i]):{fmt}}{err}")
    if "rv" in cat.colnames:
        parts.append(f"RV={float(cat['rv'][i]):.1f} km/s")
    if "red_chi2" in cat.colnames:
        parts.append(f"red. chi2={float(cat['red_chi2'][i]):.2f}")
    if "misfit" in cat.colnames and np.isfinite(float(cat["misfit"][i])):
        parts.append(f"misfit={float(cat['misfit'][i]):.1f}")
    if "fit_flags" in cat.colnames and int(cat["fit_flags"][i]):
        parts.append("FLAGS: " + ",".join(decode_fit_flags(int(cat["fit_flags"][i]))))
    return "  ".join(parts)


def plot_fit_gallery(path, wave, flux, ivar, model, cat, n_show=6, model_mask=None):
    """Observed vs best-fit model and residuals for example stars: reliable rows spread in S/N and
    one flagged fit; titles give labels +- errors, RV and reduced chi2; grey bands are pixels the
    fit did not use, hatched bands pixels the model itself does not cover (``model_mask``)."""
    plt = _plt()
    pick = _gallery_rows(cat, np.isfinite(np.asarray(model)).any(axis=1), n_show)
    if not pick:
        return 0
    fig, axes = plt.subplots(2 * len(pick), 1, figsize=(11, 2.6 * len(pick)),
                             gridspec_kw={"height_ratios": [3, 1] * len(pick)}, sharex=True)
    axes = np.atleast_1d(axes)
    not_in_model = _runs(np.asarray(model_mask, bool)) if model_mask is not None else []
    for k, i in enumerate(pick):
        a, r = axes[2 * k], axes[2 * k + 1]
        used = ivar[i] > 0
        a.plot(wave, np.where(used, flux[i], np.nan), "k-", lw=0.6, label="observed")
        a.plot(wave, np.where(np.isfinite(flux[i]) & ~used, flux[i], np.nan), "-", color="0.75", lw=0.6,
               label="masked")
        a.plot(wave, model[i], "r-", lw=0.6, label="model")
        a.set_title(_fit_title(cat, i), fontsize=7)
        a.set_ylim(0.2, 1.3)
        a.set_ylabel("norm. flux")
        for lo, hi in _runs(~used & np.isfinite(wave)):
            a.axvspan(wave[lo], wave[hi], color="0.9", lw=0)
        for j, (lo, hi) in enumerate(not_in_model):
            a.axvspan(wave[lo], wave[hi], facecolor="none", edgecolor="0.6", hatch="///", lw=0,
                      label="not in model" if j == 0 else None)
        r.plot(wave, np.where(used, flux[i] - model[i], np.nan), "k-", lw=0.5)
        r.axhline(0, color="r", lw=0.5)
        r.set_ylim(-0.08, 0.08)
        r.set_ylabel("resid.")
        if k == 0:
            a.legend(loc="lower right", fontsize=7, ncol=4)
    axes[-1].set_xlabel("vacuum wavelength [A]")
    valid = wave[np.any(ivar > 0, axis=0)]
    if valid.size:
        axes[-1].set_xlim(valid.min() - 20, valid.max() + 20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(pick)


def _runs(mask):
    m = np.asarray(mask, bool)
    if not m.any():
        return []
    d = np.diff(np.concatenate([[0], m.astype(int), [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1
    return list(zip(starts, ends))


def plot_truth(path, cat, truth, labels=("teff", "logg", "fe_h", "rv"), key="stellar_id"):
    """Recovered minus true for each label with bias and dispersion; returns the stats."""
    plt = _plt()
    tmap = {str(k): i for i, k in enumerate(truth[key])}
    idx = np.array([tmap.get(str(k), -1) for k in cat[key]])
    sel = (idx >= 0) & _good(cat)
    labels = [n for n in labels if n in cat.colnames and n in truth.colnames]
    stats = {}
    if not labels or not sel.any():
        return stats
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.6), squeeze=False)
    for ax, n in zip(axes[0], labels):
        t = np.asarray(truth[n], float)[idx[sel]]
        # simulated truth is on the model's own label scale: compare the model's labels, not the
        # benchmark-calibrated ones (musepayne.models.benchcal), when the catalogue has both
        d = _col(cat, _model_scale(cat, n))[sel] - t
        b, s, _ = bias_dispersion(d)
        stats[n] = {"bias": b, "dispersion": s, "n": int(np.isfinite(d).sum())}
        ax.scatter(t, d, s=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(f"true {_label_tex(n)}")
        ax.set_ylabel("recovered - true")
        ax.set_title(f"bias {b:.3g}, dispersion {s:.3g} (N={stats[n]['n']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


def _truth_join(cat, truth, sources=None, key="stellar_id", column="blend_frac"):
    """Row indices of ``cat`` rows with a truth row (converged fits), the truth index and the
    crowding measure ``column`` of each from ``sources`` (NaN when it has none)."""
    tmap = {str(k): i for i, k in enumerate(truth[key])}
    idx = np.array([tmap.get(str(k), -1) for k in cat[key]], dtype=np.int64)
    sel = np.flatnonzero((idx >= 0) & _good(cat))
    blend = np.full(sel.size, np.nan)
    if sources is not None and column in sources.colnames:
        smap = {str(k): i for i, k in enumerate(sources[key])}
        bf = _col(sources, column)
        ids = [str(k) for k in cat[key]]  # (iterating the column decodes FITS byte strings)
        j = np.array([smap.get(ids[i], -1) for i in sel], dtype=np.int64)
        blend = np.where(j >= 0, bf[np.maximum(j, 0)], np.nan)
    return sel, idx[sel], blend


def crowding_column(sources):
    """The crowding measure used for 'isolated': ``neighbour_frac`` (largest single neighbour's
    light within 1 FWHM relative to the star's) when the extraction wrote it, else ``blend_frac``."""
    if sources is not None and "neighbour_frac" in sources.colnames:
        return "neighbour_frac"
    return "blend_frac"


def _label_stats(d, err):
    b, s, n = bias_dispersion(d)
    with np.errstate(invalid="ignore", divide="ignore"):
        pull = d / err
    pull = pull[np.isfinite(pull)]
    return {"bias": b, "dispersion": s, "pull": float(np.median(pull)) if pull.size else float("nan"), "n": n}


def injection_budget(cat, truth, sources=None, labels=("teff", "logg", "fe_h"), snr_min=50.0,
                     blend_max=0.05, blend_bins=BLEND_BINS, snr_bins=SNR_BINS, key="stellar_id", column=None):
    """Error budget of a simulation: recovered - true for converged fits.

    Returns ``{'isolated': {label: {bias, dispersion, pull, n}}, 'by_blend': [...],
    'by_snr': [...], 'snr_min', 'blend_max', 'column'}``.  ``isolated``: ``snr_muse > snr_min``
    and crowding ``<= blend_max``; the crowding measure ``column`` of the extraction's ``sources``
    is by default :func:`crowding_column` (``neighbour_frac``: no single neighbour brings more than
    5 % of the star's light within 1 FWHM; else ``blend_frac``); without ``sources`` every star
    counts as isolated.  ``pull`` is the median of (recovered - true) / error.  ``by_blend``:
    S/N > ``snr_min`` stars in bins of that measure; ``by_snr``: isolated stars in ``snr_bins``.
    Bias = median, dispersion = half the 15.87-84.13 percentile range
    (:func:`musepayne.science.validation.bias_dispersion`).
    """
    labels = [n for n in labels if n in cat.colnames and n in truth.colnames]
    column = column or crowding_column(sources)
    sel, ti, blend = _truth_join(cat, truth, sources, key, column)
    snr = _col(cat, "snr_muse")
    snr = np.full(sel.size, np.inf) if snr is None else snr[sel]
    bl = np.where(np.isfinite(blend), blend, 0.0)
    # simulated truth is on the model's own label scale: compare the model's labels and their
    # statistical errors (X_uncal, X_err_stat), not the benchmark-calibrated ones, when both exist
    d = {n: _col(cat, _model_scale(cat, n))[sel] - np.asarray(truth[n], float)[ti] for n in labels}
    e = {n: (_col(cat, _model_scale(cat, n, "_err"))[sel] if n + "_err" in cat.colnames else np.full(sel.size, np.nan))
         for n in labels}

    def stats(m):
        return {n: _label_stats(d[n][m], e[n][m]) for n in labels}

    iso = (snr > snr_min) & (bl <= blend_max)
    out = {"snr_min": float(snr_min), "blend_max": float(blend_max), "column": column, "isolated": stats(iso),
           "n_isolated": int(iso.sum()), "by_blend": [], "by_snr": []}
    for lo, hi in zip(blend_bins[:-1], blend_bins[1:]):
        m = (snr > snr_min) & (bl <= hi) & ((bl > lo) if lo > blend_bins[0] else True)
        out["by_blend"].append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "stats": stats(m)})
    for lo, hi in zip(snr_bins[:-1], snr_bins[1:]):
        m = (bl <= blend_max) & (snr > lo) & (snr <= hi)
        out["by_snr"].append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "stats": stats(m)})
    return out


def format_budget(budget, labels=None) -> list[str]:
    """Short text form of :func:`injection_budget` (what ``musepayne demo`` prints)."""
    iso = budget["isolated"]
    labels = labels or list(iso)
    fmt = {"teff": "{:+.0f} K", "logg": "{:+.3f}", "fe_h": "{:+.3f} dex"}
    col = budget.get("column", "blend_frac")
    lines = [f"  isolated ({col} <= {budget['blend_max']:g}, S/N > {budget['snr_min']:g}, "
             f"N={budget['n_isolated']}): bias / dispersion / median pull"]
    for n in labels:
        st = iso[n]
        f = fmt.get(n, "{:+.3g}")
        lines.append(f"    {n:5s} {f.format(st['bias'])} / {f.format(st['dispersion']).lstrip('+')} / "
                     f"{st['pull']:+.2f}")
    for row in budget["by_blend"]:
        if row["n"]:
            parts = [f"{n} {fmt.get(n, '{:+.3g}').format(row['stats'][n]['bias'])} "
                     f"({row['stats'][n]['pull']:+.1f} sig)" for n in labels]
            lines.append(f"    {col} {row['lo']:.2f}-{row['hi']:.2f} (N={row['n']}): " + ", ".join(parts))
    return lines


def plot_truth_snr_blend(path, cat, truth, sources=None, labels=("teff", "logg", "fe_h"), key="stellar_id"):
    """Recovered minus true against S/N (top) and against ``blend_frac`` (bottom). Returns the number
    of stars drawn."""
    labels = [n for n in labels if n in cat.colnames and n in truth.colnames]
    sel, ti, blend = _truth_join(cat, truth, sources, key, "blend_frac")
    snr = _col(cat, "snr_muse")
    if not labels or not sel.size or snr is None:
        return 0
    plt = _plt()
    fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels), 6.6), squeeze=False)
    snr = snr[sel]
    for k, n in enumerate(labels):
        d = _col(cat, _model_scale(cat, n))[sel] - np.asarray(truth[n], float)[ti]
        ax = axes[0, k]
        ax.scatter(snr, d, s=8, c=np.where(np.isfinite(blend), blend, 0.0), cmap="viridis", vmin=0, vmax=0.5)
        ax.set_xscale("log")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("S/N per pixel (snr_muse)")
        ax.set_ylabel(f"recovered - true {_label_tex(n)}")
        ax = axes[1, k]
        ax.scatter(np.where(np.isfinite(blend), blend, 0.0), d, s=8, c=np.log10(np.maximum(snr, 1)),
                   cmap="magma")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("blend_frac (neighbour flux fraction within 1 FWHM)")
        ax.set_ylabel(f"recovered - true {_label_tex(n)}")
    axes[0, 0].set_title("colour: blend_frac", fontsize=9)
    axes[1, 0].set_title("colour: log10 S/N", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return int(sel.size)


def make_report(outdir, catalogue, *, white_light=None, sources=None, wave=None, flux=None, ivar=None,
                model_flux=None, truth=None, title="musepayne run", extra=None, model_mask=None):
    """Write ``outdir/index.html`` with every figure its inputs allow. Returns a summary dict."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    figs, notes = [], []
    summary = {"n_rows": len(catalogue)}
    if "status" in catalogue.colnames:
        summary["status_counts"] = fit_status_counts(catalogue["status"])
    if "fit_flags" in catalogue.colnames:  # rows with each quality flag (musepayne.flags.FIT_FLAGS)

        ff = np.asarray(catalogue["fit_flags"], np.int64)
        summary["fit_flag_counts"] = {k: int(np.count_nonzero(ff & f.value)) for k, f in FIT_FLAGS.items()}
        summary["fit_flag_counts"]["clean"] = int(np.count_nonzero(ff == 0))
    if white_light is not None:
        plot_white_light(out / "white_light.png", white_light, sources)
        figs.append(("white_light.png", "White-light image of the cube with the extracted sources."))
    else:
        notes.append("No cube given: no white-light image.")
    if "teff" in catalogue.colnames and "logg" in catalogue.colnames:
        summary["n_kiel"] = plot_kiel(out / "kiel.png", catalogue)
        figs.append(("kiel.png", "Kiel diagram coloured by [Fe/H] (converged fits)."))
    if plot_abundances(out / "abundances.png", catalogue):
        figs.append(("abundances.png", "[X/Fe] against [Fe/H]."))
    else:
        notes.append("No [X/Fe] labels in this model: no abundance plot.")
    plot_quality(out / "quality.png", catalogue)
    figs.append(("quality.png", "Distributions of S/N per pixel, reduced chi2 (Eq. 3) and corr_flux."))
    if model_flux is not None and flux is not None:
        n = plot_fit_gallery(out / "fits.png", wave, flux, ivar, model_flux, catalogue, model_mask=model_mask)
        if n:
            figs.append(("fits.png", "Example fits, drawn from the rows of 'select --preset reliable' (spread in "
                                     "S/N) plus the brightest flagged fit (its flags in the title): observed "
                                     "(black), pixels the fit did not use (grey bands), pixels the model does not "
                                     "cover (hatched), best-fit model (red), residuals below (paper Fig. 3, 9)."))
    if truth is not None:
        stats = plot_truth(out / "truth.png", catalogue, truth)
        if stats:
            summary["truth"] = stats
            figs.append(("truth.png", "Recovered minus true labels for the simulated stars with a converged fit "
                                  "(all magnitudes; labels at the model's range edge excluded)."))
        summary["truth_budget"] = injection_budget(catalogue, truth, sources)
        if plot_truth_snr_blend(out / "truth_snr_blend.png", catalogue, truth, sources):
            figs.append(("truth_snr_blend.png", "Recovered minus true against S/N (top, colour blend_frac) and "
                                                "against blend_frac (bottom, colour log S/N), converged fits."))
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**summary, **(extra or {})}.items() if k not in ("truth", "truth_budget")
    )
    truth_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['bias']:.4g}</td><td>{s['dispersion']:.4g}</td><td>{s['n']}</td></tr>"
        for n, s in summary.get("truth", {}).items()
    )
    body = [f"<h1>{html.escape(title)}</h1>", "<table class='kv'>" + rows + "</table>"]
    if truth_rows:
        body.append("<h2>Recovered vs true</h2><table><tr><th>label</th><th>bias (median)</th>"
                    "<th>dispersion (half 16-84 %)</th><th>N</th></tr>" + truth_rows + "</table>")
    if summary.get("truth_budget"):
        body.append("<h2>Error budget</h2><pre>" + html.escape("\n".join(format_budget(summary["truth_budget"])))
                    + "</pre>")
    for fname, caption in figs:
        body.append(f"<figure><img src='{fname}' alt='{html.escape(caption)}'><figcaption>"
                    f"{html.escape(caption)}</figcaption></figure>")
    for n in notes:
        body.append(f"<p class='note'>{html.escape(n)}</p>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
            "img{max-width:100%}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
            "padding:3px 8px}figure{margin:1.5em 0}.note{color:#666}</style></head><body>"
            + "\n".join(body) + "</body></html>")

    atomic_write_text(page, out / "index.html")
    summary["figures"] = [f for f, _ in figs]
    return summary
