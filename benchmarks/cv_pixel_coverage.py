"""Post-fix cross-validation (regularised recipe + quadratic Cannon, same folds/seeds/noise as
`musepayne validate --cv`) and the min_pixel_coverage experiment: the same fold models fitted with
the default pixel mask (coverage < 0.5) and with a looser one (coverage < LOW), which lets the
STELIB-only red pixels (Ca triplet) into the fit.  Training does not depend on the mask (it only
decides which model pixels the fitter uses), so one training per fold serves both.
Also prints the quadratic-Cannon baseline with both masks.  Writes cv_pixel_coverage.fits (per star).
Usage (~8 min on one core): PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/cv_pixel_coverage.py [LOW=0.05]
Data from $MUSEPAYNE_SHARED or ../shared/data."""
import json
import os
import sys
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
from musepayne.prepare.preparer import PrepareConfig, Preparer
from musepayne.train.crossval import _read_native, assign_folds, cv_summary
from musepayne.train.trainer import TrainConfig, train_model
from musepayne.train.trainset import build_trainset, simulate_lamost_observation, simulate_muse_observation

low = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
t00 = time.time()
shared = Path(os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
ts = build_trainset(shared / "libraries" / "miles", shared / "libraries" / "stelib")
tpl = build_templates(CannonEmulator.load(shared / "synthetic" / "doppler_cannon_coolstars_norm.npz"))
weights = dict(load_model("default").meta["regularisation"]["gradient_weight"])
names, lab, t = ts.label_names, ts.labels, ts.table
groups = np.asarray(t["star_key"])
folds = assign_folds(groups, 5, 0)
in_box = (lab[:, 0] > 4000) & (lab[:, 0] < 7000) & (lab[:, 2] > -2)
prep = Preparer(PrepareConfig())
sims = {"muse": simulate_muse_observation, "lamost": simulate_lamost_observation}
tcfg0 = TrainConfig(gradient_weight=weights)
fcfg = FitConfig()
variants = ("ours", "ours_low", "cannon", "cannon_low")
rows = []
print(f"trainset {ts.n_spectra} spectra, built in {time.time() - t00:.0f} s", flush=True)
for f in range(5):
    tr = np.nonzero(folds != f)[0]
    te = np.nonzero((folds == f) & in_box)[0]
    sub = ts.select(tr)
    res = train_model(sub.flux, sub.ivar, sub.labels, names, sub.wave, replace(tcfg0, seed=f), templates=tpl,
                      groups=groups[tr])
    cov = np.mean(sub.ivar > 0, axis=0)
    models = {"ours": res.to_model(), "ours_low": res.to_model().with_pixel_mask(cov < low)}
    cn = train_cannon(sub.flux, sub.ivar, sub.labels, names, sub.wave, CannonConfig(min_pixel_coverage=0.5))
    cn_low = train_cannon(sub.flux, sub.ivar, sub.labels, names, sub.wave, CannonConfig(min_pixel_coverage=low))
    models["cannon"], models["cannon_low"] = cn, cn_low
    fitters = {k: Fitter(m, replace(fcfg, model_scatter="weights") if k.startswith("cannon") else fcfg)
               for k, m in models.items()}
    natives = [_read_native(t[i]) for i in te]
    rng = np.random.default_rng(0 * 1000 + f)
    cats = {}
    for inst in ("muse", "lamost"):
        pp = PreparedSpectra.concatenate([prep(sims[inst](s, 100.0, rng)) for s in natives])
        for k, fit in fitters.items():
            inp = pp
            cats[(k, inst)] = fit(inp, templates=tpl if k.startswith("ours") else None)
    for j, i in enumerate(te):
        r = {"stellar_id": str(t["stellar_id"][i]), "fold": f, "library": str(t["instrument"][i])}
        for kk, n in enumerate(names):
            r[f"{n}_lit"] = float(lab[i, kk])
        for (k, inst), cat in cats.items():
            sfx = "" if k == "ours" else "_" + k
            for n in names:
                r[f"{n}_{inst}{sfx}"] = float(cat[n][j])
                if f"{n}_gradcorr" in cat.colnames:
                    r[f"{n}_gradcorr_{inst}{sfx}"] = float(cat[f"{n}_gradcorr"][j])
        rows.append(r)
    print(f"fold {f}: {te.size} stars, masked px ours {models['ours'].pixel_mask.sum()} "
          f"low {models['ours_low'].pixel_mask.sum()}, "
          f"{time.time() - t00:.0f} s", flush=True)
tab = Table(rows=rows)
tab.write("cv_pixel_coverage.fits", overwrite=True)
out = {"low": low, "seconds": round(time.time() - t00, 1)}
for k in variants:
    out[k] = cv_summary(tab, names, ("muse", "lamost"), "" if k == "ours" else "_" + k)
    for c in ("muse_minus_lit", "lamost_minus_lit", "muse_minus_lamost"):
        print(f"{k:11s} {c:17s} " + "  ".join(f"{n}: {v['dispersion']:.3g} ({v['bias']:+.3g})" for n, v in out[k][c].items()))
print(json.dumps(out))
