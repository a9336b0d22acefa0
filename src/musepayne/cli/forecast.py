"""``musepayne forecast``: label precision vs S/N, magnitude and exposure time (paper §5)."""

from __future__ import annotations

import click
import numpy as np

from ..models.files import load_model
from ..models.model import ModelError
from ..science import forecast as fc
from ..science.validation import repeat_error_factors
from ._common import emit, exc_text, fail, json_option
from ._tables import read_table


@click.command(name="forecast")
@click.option("--label", "labels", multiple=True,
              help="Label(s) of Table 3: teff, logg, fe_h, mg_fe, si_fe, ca_fe, ti_fe, c_fe, ni_fe, cr_fe "
                   "(also '[Fe/H]' style). Repeat for several; default: all.")
@click.option("--sigma", type=float, help="Target uncertainty in dex (in K when --label teff is the only label).")
@click.option("--sigma-teff", "sigma_teff", type=float,
              help="Target Teff uncertainty in K when Teff is forecast with other labels.")
@click.option("--snr", type=float, help="S/N per pixel (gives sigma, Eq. 11).")
@click.option("--vmag", type=float, help="V magnitude of the star (Eq. 13).")
@click.option("--exptime", type=float, help="Exposure time in seconds (Eq. 12).")
@click.option("--plot-snr", "plot_snr", type=click.Path(dir_okay=False),
              help="Write a Fig. 13-style plot (sigma vs S/N) to this file.")
@click.option("--plot-vmag", "plot_vmag", type=click.Path(dir_okay=False),
              help="Write a Fig. 14-style plot (S/N vs V with each label's limit for --sigma, default 0.1).")
@click.option("--model", "model_path", default=None,
              help="Cramer-Rao mode: a musepayne model file (or 'default'); bound from its Jacobian.")
@click.option("--at", "at", default=None,
              help="CRLB: labels of the star, e.g. 'teff=4800,logg=2.5,fe_h=0' (missing labels: mid-range).")
@click.option("--mode", "mask_mode", type=click.Choice(["standard", "bulge"]), default="standard",
              show_default=True, help="CRLB: the fit's wavelength mask (paper §3.2 / §4.2.1).")
@click.option("--ao-notch", default=None, help="CRLB: mask the NaD laser notch of an AO mode.")
@click.option("--correction", "corrections", multiple=True,
              help="CRLB: Eq. 9 factor LABEL=F from repeats (Eq. 10; see 'validate --repeats'); repeatable.")
@click.option("--repeats-from", "repeats_from", type=click.Path(dir_okay=False),
              help="CRLB: take the Eq. 9 factors from repeat observations in this catalogue (Eq. 10); "
                   "--correction overrides per label.")
@click.option("--fit-rv/--fixed-rv", "fit_rv", default=True, show_default=True,
              help="CRLB: marginalise over a fitted radial velocity, as the fitter does.")
@json_option
def forecast(labels, sigma, sigma_teff, snr, vmag, exptime, plot_snr, plot_vmag, model_path, at, mask_mode, ao_notch,
             corrections, repeats_from, fit_rv, as_json):
    """Forecast label precision with the paper's Eq. 11-13 and Table 3.

    \b
    Modes (from the options given):
      --sigma                 required S/N per pixel           (inverse Eq. 11)
      --sigma --exptime       limiting V magnitude             (inverse Eq. 11-13)
      --sigma --vmag          required exposure time           (inverse Eq. 11-13)
      --snr                   sigma at that S/N                (Eq. 11)
      --vmag [--exptime]      S/N and sigma (default 3600 s)   (Eq. 11-13)
    Teff uncertainties are in K (Table 3 works in 100 K; converted): with
    --label teff alone --sigma is in K, with other labels use --sigma-teff.

    \b
    Cramer-Rao mode (--model): the bound sqrt(diag(F^-1)), F = J^T J SNR^2 over
    the pixels a MUSE fit uses (--mode mask, 4750-9350 A air coverage), at
    --snr (or the S/N of --vmag/--exptime, Eq. 12-13), marginalised over RV
    (--fit-rv), times --correction (or Eq. 10 factors from --repeats-from).
    """
    if model_path:
        _crlb_mode(model_path, at, snr, vmag, exptime, mask_mode, ao_notch, corrections, repeats_from, plot_snr,
                   as_json, fit_rv)
        return

    try:
        mode, rows, labs = fc.forecast_table3(labels, sigma=sigma, sigma_teff=sigma_teff, snr=snr, vmag=vmag,
                                              exptime=exptime)
        if mode == "none":
            if not (plot_snr or plot_vmag):
                raise ValueError("give --sigma, --snr or --vmag (see --help)")
            mode = "plots"
        plots = {}
        if plot_snr:
            fc.plot_sigma_vs_snr(plot_snr, labs)
            plots["sigma_vs_snr"] = plot_snr
        if plot_vmag:
            s01 = 0.1 if sigma is None or labs == ["teff"] else sigma
            fc.plot_snr_vs_vmag(plot_vmag, labs, sigma=s01, exptime=exptime or 3600.0, sigma_teff=sigma_teff)
            plots["snr_vs_vmag"] = plot_vmag
    except (KeyError, ValueError) as exc:
        fail(exc_text(exc), as_json)
        return

    def unit(lab):
        return "K" if lab == "teff" else "dex"

    lines = []
    for r in rows:
        u = unit(r["label"])
        if mode == "required_snr":
            lines.append(f"{r['label']}: sigma = {r['sigma']:g} {u} needs S/N >= {r['required_snr']:.2f} per pixel")
        elif mode == "limiting_vmag":
            lines.append(f"{r['label']}: sigma = {r['sigma']:g} {u} in {r['exptime_s']:g} s down to "
                         f"V = {r['limiting_vmag']:.2f} (S/N {r['required_snr']:.2f})")
        elif mode == "required_exptime":
            lines.append(f"{r['label']}: sigma = {r['sigma']:g} {u} at V = {r['vmag']:g} needs "
                         f"{r['exptime_s']:.0f} s ({r['exptime_s'] / 3600:.2f} h; S/N {r['required_snr']:.2f})")
        elif mode == "sigma_at_snr":
            lines.append(f"{r['label']}: sigma = {r['sigma']:.4g} {u} at S/N {r['snr']:g}")
        else:
            lines.append(f"{r['label']}: V = {r['vmag']:g}, {r['exptime_s']:g} s -> S/N {r['snr']:.1f}, "
                         f"sigma = {r['sigma']:.4g} {u}")
    lines += [f"plot written: {p}" for p in plots.values()]
    result = {"mode": mode, "equations": "Wang et al. 2022 Eq. 11-13, Table 3 (Teff in K)",
              "results": rows, "plots": plots}
    if len(rows) == 1:
        result.update({k: v for k, v in rows[0].items()})
    emit(result, as_json, lines)



