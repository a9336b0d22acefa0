"""Benchmark calibration: post-fit map vs retraining on benchmark-scale training labels.

Two folds over the Gaia FGK benchmark stars (grouped by HD number).  For fold f:

* retrain: a map catalogue label -> benchmark label (same polynomial and ridge as the
  post-fit map, :func:`musepayne.models.benchcal.fit_calibration`) is fitted on the benchmark stars
  of the other fold (their MILES/STELIB catalogue labels vs the benchmark labels) and applied
  to the catalogue labels of every non-benchmark training star; those stars plus the other
  fold's benchmark stars (with their benchmark labels) train the default recipe (seed ``--seed``);
  fold f's benchmark spectra, observed as MUSE / LAMOST at S/N 100, are fitted with it;
* post-fit map: the hold-out model (recipe trained without any benchmark star, same seed)
  fits the same spectra; the map fitted on the other fold's fits is applied.

Both maps are chosen per label by CV over the fitting fold's stars (inputs, degree, ridge:
:func:`musepayne.train.benchcal.select_maps`), as the shipped calibration is.

Usage (two trainings, ~2 CPU-min each; ``--seed`` the training seed of both the hold-out model
and the retrained ones, so run it for several seeds):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_retrain.py \
        build/trainset.fits build/templates.fits build/nobench_s0.fits build/bench_muse.fits \
        build/bench_lamost.fits build/bench_idx.npy [--seed 0] [--out build/retrain.fits]
The bench_*.fits / bench_idx.npy are the observed benchmark spectra (musepayne.models.benchcal.observe)
and their rows in the benchmark table.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from astropy.table import vstack

from musepayne.io.prepared import PreparedSpectra
from musepayne.models.benchcal import BENCH_LABELS, match_benchmarks, read_benchmarks
from musepayne.models.files import load_model
from musepayne.models.gradients import GradientTemplates
from musepayne.train import train_model
from musepayne.train.benchcal import _recipe, calibration_figures, fit_calibration, holdout_table
from musepayne.train.crossval import assign_folds
from musepayne.train.trainset import TrainingSet


def main(argv):
    tsp, tplp, holdp, mup, lap, idxp = argv[:6]
    out = argv[argv.index("--out") + 1] if "--out" in argv else "build/retrain.fits"
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    torch.set_num_threads(1)
    shared = Path("..") / "shared" / "data"
    bench = read_benchmarks(shared / "benchmarks" / "gbs_v3_gdr3_tmass.csv")
    ts = TrainingSet.read(tsp)
    tpl = GradientTemplates.load(tplp)
    hold = load_model(holdp)
    recipe = replace(_recipe(hold, ts.label_names), seed=seed)
    observed = {"muse": PreparedSpectra.read(mup), "lamost": PreparedSpectra.read(lap)}
    idx = np.load(idxp)
    hd = np.asarray(bench["hd_number"])[idx]
    folds_obs = assign_folds(hd, 2, 0)
    m_ts = match_benchmarks(ts.table["star_key"], bench)
    fold_of_hd = {h: f for h, f in zip(hd, folds_obs)}
    lab = ts.labels
    y_ts = np.column_stack([np.asarray(bench[n], float)[np.maximum(m_ts, 0)] for n in BENCH_LABELS])
    e_ts = np.column_stack([np.asarray(bench[f"e_{n}"], float)[np.maximum(m_ts, 0)] for n in BENCH_LABELS])
    base = holdout_table([hold], observed, bench, idx, [seed])
    rows = []
    for f in (0, 1):
        te = folds_obs == f
        # ---- post-fit map (hold-out model, map from the other fold's fits)
        bt = base[np.isin(np.asarray(base["hd"]), np.asarray(bench["hd"])[idx[~te]])]
        xb = np.column_stack([np.asarray(bt[n], float) for n in BENCH_LABELS])
        yb = np.column_stack([np.asarray(bt[f"{n}_bench"], float) for n in BENCH_LABELS])
        eb = np.column_stack([np.asarray(bt[f"{n}_err"], float) for n in BENCH_LABELS])
        bb = np.column_stack([np.asarray(bt[f"e_{n}_bench"], float) for n in BENCH_LABELS])
        post = fit_calibration(xb, yb, eb, bb, sys_bins="type", groups=np.asarray(bt["hd"]), select=True)
        # ---- retrain on benchmark-scale labels
        is_b = m_ts >= 0
        tr_b = is_b & np.array([fold_of_hd.get(str(bench["hd_number"][j]), 1 - f) != f if j >= 0 else False
                                for j in m_ts])
        lmap = fit_calibration(lab[tr_b], y_ts[tr_b], np.zeros((tr_b.sum(), 3)), e_ts[tr_b],
                               groups=np.asarray(bench["hd_number"])[m_ts[tr_b]], select=True)
        new = lab.copy()
        new[~is_b] = lmap.apply(lab[~is_b])
        new[tr_b] = y_ts[tr_b]
        keep = np.nonzero(~is_b | tr_b)[0]
        sub = ts.select(keep)
        print(f"fold {f}: retraining on {keep.size} spectra ({tr_b.sum()} benchmark spectra with benchmark labels)",
              flush=True)
        res = train_model(sub.flux, sub.ivar, new[keep], ts.label_names, sub.wave, recipe, templates=tpl,
                          groups=np.asarray(sub.table["star_key"]))
        model = res.to_model()
        obs_te = {k: PreparedSpectra(p.wave, p.flux[te], p.ivar[te], p.mask[te], p.lsf_excess[te], p.cont[te],
                                     p.spectra[te], p.meta) for k, p in observed.items()}
        rt = holdout_table([model], obs_te, bench, idx[te], [seed])
        rt["method"] = "retrain"
        pt = base[np.isin(np.asarray(base["stellar_id"]), np.asarray(observed["muse"].spectra["stellar_id"])[te])]
        x = np.column_stack([np.asarray(pt[n], float) for n in BENCH_LABELS])
        xc = post.apply(x)
        sys = post.sys(xc)
        pt = pt.copy()
        for k, n in enumerate(BENCH_LABELS):
            pt[n] = xc[:, k]
            pt[f"{n}_err"] = np.hypot(np.asarray(pt[f"{n}_err"], float), sys[:, k])
        pt["method"] = "postfit"
        raw = base[np.isin(np.asarray(base["stellar_id"]), np.asarray(observed["muse"].spectra["stellar_id"])[te])]
        raw = raw.copy()
        raw["method"] = "none"
        for t in (rt, pt, raw):
            t["fold"] = f
            rows.append(t)
    allt = vstack(rows)
    allt.write(out, overwrite=True)
    for method in ("none", "postfit", "retrain"):
        for inst in ("muse", "lamost"):
            sel = (np.asarray(allt["method"]) == method) & (np.asarray(allt["instrument"]) == inst)
            t = allt[sel]
            x = np.column_stack([np.asarray(t[n], float) for n in BENCH_LABELS])
            y = np.column_stack([np.asarray(t[f"{n}_bench"], float) for n in BENCH_LABELS])
            e = np.column_stack([np.asarray(t[f"{n}_err"], float) for n in BENCH_LABELS])
            be = np.column_stack([np.asarray(t[f"e_{n}_bench"], float) for n in BENCH_LABELS])
            fig = calibration_figures(x, y, e, be)
            for grp in ("all", "dwarf", "giant", "mp_giant"):
                print(f"{method:8s} {inst:6s} {grp:8s} n={fig[grp]['teff']['n']:3d} " + "  ".join(
                    f"{n}: bias {fig[grp][n]['bias']:+.3g} disp {fig[grp][n]['dispersion']:.3g}"
                    for n in BENCH_LABELS))


if __name__ == "__main__":
    main(sys.argv[1:])
