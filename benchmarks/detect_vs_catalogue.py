"""Labels from a cube alone (detected stars) vs from the true catalogue, on a simulated crowded field.

    python benchmarks/detect_vs_catalogue.py [--size 40 --nstars 120 --seed 7]

Simulates a globular-cluster field with the default model's spectra (as ``musepayne demo``),
runs the pipeline twice: with the simulator's source catalogue and with ``sources=None``
(detection); with ``--diagnose`` also with the true cube positions of all stars and of the detected
stars only.  Detected stars are matched to the truth within 0.5 FWHM.  Prints, for both runs,
the number of converged stars and the median and robust dispersion of recovered - true labels,
also on the stars common to both runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from musepayne.models.files import load_model
from musepayne.pipeline.report import _good
from musepayne.pipeline.runner import Pipeline, RunConfig
from musepayne.simulate.simulator import SimulateConfig, Simulator
from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler

LABELS = ("teff", "logg", "fe_h", "rv")


def stats(d):
    d = d[np.isfinite(d)]
    if not d.size:
        return np.nan, np.nan
    m = np.median(d)
    return m, 1.4826 * np.median(np.abs(d - m))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--nstars", type=int, default=120)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--diagnose", action="store_true",
                    help="also run with the true cube positions of all stars (true_xy) and of the detected stars "
                         "only (true_xy_det): the cost of undetected neighbours vs that of detected positions")
    a = ap.parse_args(argv)
    mdl = load_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = SimulateConfig(nx=a.size, ny=a.size, nlayers=3681, nstars=a.nstars, king_rc=a.size / 4.0,
                             mag_bright=15.0, mag_faint=20.0, seed=a.seed)
        info = Simulator(cfg, ModelSpectra(mdl, globular_cluster_sampler())).write(tmp / "cube.fits")
        truth = Table.read(info["truth"], "TRUTH")
        rc = RunConfig(model="default", cube_lsf="lamost", report=False)
        rc_xy = rc.updated(extract={"fit_transform": False})  # true cube positions as given
        res = {}
        runs = [("catalogue", info["sources"], rc), ("detected", None, rc)]
        if a.diagnose:
            runs += [("true_xy", "true_xy", rc_xy), ("true_xy_det", "true_xy_det", rc_xy)]
        matched = None
        for name, src, cfg_run in runs:
            if src in ("true_xy", "true_xy_det"):
                keep = np.ones(len(truth), bool) if src == "true_xy" else np.isin(np.arange(len(truth)), matched)
                t = truth[keep]["stellar_id", "x", "y", "mag"]
                src = tmp / f"{name}.ecsv"
                t.write(src, format="ascii.ecsv")
            t0 = time.perf_counter()
            rec = Pipeline(tmp / name, cfg_run).run([info["cube"]], src)
            cat = Table.read(tmp / name / "catalogue.fits")
            dt = time.perf_counter() - t0
            if src is None:
                det = Table.read(next((tmp / name / "cubes").glob("*/sources_detected.ecsv")), format="ascii.ecsv")
                fwhm = float(det.meta["FWHM_PX"])
                pos = {str(s): (x, y) for s, x, y in zip(det["stellar_id"], det["x"], det["y"])}
                tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
                used = np.zeros(len(truth), bool)
                idx = np.full(len(cat), -1)
                order = np.argsort(np.asarray(det["mag"]))
                ids = np.asarray(det["stellar_id"]).astype(str)[order]
                cid = {str(s): i for i, s in enumerate(cat["stellar_id"])}
                for s in ids:
                    x, y = pos[s]
                    dd = np.hypot(tx - x, ty - y)
                    dd[used] = np.inf
                    j = int(np.argmin(dd))
                    if dd[j] < 0.5 * fwhm and s in cid:
                        used[j] = True
                        idx[cid[s]] = j
                matched = idx[idx >= 0]
                print(f"detected {len(det)} stars, {int((idx >= 0).sum())} matched to a true star, "
                      f"{len(det) - int((idx >= 0).sum())} unmatched")
            else:
                tmap = {str(k): i for i, k in enumerate(truth["stellar_id"])}
                idx = np.array([tmap.get(str(k), -1) for k in cat["stellar_id"]])
            sel = (idx >= 0) & _good(cat)
            res[name] = (cat, idx, sel)
            print(f"{name:11s}: {len(cat)} rows, {int(sel.sum())} converged & matched; {rec['counts']}; {dt:.0f} s")
        common = set.intersection(*(set(idx[sel]) for _, idx, sel in res.values()))
        print(f"\n{'label':6s} {'run':9s} {'all matched: median, robust sigma (N)':>40s} {'common stars':>28s}")
        for lab in LABELS:
            for name, (cat, idx, sel) in res.items():
                d = np.asarray(cat[lab], float)[sel] - np.asarray(truth[lab], float)[idx[sel]]
                c = np.isin(idx[sel], list(common))
                m, s = stats(d)
                mc, sc = stats(d[c])
                print(f"{lab:6s} {name:11s} {m:+12.3f} {s:10.3f} ({sel.sum():4d}) {mc:+12.3f} {sc:10.3f} ({c.sum():4d})")


if __name__ == "__main__":
    main()
