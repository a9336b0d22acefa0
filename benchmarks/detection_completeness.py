"""Completeness and false-detection rate of musepayne.extract.detect on simulated crowded fields.

    python benchmarks/detection_completeness.py [--nstars 300 --size 60 --nlayers 600 --seeds 1 2 3]

Simulates fields with ``musepayne.simulate.Simulator`` (toy spectra), runs the
Detector and matches detections to the truth within ``match`` FWHM (stars just outside the field
included: their light on the field's edge is a fair detection).  A true
star's S/N is its matched-filter S/N on the white-light image from its true
white-light flux and the cube noise (STAT); it counts as *isolated* when no
brighter true star lies within 1 FWHM.  Prints completeness per S/N bin for
isolated and crowded stars, the false-detection rate (no true star within 1 FWHM), the rate of
unmatched blends (true stars within 1 FWHM, none within the match radius) and the magnitude and
position errors.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from musepayne.extract.detect import DetectConfig, Detector, _kernel, matched_filter_snr
from musepayne.io.cube import open_cube
from musepayne.simulate.simulator import SimulateConfig, Simulator


def evaluate(cube, truth, det, fwhm, match=0.5):
    with open_cube(cube) as c:
        _, _, _, white, wvar = Detector().band_images(c)
    _, _, err = matched_filter_snr(white, wvar, _kernel(np.array([fwhm, 2.5, 0, 0]), fwhm))
    t = truth[truth["in_field"]]
    ny, nx = white.shape
    tx, ty = np.asarray(t["x"], float), np.asarray(t["y"], float)
    inside = (tx > -0.5) & (tx < nx - 0.5) & (ty > -0.5) & (ty < ny - 0.5)
    t, tx, ty = t[inside], tx[inside], ty[inside]
    flux = 10 ** (-0.4 * (np.asarray(t["mag"]) - 28.9))
    e = err[np.clip(np.rint(ty).astype(int), 0, ny - 1), np.clip(np.rint(tx).astype(int), 0, nx - 1)]
    snr = flux / e
    d = np.hypot(tx[:, None] - tx[None, :], ty[:, None] - ty[None, :])
    brighter = flux[None, :] > flux[:, None]
    isolated = ~np.any((d < fwhm) & brighter, axis=1)
    dx, dy = np.asarray(det["x"], float), np.asarray(det["y"], float)
    dd = np.hypot(tx[:, None] - dx[None, :], ty[:, None] - dy[None, :]) if len(det) else np.zeros((len(t), 0))
    # greedy one-to-one matching, brightest true star first
    used = np.zeros(len(det), bool)
    mt = np.full(len(t), -1)
    for i in np.argsort(-flux):
        if not len(det):
            break
        cand = np.where(~used & (dd[i] < match * fwhm))[0]
        if cand.size:
            j = cand[np.argmin(dd[i, cand])]
            used[j] = True
            mt[i] = j
    # unmatched detections: the light of a true star just outside the field (matched to it), the blend of
    # true stars within 1 FWHM (no single one within the match radius), or spurious (no true star within 1 FWHM)
    ax, ay = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    out = ~np.isin(np.asarray(truth["stellar_id"]), np.asarray(t["stellar_id"]))
    n_out = n_blend = 0
    for j in np.nonzero(~used)[0]:
        d = np.hypot(ax - dx[j], ay - dy[j])
        if np.any(out & (d < match * fwhm)):
            n_out += 1
        elif np.any(d < fwhm):
            n_blend += 1
    n_false = int((~used).sum()) - n_out - n_blend
    return dict(snr=snr, isolated=isolated, found=mt >= 0, mt=mt, tx=tx, ty=ty, mag=np.asarray(t["mag"]),
                n_det=len(det) - n_out, n_false=n_false, n_blend=n_blend, n_unmatched=int((~used).sum()) - n_out,
                det=det)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--nstars", type=int, default=300)
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--nlayers", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threshold", type=float, default=5.0)
    ap.add_argument("--mag-range", type=float, nargs=2, default=(16.0, 21.0))
    ap.add_argument("--lf-slope", type=float, default=0.3, help="dN/dm ~ 10^(slope m); 0: flat")
    ap.add_argument("--residual-passes", type=int, default=None,
                    help="DetectConfig.residual_passes (default: the DetectConfig default)")
    ap.add_argument("--king-rc", type=float, default=None, help="King core radius (px; default size/4)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            cfg = SimulateConfig(nx=a.size, ny=a.size, nlayers=a.nlayers, nstars=a.nstars, seed=seed,
                                 king_rc=a.king_rc or max(5.0, a.size / 4.0), lf_slope=a.lf_slope,
                                 mag_bright=a.mag_range[0], mag_faint=a.mag_range[1])
            info = Simulator(cfg).write(Path(tmp) / f"sim{seed}.fits")
            truth = Table.read(info["truth"], "TRUTH")
            t0 = time.perf_counter()
            kw = {} if a.residual_passes is None else {"residual_passes": a.residual_passes}
            det = Detector(DetectConfig(threshold=a.threshold, **kw))(info["cube"])
            dt = time.perf_counter() - t0
            fwhm = float(det.meta["FWHM_PX"])
            r = evaluate(info["cube"], truth, det, fwhm)
            r["time"] = dt
            r["fwhm"] = fwhm
            rows.append(r)
            print(f"seed {seed}: {r['n_det']} detections, {r['n_false']} false, {r['n_blend']} blends, "
                  f"FWHM {fwhm:.2f} px, beta {det.meta['BETA']:.2f}, "
                  f"e1 {det.meta.get('E1', 0):+.3f}, e2 {det.meta.get('E2', 0):+.3f}, {dt:.1f} s")
    snr = np.concatenate([r["snr"] for r in rows])
    iso = np.concatenate([r["isolated"] for r in rows])
    found = np.concatenate([r["found"] for r in rows])
    n_det = sum(r["n_det"] for r in rows)
    n_false = sum(r["n_false"] for r in rows)
    print(f"\nthreshold {a.threshold}; {len(snr)} true stars in the field, {n_det} detections")
    n_blend = sum(r["n_blend"] for r in rows)
    n_unm = sum(r["n_unmatched"] for r in rows)
    print(f"false detections (no true star within 1 FWHM): {n_false} / {n_det} = {100 * n_false / max(n_det, 1):.2f} %")
    print(f"blends (true stars within 1 FWHM, none within {0.5:.1f} FWHM): {n_blend} / {n_det} = "
          f"{100 * n_blend / max(n_det, 1):.2f} %; unmatched in all: {100 * n_unm / max(n_det, 1):.2f} % "
          "(detections of stars just outside the field are matched to them and not counted)")
    print("completeness by true S/N (isolated = no brighter star within 1 FWHM):")
    print(f"{'S/N':>12s} {'isolated':>18s} {'crowded':>18s}")
    for lo, hi in ((3, 5), (5, 7), (7, 10), (10, 20), (20, 50), (50, 1e9)):
        s = (snr >= lo) & (snr < hi)
        c1, c2 = s & iso, s & ~iso
        print(f"{lo:5.0f}-{hi:<6.0f} {found[c1].sum():5d}/{c1.sum():<5d}{100 * found[c1].mean() if c1.any() else np.nan:6.1f}% "
              f"{found[c2].sum():5d}/{c2.sum():<5d}{100 * found[c2].mean() if c2.any() else np.nan:6.1f}%")
    goal = (snr >= 5) & iso
    print(f"GOAL (S/N >= 5, isolated): completeness {100 * found[goal].mean():.1f} % of {goal.sum()}")
    dmag, dpos = [], []
    for r in rows:
        m = r["found"]
        j = r["mt"][m]
        dmag.append(np.asarray(r["det"]["mag"])[j] - r["mag"][m])
        dpos.append(np.hypot(np.asarray(r["det"]["x"])[j] - r["tx"][m], np.asarray(r["det"]["y"])[j] - r["ty"][m]))
    dmag, dpos = np.concatenate(dmag), np.concatenate(dpos)
    bright = np.concatenate([r["snr"][r["found"]] for r in rows]) >= 20
    print(f"matched S/N >= 20: mag - true median {np.median(dmag[bright]):+.3f}, "
          f"robust sigma {1.4826 * np.median(np.abs(dmag[bright] - np.median(dmag[bright]))):.3f}; "
          f"position error median {np.median(dpos[bright]):.3f} px")
    print(f"detector time median {np.median([r['time'] for r in rows]):.1f} s")


if __name__ == "__main__":
    main()
