"""Benchmark: PSF extraction of simulated MUSE WFM cubes, one cube or a scaling series.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_extract.py            # 300x300x3681, 2000 stars
    PYTHONPATH=src python benchmarks/bench_extract.py --size 150 --nlayers 1000 --nstars 500   # quicker
    # scaling: time and peak memory against star count and layers, ratios and growth exponents
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --size 150 \
        --nstars 500,1000,2000,4000,8000 --nlayers 250,500,1000
    # compare fluxes with an earlier version's run on the same cubes (--keep, then --cubes/--compare)
    PYTHONPATH=/old/src python benchmarks/bench_extract.py --size 150 --nstars 2000,8000 --nlayers 1000 \
        --keep --tmpdir /tmp/ref        # prints the folder it kept, e.g. /tmp/ref/bench_extract_xxx
    PYTHONPATH=src python benchmarks/bench_extract.py --size 150 --nstars 2000,8000 --nlayers 1000 \
        --cubes /tmp/ref/bench_extract_xxx --compare /tmp/ref/bench_extract_xxx
    # also check the solver path against the exact sparse-product path on one block of each run
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --size 150 --nlayers 250 \
        --nstars 2000,8000 --check-solver

With several star counts and/or layer counts (comma-separated), every star
count is run at the largest layer count and every layer count at the star
count nearest 2000; each extraction runs in its own child process (its own
peak memory) and the summary gives each run's time, steps, peak RSS, the
ratio to the 2000-star (or largest-layer) run of the same series and the
local growth exponent d ln t / d ln n.  All in one invocation, so the ratios
come from one machine state (the load is printed before and after).  With
``--check-solver`` each run also solves its middle block through the sparse
normal-matrix product (the path of fields with at most
``musepayne.extract.linsolve.TILED_MIN`` unknowns) and prints the largest
flux and error differences against the path the extraction took, relative to
max(|flux|, error).

Simulates the cube in streamed blocks into a temporary folder (deleted at the
end unless --keep), then runs the extraction in a child process (so its peak
memory is its own) and prints: wall time split by step, peak RSS, accuracy
against the truth, and a baseline run in the same child process: a per-layer
solve without factorisation reuse (design matrix at that layer's wavelength,
weights from that layer's STAT, its own normal matrix, factorisation and
error diagonal) on a subset of layers, extrapolated to
the cube, with the ratio.  Also prints the machine load (shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


class MemSampler:
    """Peak anonymous (heap) and file-backed (memory-mapped cube pages) RSS from /proc, sampled."""

    def __init__(self, every=0.2):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _read(self):
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    k = line.split(":")[0]
                    if k in self.peak:
                        self.peak[k] = max(self.peak[k], int(line.split()[1]))
        except OSError:
            pass

    def _run(self, every):
        while not self._stop.wait(every):
            self._read()

    def stop(self):
        self._read()
        self._stop.set()
        self._t.join()
        return {k + "_peak_MiB": round(v / 1024.0, 1) for k, v in self.peak.items()}


def child(args):
    import scipy.sparse as sp
    from astropy.io import fits
    from astropy.table import Table

    from musepayne.extract.extractor import ExtractConfig, Extractor, _read_block, factorise
    from musepayne.io.cube import open_cube

    cube, cat, truth = args.cube, args.cube.replace(".fits", "_sources.csv"), args.cube.replace(".fits", "_truth.fits")
    out = cube.replace(".fits", "_spectra.fits")
    ex = Extractor(ExtractConfig(block=args.block))
    mem = MemSampler()
    t0, c0 = time.perf_counter(), time.process_time()
    res = ex(cube, cat)
    t_extract, cpu_extract = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    res.write(out)
    t_write = time.perf_counter() - t1
    peak_extract = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # MiB (Linux: KiB)
    mem_peaks = mem.stop()

    # accuracy against the truth
    tr = Table.read(truth, "TRUTH")
    tf = fits.getdata(truth, "TRUE_FLUX").astype(float)
    from scipy.spatial import cKDTree

    xy = np.column_stack([tr["x"], tr["y"]])
    nn = cKDTree(xy).query(xy, 2)[0][:, 1]
    fw = res.psf.fwhm_at(float(np.median(res.wave)))
    s = res.sources
    ok = np.asarray(s["status"]) == "ok"
    bright = np.asarray(tr["mag"]) < np.percentile(np.asarray(tr["mag"])[np.asarray(tr["in_field"])], 90)
    iso = ok & bright & (nn >= fw)
    rel = (np.nansum(res.flux, 1) - tf.sum(1)) / tf.sum(1)
    resid = res.flux - tf
    snr_emp = np.nanmedian(tf, 1) / np.nanstd(resid, 1)
    pull = np.nanstd(resid / res.err, 1)

    summary = {
        "n_layers": int(res.wave.size),
        "n_stars": int(len(s)),
        "t_extract_s": round(t_extract, 2),
        "cpu_extract_s": round(cpu_extract, 2),
        "t_write_s": round(t_write, 2),
        "steps_s": {k: round(v, 2) for k, v in res.timings.items()},
        "peak_rss_extract_MiB": round(peak_extract, 1),
        "memory_extract": mem_peaks,
        "transform": {"offset": res.transform.offset, "rotation": res.transform.rotation,
                      "scale": res.transform.scale, "rms_px": res.transform.rms},
        "psf": res.psf.describe(),
        "status_counts": {k: int(v) for k, v in zip(*np.unique(np.asarray(s["status"]), return_counts=True))},
        "n_isolated_bright": int(iso.sum()),
        "isolated_median_abs_flux_err": round(float(np.median(np.abs(rel[iso]))), 5),
        "isolated_median_pull_std": round(float(np.median(pull[iso])), 3),
        "isolated_median_snr_reported_over_empirical": round(float(np.median(np.asarray(s["snr"])[iso] / snr_emp[iso])), 3),
        "blended_median_abs_flux_err": round(float(np.median(np.abs(rel[ok & (nn < fw)]))), 5),
    }
    if args.check_solver:
        summary["solver_check"] = _check_solver(ex, res, cube)
    if args.compare:
        summary["compare"] = _compare(res, os.path.join(args.compare, os.path.basename(out)))
    if args.baseline_layers <= 0:
        return summary
    # baseline: per-layer solve without reuse, on a subset of layers of a middle block
    c = open_cube(cube)
    nz, ny, nx = c.shape
    x, y = np.asarray(s["x"]), np.asarray(s["y"])
    rmax = min(ex.config.psf_radius * float(np.max(res.psf.params(c.wave)[0])), ex.config.psf_radius_max_px)
    cols = np.nonzero((x > -rmax) & (x < nx - 1 + rmax) & (y > -rmax) & (y < ny - 1 + rmax))[0]
    valid = np.isfinite(c.data_block(nz // 2, nz // 2 + 1)[0])
    i0 = nz // 2
    i1 = min(nz, i0 + args.baseline_layers)
    d, st, good, mask, _ = _read_block(c, i0, i1, valid)
    tb = time.perf_counter()
    base_flux = []
    for j in range(i1 - i0):
        A = ex._design(res.psf, x, y, cols, float(c.wave[i0 + j]), (ny, nx), mask)
        w = np.where(mask.ravel(), 1.0 / np.where(mask.ravel(), st[j].ravel(), 1.0), 0.0)
        AW = A.multiply(w[:, None]).tocsc()
        N = (A.T @ AW).tocsc()
        N = N + sp.diags(1e-9 * N.diagonal() + (N.diagonal() <= 0))
        # same factorisation + error diagonal as the extraction
        solve, ninv_diag = factorise(N, ex.config.dense_max, border=np.arange(cols.size, N.shape[0]))
        xs = solve(np.asarray(AW.T @ np.where(mask.ravel(), d[j].ravel(), 0.0)).ravel())
        base_flux.append(xs[: cols.size])
    t_base = (time.perf_counter() - tb) / (i1 - i0)
    c.close()
    base_flux = np.array(base_flux).T
    diff = np.nanmedian(np.abs(base_flux - res.flux[cols, i0:i1]) / np.maximum(res.err[cols, i0:i1], 1e-30))
    flux_steps = sum(res.timings.get(k, 0.0) for k in ("read", "design", "factorise", "solve"))
    summary.update({
        "shape": [nz, ny, nx],
        "n_fitted_columns": int(cols.size),
        "per_layer_blocked_s": round(flux_steps / nz, 5),
        "per_layer_baseline_s": round(t_base, 5),
        "baseline_ratio": round(t_base / (flux_steps / nz), 1),
        "baseline_extrapolated_full_cube_s": round(t_base * nz, 1),
        "baseline_vs_blocked_median_abs_diff_in_sigma": round(float(diff), 4),
    })
    return summary


def _compare(res, ref_path):
    """Fluxes and errors of this run against a reference run's spectra file (same cube, e.g. made
    by an earlier version with ``--keep``): largest flux difference relative to max(|flux|, error),
    its 99.9th percentile, and the largest relative error difference."""
    from astropy.io import fits

    if not os.path.exists(ref_path):
        return {"reference": ref_path, "missing": True}
    with fits.open(ref_path) as h:
        f0, e0 = h["FLUX"].data.astype(float), h["ERR"].data.astype(float)
    f1, e1 = res.flux.astype(float), res.err.astype(float)
    fin = np.isfinite(f0) & np.isfinite(f1)
    rel = np.abs(f1[fin] - f0[fin]) / np.maximum(np.abs(f0[fin]), e0[fin])
    erel = np.abs(e1[fin] / e0[fin] - 1)
    return {"reference": ref_path, "same_finite": bool(np.array_equal(np.isfinite(f0), np.isfinite(f1))),
            "max_rel_flux_diff": float(rel.max()), "p999_rel_flux_diff": float(np.percentile(rel, 99.9)),
            "max_rel_err_diff": float(erel.max()), "median_rel_err_diff": float(np.median(erel))}


def _check_solver(ex, res, cube):
    """Middle block solved through both normal-matrix paths (sparse product / tiled dense): largest
    differences of the fluxes (relative to max(|flux|, err)) and of diag(N^-1) (relative)."""
    from musepayne.extract import linsolve
    from musepayne.extract.extractor import _read_block, factorise
    from musepayne.io.cube import open_cube

    c = open_cube(cube)
    nz, ny, nx = c.shape
    x, y = np.asarray(res.sources["x"]), np.asarray(res.sources["y"])
    rmax = min(ex.config.psf_radius * float(np.max(res.psf.params(c.wave)[0])), ex.config.psf_radius_max_px)
    cols = np.nonzero((x > -rmax) & (x < nx - 1 + rmax) & (y > -rmax) & (y < ny - 1 + rmax))[0]
    valid = np.isfinite(c.data_block(nz // 2, nz // 2 + 1)[0])
    i0 = (nz // 2 // ex.config.block) * ex.config.block
    i1 = min(nz, i0 + ex.config.block)
    d, st, good, mask, _ = _read_block(c, i0, i1, valid)
    c.close()
    A = ex._design(res.psf, x, y, cols, float(np.mean(res.wave[i0:i1][good])), (ny, nx), mask)
    w = np.zeros(ny * nx)
    sg = st[good].reshape(good.sum(), -1)
    w[mask.ravel()] = 1.0 / np.median(sg[:, mask.ravel()], axis=0)
    B = np.asarray(A.multiply(w[:, None]).T @ np.where(mask.ravel()[None, :], d[good].reshape(good.sum(), -1), 0.0).T)
    out, saved = {}, linsolve.TILED_MIN
    try:
        for name, lim in (("sparse", 10**9), ("tiled", 0)):
            linsolve.TILED_MIN = lim
            t = time.perf_counter()
            N, _ = linsolve.normal_matrix(A, w, (ny, nx), ex.config.ridge)
            t1 = time.perf_counter()
            solve, dg = factorise(N, ex.config.dense_max, border=np.arange(cols.size, A.shape[1]))
            out[name] = (solve(B)[: cols.size], dg[: cols.size], round(t1 - t, 2), round(time.perf_counter() - t1, 2))
    finally:
        linsolve.TILED_MIN = saved
    (xs, ds, *ts), (xt, dt, *tt) = out["sparse"], out["tiled"]
    sig = np.sqrt(ds)[:, None]  # flux error (weights are 1 / the block's median variance)
    return {"max_rel_flux_diff": float(np.max(np.abs(xt - xs) / np.maximum(np.abs(xs), sig))),
            "max_rel_ninv_diag_diff": float(np.max(np.abs(dt / ds - 1))),
            "sparse_normal_s": ts[0], "sparse_factorise_s": ts[1], "tiled_normal_s": tt[0], "tiled_factorise_s": tt[1]}


def _simulate(size, nlayers, nstars, seed, folder, cubes=None):
    from musepayne.simulate import SimulateConfig, Simulator

    cube = os.path.join(folder, f"cube_{size}_{nlayers}_{nstars}.fits")
    if cubes and os.path.exists(os.path.join(cubes, os.path.basename(cube))):  # an earlier run's cube: link it
        for suffix in (".fits", "_sources.csv", "_truth.fits"):
            os.symlink(os.path.join(os.path.abspath(cubes), os.path.basename(cube).replace(".fits", suffix)),
                       cube.replace(".fits", suffix))
        print(f"cube {size}x{size}x{nlayers}, {nstars} stars (seed {seed}) taken from {cubes}", flush=True)
        return cube, 0.0
    cfg = SimulateConfig(nx=size, ny=size, nlayers=nlayers, nstars=nstars, seed=seed, king_rc=size / 4.0,
                         psf_step=100)
    t0 = time.perf_counter()
    Simulator(cfg).write(cube)
    t_sim = time.perf_counter() - t0
    print(f"simulated {size}x{size}x{nlayers}, {nstars} stars: {t_sim:.1f} s, {os.path.getsize(cube) / 1e9:.2f} GB",
          flush=True)
    return cube, t_sim


def _run_child(cube, args, baseline_layers):
    r = subprocess.run([sys.executable, __file__, "--child", cube, "--block", str(args.block),
                        "--baseline-layers", str(baseline_layers)] + (["--check-solver"] if args.check_solver else [])
                       + (["--compare", args.compare] if args.compare else []),
                       capture_output=True, text=True)
    if r.returncode:
        print(r.stderr)
        sys.exit(r.returncode)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _series(name, runs, ref):
    """Print one scaling series: time, steps, peak memory, ratio to ``ref`` and local exponents."""
    import math

    print(f"\n{name}: time and peak RSS (ratio: to the {ref} run of this series; exponent: d ln t / d ln {name})")
    keys = [k for k in ("transform", "psf_fit", "geometry", "design", "factorise", "solve", "hidden", "read")
            if k in runs[0][1]["steps_s"]]
    print(f"{name:>8} {'t [s]':>8} {'ratio':>6} {'exp':>5} {'cpu [s]':>8} {'ratio':>6} {'RSS MiB':>8}  "
          + " ".join(f"{k:>9}" for k in keys))
    c_ref = dict(runs)[ref].get("cpu_extract_s", float("nan"))
    t_ref = dict(runs)[ref]["t_extract_s"]
    prev = None
    for v, r in runs:
        t = r["t_extract_s"]
        ex = f"{math.log(t / prev[1]) / math.log(v / prev[0]):5.2f}" if prev else "    -"
        chk, cmp = r.get("solver_check"), r.get("compare")
        cpu = r.get("cpu_extract_s", float("nan"))
        print(f"{v:>8} {t:8.1f} {t / t_ref:6.2f} {ex} {cpu:8.1f} {cpu / c_ref:6.2f} {r['peak_rss_extract_MiB']:8.0f}  "
              + " ".join(f"{r['steps_s'].get(k, 0.0):9.1f}" for k in keys)
              + (f"  max rel flux diff vs sparse path {chk['max_rel_flux_diff']:.1e}, "
                 f"diag(N^-1) {chk['max_rel_ninv_diag_diff']:.1e}" if chk else "")
              + (f"  vs reference: max rel flux diff {cmp['max_rel_flux_diff']:.1e} (99.9 % "
                 f"{cmp['p999_rel_flux_diff']:.1e}), err max {cmp['max_rel_err_diff']:.1e}"
                 if cmp and not cmp.get("missing") else ""))
        prev = (v, t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--nlayers", default="3681", help="layers, or a comma-separated list (scaling series)")
    ap.add_argument("--nstars", default="2000", help="stars, or a comma-separated list (scaling series)")
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--baseline-layers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--check-solver", action="store_true",
                    help="compare the solver path with the exact sparse-product path on one block per run")
    ap.add_argument("--compare", default=None,
                    help="folder of an earlier --keep run (same sizes and seed): compare each run's fluxes and "
                         "errors with its spectra there (e.g. made by the previous version of the code)")
    ap.add_argument("--cubes", default=None,
                    help="folder of an earlier --keep run: take the simulated cubes from there when present")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.cube = args.child
        print(json.dumps(child(args)))
        return
    stars = [int(v) for v in str(args.nstars).split(",")]
    layers = [int(v) for v in str(args.nlayers).split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_extract_", dir=args.tmpdir)
    if args.keep:
        print(f"keeping cubes and spectra in {tmp}", flush=True)
    try:
        load0 = os.getloadavg()
        if len(stars) == 1 and len(layers) == 1:
            cube, t_sim = _simulate(args.size, layers[0], stars[0], args.seed, tmp, args.cubes)
            res = _run_child(cube, args, args.baseline_layers)
            res["t_simulate_s"] = round(t_sim, 1)
            res["load_before"] = [round(v, 2) for v in load0]
            res["load_after"] = [round(v, 2) for v in os.getloadavg()]
            print(json.dumps(res, indent=1))
            m = res["memory_extract"]
            print(f"extraction {res['t_extract_s']:.1f} s (+ write {res['t_write_s']:.1f} s), "
                  f"peak RSS {res['peak_rss_extract_MiB']:.0f} MiB (anonymous {m['RssAnon_peak_MiB']:.0f} MiB, "
                  f"file-backed cube pages {m['RssFile_peak_MiB']:.0f} MiB); per layer "
                  f"{res['per_layer_blocked_s']*1e3:.1f} ms vs per-layer baseline "
                  f"{res['per_layer_baseline_s']*1e3:.1f} ms (x{res['baseline_ratio']})")
            return
        nl_max = max(layers)
        n_ref = min(stars, key=lambda v: abs(v - 2000))
        by_stars, by_layers = [], []
        for ns in sorted(stars):
            cube, _ = _simulate(args.size, nl_max, ns, args.seed, tmp, args.cubes)
            r = _run_child(cube, args, 0)
            print(f"  {ns} stars, {nl_max} layers: {r['t_extract_s']:.1f} s, peak RSS "
                  f"{r['peak_rss_extract_MiB']:.0f} MiB, load {os.getloadavg()[0]:.1f}", flush=True)
            by_stars.append((ns, r))
            if not args.keep:
                os.remove(cube)
        for nl in sorted(layers):
            if nl == nl_max:
                by_layers.append((nl, dict(by_stars)[n_ref]))
                continue
            cube, _ = _simulate(args.size, nl, n_ref, args.seed, tmp, args.cubes)
            r = _run_child(cube, args, 0)
            print(f"  {n_ref} stars, {nl} layers: {r['t_extract_s']:.1f} s", flush=True)
            by_layers.append((nl, r))
            if not args.keep:
                os.remove(cube)
        print(f"\n{args.size}x{args.size} spaxels, block {args.block}; load (1/5/15 min) before "
              f"{[round(v, 2) for v in load0]}, after {[round(v, 2) for v in os.getloadavg()]}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        _series("stars", by_stars, n_ref)
        if len(by_layers) > 1:
            _series("layers", by_layers, nl_max)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
