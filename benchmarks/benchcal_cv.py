"""Benchmark calibration: cross-validated variants of the post-fit map and the systematic errors.

Reads a hold-out fits table (``musepayne model calibrate-benchmark ... --table T.fits``: the
benchmark stars observed as MUSE / LAMOST, fitted by models trained without them, several seeds)
and prints, for each variant (map degree, ridge penalty, sys-error bins), the K-fold (over stars)
figures, mean and range over seeds.  With ``--snr-check N --holdout-model M...``, also observes
the benchmark spectra at S/N N, fits them with the hold-out models, and applies the calibration
learnt at the table's S/N (out of fold) to check that the error model holds at another S/N.

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_cv.py build/holdout.fits \
        [--snr-check 30 --holdout-model build/nobench_s0.fits ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from astropy.table import Table

from musepayne.models.benchcal import BENCH_LABELS, star_type
from musepayne.train.benchcal import (
    BenchCalConfig,
    _arrays,
    _at_snr,
    _usable,
    calibration_figures,
    evaluate,
    fit_calibration,
)
from musepayne.train.crossval import assign_folds


def variants(tab):
    print("variant                      | MUSE cal all: Teff bias/disp, logg bias/disp, feh bias/disp | pulls | "
          "mp_giant logg bias/disp")
    # degree -1: each label's map chosen by (nested) CV (the shipped setting, BenchCalConfig.select)
    for degree, ridge, bins, mi in [(d, r, b, m) for m in (None, ("muse",)) for d in (-1, 0, 1, 2)
                                    for r in ((1.0,) if d <= 0 else (0.1, 1.0, 10.0)) for b in ("all", "type")]:
        cfg = BenchCalConfig(degree=max(degree, 0), ridge=ridge, sys_bins=bins, map_instruments=mi,
                             select=degree < 0)
        fig = evaluate(tab, cfg)["summary"]
        for inst in ("muse", "lamost"):
            if True:
                s = fig[inst]["cal"]
                a, mp = s["all"], s["mp_giant"]
                print(f"learn {'+'.join(mi or ('all',)):4s} {inst:6s} deg {degree} ridge {ridge:4.1f} sys {bins:4s} | "
                      + ", ".join(f"{a[n]['bias']['mean']:+.3g}/{a[n]['dispersion']['mean']:.3g} "
                                  f"[{a[n]['dispersion']['min']:.3g}..{a[n]['dispersion']['max']:.3g}]"
                                  for n in BENCH_LABELS)
                      + " | " + "/".join(f"{a[n]['pull_dispersion']['mean']:.2f}" for n in BENCH_LABELS)
                      + f" | {mp['logg']['bias']['mean']:+.3f}/{mp['logg']['dispersion']['mean']:.3f}")


def snr_check(tab, snr, holdout_paths, cfg=BenchCalConfig()):
    from musepayne.models.benchcal import read_benchmarks
    from musepayne.models.files import load_model
    from musepayne.train.benchcal import benchmark_library_spectra, holdout_table, observe

    shared = Path("..") / "shared" / "data"
    bench = read_benchmarks(shared / "benchmarks" / "gbs_v3_gdr3_tmass.csv")
    sets, index = benchmark_library_spectra(shared, bench)
    models = [load_model(p) for p in holdout_paths]
    seeds = [int(m.meta.get("seed", i)) for i, m in enumerate(models)]
    obs = {inst: observe(sets, inst, snr, 7000 + i) for i, inst in enumerate(cfg.instruments)}
    low = holdout_table(models, obs, bench, index, seeds)
    low = low[_usable(low)]
    tab = _at_snr(tab[_usable(tab)], BenchCalConfig())
    x, y, e, be = _arrays(tab)
    xl, yl, el, bl = _arrays(low)
    hd_all = np.unique(np.r_[np.asarray(tab["hd"]), np.asarray(low["hd"])])
    fold = dict(zip(hd_all, assign_folds(hd_all, cfg.k, cfg.seed)))
    f_hi = np.array([fold[h] for h in tab["hd"]])
    f_lo = np.array([fold[h] for h in low["hd"]])
    xc = np.full(xl.shape, np.nan)
    err = np.full(xl.shape, np.nan)
    for f in range(cfg.k):
        c = fit_calibration(x[f_hi != f], y[f_hi != f], e[f_hi != f], be[f_hi != f], degree=cfg.degree,
                            ridge=cfg.ridge, sys_bins=cfg.sys_bins, groups=np.asarray(tab["hd"])[f_hi != f],
                            select=cfg.select)
        te = f_lo == f
        xc[te] = c.apply(xl[te])
        err[te] = np.hypot(el[te], c.sys(xc[te]))
    for inst in cfg.instruments:
        for s in seeds:
            sel = (np.asarray(low["instrument"]) == inst) & (np.asarray(low["seed"]) == s)
            fu = calibration_figures(xl[sel], yl[sel], el[sel], bl[sel], star_type(yl[sel]))
            fc = calibration_figures(xc[sel], yl[sel], err[sel], bl[sel], star_type(yl[sel]))
            print(f"S/N {snr:g} {inst} seed {s}: median stat err "
                  + ", ".join(f"{n} {np.nanmedian(el[sel, k]):.3g}" for k, n in enumerate(BENCH_LABELS)))
            for name, fg in (("uncal", fu), ("cal", fc)):
                print(f"   {name:5s} " + "; ".join(
                    f"{n} bias {fg['all'][n]['bias']:+.3g} disp {fg['all'][n]['dispersion']:.3g} "
                    f"pulls {fg['all'][n]['pull_dispersion']:.2f}" for n in BENCH_LABELS))


def ensemble(tab):
    """Rows of the seed-averaged labels (one pseudo-seed, 99): what an ensemble of the hold-out
    models would give (each seed's fit averaged; stat error: mean of the seeds')."""
    from astropy.table import vstack

    tab = _at_snr(tab[_usable(tab)], BenchCalConfig())
    key = np.char.add(np.asarray(tab["instrument"]).astype(str), np.asarray(tab["stellar_id"]).astype(str))
    out = []
    for k in np.unique(key):
        r = tab[key == k]
        row = r[:1].copy()
        for n in BENCH_LABELS:
            row[n] = np.mean(r[n])
            row[f"{n}_err"] = np.mean(r[f"{n}_err"])
        row["seed"] = 99
        out.append(row)
    return vstack(out)


def main(argv):
    tab = Table.read(argv[0])
    if "teff_bench" not in tab.colnames:  # a shipped / --table file: benchmark labels re-attached by HD
        import os
        from pathlib import Path

        from musepayne.models.benchcal import DEFAULT_BENCHMARK_FILE, attach_benchmark_labels, read_benchmarks

        shared = Path(os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
        tab = attach_benchmark_labels(tab, read_benchmarks(shared / DEFAULT_BENCHMARK_FILE))
    variants(tab)
    if len(set(tab["seed"])) > 1:
        ens = ensemble(tab)
        print("ensemble of the seeds (mean labels), default calibration settings:")
        from musepayne.train.benchcal import figures_lines

        print("\n".join(figures_lines(evaluate(ens, BenchCalConfig()))))
    if "--snr-check" in argv:
        snr = float(argv[argv.index("--snr-check") + 1])
        paths = [argv[i + 1] for i, a in enumerate(argv) if a == "--holdout-model"]
        snr_check(tab, snr, paths)


if __name__ == "__main__":
    main(sys.argv[1:])
