"""Mock prepared spectra of the default model, as MUSE spectra prepared for it, written as a
prepared-spectra file (the input of ``musepayne fit``), for the fit benchmarks.

Every spectrum: the default model at random labels (inner 80 % of its box), relativistic RV
uniform in +-300 km/s (the fitter's own cubic shift), convolved with the LSF excess of MUSE
over the model's LSF (the same ``LSF_EXCESS`` row ``musepayne prepare`` writes for MUSE cubes:
every row has the same profile), Gaussian noise at S/N 50 per pixel, and the standard-mode
mask plus NO_DATA outside MUSE's range (``IVAR = 0`` there).  Written in blocks, so memory is
~ one block of spectra plus the file's arrays in float32.

Usage: PYTHONPATH=src python benchmarks/fit_mock_data.py OUT.fits [--n 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def muse_like_prepared(path, n, seed=0, snr=50.0, block=2000):
    from astropy.table import Table

    from musepayne.fit import FitConfig, Fitter
    from musepayne.flags import flag_value
    from musepayne.instrument.lsf import FWHM_TO_SIGMA, MUSE_LSF
    from musepayne.instrument.wavelength import linear_grid
    from musepayne.io.prepared import PreparedSpectra
    from musepayne.models.model import load_model
    from musepayne.prepare import Preparer
    from musepayne.prepare.resample import build_operator, convolution_matrix

    model = load_model("default")
    prep = Preparer()
    wave = prep.wave
    muse = linear_grid(4749.75, 1.25, 3681)
    op = build_operator(muse, "air", MUSE_LSF, wave, prep.config.target_lsf, "vacuum")
    exc = np.asarray(op.excess_fwhm, np.float64)
    mask_row = prep.fixed_mask | np.where(op.coverage < 0.999, flag_value("NO_DATA"), 0).astype(np.int32)
    K = convolution_matrix(wave, exc * FWHM_TO_SIGMA)[0]
    fitter = Fitter(model, FitConfig(precision="float64"))
    rng = np.random.default_rng(seed)
    flux = np.empty((n, wave.size), np.float32)
    ivar = np.empty((n, wave.size), np.float32)
    labels = np.empty((n, model.n_labels))
    rv = rng.uniform(-300, 300, n)
    from musepayne.flags import EXCLUDING_BITS

    good = (mask_row & EXCLUDING_BITS) == 0
    for a in range(0, n, block):
        b = min(n, a + block)
        s = rng.uniform(-0.4, 0.4, (b - a, model.n_labels))
        f, _, valid = fitter._evaluate(np.c_[s, rv[a:b]], np.full(b - a, -1), want_jac=False)
        f = np.asarray((K @ f.T).T)
        ok = valid & good[None, :]
        flux[a:b] = np.where(ok, f + rng.normal(size=f.shape) / snr, 1.0)
        ivar[a:b] = np.where(ok, snr ** 2, 0.0)
        labels[a:b] = model.unscale(s)
    tab = Table({"stellar_id": [f"m{i:06d}" for i in range(n)], "ra": np.zeros(n), "dec": np.zeros(n),
                 "snr": np.full(n, snr), "status": ["ok"] * n, "reason": [""] * n})
    for k, name in enumerate(model.label_names):
        tab[f"true_{name}"] = labels[:, k]
    tab["true_rv"] = rv
    ps = PreparedSpectra(wave, flux, ivar, np.broadcast_to(mask_row, flux.shape),
                         np.broadcast_to(exc.astype(np.float32), flux.shape),
                         np.broadcast_to(np.ones(1, np.float32), flux.shape), tab, prep.meta())
    ps.write(path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    muse_like_prepared(a.output, a.n, a.seed)
    print(f"wrote {a.n} spectra to {a.output}")
