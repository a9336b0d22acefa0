"""Where does the MUSE - LAMOST Teff offset come from?  (issue 4, LSF-excess study)

The same MILES stars (validation box, every k-th of the MILES stars) are observed at high S/N
  A  as MUSE (MUSE LSF, 1.25 A air grid)              -- the real simulation
  B  on the MUSE grid but with the LAMOST LSF          -- sampling only, no resolution difference
  C  with the MUSE LSF but on the LAMOST grid          -- resolution only, exact excess
and as LAMOST (R = 1800, LAMOST grid), prepared by the pipeline and fitted with the shipped default
model and with a quadratic Cannon trained on the same training set, with and without the LSF_EXCESS
forward model, and with the pseudo-continuum re-computed with flat weights (1 on usable pixels)
instead of the IVAR weights of the pipeline.  Prints the median MUSE - LAMOST label differences
(+- their error) and, for A, the total chi2 and paired Teff change when the recorded excess is
scaled by 0.5 / 1 / 1.5.  Library spectra stand for the truth, so no literature labels enter.

Usage (~2-3 min on one core):
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lsf_offset_study.py [TRAINSET.fits] [--snr 1000] [--nstars 175]
Without TRAINSET the training set is built from $MUSEPAYNE_SHARED or ../shared/data.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.instrument.lsf import LAMOST_LSF, MUSE_LSF
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.io.prepared import PreparedSpectra
from musepayne.io.readers import read_miles
from musepayne.models.cannon import train_cannon
from musepayne.models.files import load_model
from musepayne.prepare.normalize import ContinuumNormalizer
from musepayne.prepare.preparer import PrepareConfig, Preparer
from musepayne.train.trainset import (
    TrainingSet,
    build_trainset,
    muse_air_grid,
    simulate_lamost_observation,
    simulate_muse_observation,
    simulate_observation,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trainset", nargs="?")
    ap.add_argument("--snr", type=float, default=1000.0)
    ap.add_argument("--nstars", type=int, default=175)
    a = ap.parse_args()
    if a.trainset:
        ts = TrainingSet.read(a.trainset)
    else:
        sh = Path(os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
        ts = build_trainset(sh / "libraries" / "miles", sh / "libraries" / "stelib")
    t, lab = ts.table, ts.labels
    box = (lab[:, 0] > 4000) & (lab[:, 0] < 7000) & (lab[:, 2] > -2) & (np.asarray(t["instrument"]) == "miles")
    idx = np.flatnonzero(box)
    idx = idx[np.linspace(0, idx.size - 1, min(a.nstars, idx.size)).astype(int)]
    prep = Preparer(PrepareConfig())
    rng = np.random.default_rng(42)
    nat = [read_miles(str(t["source"][i])) for i in idx]

    def observe(fn):
        return PreparedSpectra.concatenate([prep(fn(s)) for s in nat])

    obs = {
        "A": observe(lambda s: simulate_muse_observation(s, a.snr, rng)),
        "L": observe(lambda s: simulate_lamost_observation(s, a.snr, rng)),
        "B": observe(lambda s: simulate_observation(s, a.snr, rng, muse_air_grid(), LAMOST_LSF, "air", "muse")),
        "C": observe(lambda s: simulate_observation(s, a.snr, rng, lamost_wavelength(), MUSE_LSF, "vacuum", "muse")),
    }
    w = obs["A"].wave
    cr = prep.config.continuum_range
    nrm = ContinuumNormalizer(w, width=prep.config.continuum_width, support=(w >= cr[0]) & (w <= cr[1]))

    def flat(p):
        """The same spectra normalised by a flat-weight pseudo-continuum (same usable pixels)."""
        raw, iv = p.flux * p.cont, p.ivar / p.cont**2
        use = (p.ivar > 0) & ~prep.telluric_continuum[None, :]
        _, _, cont, _ = nrm(np.where(use, raw, 0.0), use.astype(float))
        return PreparedSpectra(p.wave, raw / cont, np.where(p.ivar > 0, iv * cont**2, 0.0), p.mask, p.lsf_excess,
                               cont, p.spectra, dict(p.meta))

    def scaled(p, s):
        return PreparedSpectra(p.wave, p.flux, p.ivar, p.mask, p.lsf_excess * s, p.cont, p.spectra, dict(p.meta))

    print(f"{idx.size} MILES stars, S/N {a.snr:g}; recorded LSF_EXCESS at 4800/5000/5200 A: "
          + ", ".join(f"{k} {np.round(obs[k].lsf_excess[0, [np.argmin(abs(w - x)) for x in (4800, 5000, 5200)]], 2)}"
                      for k in ("A", "B", "C", "L")))
    models = {"default": load_model("default"),
              "cannon": train_cannon(ts.flux, ts.ivar, ts.labels, ts.label_names, ts.wave)}
    names = ts.label_names

    def labels(model, p, on):
        c = Fitter(model, FitConfig(lsf_excess=on, model_scatter="weights" if model.arch == "cannon" else "errors"))(p)
        return np.stack([np.asarray(c[n], float) for n in names], 1), np.asarray(c["chi2"], float)

    cases = [("A MUSE", "A", False), ("A MUSE", "A", True), ("B MUSE grid, LAMOST LSF", "B", False),
             ("B MUSE grid, LAMOST LSF", "B", True), ("C MUSE LSF, LAMOST grid", "C", False),
             ("C MUSE LSF, LAMOST grid", "C", True), ("A MUSE, flat-weight continuum", "Af", False),
             ("A MUSE, flat-weight continuum", "Af", True)]
    obs["Af"], obs["Lf"] = flat(obs["A"]), flat(obs["L"])
    for mname, model in models.items():
        ref = {v: labels(model, obs[v], False)[0] for v in ("L", "Lf")}  # LAMOST has no excess
        for title, key, on in cases:
            la, _ = labels(model, obs[key], on)
            d = la - ref["Lf" if key.endswith("f") else "L"]
            med, err = np.median(d, 0), 1.2533 * np.std(d, 0) / np.sqrt(d.shape[0])
            print(f"{mname:8s} {title:31s} excess {'on ' if on else 'off'}: MUSE - LAMOST  Teff {med[0]:+6.1f} "
                  f"(+-{err[0]:.1f}) K  logg {med[1]:+.3f}  [Fe/H] {med[2]:+.3f}", flush=True)
        l0, c0 = labels(model, obs["A"], False)
        for s in (0.5, 1.0, 1.5):
            l1, c1 = labels(model, scaled(obs["A"], s), True)
            print(f"{mname:8s} A, excess x {s:.1f}: chi2 / chi2(no excess) {c1.sum() / c0.sum():.4f}, "
                  f"{np.mean(c1 < c0):.0%} of stars fitted better, paired Teff change {np.median(l1[:, 0] - l0[:, 0]):+.1f} K")


if __name__ == "__main__":
    main()
