"""Benchmark: the close-pair test of detection (``Detector.split_pairs`` / ``extract.pairs.fit_pair``).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_detect_pairs.py [--nstars 150 --size 60 --repeats 3]

Simulates broad-band images (4 bands, a Moffat PSF that narrows with wavelength, Gaussian noise) of a field
of ``--nstars`` point sources of random colours, a fifth of them with a companion 0.2-0.6 FWHM away, and
times ``Detector.split_pairs`` on the single-star list (every star with S/N above twice the detection
threshold is fitted as one and as two sources) with the current code and with the baseline, in the same
process, alternating: the baseline integrates each band's PSF and each source separately (one
``psf._integrate`` call per band and source, as before the band-batched ``psf._integrate_bands``).  Prints
the median times, their ratio, and whether the two give identical results (they must: same operations per
pixel).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import musepayne.extract.pairs as pairs
from musepayne.extract.detect import DetectConfig, Detector
from musepayne.extract.psf import MoffatPSF, _integrate

WAVES = np.array([5300.0, 6450.0, 7600.0, 8750.0])


def _design_baseline(params, xx, yy, pos, oversample):
    K = len(params)
    out = np.ones((K, xx.size, len(pos) + 1))
    for b, (fw, be, el, an) in enumerate(params):
        for k, (px, py) in enumerate(pos):
            out[b, :, k] = _integrate(xx - px, yy - py, fw, be, el, an, oversample)
    return out


def _grid_start_baseline(params, xx, yy, t, w, xs, ys, fwhm, min_sep, max_sep, oversample):
    """``pairs._grid_start`` with the per-band integration of the baseline."""
    def one_band(dx, dy, prm, ov):
        return np.stack([_integrate(dx, dy, *p, ov) for p in prm])

    saved = pairs._integrate_bands
    pairs._integrate_bands = one_band
    try:
        return _GRID(params, xx, yy, t, w, xs, ys, fwhm, min_sep, max_sep, oversample)
    finally:
        pairs._integrate_bands = saved


_GRID = pairs._grid_start
_DESIGN = pairs._design


def field(nstars, size, seed):
    rng = np.random.default_rng(seed)
    psf = MoffatPSF(fwhm=(3.8, -0.25), beta=(2.8,), ellip=(0.03,), angle=(20.0,))
    fwhm = psf.fwhm_at(float(np.median(WAVES)))
    x, y = rng.uniform(3, size - 3, nstars), rng.uniform(3, size - 3, nstars)
    flux = 10 ** rng.uniform(3.5, 5.0, nstars)
    colour = rng.uniform(-0.4, 0.4, nstars)
    stars = [(x[i], y[i], flux[i] * (1 + colour[i] * np.linspace(-1, 1, WAVES.size))) for i in range(nstars)]
    for i in rng.choice(nstars, nstars // 5, replace=False):  # companions, not in the list
        s, a = rng.uniform(0.2, 0.6) * fwhm, rng.uniform(0, 2 * np.pi)
        stars.append((x[i] + s * np.cos(a), y[i] + s * np.sin(a), 0.4 * flux[i] * (1 - colour[i] * np.linspace(-1, 1, 4))))
    imgs = np.zeros((WAVES.size, size, size))
    for b, wv in enumerate(WAVES):
        for sx, sy, f in stars:
            imgs[b] += f[b] * psf.image((size, size), sx, sy, wv, oversample=3)
    sigma = 2.0
    imgs += rng.normal(0.0, sigma, imgs.shape)
    snr = flux / (sigma * np.sqrt(4 * np.pi) * fwhm / 2.355)  # rough S/N of the matched filter
    return imgs, np.full(imgs.shape, sigma**2), psf, x, y, snr, fwhm


def run(det, data, baseline):
    pairs._design, pairs._grid_start = (_design_baseline, _grid_start_baseline) if baseline else (_DESIGN, _GRID)
    try:
        t0 = time.perf_counter()
        out = det.split_pairs(data[0], data[1], WAVES, data[2], *data[3:])
        return time.perf_counter() - t0, out
    finally:
        pairs._design, pairs._grid_start = _DESIGN, _GRID


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nstars", type=int, default=150)
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    data = field(a.nstars, a.size, a.seed)
    det = Detector(DetectConfig())
    times = {"baseline": [], "current": []}
    outs = {}
    for _ in range(a.repeats):
        for name in ("baseline", "current"):
            dt, outs[name] = run(det, data, name == "baseline")
            times[name].append(dt)
    tested = int(np.isfinite(np.asarray(outs["current"]["dchi2"], float)).sum())
    same = all(np.array_equal(np.asarray(outs["baseline"][c]), np.asarray(outs["current"][c]), equal_nan=True)
               for c in outs["current"].colnames if c != "split") and \
        np.array_equal(np.asarray(outs["baseline"]["split"]), np.asarray(outs["current"]["split"]))
    mb, mc = np.median(times["baseline"]), np.median(times["current"])
    print(f"{a.nstars} stars in {a.size}x{a.size} px, 4 bands: {tested} stars fitted as one and as two sources, "
          f"{int(np.sum(outs['current']['split']))} split")
    print(f"split_pairs, median of {a.repeats}: baseline (per-band integration) {mb:.2f} s, current {mc:.2f} s, "
          f"ratio {mb / mc:.2f}x; per tested star {1e3 * mc / max(tested, 1):.1f} ms; identical results: {same}")


if __name__ == "__main__":
    main()
