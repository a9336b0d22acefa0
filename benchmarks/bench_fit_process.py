"""Benchmark: whole-process ``musepayne fit`` vs the same fit in the library vs per-spectrum
``scipy.optimize.curve_fit``, on the same spectra, ratios from one run.

Spectra: ``benchmarks/fit_mock_data.py`` -- the default model as MUSE spectra prepared for it
(LSF_EXCESS forward-modelled, standard-mode mask, S/N 50, RV within +-300 km/s), written as a
prepared-spectra file (made once into --workdir, reused when present).

Measured, interleaved in each repeat so load changes hit all alike:
  * process  -- ``musepayne fit FILE -o OUT --threads T`` in a fresh interpreter (imports, read,
                fit, catalogue written): wall, CPU (user + sys) and peak RSS of the child;
  * ref      -- with ``--ref GITREF``: the same command with that commit's ``src`` (``git archive``),
                e.g. the code before this change (its catalogue is compared byte for byte);
  * library  -- ``Fitter(model, FitConfig(n_threads=T))`` on ``PreparedSpectra.open(FILE)`` in this
                process, BLAS held to one thread (as the CLI does);
  * curve_fit -- per spectrum (``--n-base`` of the same spectra), 'trf', numerical Jacobian, the same
                forward model (emulator, relativistic cubic shift, LSF-excess operator), started at
                the box centre and at the RV of our coarse RV search (not the true RV).
Rates are spectra per wall second (and per CPU second, the fairer figure on a shared machine);
ratios are of medians.  The fixed cost per process is measured on a 1-spectrum file.

Usage:  PYTHONPATH=src python benchmarks/bench_fit_process.py [--n 20000] [--threads 2] [--repeat 3]
            [--ref 8b999cd] [--ref-max-n 5000] [--workdir /tmp/mp_bench]
The reference code read the whole file into memory (~0.38 GB per 1000 spectra): --ref-max-n runs it
on the first that many spectra only (a file of its own), so this script stays within a few GB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# the child reports its own peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child
# inherits from this process across fork + exec)
CLI = ("import atexit, sys\n"
       "def _hwm():\n"
       "    try:\n"
       "        kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
       "        sys.stderr.write(f'\\nPEAK_RSS_KB {kb}\\n')\n"
       "    except OSError:\n"
       "        pass\n"
       "atexit.register(_hwm)\n"
       "from musepayne.cli import main; sys.argv[0] = 'musepayne'; main()")


def run_process(src, args, env_extra=None):
    """Run the CLI with ``src`` first on the path; (wall s, cpu s, peak RSS MB, stdout)."""
    env = dict(os.environ, PYTHONPATH=str(src), **(env_extra or {}))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read().decode(), p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"musepayne {' '.join(args)} failed ({p.returncode}): {err[-2000:]}")
    hwm = [ln.split()[1] for ln in err.splitlines() if ln.startswith("PEAK_RSS_KB")]
    rss = int(hwm[0]) / 1024 if hwm else ru.ru_maxrss / 1024  # (ru_maxrss: an upper bound)
    return wall, ru.ru_utime + ru.ru_stime, rss, out


def subset(src_file, dst, n):
    from musepayne.io.prepared import PreparedSpectra

    if not Path(dst).exists():
        p = PreparedSpectra.open(src_file)
        p.take(np.arange(n)).write(dst)
        p.close()
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-base", type=int, default=30)
    ap.add_argument("--ref", default=None, help="git commit whose src is timed as the reference")
    ap.add_argument("--ref-max-n", type=int, default=5000)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "musepayne_bench_fit"))
    args = ap.parse_args()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    from fit_mock_data import muse_like_prepared

    data = wd / f"mock{args.n}.fits"
    if not data.exists():
        t0 = time.perf_counter()
        muse_like_prepared(data, args.n)
        print(f"made {data} ({args.n} spectra) in {time.perf_counter() - t0:.1f} s")
    one = subset(data, wd / "mock1.fits", 1)
    ref_src = None
    if args.ref:
        ref_src = wd / f"ref-{args.ref}"
        if not ref_src.exists():
            ref_src.mkdir()
            arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "src"], check=True,
                                  capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(ref_src)], input=arch, check=True)
        ref_src = ref_src / "src"
        n_ref = min(args.n, args.ref_max_n)
        ref_data = data if n_ref == args.n else subset(data, wd / f"mock{n_ref}.fits", n_ref)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}; {args.n} spectra, "
          f"--threads {args.threads}", flush=True)

    from musepayne.fit import FitConfig, Fitter
    from musepayne.io.prepared import PreparedSpectra
    from musepayne.models.files import load_model
    from musepayne.threads import blas_threads

    model = load_model("default")
    src = ROOT / "src"
    T = str(args.threads)
    res = {}

    def add(key, n, wall, cpu, rss=None):
        res.setdefault(key, []).append((n / wall, n / cpu, rss))
        print(f"  {key}: {n} spectra {wall:.2f} s wall ({n / wall:.1f}/s), {cpu:.2f} s CPU ({n / cpu:.1f}/s)"
              + (f", peak RSS {rss:.0f} MB" if rss else "") + f" (load {os.getloadavg()[0]:.2f})", flush=True)

    for r in range(args.repeat):
        print(f"repeat {r + 1}", flush=True)
        w, c, m, _ = run_process(src, ["fit", str(one), "-o", str(wd / "one.fits"), "--threads", T])
        res.setdefault("fixed", []).append((w, c, m))
        print(f"  process, 1 spectrum: {w:.2f} s wall, {c:.2f} s CPU, peak RSS {m:.0f} MB", flush=True)
        w, c, m, _ = run_process(src, ["fit", str(data), "-o", str(wd / "new.fits"), "--threads", T])
        add("process", args.n, w, c, m)
        if ref_src is not None:
            w, c, m, _ = run_process(ref_src, ["fit", str(one), "-o", str(wd / "one_ref.fits"), "--threads", T])
            res.setdefault("fixed_ref", []).append((w, c, m))
            print(f"  ref process, 1 spectrum: {w:.2f} s wall, {c:.2f} s CPU, peak RSS {m:.0f} MB", flush=True)
            w, c, m, _ = run_process(ref_src, ["fit", str(ref_data), "-o", str(wd / "ref.fits"), "--threads", T])
            add("ref process", n_ref, w, c, m)
            if n_ref < args.n:
                w, c, m, _ = run_process(src, ["fit", str(ref_data), "-o", str(wd / "new_refn.fits"), "--threads", T])
                add(f"process ({n_ref})", n_ref, w, c, m)
        prep = PreparedSpectra.open(data)
        with blas_threads(1, scipy=False):
            t0, c0 = time.perf_counter(), time.process_time()
            Fitter(model, FitConfig(n_threads=args.threads))(prep)
            add("library", args.n, time.perf_counter() - t0, time.process_time() - c0)
        if r == 0 or True:
            from bench_fit import curve_fit_one, payne_style_predict

            from musepayne.instrument.lsf import FWHM_TO_SIGMA
            from musepayne.prepare.resample import convolution_matrix

            fitter = Fitter(model, FitConfig())
            nb = args.n_base
            rows = prep.flux[0:nb].astype(np.float64), prep.ivar[0:nb].astype(np.float64)
            flux, ivar = np.nan_to_num(rows[0]), rows[1]
            K = convolution_matrix(prep.wave, np.round(prep.lsf_excess[0].astype(np.float64), 4) * FWHM_TO_SIGMA)[0]
            with blas_threads(1, scipy=False):
                v0 = fitter._coarse_rv(flux, ivar)
                predict = payne_style_predict(model)
                t0, c0 = time.perf_counter(), time.process_time()
                base = [curve_fit_one(fitter, flux[i], ivar[i], v0[i], predict, K) for i in range(nb)]
                add("curve_fit", nb, time.perf_counter() - t0, time.process_time() - c0)
        prep.close()
    if ref_src is not None and ref_data == data:
        same = (wd / "new.fits").read_bytes() == (wd / "ref.fits").read_bytes()
        print(f"catalogue byte-identical to the reference's: {same}")
    elif ref_src is not None:
        same = (wd / "new_refn.fits").read_bytes() == (wd / "ref.fits").read_bytes()
        print(f"catalogue of the first {n_ref} spectra byte-identical to the reference's: {same}")
    from astropy.table import Table

    cat, truth = Table.read(wd / "new.fits"), Table.read(data, hdu="SPECTRA")
    names = list(model.label_names) + ["rv"]
    # the model's own labels and statistical errors (with a benchmark calibration, X is on the
    # benchmark scale and X_err includes its systematic part; the truth is on the model's scale)
    raw = {k: (k + "_uncal" if k + "_uncal" in cat.colnames else k) for k in names}
    err = {k: (k + "_err_stat" if k + "_err_stat" in cat.colnames else k + "_err") for k in names}
    print("accuracy rms (fit - truth)/sigma, process catalogue (model scale, statistical errors): " + " ".join(
        f"{k}={np.sqrt(np.nanmean(((cat[raw[k]] - truth['true_' + k]) / cat[err[k]]) ** 2)):.3f}" for k in names)
        + " (a file made with another model's truth gives values far above 1)")
    b = np.array([x[0] for x in base])
    print(f"accuracy rms (fit - truth)/sigma, curve_fit ({nb}): " + " ".join(
        f"{k}={np.sqrt(np.mean(((b[:, j] - truth['true_' + k][:nb]) / cat[err[k]][:nb]) ** 2)):.3f}"
        for j, k in enumerate(names)))

    med = {k: (float(np.median([x[0] for x in v])), float(np.median([x[1] for x in v])),
               max((x[2] or 0) for x in v)) for k, v in res.items() if not k.startswith("fixed")}
    fx = np.median([x[0] for x in res["fixed"]]), np.median([x[1] for x in res["fixed"]])
    print(f"SUMMARY (medians of {args.repeat}; load average at end {os.getloadavg()})")
    print(f"  fixed cost per process (1 spectrum): {fx[0]:.2f} s wall, {fx[1]:.2f} s CPU"
          + (f"; reference {np.median([x[0] for x in res['fixed_ref']]):.2f} s wall, "
             f"{np.median([x[1] for x in res['fixed_ref']]):.2f} s CPU" if "fixed_ref" in res else ""))
    for k, (rw, rc, rss) in med.items():
        print(f"  {k:18s} {rw:8.1f} spectra/s wall  {rc:8.1f} spectra/CPU-s" + (f"  peak RSS {rss:.0f} MB" if rss else ""))
    p, lib, cf = med["process"], med["library"], med["curve_fit"]
    print(f"  ratios: process / library {p[0] / lib[0]:.2f} (wall) {p[1] / lib[1]:.2f} (CPU); "
          f"process / curve_fit {p[0] / cf[0]:.1f}x (wall) {p[1] / cf[1]:.1f}x (CPU); "
          f"library / curve_fit {lib[0] / cf[0]:.1f}x (wall) {lib[1] / cf[1]:.1f}x (CPU)")
    if "ref process" in med:
        rp = med["ref process"]
        same_n = med.get(f"process ({n_ref})", p)
        print(f"  ratio process / reference process on {n_ref} spectra: {same_n[0] / rp[0]:.2f}x (wall) "
              f"{same_n[1] / rp[1]:.2f}x (CPU); peak RSS {same_n[2]:.0f} vs {rp[2]:.0f} MB")


if __name__ == "__main__":
    main()
