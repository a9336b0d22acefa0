"""Survey throughput: stars per second with 1 and 2 workers, peak memory per worker.

Run:  python benchmarks/bench_survey.py [--cubes 4] [--stars 150] [--size 60] [--model PATH]

Simulates ``--cubes`` cubes (``--size`` x ``--size`` spaxels, 3681 layers,
``--stars`` stars each, spectra from the model), then runs the whole pipeline
per cube (extract -> prepare -> fit -> catalogue) as a survey:

* baseline: one worker, in process (no Dask);
* two Dask workers (LocalCluster, one thread each).

Prints stars/s and the ratio, peak RSS per worker, and the projected wall time
for 13,000 cubes x 300 stars on 100 such nodes (assumptions printed).  The
default model is used when it exists, else a random-weight toy model of the
same size (the fit cost depends on the model size, not on its weights).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubes", type=int, default=4)
    ap.add_argument("--stars", type=int, default=150)
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--model", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--extract-seconds", type=float, default=161.0,
                    help="extraction time of one full 300x300x3681 cube (benchmarks/bench_extract.py; 161 s measured)")
    args = ap.parse_args()

    from musepayne.models.files import load_model
    from musepayne.models.model import ModelError
    from musepayne.pipeline.survey import Survey, SurveyConfig, read_store_catalogue, sources_resolver
    from musepayne.simulate.simulator import SimulateConfig, Simulator
    from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler

    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-survey-"))
    try:
        if args.model:
            model_path = args.model
        else:
            try:
                load_model("default")
                model_path = "default"
            except ModelError:
                from musepayne.instrument.wavelength import lamost_wavelength
                from musepayne.testing import toy_mlp_model

                toy_mlp_model(lamost_wavelength(), label_names=("teff", "logg", "fe_h"),
                              x_min=np.array([4000.0, 0.5, -2.5]), x_max=np.array([7000.0, 5.0, 0.5])
                              ).save(tmp / "toy.fits")
                model_path = str(tmp / "toy.fits")
        model = load_model(model_path)
        print(f"model: {model_path} ({type(model).__name__}, {model.n_pix} px, labels {model.label_names})")
        src = ModelSpectra(model, globular_cluster_sampler())
        (tmp / "sources").mkdir()
        paths = []
        t0 = time.perf_counter()
        for i in range(args.cubes):
            cfg = SimulateConfig(nx=args.size, ny=args.size, nlayers=3681, nstars=args.stars, seed=100 + i,
                                 king_rc=args.size / 4, mag_bright=15.5, mag_faint=19.5)
            info = Simulator(cfg, src).write(tmp / f"c{i}.fits")
            os.replace(info["sources"], tmp / "sources" / f"c{i}.csv")
            paths.append(str(tmp / f"c{i}.fits"))
        print(f"simulated {args.cubes} cubes of {args.size}x{args.size}x3681 with {args.stars} stars "
              f"in {time.perf_counter() - t0:.1f} s")
        opts = {"model": model_path, "cube_lsf": "lamost", "report": False}
        results = {}
        for label, sched, workers in (("1 worker (in process)", "process", 1), ("2 Dask workers", "local", 2)):
            store = tmp / f"store-{workers}"
            t0 = time.perf_counter()
            Survey(store, SurveyConfig(run_options=opts, scheduler=sched, workers=workers),
                   log=lambda *a: None).run(paths, sources_resolver(tmp / "sources"))
            wall = time.perf_counter() - t0
            n = len(read_store_catalogue(store))
            results[workers] = (wall, n)
            print(f"{label:24s}: {wall:7.1f} s for {n} stars -> {n / wall:6.2f} stars/s")
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS: in-process worker {peak_self:.0f} MB; largest Dask worker process {peak_children:.0f} MB")
        w1, n1 = results[1]
        w2, n2 = results[2]
        print(f"speed-up 2 workers vs 1: {(n2 / w2) / (n1 / w1):.2f}x (includes Dask cluster start-up)")
        # per-stage costs from the per-cube records of the 1-worker store
        man = Survey(tmp / "store-1").load_manifest()
        fit_s = sum(r["timings"].get("fit", 0.0) for r in man.values())
        prep_s = sum(r["timings"].get("prepare", 0.0) for r in man.values())
        fit_rate = n1 / fit_s if fit_s > 0 else float("nan")
        print(f"fit stage: {fit_rate:.1f} stars/s per worker; prepare {prep_s / n1 * 1e3:.1f} ms per star")
        t_cube = args.extract_seconds + 300 / fit_rate + 300 * prep_s / n1
        hours = 13000 / 100 * t_cube / 2 / 3600
        print("projection, 13,000 cubes x 300 stars on 100 nodes like this one (2 cores = 2 workers):")
        print(f"  per full cube: extract {args.extract_seconds:.0f} s (bench_extract, 300x300x3681, 2000 stars) "
              f"+ fit {300 / fit_rate:.0f} s + prepare {300 * prep_s / n1:.1f} s = {t_cube:.0f} s")
        print(f"  -> {hours:.1f} h wall (assumes perfect scaling over nodes and workers, cubes read from local disk "
              "at the rate measured here, extraction single-threaded per worker)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
