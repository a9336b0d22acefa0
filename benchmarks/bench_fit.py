"""Benchmark: batched fitter vs per-spectrum scipy curve_fit, same process, same spectra.

Two models:
  * apogee  -- the real 7214-px per-pixel Payne network (../shared/data/payne_apogee), 5 labels + RV
  * lamost  -- a 3909-px LAMOST-grid MLP of The Payne's size (5 -> 300 -> 300 -> 3909, random weights
               with line-like outputs: musepayne.testing), 5 labels + RV

Mock spectra: random labels in the inner 80 % of the box, RV uniform in +-300 km/s, Gaussian noise
at S/N 50; masked pixels as the APOGEE mask for the APOGEE model.

Baselines: scipy.optimize.curve_fit (method 'trf', same bounds), one spectrum at a time, on the
*same* forward model (emulator + the same relativistic cubic shift), numerical Jacobian (curve_fit
default), started at the box centre and at the coarse RV of our first stage (generous: the
baseline's own RV search is not timed).  Two versions differ only in how the emulator is evaluated
for one spectrum:
  * "Payne-style" -- The Payne's own numpy expressions (per-pixel: einsum over w_array_0 in its
    (pix, hidden, label) layout and 1/(1+exp(-x)); MLP: dot products and leaky ReLU), i.e. the
    per-spectrum fitting users run today, independent of this package's model code;
  * "musepayne predict" -- this package's SpectralModel.predict (whose single-spectrum speed
    improves with this package's optimisations).
Accuracy: rms of (fit - truth)/sigma for ours and the baseline.

Usage:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_fit.py [--n 1000] [--n-base 40] [--repeat 3]
Ours runs with FitConfig(n_threads=1) and (n_threads=2) (chunks in threads); the baselines are one
spectrum at a time in one thread.  OMP_NUM_THREADS=1 keeps BLAS from oversubscribing the cores.
Prints one line per run and a summary with medians: wall-clock rates (threads=2 uses both cores
of the machine while the baseline uses one) and per-core rates from CPU time (the like-for-like
ratio).
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

from fit_helpers import as_prepared  # noqa: E402
from musepayne.fit.fitter import FitConfig, Fitter, shift_weights  # noqa: E402


def mock(fitter, n, snr, rng, mask=None):
    model = fitter.model
    s = rng.uniform(-0.4, 0.4, (n, model.n_labels))
    v = rng.uniform(-300, 300, n)
    f, _, valid = fitter.with_config(precision="float64")._evaluate(np.c_[s, v], np.full(n, -1), want_jac=False)
    flux = np.where(valid, f + rng.normal(size=f.shape) / snr, 0.0)
    ivar = np.where(valid, snr**2, 0.0)
    if mask is not None:
        ivar[:, mask] = 0.0
    return model.unscale(s), v, as_prepared(model.wave, flux, ivar)


def payne_style_predict(model):
    """One-spectrum emulator with The Payne's own expressions (physical labels in, flux out).
    Weights are cast to float64 once here, so no per-call dtype conversion slows the baseline."""
    from musepayne.models.model import PerPixelPayne

    if isinstance(model, PerPixelPayne):
        w0, b0, w1, b1 = (np.asarray(a, np.float64) for a in (model.w0, model.b0, model.w1, model.b1))

        def predict(x):
            s = (np.asarray(x, np.float64) - model.x_min) / (model.x_max - model.x_min) - 0.5
            inside = np.einsum("ijk,k->ij", w0, s) + b0
            return np.einsum("ij,ij->i", w1, 1.0 / (1.0 + np.exp(-inside))) + b1
        return predict
    ws = [np.asarray(w, np.float64) for w in model.weights]
    bs = [np.asarray(b, np.float64) for b in model.biases]
    slope = model.negative_slope

    def predict(x):
        h = (np.asarray(x, np.float64) - model.x_min) / (model.x_max - model.x_min) - 0.5
        for w, b in zip(ws[:-1], bs[:-1]):
            h = np.dot(w, h) + b
            h = np.where(h > 0, h, slope * h)
        return np.dot(ws[-1], h) + bs[-1]
    return predict


def curve_fit_one(fitter, flux, ivar, v0, predict, K=None):
    """One spectrum with scipy's curve_fit; ``K``: LSF-excess operator applied after the shift."""
    from scipy.optimize import curve_fit

    model = fitter.model
    lnw = fitter.lnw
    pix = np.flatnonzero(ivar > 0)
    # drop pixels that could leave the model grid within +-30 km/s of v0 (curve_fit cannot mask)
    _, _, _, ok_lo = shift_weights(lnw, lnw, v0 - 30, fitter.segments)
    _, _, _, ok_hi = shift_weights(lnw, lnw, v0 + 30, fitter.segments)
    pix = pix[(ok_lo[0] & ok_hi[0])[pix]]

    def fmodel(_, *p):
        f_rest = predict(np.array(p[:-1]))
        j0, c, _, _ = shift_weights(lnw, lnw, p[-1], fitter.segments)
        fo = sum(c[0, :, k] * f_rest[j0[0] + k] for k in range(4))
        if K is not None:
            fo = K @ fo
        return fo[pix]

    p0 = np.r_[(model.x_min + model.x_max) / 2, v0]
    lo = np.r_[model.x_min, -600.0]
    hi = np.r_[model.x_max, 600.0]
    popt, pcov = curve_fit(fmodel, pix, flux[pix], p0=p0, sigma=1 / np.sqrt(ivar[pix]), absolute_sigma=True,
                           bounds=(lo, hi), method="trf", x_scale=np.r_[model.x_max - model.x_min, 10.0])
    return popt, np.sqrt(np.diag(pcov))


