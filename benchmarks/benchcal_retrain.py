"""Benchmark calibration, nested CV: post-fit map alone vs retraining on benchmark-scale labels
with a post-fit map on top.

Outer folds: the benchmark stars (HD number) in ``K`` folds, the assignment of
:func:`musepayne.train.benchcal.evaluate` (``assign_folds`` over the usable S/N-100 rows of the
hold-out table, fold seed ``--fold-seed``), so the post-fit-map figures are those quoted in the
README.  For outer fold f and training seed s:

* **retrain** (model R_f,s): a label map catalogue label -> benchmark label
  (:func:`~musepayne.train.benchcal_maps.fit_calibration`, per label chosen by CV, as the post-fit
  map) is fitted on the training-set spectra of the benchmark stars NOT in f (their MILES/STELIB
  catalogue labels vs the benchmark labels) and applied to the catalogue labels of every
  non-benchmark training star; those stars plus the benchmark stars not in f (with their
  benchmark labels) train the default model's recipe (seed s); fold f's benchmark stars are not
  in its training set.  It fits fold f's benchmark spectra (MUSE and LAMOST at S/N 100, the
  spectra of the shipped hold-out table: same simulation seeds).
* The only stars R_f,s has not seen are fold f's, so a post-fit map on top of it is learnt by an
  **inner CV inside fold f**: fold f's stars in ``J`` cells (``assign_folds``, seed
  ``100 + a`` for inner assignment a); the map of cell i is learnt from R_f's fits (seeds pooled,
  both instruments, as the shipped map) of fold f's stars outside cell i and applied to cell i.

Methods (every row is a fit of a star by a model and a map that did not use it):

* ``none``: hold-out model (trained without any benchmark star; ``tests/data/benchcal_holdout.fits``), no map;
* ``post_outer``: hold-out fits, map learnt on the other outer folds' stars (the shipped nested CV);
* ``post_cell``: hold-out fits, map learnt on the SAME stars as ``retrain+map`` (fold f minus
  cell i): the same amount and kind of map data;
* ``post_all``: hold-out fits, map learnt on every star outside cell i (other folds and other
  cells of f): the same benchmark stars ``retrain+map`` uses (for training and for its map);
* ``retrain``: R_f, no map; ``retrain+map``: R_f with the map of cell i;
* ``retrain+map_pair`` (after ``train --pairs``): R_f with a map learnt from the other folds' stars,
  each fitted by the model R_fg,s retrained (as above) without fold f AND its own fold g (10 pair
  models per seed for K = 5; seeds pooled): the deployable "retrain on all benchmark stars, map
  from K-fold retrained models" evaluated without any leak; compare with ``post_outer``.

Maps: :func:`fit_calibration` with ``select=True`` and ``sys_bins='type'`` (the shipped settings);
errors sqrt(stat^2 + sys^2).  Figures per seed (per instrument, all / dwarf / giant), mean over
seeds and inner assignments.

Usage (``train``: K x seeds trainings of ~2 CPU-min each, cached in ``--dir``; ``--pairs``: the
K (K - 1) / 2 x seeds pair models; then ``report``, ~3 CPU-min; pair figures for the seeds whose pair
models are all there):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_retrain.py train \
        build/trainset.fits build/templates.fits [--seeds 0,1,2] [--k 5] [--fold-seed 0] [--dir build/retrain]
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_retrain.py train \
        build/trainset.fits build/templates.fits --pairs [--seeds 0,1,2]
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/benchcal_retrain.py report \
        [--seeds 0,1,2] [--k 5] [--fold-seed 0] [--dir build/retrain] [--inner 3] [--j 5]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table, vstack

from musepayne.io.prepared import PreparedSpectra
from musepayne.models.benchcal import BENCH_LABELS, attach_benchmark_labels, match_benchmarks, read_benchmarks
from musepayne.models.files import load_model
from musepayne.models.gradients import GradientTemplates
from musepayne.train import train_model
from musepayne.train.benchcal import (
    BenchCalConfig,
    _arrays,
    _at_snr,
    _recipe,
    _usable,
    benchmark_library_spectra,
    calibration_figures,
    fit_calibration,
    holdout_table,
    observe,
)
from musepayne.train.crossval import assign_folds
from musepayne.train.trainset import TrainingSet

SHARED = Path("..") / "shared" / "data"
HOLDOUT = Path("tests") / "data" / "benchcal_holdout.fits"
METHODS = ("none", "post_outer", "post_cell", "post_all", "retrain", "retrain+map", "retrain+map_pair")


def _opt(argv, name, default):
    return argv[argv.index(name) + 1] if name in argv else default


def _read(path, bench):
    """A fits table (text columns as str) with the benchmark labels attached."""
    tab = Table.read(path)
    for c in tab.colnames:
        if tab[c].dtype.kind == "S":
            tab[c] = np.char.decode(np.asarray(tab[c]), "utf-8")
    return attach_benchmark_labels(tab, bench)


def _holdout(bench):
    """Usable S/N-100 rows of the shipped hold-out fits, benchmark labels attached."""
    tab = _read(HOLDOUT, bench)
    return _at_snr(tab[_usable(tab)], BenchCalConfig())


def outer_fold_of(hold, k, fold_seed) -> dict:
    """{hd: outer fold}, as :func:`musepayne.train.benchcal.evaluate` assigns them."""
    hd = np.asarray(hold["hd"])
    return dict(zip(hd, assign_folds(hd, k, fold_seed)))


def train(argv):
    tsp, tplp = argv[:2]
    seeds = [int(s) for s in _opt(argv, "--seeds", "0,1,2").split(",")]
    k = int(_opt(argv, "--k", 5))
    fold_seed = int(_opt(argv, "--fold-seed", 0))
    out = Path(_opt(argv, "--dir", "build/retrain"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    bench = read_benchmarks(SHARED / "benchmarks" / "gbs_v3_gdr3_tmass.csv")
    fold_of = outer_fold_of(_holdout(bench), k, fold_seed)
    ts = TrainingSet.read(tsp)
    tpl = GradientTemplates.load(tplp)
    recipe0 = _recipe(load_model("default"), ts.label_names)
    sets, idx = benchmark_library_spectra(SHARED, bench)
    # the S/N-100 spectra of the shipped hold-out table (calibrate: seed 1000 * cfg.seed + 10 * j + i)
    observed = {inst: observe(sets, inst, 100.0, i) for i, inst in enumerate(("muse", "lamost"))}
    hd_obs = np.asarray(bench["hd"])[idx]
    f_obs = np.array([fold_of.get(h, -1) for h in hd_obs])
    m_ts = match_benchmarks(ts.table["star_key"], bench)
    is_b = m_ts >= 0
    hd_ts = np.where(is_b, np.asarray(bench["hd"])[np.maximum(m_ts, 0)], "")
    f_ts = np.array([fold_of.get(h, -1) if b else -1 for h, b in zip(hd_ts, is_b)])
    lab = ts.labels
    y_ts = np.column_stack([np.asarray(bench[n], float)[np.maximum(m_ts, 0)] for n in BENCH_LABELS])
    e_ts = np.column_stack([np.asarray(bench[f"e_{n}"], float)[np.maximum(m_ts, 0)] for n in BENCH_LABELS])
    print(f"{is_b.sum()} benchmark spectra in the training set ({(is_b & (f_ts < 0)).sum()} of stars without "
          f"a usable hold-out fit: trained on with benchmark labels in every fold)", flush=True)
    units = [(f, g) for f in range(k) for g in range(f + 1, k)] if "--pairs" in argv else [(f,) for f in range(k)]
    for s in seeds:
        for unit in units:
            tag = f"pair{unit[0]}{unit[1]}" if len(unit) == 2 else f"fold{unit[0]}"
            path = out / f"fits_k{k}fs{fold_seed}_seed{s}_{tag}.fits"
            if path.exists():
                continue
            t0 = time.time()
            tr_b = is_b & ~np.isin(f_ts, unit)
            lmap = fit_calibration(lab[tr_b], y_ts[tr_b], np.zeros((tr_b.sum(), 3)), e_ts[tr_b],
                                   groups=hd_ts[tr_b], select=True)
            new = lab.copy()
            new[~is_b] = lmap.apply(lab[~is_b])
            new[tr_b] = y_ts[tr_b]
            keep = np.nonzero(~is_b | tr_b)[0]
            sub = ts.select(keep)
            mpath = out / f"model_k{k}fs{fold_seed}_seed{s}_{tag}.fits"
            if mpath.exists():
                model = load_model(mpath)
            else:
                res = train_model(sub.flux, sub.ivar, new[keep], ts.label_names, sub.wave, replace(recipe0, seed=s),
                                  templates=tpl, groups=np.asarray(sub.table["star_key"]))
                model = res.to_model()
                model.meta["name"] = f"retrain-k{k}fs{fold_seed}-{tag}-seed{s}"
                model.save(mpath)
            te = np.isin(f_obs, unit)
            obs_te = {kk: PreparedSpectra(p.wave, p.flux[te], p.ivar[te], p.mask[te], p.lsf_excess[te], p.cont[te],
                                          p.spectra[te], p.meta) for kk, p in observed.items()}
            tab = holdout_table([model], obs_te, bench, idx[te], [s])
            tab["fold"] = [fold_of[h] for h in np.asarray(tab["hd"]).astype(str)]
            tab["label_map"] = ", ".join(f"{n}: {v['choice']}" for n, v in lmap.meta["map"].items())
            for c in [c for c in tab.colnames if c.endswith("_bench")]:
                del tab[c]  # third-party labels: re-attached when read
            tab.write(path, overwrite=True)
            print(f"seed {s} {tag}: trained on {keep.size} spectra ({tr_b.sum()} benchmark spectra with "
                  f"benchmark labels), fitted {te.sum()} x 2 spectra, {time.time() - t0:.0f} s; label map "
                  f"{tab['label_map'][0]}", flush=True)


def _calibrated(learn, apply_rows):
    """Map (select=True, sys by type) learnt on ``learn`` rows, applied to ``apply_rows``:
    (calibrated labels, total errors, the calibration)."""
    x, y, e, be = _arrays(learn)
    c = fit_calibration(x, y, e, be, sys_bins="type", groups=np.asarray(learn["hd"]), select=True)
    xa, _, ea, _ = _arrays(apply_rows)
    xc = c.apply(xa)
    return xc, np.sqrt(ea**2 + c.sys(xc) ** 2), c


def _rows(tab, xc, err, method, inner):
    out = tab.copy()
    for kk, n in enumerate(BENCH_LABELS):
        out[n] = xc[:, kk]
        out[f"{n}_err"] = err[:, kk]
    out["method"] = method
    out["inner"] = inner
    return out


def calibrated_rows(hold, ret, fold_of, k, j, n_inner):
    """Every method's calibrated rows of every outer fold (columns ``method``, ``inner``) and the
    sys errors of the ``retrain+map`` and ``post_cell`` maps ({method: list of sys dicts})."""
    hd_h = np.asarray(hold["hd"])
    f_h = np.array([fold_of[h] for h in hd_h])
    hd_r = np.asarray(ret["hd"])
    f_r = np.array([fold_of[h] for h in hd_r])
    rows, sys_list = [], {"post_outer": [], "post_cell": [], "retrain+map": []}
    for f in range(k):
        xc, err, c_out = _calibrated(hold[f_h != f], hold[f_h == f])
        sys_list["post_outer"].append(c_out.sys_err)
        for a in range(n_inner):
            rows.append(_rows(hold[f_h == f], *_arrays(hold[f_h == f])[::2], "none", a))
            rows.append(_rows(hold[f_h == f], xc, err, "post_outer", a))
            rf = ret[f_r == f]
            rows.append(_rows(rf, *_arrays(rf)[::2], "retrain", a))
            stars = np.unique(hd_r[f_r == f])
            cell_of = dict(zip(stars, assign_folds(stars, j, 100 + a)))
            c_h = np.array([cell_of.get(h, -1) if ff == f else -1 for h, ff in zip(hd_h, f_h)])
            c_r = np.array([cell_of[h] for h in np.asarray(rf["hd"])])
            for i in range(j):
                test_h = (f_h == f) & (c_h == i)
                for name, learn, tab, test in (
                        ("retrain+map", rf[c_r != i], rf, c_r == i),
                        ("post_cell", hold[(f_h == f) & (c_h != i)], hold, test_h),
                        ("post_all", hold[~test_h], hold, test_h)):
                    if not test.any():
                        continue
                    xc_i, err_i, c = _calibrated(learn, tab[test])
                    rows.append(_rows(tab[test], xc_i, err_i, name, a))
                    if name in sys_list:
                        sys_list[name].append(c.sys_err)
    return vstack(rows), sys_list


def pair_rows(ret, pairs, fold_of, k):
    """``retrain+map_pair``: R_f's fits of fold f calibrated by a map learnt from the fits of the other
    folds' stars by models trained without fold f AND the star's own fold (pair models, seeds pooled)."""
    f_r = np.array([fold_of[h] for h in np.asarray(ret["hd"])])
    f_p = np.array([fold_of[h] for h in np.asarray(pairs["hd"])])
    unit = np.asarray(pairs["unit"])
    rows, sys_list = [], []
    for f in range(k):
        learn = pairs[np.char.find(unit.astype(str), str(f)) >= 0]
        learn = learn[np.array([fold_of[h] for h in np.asarray(learn["hd"])]) != f]
        assert not np.isin(f, f_p[np.isin(np.asarray(pairs["stellar_id"]), np.asarray(learn["stellar_id"]))])
        xc, err, c = _calibrated(learn, ret[f_r == f])
        rows.append(_rows(ret[f_r == f], xc, err, "retrain+map_pair", 0))
        sys_list.append(c.sys_err)
    return vstack(rows), sys_list


def figures(allt, seeds, n_inner):
    """{(method, instrument, group, label): {'bias', 'dispersion', 'pull_dispersion': per-seed means over
    the inner assignments}}."""
    out = {}
    meth = np.asarray(allt["method"]).astype(str)
    inst = np.asarray(allt["instrument"]).astype(str)
    seed = np.asarray(allt["seed"])
    inner = np.asarray(allt["inner"])
    for m in METHODS:
        for i in ("muse", "lamost"):
            acc = {}
            for s in seeds:
                for a in range(n_inner):
                    sel = (meth == m) & (inst == i) & (seed == s) & (inner == a)
                    if not sel.any():
                        continue
                    x, y, e, be = _arrays(allt[sel])
                    fig = calibration_figures(x, y, e, be)
                    for g in ("all", "dwarf", "giant"):
                        for n in BENCH_LABELS:
                            for q in ("bias", "dispersion", "pull_dispersion", "n"):
                                acc.setdefault((g, n, q, s), []).append(fig[g][n][q])
            for (g, n, q, s), v in acc.items():
                out.setdefault((m, i, g, n), {}).setdefault(q, {})[s] = float(np.mean(v))
    return out


def report(argv):
    seeds = [int(s) for s in _opt(argv, "--seeds", "0,1,2").split(",")]
    k = int(_opt(argv, "--k", 5))
    fold_seed = int(_opt(argv, "--fold-seed", 0))
    n_inner = int(_opt(argv, "--inner", 3))
    j = int(_opt(argv, "--j", 5))
    d = Path(_opt(argv, "--dir", "build/retrain"))
    bench = read_benchmarks(SHARED / "benchmarks" / "gbs_v3_gdr3_tmass.csv")
    hold = _holdout(bench)
    fold_of = outer_fold_of(hold, k, fold_seed)
    parts = []
    for s in seeds:
        for f in range(k):
            p = d / f"fits_k{k}fs{fold_seed}_seed{s}_fold{f}.fits"
            if not p.exists():
                raise SystemExit(f"{p} missing: run 'train' first")
            parts.append(_read(p, bench))
    ret = vstack(parts)
    ret = ret[_usable(ret)]
    hold = hold[np.isin(np.asarray(hold["seed"]), seeds)]
    print(f"outer folds: K={k}, fold seed {fold_seed}; inner cells J={j}, {n_inner} inner assignments; seeds {seeds}; "
          f"hold-out rows {len(hold)}, retrained rows {len(ret)}", flush=True)
    allt, sys_list = calibrated_rows(hold, ret, fold_of, k, j, n_inner)
    pseeds = [s for s in seeds if all((d / f"fits_k{k}fs{fold_seed}_seed{s}_pair{f}{g}.fits").exists()
                                      for f in range(k) for g in range(f + 1, k))]
    if pseeds:
        pp = []
        for s in pseeds:
            for f in range(k):
                for g in range(f + 1, k):
                    t = _read(d / f"fits_k{k}fs{fold_seed}_seed{s}_pair{f}{g}.fits", bench)
                    t["unit"] = f"{f}{g}"
                    pp.append(t)
        pairs = vstack(pp)
        pairs = pairs[_usable(pairs)]
        pr, sys_list["retrain+map_pair"] = pair_rows(ret[np.isin(np.asarray(ret["seed"]), pseeds)], pairs, fold_of, k)
        allt = vstack([allt, pr])
    print(f"pair models (trained without two outer folds) complete for seeds {pseeds}", flush=True)
    allt.write(d / f"report_k{k}fs{fold_seed}.fits", overwrite=True)
    fig = figures(allt, seeds, n_inner)
    for i in ("muse", "lamost"):
        print(f"\n{i.upper()} S/N 100: bias / dispersion [per seed] / pulls (mean over seeds"
              f"{' and inner assignments' if n_inner > 1 else ''})")
        for m in METHODS:
            for g in ("all", "dwarf", "giant"):
                parts = []
                for n in BENCH_LABELS:
                    if (m, i, g, n) not in fig:
                        continue
                    v = fig[(m, i, g, n)]
                    fmt = (lambda z: f"{z:.0f}") if n == "teff" else (lambda z: f"{z:.3f}")
                    b = np.mean(list(v["bias"].values()))
                    per = "/".join(fmt(v["dispersion"][s]) if s in v["dispersion"] else "-" for s in seeds)
                    dm = fmt(np.mean(list(v["dispersion"].values())))
                    parts.append(f"{n} {'+' if b >= 0 else '-'}{fmt(abs(b))} / {dm} "
                                 f"[{per}] / {np.mean(list(v['pull_dispersion'].values())):.2f}")
                if not parts:
                    continue
                nn = int(np.mean(list(fig[(m, i, g, 'teff')]['n'].values())))
                print(f"  {m:16s} {g:5s} n={nn:3d}  " + "; ".join(parts))
    for name, lst in sys_list.items():
        print(f"\nsys errors of the {name} maps (mean over {len(lst)} maps; dwarf / giant / all):")
        for n in BENCH_LABELS:
            vals = {t: [sd[n].get(t, np.nan) for sd in lst] for t in ("dwarf", "giant", "all")}
            print(f"  {n}: " + " / ".join(f"{np.nanmean(v):.3g}" for v in vals.values()))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "train":
        train(sys.argv[2:])
    elif cmd == "report":
        report(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
