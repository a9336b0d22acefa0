"""Benchmark: the cost of the seed-member error term (``X_err_seed``) in a fit.

The shipped default model (with its seed members) fits the same spectra twice per repeat, in the
same process and alternating: ``FitConfig(seed_errors=True)`` (the default: one network
evaluation per member and spectrum at the solution, its Doppler shift and convolution, one small
solve) and ``seed_errors=False`` (the baseline: the fit without the term).  The spectra are the
model's own at random labels of its training box (inner 80 %), RV uniform in +-300 km/s (shifted
by the fitter's forward model), Gaussian noise at S/N 50, on the model's grid.  Prints per-repeat times, the medians and their
ratio, the labels' agreement (they must be identical) and the median seed spread.

Usage:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_seed_members.py [--n 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from musepayne.fit import FitConfig, Fitter  # noqa: E402
from musepayne.io.prepared import PreparedSpectra  # noqa: E402
from musepayne.models.files import load_model  # noqa: E402
from musepayne.threads import blas_threads  # noqa: E402


def spectra(model, n, snr, seed=0):
    """The model's spectra at random labels and RVs, shifted by the fitter's own forward model."""
    rng = np.random.default_rng(seed)
    theta = np.column_stack([rng.uniform(-0.4, 0.4, (n, model.n_labels)), rng.uniform(-300, 300, n)])
    f, _, _ = Fitter(model, FitConfig(precision="float64"))._evaluate(theta, np.full(n, -1), want_jac=False)
    f = f + rng.standard_normal(f.shape) / snr
    ivar = np.full(f.shape, snr ** 2)
    ivar[:, np.asarray(model.pixel_mask, bool)] = 0.0
    tab = Table({"stellar_id": [f"s{i}" for i in range(n)], "snr": np.full(n, snr), "status": ["ok"] * n,
                 "reason": [""] * n})
    return PreparedSpectra(model.wave, f, ivar, np.zeros(f.shape, np.int32), np.zeros(f.shape),
                           np.ones(f.shape), tab)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--snr", type=float, default=50.0)
    a = ap.parse_args(argv)
    model = load_model("default")
    if not model.seed_members:
        sys.exit("the default model carries no seed members")
    prep = spectra(model, a.n, a.snr)
    fits = {"seed_errors": Fitter(model, FitConfig(seed_errors=True)),
            "baseline": Fitter(model, FitConfig(seed_errors=False))}
    times = {k: [] for k in fits}
    cats = {}
    with blas_threads(1):
        for r in range(a.repeat):
            for k, f in fits.items():
                t0 = time.perf_counter()
                cats[k] = f(prep)
                times[k].append(time.perf_counter() - t0)
            print(f"repeat {r}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in fits))
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{a.n} spectra, {len(model.seed_members)} seed members; medians: "
          + ", ".join(f"{k} {v:.2f} s ({a.n / v:.0f} spectra/s)" for k, v in med.items()))
    print(f"cost of the seed term: x{med['seed_errors'] / med['baseline']:.3f} of the baseline fit time")
    same = all(np.array_equal(np.asarray(cats["seed_errors"][n]), np.asarray(cats["baseline"][n]), equal_nan=True)
               for n in ("teff", "logg", "fe_h", "rv", "teff_err_stat"))
    print(f"labels, RV and stat errors identical with and without the term: {same}")
    ok = np.asarray(cats["seed_errors"]["status"]) == "converged"
    print("median seed spread (converged rows): " + ", ".join(
        f"{n} {np.median(np.asarray(cats['seed_errors'][n + '_err_seed'])[ok]):.3g}" for n in ("teff", "logg", "fe_h")))


if __name__ == "__main__":
    main()
