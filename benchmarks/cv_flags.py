r"""Measure the catalogue quality flags on a cross-validation of library stars.

Step ``prepare`` (slow, cached): K folds of the training set (stars grouped by ``star_key``,
:func:`musepayne.train.crossval.assign_folds`); per fold a model of the default recipe
(:func:`musepayne.train.crossval.default_recipe`) trained without the fold's stars, and the
fold's held-out library spectra observed as MUSE at S/N 20, 50 and 100 and prepared.  Models
and prepared spectra are written to the cache folder and reused.

Step ``fit``: every prepared file fitted by its fold's model; the catalogues (with the
catalogue's quality flags and diagnostics) stacked into ``cv_flags.fits`` with the catalogue
labels (``X_lit``), the fold and the S/N.

Step ``measure``: for each flag of ``fit_flags`` (and the new diagnostics at several thresholds),
the fraction of the worst 5 % of CV residuals it catches and the fraction of the other stars it
flags.  Residuals per label are |fit - catalogue label| / (that label's CV dispersion at the same
S/N); "combined" is the quadrature mean over labels.  Thresholds are chosen on this CV of library
stars with their catalogue labels, never on the Gaia benchmark stars.

Step ``reference``: the fitted labels and ``misfit`` of every held-out star at S/N 100, written
as the misfit reference that ships beside the model (``<model>.misfitref.fits``,
:func:`musepayne.fit.catalogue.misfit_reference`).  ``measure`` uses, for each fold, only the
other folds' stars as its reference.

Usage (one thread; ``prepare`` took ~12 CPU-minutes for 5 folds on the default recipe, 75-149
CPU-s of training per fold; ``fit`` ~2 min; the cache makes re-runs cheap)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cv_flags.py prepare --cache /tmp/flagscv \
        --trainset /tmp/retrain/trainset.fits --templates /tmp/retrain/templates.fits
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cv_flags.py fit --cache /tmp/flagscv \
        --trainset /tmp/retrain/trainset.fits --templates /tmp/retrain/templates.fits
    PYTHONPATH=src python benchmarks/cv_flags.py measure --cache /tmp/flagscv
    PYTHONPATH=src python benchmarks/cv_flags.py reference --cache /tmp/flagscv \
        --output src/musepayne/models/default.misfitref.fits

(``--trainset``: ``musepayne trainset build``; ``--templates``: ``musepayne gradients build``, the
files the default model was trained with.)  ``--members 2`` with ``prepare`` and ``fit`` gives every fold
model two seed members of its own (seeds 1000 j + the fold's seed; ~2 CPU-min each) and the table
``X_err_seed`` columns (the README's check of the seed term against the catalogue labels).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack

from musepayne.fit.catalogue import MISFIT_REF_FLOOR, apply_quality_flags, misfit_reference
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.flags import FIT_FLAGS, FlagThresholds
from musepayne.io.prepared import PreparedSpectra
from musepayne.io.readers import read_miles, read_stelib
from musepayne.models.files import load_model
from musepayne.models.gradients import GradientTemplates
from musepayne.prepare.preparer import PrepareConfig, Preparer
from musepayne.threads import blas_threads
from musepayne.train.crossval import assign_folds, default_recipe, dispersion
from musepayne.train.trainer import train_model
from musepayne.train.trainset import TrainingSet, simulate_muse_observation

SNRS = (20.0, 50.0, 100.0)
LABELS = ("teff", "logg", "fe_h")


def _native(row):
    src = str(row["source"])
    return read_miles(src) if str(row["instrument"]) == "miles" else read_stelib(src)


def prepare(args):
    import torch  # noqa: PLC0415 - training only

    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ts = TrainingSet.read(args.trainset)
    tpl = GradientTemplates.load(args.templates)
    t = ts.table
    groups = np.asarray(t["star_key"]) if "star_key" in t.colnames else np.asarray(t["stellar_id"])
    folds = assign_folds(groups, args.k, args.seed)
    recipe = default_recipe(ts.label_names)
    prep = Preparer(PrepareConfig())
    for f in _folds(args):
        # the fold model (seed recipe.seed + f) and its seed members (seeds 1000 j + recipe.seed + f)
        for j in range(args.members + 1):
            mpath = cache / (f"fold{f}.fits" if j == 0 else f"fold{f}_member{j}.fits")
            if mpath.exists():
                continue
            tr = np.nonzero(folds != f)[0]
            sub = ts.select(tr)
            t0 = time.process_time()
            res = train_model(sub.flux, sub.ivar, sub.labels, ts.label_names, sub.wave,
                              replace(recipe, seed=1000 * j + recipe.seed + f), templates=tpl,
                              groups=np.asarray(sub.table["star_key"]) if "star_key" in sub.table.colnames else None)
            model = res.to_model()
            model.meta["name"] = f"cvflags-fold{f}" + (f"-member{j}" if j else "")
            model.save(mpath)
            print(f"fold {f}: trained on {tr.size} spectra in {time.process_time() - t0:.0f} CPU-s -> {mpath}",
                  flush=True)
        te = np.nonzero(folds == f)[0]
        for snr in SNRS:
            ppath = cache / f"fold{f}_snr{snr:g}.fits"
            if ppath.exists():
                continue
            rng = np.random.default_rng(args.seed * 1000 + f * 10 + int(snr))
            parts, keep = [], []
            for i in te:
                try:
                    parts.append(prep(simulate_muse_observation(_native(t[i]), snr, rng)))
                    keep.append(i)
                except (OSError, ValueError) as exc:
                    print(f"  skip {t['source'][i]}: {exc}", flush=True)
            ps = PreparedSpectra.concatenate(parts)
            sp = ps.spectra
            sp["stellar_id"] = np.asarray(t["stellar_id"][keep]).astype(str)
            for k, n in enumerate(ts.label_names):
                sp[f"{n}_lit"] = ts.labels[keep, k]
            sp["star_key"] = groups[keep].astype(str)
            sp["fold"] = np.full(len(keep), f)
            sp["snr_sim"] = np.full(len(keep), snr)
            ps.write(ppath)
            print(f"fold {f} S/N {snr:g}: {len(keep)} held-out spectra -> {ppath}", flush=True)


def _diagnostics(model, ps, res, train_labels, label_names):
    """Candidate misfit diagnostics per spectrum (exact residual statistics from the prepared
    arrays and the best-fit model, and the label-space density of the fold's training set)."""
    from musepayne.flags import EXCLUDING_BITS  # noqa: PLC0415

    flux, ivar, mk = np.asarray(ps.flux, float), np.asarray(ps.ivar, float), np.asarray(ps.mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        use = (np.isfinite(flux) & (ivar > 0) & ((mk & EXCLUDING_BITS) == 0)
               & ~np.asarray(model.pixel_mask, bool)[None, :])
        s2 = np.asarray(model.scatter, float) ** 2
        out = {k: np.full(len(flux), np.nan) for k in ("dx_excess", "dx_chi2_deep", "dx_chi2_cont", "dx_knn5",
                                                          "dx_knn10", "dx_knn1")}
        for i in range(len(flux)):
            u = use[i] & np.isfinite(res.model_flux[i])
            if u.sum() < 50:
                continue
            r = flux[i, u] - res.model_flux[i, u]
            e2 = 1.0 / ivar[i, u]
            out["dx_excess"][i] = np.mean(r ** 2 - e2) / np.mean(s2[u])
            c2 = r ** 2 / (e2 + s2[u])
            mf = res.model_flux[i, u]
            out["dx_chi2_deep"][i] = c2[mf < np.quantile(mf, 0.1)].mean()
            out["dx_chi2_cont"][i] = c2[mf > np.quantile(mf, 0.5)].mean()
    scale = np.array([100.0, 0.2, 0.1])
    idx = [label_names.index(n) for n in LABELS]
    tl = train_labels[:, idx] / scale
    fl = res.labels[:, idx] / scale
    for i in range(len(fl)):
        if np.all(np.isfinite(fl[i])):
            d = np.sort(np.sqrt(((tl - fl[i]) ** 2).sum(1)))
            out["dx_knn1"][i], out["dx_knn5"][i], out["dx_knn10"][i] = d[0], d[4], d[9]
    return out


def _folds(args):
    return range(args.k) if args.folds is None else [int(v) for v in args.folds.split(",")]


def fit(args):
    cache = Path(args.cache)
    tpl = GradientTemplates.load(args.templates) if args.templates else None
    ts = TrainingSet.read(args.trainset)
    t = ts.table
    groups = np.asarray(t["star_key"]) if "star_key" in t.colnames else np.asarray(t["stellar_id"])
    folds = assign_folds(groups, args.k, args.seed)
    cats = []
    for f in _folds(args):
        model = load_model(cache / f"fold{f}.fits")
        members = [load_model(cache / f"fold{f}_member{j}.fits") for j in range(1, args.members + 1)]
        if members:  # the fold model's seed members: the catalogue gets X_err_seed
            model = model.with_seed_members(members)
        fitter = Fitter(model, FitConfig(keep_model=True))
        for snr in SNRS:
            ps = PreparedSpectra.read(cache / f"fold{f}_snr{snr:g}.fits")
            with blas_threads(1):
                res = fitter.fit_arrays(ps)
                cat = fitter.catalogue(ps.spectra, res, templates=tpl)
            for c in [c for c in ps.spectra.colnames if c.endswith("_lit")] + ["fold", "snr_sim", "star_key"]:
                cat[c] = ps.spectra[c]
            for c, v in _diagnostics(model, ps, res, ts.labels[folds != f], ts.label_names).items():
                cat[c] = v
            keep = [c for c in cat.colnames if cat[c].ndim == 1]
            cats.append(cat[keep])
            print(f"fold {f} S/N {snr:g}: fitted {len(cat)}", flush=True)
    out = vstack(cats, metadata_conflicts="silent")
    out.write(cache / args.out, overwrite=True)
    print(f"-> {cache / args.out} ({len(out)} rows)")


def worst(cat, frac=0.05):
    """Per label and combined: boolean 'among the worst ``frac`` of scaled residuals' (per S/N)."""
    snr = np.asarray(cat["snr_sim"], float)
    z = {}
    for n in LABELS:
        d = np.asarray(cat[n], float) - np.asarray(cat[f"{n}_lit"], float)
        s = np.full(len(cat), np.nan)
        for v in np.unique(snr):
            m = snr == v
            s[m] = np.abs(d[m]) / dispersion(d[m])
        z[n] = s
    z["combined"] = np.sqrt(np.nanmean(np.stack([z[n] ** 2 for n in LABELS]), axis=0))
    out = {}
    for k, s in z.items():
        s = np.where(np.isfinite(s), s, np.inf)  # failed fits count as the worst
        out[k] = s >= np.quantile(s, 1.0 - frac)
    return out, z


def rates(flag, bad):
    """(fraction of ``bad`` rows flagged, fraction of the other rows flagged)."""
    flag = np.asarray(flag, bool)
    return float(flag[bad].mean()), float(flag[~bad].mean())


def reference_rows(cat):
    """Rows that make a misfit reference: S/N 100, finite labels and misfit."""
    lab = np.column_stack([np.asarray(cat[n], float) for n in LABELS])
    mf = np.asarray(cat["misfit"], float)
    return (np.asarray(cat["snr_sim"], float) == 100.0) & np.all(np.isfinite(lab), 1) & np.isfinite(mf)


def leave_fold_out_reference(cat):
    """``misfit_ref`` of every row from the reference stars of the other folds (no star is its own reference)."""
    fold = np.asarray(cat["fold"])
    use = reference_rows(cat)
    lab = np.column_stack([np.asarray(cat[n], float) for n in LABELS])
    out, dist = np.full(len(cat), np.nan), np.full(len(cat), np.nan)
    for f in np.unique(fold):
        ref = cat[use & (fold != f)][list(LABELS) + ["misfit"]]
        out[fold == f], dist[fold == f] = misfit_reference(ref, lab[fold == f], LABELS)
    return out, dist


def reference(args):
    """Write the misfit reference of the recipe (every fold's S/N 100 stars) beside a model."""
    cat = Table.read(Path(args.cache) / args.out)
    ref = cat[reference_rows(cat)][list(LABELS) + ["misfit"]]
    for n in LABELS:
        ref[n] = np.round(np.asarray(ref[n], float), 3 if n == "teff" else 4).astype(np.float32)
    ref["misfit"] = np.asarray(ref["misfit"], np.float32)
    ref["teff"].unit = "K"
    ref.meta["COMMENT"] = ["misfit reference (musepayne.fit.catalogue.misfit_reference): fitted labels and misfit "
                           f"of {len(ref)} library stars held out of training ({args.k}-fold CV of the default "
                           "recipe, benchmarks/cv_flags.py), observed as MUSE at S/N 100"]
    ref.write(args.output, overwrite=True)
    print(f"-> {args.output} ({len(ref)} stars)")


def measure(args):
    cat = Table.read(Path(args.cache) / args.out)
    th = FlagThresholds(max_misfit=args.max_misfit, misfit_sigma=args.misfit_sigma, max_ref_dist=args.max_ref_dist)
    # each fold's reference from the other folds' stars (no star is its own reference)
    cat["misfit_ref"], cat["ref_dist"] = leave_fold_out_reference(cat)
    apply_quality_flags(cat, th)  # the thresholds under test (the fit step used the defaults)
    bad, _ = worst(cat)
    ff = np.asarray(cat["fit_flags"], int)
    snr = np.asarray(cat["snr_sim"], float)
    rows = [(name, ff & fl.value > 0) for name, fl in FIT_FLAGS.items()]
    rows.append(("any fit_flags", ff > 0))
    rows.append(("any but LOW_SNR", (ff & ~FIT_FLAGS["LOW_SNR"].value) > 0))
    for n in LABELS:
        if f"{n}_flag" in cat.colnames:
            rows.append((f"{n}_flag != 1", np.asarray(cat[f"{n}_flag"]) != 1))
    print(f"{len(cat)} CV rows ({len(np.unique(cat['star_key']))} stars x S/N {', '.join(f'{v:g}' for v in SNRS)}); "
          f"worst 5 % per S/N of |fit - lit| / CV dispersion; MISFIT: misfit - {th.misfit_sigma:g} misfit_err "
          f"> {th.max_misfit:g}")
    diff = {n: np.asarray(cat[n], float) - np.asarray(cat[n + "_lit"], float) for n in LABELS}
    print("dispersions (fit - lit): " + "; ".join(
        f"S/N {v:g} " + " ".join(f"{n} {dispersion(diff[n][snr == v]):.3g}" for n in LABELS) for v in SNRS))
    print("flag".ljust(18) + "".join(f"{k:>17s}" for k in bad) + "   (caught / false)")
    for name, fl in rows:
        print(name.ljust(18) + "".join("{:>8.2f} / {:<6.3f}".format(*rates(fl, b)) for b in bad.values()))
    print("per S/N, combined residual (caught / false):")
    for name, fl in rows:
        if name in ("MISFIT", "HIGH_CHI2", "LABEL_EDGE", "any fit_flags", "any but LOW_SNR"):
            print("  " + name.ljust(16) + "  ".join(
                "S/N {:g}: {:.2f} / {:.3f}".format(v, *rates(fl[snr == v], bad["combined"][snr == v]))
                for v in SNRS))
    mf, me = np.asarray(cat["misfit"], float), np.asarray(cat["misfit_err"], float)
    ref = np.maximum(np.nan_to_num(np.asarray(cat["misfit_ref"], float), nan=1.0), MISFIT_REF_FLOOR)
    print("MISFIT threshold scan, (misfit - sigma misfit_err) / misfit_ref > max_misfit "
          "(combined; all S/N | S/N 100); without the reference (misfit_ref = 1) in brackets:")
    for sig in (0.0, 1.0, 2.0):
        for a in (2.0, 2.5, 3.0, 3.5, 4.0):
            fl = np.nan_to_num((mf - sig * me) / ref, nan=-np.inf) > a
            fl0 = np.nan_to_num(mf - sig * me, nan=-np.inf) > a
            print(f"  sigma {sig:g} max_misfit {a:.1f}: " + "{:.2f} / {:.3f}".format(*rates(fl, bad["combined"]))
                  + " | {:.2f} / {:.3f}".format(*rates(fl[snr == 100], bad["combined"][snr == 100]))
                  + "   [{:.2f} / {:.3f}]".format(*rates(fl0, bad["combined"])))
    rd = np.nan_to_num(np.asarray(cat["ref_dist"], float), nan=-np.inf)
    print("SPARSE_LABELS threshold scan, ref_dist > max_ref_dist (combined; all S/N | S/N 100):")
    for k in (4.5, 5.0, 5.5, 6.0, 7.0):
        print(f"  max_ref_dist {k:g}: " + "{:.2f} / {:.3f}".format(*rates(rd > k, bad["combined"]))
              + " | {:.2f} / {:.3f}".format(*rates((rd > k)[snr == 100], bad["combined"][snr == 100])))
    both = (ff & (FIT_FLAGS["MISFIT"].value | FIT_FLAGS["SPARSE_LABELS"].value)) > 0
    print("MISFIT or SPARSE_LABELS: " + "  ".join(f"{k} " + "{:.2f} / {:.3f}".format(*rates(both, b))
                                                 for k, b in bad.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("prepare", "fit", "measure", "reference"))
    p.add_argument("--output", default=None, help="reference step: the .misfitref.fits to write")
    p.add_argument("--cache", default="build/cv_flags")
    p.add_argument("--trainset", default=None)
    p.add_argument("--templates", default=None)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-misfit", type=float, default=FlagThresholds().max_misfit)
    p.add_argument("--misfit-sigma", type=float, default=FlagThresholds().misfit_sigma)
    p.add_argument("--max-ref-dist", type=float, default=FlagThresholds().max_ref_dist)
    p.add_argument("--folds", default=None, help="prepare / fit steps: comma-separated folds (default all)")
    p.add_argument("--members", type=int, default=0,
                   help="prepare / fit steps: seed members per fold model (trained with seeds 1000 j + fold seed; "
                        "fit: X_err_seed in the table)")
    p.add_argument("--out", default="cv_flags.fits", help="fit / measure step: table name in the cache")
    args = p.parse_args(argv)
    {"prepare": prepare, "fit": fit, "measure": measure, "reference": reference}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
