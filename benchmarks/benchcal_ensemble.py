"""Seed ensembles for the benchmark calibration: CV figures and fitting cost.

Two kinds of ensemble of hold-out models (the default recipe trained without the benchmark
stars, one per seed; ``musepayne model calibrate-benchmark --save-holdout DIR`` keeps them):

* **network ensemble**: one MLP whose spectrum is the mean of the members' spectra
  (:func:`musepayne.train.benchcal.ensemble_mlp`: block-diagonal hidden layers, an ordinary
  model file), fitted once per spectrum;
* **label ensemble**: the mean of the members' fitted labels (one fit per member).

Both are observed/fitted on the benchmark spectra as MUSE and LAMOST at S/N 100 (the same noise
as ``calibrate-benchmark``) and calibrated with the shipped procedure (map chosen by CV, sys errors
by type), cross-validated over the stars (:func:`musepayne.train.benchcal.evaluate`).  The fitting
cost is measured in this process on the same spectra: ensemble / single-model CPU time (median of
``--repeat`` runs, one thread).

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_ensemble.py build/holdout/holdout_seed*.fits \
        [--repeat 3] [--out build/ensemble_holdout.fits]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack

from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.io.prepared import PreparedSpectra
from musepayne.models.benchcal import BENCH_LABELS, DEFAULT_BENCHMARK_FILE, read_benchmarks
from musepayne.models.files import load_model
from musepayne.train.benchcal import (
    BenchCalConfig,
    benchmark_library_spectra,
    ensemble_mlp,
    evaluate,
    figures_lines,
    holdout_table,
    observe,
)


def label_mean(tab: Table, tag: int) -> Table:
    """Mean of the seeds' fitted labels (and of their stat errors) per instrument and spectrum."""
    rows = []
    inst = np.asarray(tab["instrument"]).astype(str)
    sid = np.asarray(tab["stellar_id"]).astype(str)
    ok = ~np.char.startswith(np.asarray(tab["status"]).astype(str), "failed")
    nseed = len(set(tab["seed"]))
    for i, s in sorted(set(zip(inst, sid))):
        sel = (inst == i) & (sid == s) & ok
        if sel.sum() < nseed:
            continue
        r = {"seed": tag, "instrument": i, "stellar_id": s, "hd": str(tab["hd"][sel][0]), "status": "converged"}
        for n in BENCH_LABELS:
            r[n] = float(np.mean(tab[n][sel]))
            r[f"{n}_err"] = float(np.mean(tab[f"{n}_err"][sel]))
            for c in (f"{n}_bench", f"e_{n}_bench"):
                r[c] = float(tab[c][sel][0])
        rows.append(r)
    return Table(rows=rows)


def cpu_time(model, prepared, repeat):
    fitter = Fitter(model, FitConfig(benchmark_calibration=False))
    out = []
    for _ in range(repeat):
        t0 = time.process_time()
        fitter(prepared)
        out.append(time.process_time() - t0)
    return float(np.median(out))


def main(argv):
    repeat = int(argv[argv.index("--repeat") + 1]) if "--repeat" in argv else 3
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    paths = [a for i, a in enumerate(argv) if a.endswith(".fits") and (i == 0 or argv[i - 1] not in ("--out",))]
    shared = Path("..") / "shared" / "data"
    bench = read_benchmarks(shared / DEFAULT_BENCHMARK_FILE)
    sets, index = benchmark_library_spectra(shared, bench)
    cfg = BenchCalConfig()
    observed = {inst: observe(sets, inst, cfg.snr, 1000 * cfg.seed + i) for i, inst in enumerate(cfg.instruments)}
    models = [load_model(p) for p in paths]
    seeds = [int(m.meta.get("seed", i)) for i, m in enumerate(models)]
    ens = ensemble_mlp(models)
    x = np.array([[5000.0, 3.0, -0.5], [4500.0, 1.5, -2.0], [6000.0, 4.4, 0.2]])
    print(f"ensemble of seeds {seeds}: layers {[w.shape for w in ens.weights]}; max |ensemble - mean of members| "
          f"{np.max(np.abs(ens.predict(x) - np.mean([m.predict(x) for m in models], 0))):.1e}")
    singles = holdout_table(models, observed, bench, index, seeds)
    net = holdout_table([ens], observed, bench, index, [100])
    lab = label_mean(singles, 200)
    if out:
        vstack([singles, net, lab]).write(out, overwrite=True)
    for name, t in ((f"single models, seeds {seeds}", singles), ("network ensemble (mean spectrum)", net),
                    ("label ensemble (mean of the seeds' labels)", lab)):
        print(f"===== {name}")
        print("\n".join(figures_lines(evaluate(t, cfg))))
    both = PreparedSpectra.concatenate(list(observed.values()))
    t1 = cpu_time(models[0], both, repeat)
    te = cpu_time(ens, both, repeat)
    print(f"fitting cost ({len(both.flux)} spectra, CPU s, median of {repeat}): single {t1:.2f}, network ensemble "
          f"{te:.2f} (x{te / t1:.2f}), label ensemble ~x{len(models)} (one fit per member)")


if __name__ == "__main__":
    main(sys.argv[1:])
