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
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

from .validation import bias_dispersion

__all__ = ["make_report"]

_LABEL_TEX = {"teff": r"$T_{\rm eff}$ [K]", "logg": r"$\log g$", "fe_h": "[Fe/H]", "rv": "RV [km/s]"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

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


def plot_fit_gallery(path, wave, flux, ivar, model, cat, n_show=6):
    """Observed vs best-fit model, residuals, and masked pixels for example stars."""
    plt = _plt()
    good = np.nonzero(_good(cat) & np.isfinite(np.asarray(model)).any(axis=1))[0]
    if good.size == 0:
        return 0
    snr = _col(cat, "snr_muse")
    order = good[np.argsort(-np.nan_to_num(snr[good] if snr is not None else np.zeros(good.size), nan=-1))]
    pick = order[np.linspace(0, order.size - 1, min(n_show, order.size)).astype(int)]
    fig, axes = plt.subplots(2 * len(pick), 1, figsize=(11, 2.6 * len(pick)),
                             gridspec_kw={"height_ratios": [3, 1] * len(pick)}, sharex=True)
    axes = np.atleast_1d(axes)
    for k, i in enumerate(pick):
        a, r = axes[2 * k], axes[2 * k + 1]
        used = ivar[i] > 0
        a.plot(wave, np.where(used, flux[i], np.nan), "k-", lw=0.6, label="observed")
        a.plot(wave, np.where(np.isfinite(flux[i]) & ~used, flux[i], np.nan), "-", color="0.75", lw=0.6,
               label="masked")
        a.plot(wave, model[i], "r-", lw=0.6, label="model")
        lab = ", ".join(f"{n}={cat[n][i]:.2f}" if n != "teff" else f"Teff={cat[n][i]:.0f}"
                        for n in ("teff", "logg", "fe_h") if n in cat.colnames)
        a.set_title(f"{cat['stellar_id'][i]}  S/N={snr[i]:.0f}  {lab}" if snr is not None else str(cat["stellar_id"][i]),
                    fontsize=8)
        a.set_ylim(0.2, 1.3)
        a.set_ylabel("norm. flux")
        for lo, hi in _runs(~used & np.isfinite(wave)):
            a.axvspan(wave[lo], wave[hi], color="0.9", lw=0)
        r.plot(wave, np.where(used, flux[i] - model[i], np.nan), "k-", lw=0.5)
        r.axhline(0, color="r", lw=0.5)
        r.set_ylim(-0.08, 0.08)
        r.set_ylabel("resid.")
        if k == 0:
            a.legend(loc="lower right", fontsize=7, ncol=3)
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
        # benchmark-calibrated ones (musepayne.benchcal), when the catalogue has both
        d = _col(cat, f"{n}_uncal" if f"{n}_uncal" in cat.colnames else n)[sel] - t
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


def make_report(outdir, catalogue, *, white_light=None, sources=None, wave=None, flux=None, ivar=None,
                model_flux=None, truth=None, title="musepayne run", extra=None):
    """Write ``outdir/index.html`` with every figure its inputs allow. Returns a summary dict."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    figs, notes = [], []
    summary = {"n_rows": len(catalogue)}
    if "status" in catalogue.colnames:
        summary["status_counts"] = dict(Counter(str(s).split(":")[0] for s in catalogue["status"]))
    if "fit_flags" in catalogue.colnames:  # rows with each quality flag (musepayne.flags.FIT_FLAGS)
        from .flags import FIT_FLAGS

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
        n = plot_fit_gallery(out / "fits.png", wave, flux, ivar, model_flux, catalogue)
        if n:
            figs.append(("fits.png", "Example fits: observed (black), masked (grey), best-fit model (red), "
                                     "residuals below (paper Fig. 3, 9)."))
    if truth is not None:
        stats = plot_truth(out / "truth.png", catalogue, truth)
        if stats:
            summary["truth"] = stats
            figs.append(("truth.png", "Recovered minus true labels for the simulated stars with a converged fit "
                                  "(all magnitudes; labels at the model's range edge excluded)."))
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**summary, **(extra or {})}.items() if k != "truth"
    )
    truth_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['bias']:.4g}</td><td>{s['dispersion']:.4g}</td><td>{s['n']}</td></tr>"
        for n, s in summary.get("truth", {}).items()
    )
    body = [f"<h1>{html.escape(title)}</h1>", "<table class='kv'>" + rows + "</table>"]
    if truth_rows:
        body.append("<h2>Recovered vs true</h2><table><tr><th>label</th><th>bias (median)</th>"
                    "<th>dispersion (half 16-84 %)</th><th>N</th></tr>" + truth_rows + "</table>")
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
    from .io import atomic_write_text

    atomic_write_text(page, out / "index.html")
    summary["figures"] = [f for f, _ in figs]
    return summary
