"""Validation: error calibration of the fitter on the real APOGEE per-pixel network (issue 3).

1000 noisy copies of model spectra per S/N (30 and 100), random labels in the inner 80 % of the
training box, RV uniform in +-300 km/s, Gaussian noise sigma = 1/SNR, APOGEE pixel mask.  The
noise-free spectra are shifted by an independent implementation (per-chip scipy cubic Hermite
spline, exact relativistic Doppler factor: tests/fit_helpers.reference_shift).

Criteria (issue): pulls (fit - truth)/err with std in 0.9-1.1 and |median| < 0.1 per label;
RV better than 1 km/s at S/N 100.

Usage:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/validate_errors.py [--n 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from fit_helpers import as_prepared, load_apogee, reference_shift  # noqa: E402
from musepayne.fit.fitter import FitConfig, Fitter  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shared = Path(os.environ.get("MUSEPAYNE_SHARED", ROOT.parent / "shared" / "data"))
    model, mask, _, _ = load_apogee(shared)
    fitter = Fitter(model, FitConfig(n_threads=args.threads))
    all_ok = True
    for snr, seed in ((30, 101), (100, 102)):
        rng = np.random.default_rng(seed)
        n = args.n
        truth = model.unscale(rng.uniform(-0.4, 0.4, (n, model.n_labels)))
        v = rng.uniform(-300, 300, n)
        obs = reference_shift(model.wave, model.predict(truth), v)
        good = np.isfinite(obs) & ~mask[None, :]
        flux = np.where(good, obs + rng.normal(size=obs.shape) / snr, 0.0)
        ivar = np.where(good, float(snr) ** 2, 0.0)
        t0 = time.perf_counter()
        cat = fitter(as_prepared(model.wave, flux, ivar))
        dt = time.perf_counter() - t0
        st, cnt = np.unique(np.asarray(cat["status"]), return_counts=True)
        print(f"S/N {snr}: {n} spectra in {dt:.1f} s; status {dict(zip(st.tolist(), cnt.tolist()))}")
        ok = np.isfinite(np.asarray(cat["teff"], float))
        names = list(model.label_names) + ["rv"]
        tr = np.c_[truth, v]
        for k, name in enumerate(names):
            pull = ((cat[name] - tr[:, k]) / cat[name + "_err"])[ok]
            sd, med = float(np.std(pull)), float(np.median(pull))
            good_k = 0.9 <= sd <= 1.1 and abs(med) < 0.1
            all_ok &= good_k
            print(f"  {name:7s} pull std {sd:.3f}  median {med:+.3f}  "
                  f"median err {np.median(cat[name + '_err']):.4g}  {'PASS' if good_k else 'FAIL'}")
        dv = np.abs(cat["rv"] - v)[ok]
        line = f"  rv |fit-truth|: median {np.median(dv):.3f}  95% {np.percentile(dv, 95):.3f}  max {dv.max():.3f} km/s"
        if snr == 100:
            good_v = dv.max() < 1.0
            all_ok &= good_v
            line += "  PASS (< 1 km/s)" if good_v else "  FAIL"
        print(line)
    print("ALL PASS" if all_ok else "SOME FAIL")


if __name__ == "__main__":
    main()