CONFIGS = {"default": {}, "fast(n_starts=1)": {"n_starts": 1}}


def run(name, model, n, n_base, repeat, mask=None, seed=0, threads=(1, 2)):
    fitter = Fitter(model, FitConfig())
    rng = np.random.default_rng(seed)
    truth, v, prep = mock(fitter, n, 50, rng, mask)
    names = list(model.label_names) + ["rv"]
    # interleaved: each repeat times every configuration of ours and then the baseline, so a
    # change of machine load between measurements affects both; wall and CPU time are recorded
    # (CPU time = this process's own work, the fairer figure on a shared machine)
    v0 = fitter._coarse_rv(np.nan_to_num(prep.flux[:n_base]), prep.ivar[:n_base])
    baselines = {"Payne-style": payne_style_predict(model), "musepayne predict": lambda x: model.predict(x)[0]}
    rates, cpu_rates, cats = {}, {}, {}
    base_wall, base_cpu, base_res = {}, {}, {}
    for r in range(repeat):
        for cname, extra in CONFIGS.items():
            for nt in threads:
                ft = fitter.with_config(n_threads=nt, **extra)
                key = f"{cname} threads={nt}"
                t0, c0 = time.perf_counter(), time.process_time()
                cats[cname] = ft(prep)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                rates.setdefault(key, []).append(n / dt)
                cpu_rates.setdefault(key, []).append(n / dc)
                print(f"  {name} {key} run {r + 1}: {n} spectra in {dt:.2f} s wall ({n / dt:.1f}/s), "
                      f"{dc:.2f} s CPU ({n / dc:.1f}/s) (load {os.getloadavg()[0]:.2f})", flush=True)
        for bname, predict in baselines.items():
            t0, c0 = time.perf_counter(), time.process_time()
            base_res[bname] = [curve_fit_one(fitter, prep.flux[i], prep.ivar[i], v0[i], predict) for i in range(n_base)]
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            base_wall.setdefault(bname, []).append(n_base / dt)
            base_cpu.setdefault(bname, []).append(n_base / dc)
            print(f"  {name} curve_fit ({bname}) run {r + 1}: {n_base} spectra in {dt:.2f} s wall "
                  f"({n_base / dt:.1f}/s), {dc:.2f} s CPU ({n_base / dc:.1f}/s)", flush=True)
    res = base_res["Payne-style"]
    base, base_err = np.array([x[0] for x in res]), np.array([x[1] for x in res])
    cat = cats["default"]
    tr = np.c_[truth, v]
    ours = np.column_stack([cat[c] for c in names])
    ours_err = np.column_stack([cat[c + "_err"] for c in names])
    z_base = (base - tr[:n_base]) / base_err
    d_ours_base = np.abs(ours[:n_base] - base) / ours_err[:n_base]
    for cname, c in cats.items():
        zz = (np.column_stack([c[k] for k in names]) - tr) / np.column_stack([c[k + "_err"] for k in names])
        print(f"  {name} accuracy rms z (fit-truth)/sigma, {cname:17s} ({n} spectra): "
              + " ".join(f"{k}={np.sqrt(np.mean(zz[:, j] ** 2)):.3f}" for j, k in enumerate(names)))
    print(f"  {name} accuracy rms z (fit-truth)/sigma, curve_fit ({n_base} spectra): "
          + " ".join(f"{k}={np.sqrt(np.mean(z_base[:, j] ** 2)):.2f}" for j, k in enumerate(names)))
    chi_better = []
    f64 = fitter.with_config(precision="float64")
    for i in range(n_base):
        th = np.vstack([np.r_[model.scale(ours[i, :-1]), ours[i, -1]], np.r_[model.scale(base[i, :-1]), base[i, -1]]])
        fo, _, valid = f64._evaluate(th, np.full(2, -1), want_jac=False)
        chi, _, _ = f64._chi2(fo, valid, np.nan_to_num(prep.flux[[i, i]]), prep.ivar[[i, i]])
        chi_better.append(chi[0] - chi[1])
    chi_better = np.array(chi_better)
    print(f"  {name} chi2(ours) - chi2(curve_fit) over {n_base} spectra: median {np.median(chi_better):.4f}, "
          f"max {chi_better.max():.4f} (negative: ours lower); max |ours - curve_fit| / sigma "
          f"{np.max(d_ours_base):.3f}; status: {dict(zip(*np.unique(np.asarray(cat['status']), return_counts=True)))}")
    med = {k: float(np.median(x)) for k, x in rates.items()}
    for bname in baselines:
        rb, rbc = float(np.median(base_wall[bname])), float(np.median(base_cpu[bname]))
        print(f"  {name} BASELINE curve_fit ({bname}), one spectrum at a time: wall {rb:.1f} spectra/s, "
              f"CPU {rbc:.1f} spectra/s (median of {repeat})")
    rb_p, rbc_p = (float(np.median(x["Payne-style"])) for x in (base_wall, base_cpu))
    rb_m, rbc_m = (float(np.median(x["musepayne predict"])) for x in (base_wall, base_cpu))
    for key, mr in med.items():
        mc = float(np.median(cpu_rates[key]))
        print(f"  {name} SUMMARY {key}: wall {mr:.1f} spectra/s (median of {repeat}), ratio to curve_fit "
              f"Payne-style {mr / rb_p:.1f}x / musepayne-predict {mr / rb_m:.1f}x | per core (CPU time) "
              f"{mc:.1f} spectra/s, ratio {mc / rbc_p:.1f}x / {mc / rbc_m:.1f}x", flush=True)
    return med, rb_p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-base", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["apogee", "lamost"], default=None)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if args.only in (None, "apogee"):
        shared = Path(os.environ.get("MUSEPAYNE_SHARED", ROOT.parent / "shared" / "data"))
        from fit_helpers import load_apogee

        model, mask, _, _ = load_apogee(shared)
        run("apogee-perpixel-7214", model, args.n, args.n_base, args.repeat, mask=mask)
    if args.only in (None, "lamost"):
        from musepayne.instrument.wavelength import lamost_wavelength
        from musepayne.testing import toy_mlp_model

        model = toy_mlp_model(lamost_wavelength(), hidden=(300, 300))
        run("lamost-mlp-3909", model, args.n, args.n_base, args.repeat)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
