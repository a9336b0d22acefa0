"""Experiment: CV (regularised recipe + quadratic Cannon; same folds, seeds and noise as validate --cv)
with the 50 A pseudo-continuum computed with FLAT weights (1 on the pixels the pipeline's continuum
uses: not CONTINUUM_EXCLUDING-flagged, inside the continuum range, outside telluric bands, finite)
instead of IVAR weights -- for training and test spectra alike.  Gradient templates unchanged.
Writes cv_flat_continuum.fits (per star).  Compare with benchmarks/cv_pixel_coverage.py (the
pipeline's IVAR-weighted continuum, same folds, seeds and noise).
Usage (~7 min on one core): PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/cv_flat_continuum.py"""
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.table import Table

from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.io.prepared import PreparedSpectra
from musepayne.models.cannon import CannonConfig, train_cannon
from musepayne.models.files import load_model
from musepayne.models.gradients import CannonEmulator, build_templates
from musepayne.prepare.normalize import ContinuumNormalizer
from musepayne.prepare.preparer import CONTINUUM_EXCLUDING, PrepareConfig, Preparer
from musepayne.train.crossval import _read_native, assign_folds, cv_summary
from musepayne.train.trainer import TrainConfig, train_model
from musepayne.train.trainset import build_trainset, simulate_lamost_observation, simulate_muse_observation

t00 = time.time()
shared = Path(os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
ts = build_trainset(shared / "libraries" / "miles", shared / "libraries" / "stelib")
tpl = build_templates(CannonEmulator.load(shared / "synthetic" / "doppler_cannon_coolstars_norm.npz"))
weights = dict(load_model("default").meta["regularisation"]["gradient_weight"])
prep = Preparer(PrepareConfig())
w = prep.wave
cr = prep.config.continuum_range
inside = (w >= cr[0]) & (w <= cr[1])
nrm = ContinuumNormalizer(w, width=prep.config.continuum_width, support=inside)


def flat(p):
    raw = p.flux * p.cont
    iv = np.where(p.ivar > 0, p.ivar / p.cont**2, 0.0)
    use = ((p.mask & CONTINUUM_EXCLUDING) == 0) & inside[None, :] & ~prep.telluric_continuum[None, :] & np.isfinite(raw)
    _, _, cont, defined = nrm(np.where(use, raw, 0.0), use.astype(float))
    ok = defined & np.isfinite(cont) & (cont > 0)
    fn = np.where(ok, raw / np.where(ok, cont, 1.0), np.nan)
    ivn = np.where(ok & (p.ivar > 0), iv * cont**2, 0.0)
    return PreparedSpectra(p.wave, fn, ivn, p.mask, p.lsf_excess, np.where(ok, cont, np.nan), p.spectra, dict(p.meta))


fts = replace(ts, prepared=flat(ts.prepared))
names, lab, t = ts.label_names, ts.labels, ts.table
groups = np.asarray(t["star_key"])
folds = assign_folds(groups, 5, 0)
in_box = (lab[:, 0] > 4000) & (lab[:, 0] < 7000) & (lab[:, 2] > -2)
sims = {"muse": simulate_muse_observation, "lamost": simulate_lamost_observation}
rows = []
for f in range(5):
    tr = np.nonzero(folds != f)[0]
    te = np.nonzero((folds == f) & in_box)[0]
    sub = fts.select(tr)
    res = train_model(sub.flux, sub.ivar, sub.labels, names, sub.wave, TrainConfig(gradient_weight=weights, seed=f),
                      templates=tpl, groups=groups[tr])
    models = {"ours": res.to_model(), "cannon": train_cannon(sub.flux, sub.ivar, sub.labels, names, sub.wave, CannonConfig())}
    natives = [_read_native(t[i]) for i in te]
    rng = np.random.default_rng(f)
    cats = {}
    for inst in ("muse", "lamost"):
        pp = flat(PreparedSpectra.concatenate([prep(sims[inst](s, 100.0, rng)) for s in natives]))
        for k, m in models.items():
            # the Cannon's test step weighs pixels by 1/(1/ivar + s^2)
            cats[(k, inst)] = Fitter(m, FitConfig(model_scatter="weights" if k == "cannon" else "errors"))(pp,
                                                   templates=tpl if k == "ours" else None)
    for j, i in enumerate(te):
        r = {"stellar_id": str(t["stellar_id"][i]), "fold": f}
        for kk, n in enumerate(names):
            r[f"{n}_lit"] = float(lab[i, kk])
        for (k, inst), cat in cats.items():
            sfx = "" if k == "ours" else "_cannon"
            for n in names:
                r[f"{n}_{inst}{sfx}"] = float(cat[n][j])
                if f"{n}_gradcorr" in cat.colnames:
                    r[f"{n}_gradcorr_{inst}{sfx}"] = float(cat[f"{n}_gradcorr"][j])
        rows.append(r)
    print(f"fold {f}: {te.size} stars, {time.time() - t00:.0f} s", flush=True)
tab = Table(rows=rows)
tab.write("cv_flat_continuum.fits", overwrite=True)
out = {}
for k, sfx in (("ours", ""), ("cannon", "_cannon")):
    out[k] = cv_summary(tab, names, ("muse", "lamost"), sfx)
    for c in ("muse_minus_lit", "lamost_minus_lit", "muse_minus_lamost"):
        print(f"{k:7s} {c:17s} " + "  ".join(f"{n}: {v['dispersion']:.3g} ({v['bias']:+.3g})" for n, v in out[k][c].items()))
    if "muse_gradcorr_median" in out[k]:
        print(k, "gradcorr", out[k]["muse_gradcorr_median"])
print(json.dumps(out))
