"""Throughput of ``prepare`` for MUSE -> LAMOST (3681 -> 3909 px), batched.

Run:  python benchmarks/bench_prepare.py [--n 2000] [--repeats 5]

Prints spectra/s (median of repeats) on one core (BLAS threads pinned to 1),
the time split by step, and two baselines run in the same process on the same
spectra:

* ``per-spectrum``: the same Preparer called one spectrum at a time;
* ``naive``: a typical script: per spectrum, a variable-width Gaussian
  convolution done chunk-wise with ``scipy.ndimage.gaussian_filter1d``,
  ``np.interp`` onto the LAMOST grid (what we avoid for flux) and the exact
  dense 50 A continuum.  Only its speed is compared.

Target (issue 2): >= 1000 spectra/s on one core.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402

from musepayne.instrument.lsf import LAMOST_LSF, MUSE_LSF  # noqa: E402
from musepayne.instrument.wavelength import air_to_vacuum, lamost_wavelength  # noqa: E402
from musepayne.io.spectra import SpectrumSet  # noqa: E402
from musepayne.prepare.preparer import Preparer  # noqa: E402
from musepayne.simulate.toyspec import muse_grid, toy_spectrum  # noqa: E402


def make_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    w = muse_grid()
    base = np.vstack([toy_spectrum(w, rv_kms=rv) for rv in rng.uniform(-300, 300, 16)])
    flux = base[rng.integers(0, 16, n)] * 1e4
    sig = flux / rng.uniform(20, 200, (n, 1))
    flux = flux + rng.normal(size=flux.shape) * sig
    meta = Table({"stellar_id": np.arange(n).astype(str), "ra": np.zeros(n), "dec": np.zeros(n),
                  "source": ["bench"] * n, "instrument": ["muse"] * n})
    return SpectrumSet(w, flux, sig**2, "air", MUSE_LSF, meta)


def naive_prepare(s: SpectrumSet):
    from scipy.ndimage import gaussian_filter1d

    out_w = lamost_wavelength()
    w_vac = air_to_vacuum(s.wave)
    W = np.exp(-0.5 * ((out_w[:, None] - out_w[None, :]) / 50.0) ** 2)
    res = []
    for f, v in zip(s.flux, s.variance):
        sm = np.empty_like(f)
        for chunk in np.array_split(np.arange(f.size), 20):
            lam = s.wave[chunk].mean()
            k2 = LAMOST_LSF.sigma(lam) ** 2 - MUSE_LSF.sigma(lam) ** 2
            sig_pix = np.sqrt(max(k2, 0.0)) / 1.25
            sm[chunk] = gaussian_filter1d(f, sig_pix)[chunk] if sig_pix > 0.1 else f[chunk]
        fo = np.interp(out_w, w_vac, sm, left=np.nan, right=np.nan)
        iv = np.interp(out_w, w_vac, 1 / v, left=0, right=0)
        ok = np.isfinite(fo)
        iv = np.where(ok, iv, 0.0)
        cont = (W @ (np.where(ok, fo, 0) * iv)) / (W @ iv)
        res.append(fo / cont)
    return np.array(res)


def timed(fn, repeats):
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return np.median(t), t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    s = make_batch(args.n)
    prep = Preparer()
    prep(s.select(np.arange(2)))  # build the cached operator once (cost reported separately)
    t0 = time.perf_counter()
    Preparer()(s.select([0]))
    t_first = time.perf_counter() - t0

    med, all_t = timed(lambda: prep(s), args.repeats)
    rate = args.n / med
    print(f"prepare, batched: {args.n} spectra MUSE 3681 px -> LAMOST 3909 px")
    print(f"  median {med:.3f} s per batch -> {rate:,.0f} spectra/s on one core "
          f"(runs: {', '.join(f'{x:.3f}' for x in all_t)})")
    print(f"  first call incl. operator build: {t_first:.3f} s")

    # time split, using the same internals on the same batch, in the Preparer's chunks
    op = prep.operator(s.wave, s.frame, s.lsf)
    steps = dict.fromkeys(["validate", "resolution+rebin (sparse)", "variance propagation",
                           "bad-pixel propagation", "continuum normalisation"], 0.0)
    for i0 in range(0, args.n, prep.chunk):
        flux = s.flux[i0:i0 + prep.chunk]
        var = s.variance[i0:i0 + prep.chunk]
        t0 = time.perf_counter(); bad = ~np.isfinite(flux) | ~(var > 0); steps["validate"] += time.perf_counter() - t0
        t0 = time.perf_counter(); fo = op.apply(flux); steps["resolution+rebin (sparse)"] += time.perf_counter() - t0
        t0 = time.perf_counter(); vo = op.apply_variance(var); steps["variance propagation"] += time.perf_counter() - t0
        t0 = time.perf_counter(); op.bad_fraction(bad); steps["bad-pixel propagation"] += time.perf_counter() - t0
        iv = np.where(vo > 0, 1 / np.where(vo > 0, vo, 1), 0.0)
        t0 = time.perf_counter(); prep.normalize(fo, iv); steps["continuum normalisation"] += time.perf_counter() - t0
    tot = sum(steps.values())
    print(f"  split (sum over chunks of {prep.chunk}; the rest of the {med:.3f} s is masks, S/N, bookkeeping):")
    for k, v in steps.items():
        print(f"    {k:28s} {v:7.3f} s  {100 * v / tot:5.1f} %")

    nb = min(200, args.n)
    sub = s.select(np.arange(nb))
    med1, _ = timed(lambda: [prep(sub.select([i])) for i in range(nb)], max(1, args.repeats // 2))
    rate1 = nb / med1
    print(f"baseline per-spectrum calls ({nb} spectra): {rate1:,.0f} spectra/s -> batched is {rate / rate1:.1f}x")
    nn = min(100, args.n)
    subn = s.select(np.arange(nn))
    medn, _ = timed(lambda: naive_prepare(subn), max(1, args.repeats // 2))
    raten = nn / medn
    print(f"baseline naive script ({nn} spectra): {raten:,.0f} spectra/s -> batched is {rate / raten:.1f}x")
    print(f"target >= 1000 spectra/s: {'met' if rate >= 1000 else 'NOT met'} ({rate:,.0f})")


if __name__ == "__main__":
    main()