def _parse_pairs(text_items, what):
    out = {}
    for item in text_items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"{what} needs NAME=VALUE, got {part!r}")
            k, v = part.split("=", 1)
            out[k.strip()] = float(v)
    return out


def _crlb_mode(model_path, at, snr, vmag, exptime, mask_mode, ao_notch, corrections, repeats_from, plot_snr,
               as_json, fit_rv=True):
    try:
        model = load_model(model_path)
        names = [fc.canonical_label(n) for n in model.label_names]
        corr = {}
        if repeats_from:
            cat = read_table(repeats_from)
            have = [n for n in names if n in cat.colnames and f"{n}_err" in cat.colnames]
            for r in repeat_error_factors(cat, have):
                if r["n_pairs"] > 0 and np.isfinite(r["factor"]):
                    corr[str(r["label"])] = float(r["factor"])
        corr.update(_parse_pairs(corrections, "--correction"))
        at_values = _parse_pairs([at] if at else [], "--at")
        res, snr = fc.crlb_forecast(model, at_values, snr=snr, vmag=vmag, exptime=exptime, mask_mode=mask_mode,
                                    ao_notch=ao_notch, correction=corr, fit_rv=fit_rv)
        corr = {fc.canonical_label(k): v for k, v in corr.items()}
        plots = {}
        if plot_snr:
            fc.plot_sigma_vs_snr(plot_snr, [n for n in names if n in fc.TABLE3] or None, crlb=res, crlb_snr=snr)

            plots["sigma_vs_snr"] = plot_snr
    except (KeyError, ValueError, FileNotFoundError, ModelError) as exc:
        fail(exc_text(exc), as_json)
        return
    rows = [{"label": n, "value": float(res.labels[0, i]), "crlb": float(res.sigma[0, i]),
             "crlb_theory": float(res.sigma_theory[0, i]), "correction": corr.get(n, 1.0),
             "table3": (float(fc.sigma_from_snr(n, snr)) if n in fc.TABLE3 else None)}
            for i, n in enumerate(res.label_names)]
    info = {"mode": "cramer_rao", "model": str(model_path), "snr": snr, "mask_mode": mask_mode, "fit_rv": fit_rv,
            "n_used": int(res.n_used[0]), "results": rows, "plots": plots,
            "method": "F = J^T diag(SNR^2) J over used pixels; sigma = sqrt(diag(F^-1)) x correction"}
    lines = [f"Cramer-Rao bound at S/N {snr:.1f} per pixel ({int(res.n_used[0])} pixels, {mask_mode} mask):"]
    for r in rows:
        extra = f"  (paper Eq. 11: {r['table3']:.4g})" if r["table3"] is not None else ""
        lines.append(f"  {r['label']:8s} = {r['value']:.4g}: sigma >= {r['crlb']:.4g}{extra}")
    lines += [f"plot written: {p}" for p in plots.values()]
    emit(info, as_json, lines)
