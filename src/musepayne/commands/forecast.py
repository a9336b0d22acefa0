"""``musepayne forecast``: label precision vs S/N, magnitude and exposure time (paper §5)."""

from __future__ import annotations

import click

from ._common import emit, fail, json_option


@click.command(name="forecast")
@click.option("--label", "labels", multiple=True,
              help="Label(s) of Table 3: teff, logg, fe_h, mg_fe, si_fe, ca_fe, ti_fe, c_fe, ni_fe, cr_fe "
                   "(also '[Fe/H]' style). Repeat for several; default: all.")
@click.option("--sigma", type=float, help="Target uncertainty (dex; Teff in K).")
@click.option("--snr", type=float, help="S/N per pixel (gives sigma, Eq. 11).")
@click.option("--vmag", type=float, help="V magnitude of the star (Eq. 13).")
@click.option("--exptime", type=float, help="Exposure time in seconds (Eq. 12).")
@click.option("--plot-snr", "plot_snr", type=click.Path(dir_okay=False),
              help="Write a Fig. 13-style plot (sigma vs S/N) to this file.")
@click.option("--plot-vmag", "plot_vmag", type=click.Path(dir_okay=False),
              help="Write a Fig. 14-style plot (S/N vs V with each label's limit for --sigma, default 0.1).")
@json_option
def forecast(labels, sigma, snr, vmag, exptime, plot_snr, plot_vmag, as_json):
    """Forecast label precision with the paper's Eq. 11-13 and Table 3.

    \b
    Modes (from the options given):
      --sigma                 required S/N per pixel           (inverse Eq. 11)
      --sigma --exptime       limiting V magnitude             (inverse Eq. 11-13)
      --sigma --vmag          required exposure time           (inverse Eq. 11-13)
      --snr                   sigma at that S/N                (Eq. 11)
      --vmag [--exptime]      S/N and sigma (default 3600 s)   (Eq. 11-13)
    Teff uncertainties are in K (Table 3 works in 100 K; converted).
    For a Cramer-Rao forecast from a model use musepayne.forecast.cramer_rao.
    """


    from .. import forecast as fc

    try:
        labs = [fc.canonical_label(x) for x in labels] or list(fc.TABLE3)
        for lab in labs:
            if lab not in fc.TABLE3:
                raise KeyError(f"no Table 3 relation for {lab!r}; known: {', '.join(fc.TABLE3)}")
        for name, v in (("sigma", sigma), ("snr", snr), ("exptime", exptime)):
            if v is not None and not v > 0:
                raise ValueError(f"--{name} must be positive")
        rows = []
        if sigma is not None and vmag is not None and exptime is not None:
            raise ValueError("give at most two of --sigma, --vmag, --exptime")
        if sigma is not None and snr is not None:
            raise ValueError("--sigma and --snr are exclusive")
        if sigma is not None and vmag is not None:
            mode = "required_exptime"
            for lab in labs:
                need = float(fc.snr_for_sigma(lab, sigma))
                rows.append({"label": lab, "sigma": sigma, "vmag": vmag, "required_snr": need,
                             "exptime_s": float(fc.exptime_for_snr(need, vmag))})
        elif sigma is not None and exptime is not None:
            mode = "limiting_vmag"
            for lab in labs:
                need = float(fc.snr_for_sigma(lab, sigma))
                rows.append({"label": lab, "sigma": sigma, "exptime_s": exptime, "required_snr": need,
                             "limiting_vmag": float(fc.vmag_for_snr(need, exptime))})
        elif sigma is not None:
            mode = "required_snr"
            for lab in labs:
                rows.append({"label": lab, "sigma": sigma, "required_snr": float(fc.snr_for_sigma(lab, sigma))})
        elif snr is not None:
            mode = "sigma_at_snr"
            for lab in labs:
                rows.append({"label": lab, "snr": snr, "sigma": float(fc.sigma_from_snr(lab, snr))})
        elif vmag is not None:
            mode = "sigma_at_vmag"
            t = exptime if exptime is not None else 3600.0
            s = float(fc.snr_from_vmag(vmag, t))
            for lab in labs:
                rows.append({"label": lab, "vmag": vmag, "exptime_s": t, "snr": s,
                             "sigma": float(fc.sigma_from_snr(lab, s))})
        elif plot_snr or plot_vmag:
            mode = "plots"
        else:
            raise ValueError("give --sigma, --snr or --vmag (see --help)")
        plots = {}
        if plot_snr:
            fc.plot_sigma_vs_snr(plot_snr, labs)
            plots["sigma_vs_snr"] = plot_snr
        if plot_vmag:
            s01 = 0.1 if sigma is None else sigma
            fc.plot_snr_vs_vmag(plot_vmag, labs, sigma=s01, exptime=exptime or 3600.0)
            plots["snr_vs_vmag"] = plot_vmag
    except (KeyError, ValueError) as exc:
        fail(str(exc.args[0]) if exc.args else str(exc), as_json)
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

