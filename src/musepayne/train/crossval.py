"""K-fold cross-validation of trained models on library stars observed as MUSE and LAMOST.

For each of ``k`` folds (stars grouped by ``star_key``, so a star present in
MILES and STELIB never sits on both sides): train on the other folds
(:func:`musepayne.train.trainer.train_model`), take the held-out stars inside the
validation box (default 4000 < Teff < 7000 K, [Fe/H] > -2.0) from their
*native* library files, simulate them as MUSE (MUSE LSF, 1.25 A air grid)
and as LAMOST (R = 1800, vacuum log-linear grid) observations at S/N
``snr`` (:mod:`musepayne.train.trainset`), prepare them with the pipeline
(:class:`musepayne.prepare.preparer.Preparer`, standard mode) and fit them
(:class:`musepayne.fit.fitter.Fitter`, RV free) with the fold's model.

Statistics follow the paper: bias = median of the differences, dispersion =
half the 15.87-84.13 percentile range.  Reported for fit - literature
(MUSE and LAMOST) and MUSE - LAMOST (instrument consistency, the paper's
validation 1), plus the median gradient correlation of each label over the
validation stars when templates are given.

Baseline (``CVConfig.baseline``, a :class:`musepayne.models.cannon.CannonConfig`):
a quadratic Cannon (Ness et al. 2015) is trained on exactly the same
training spectra of each fold and fitted to exactly the same prepared
MUSE/LAMOST test spectra (same noise realisations) with the same
:class:`~musepayne.fit.fitter.Fitter` settings (RV free, ``LSF_EXCESS`` forward
model, label box), its intrinsic scatter added to the test-step errors.  Its
per-star results are the ``*_cannon`` columns and its statistics
``summary['baseline']``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..fit.fitter import FitConfig, Fitter
from ..io.prepared import PreparedSpectra
from ..io.readers import read_miles, read_stelib
from ..io.spectra import ReaderError
from ..models.cannon import CannonConfig, train_cannon
from ..models.files import load_model
from ..models.gradients import CannonEmulator, GradientTemplates, build_templates
from ..prepare.preparer import PrepareConfig, Preparer
from ..threads import blas_threads
from .trainer import TrainConfig, train_model
from .trainset import TrainingSet, build_trainset, simulate_lamost_observation, simulate_muse_observation

__all__ = ["CVConfig", "cross_validate", "dispersion", "bias", "assign_folds", "cv_summary"]


def dispersion(x):
    """Half the 15.87-84.13 percentile range (NaN-aware), per column.

    Parameters
    ----------
    x : array_like
        Differences, shape (n,) or (n, n_labels), in the labels' units (K, dex).

    Returns
    -------
    float or numpy.ndarray
        Robust 1-sigma per column, same unit.
    """
    lo, hi = np.nanpercentile(np.asarray(x, float), [15.87, 84.13], axis=0)
    return 0.5 * (hi - lo)


def bias(x):
    """Median (NaN-aware), per column.

    Parameters
    ----------
    x : array_like
        Differences, shape (n,) or (n, n_labels), in the labels' units (K, dex).

    Returns
    -------
    float or numpy.ndarray
        Median per column, same unit.
    """
    return np.nanmedian(np.asarray(x, float), axis=0)


def assign_folds(groups, k, seed):
    """Fold index per item; all members of a group in the same fold, folds balanced by count.

    Groups are taken in a random order (``seed``) and each goes to the fold with the fewest items so far.

    Parameters
    ----------
    groups : array_like
        Group key per item (e.g. ``star_key``), shape (n,).
    k : int
        Number of folds.
    seed : int
        Seed of the group order.

    Returns
    -------
    numpy.ndarray
        int fold index in [0, k) per item, shape (n,).
    """
    groups = np.asarray(groups)
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(uniq.size)
    load = np.zeros(k, int)
    gfold = np.empty(uniq.size, int)
    for g in order:
        f = int(np.argmin(load))
        gfold[g] = f
        load[f] += counts[g]
    return gfold[inv]


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation settings (the issue's defaults).

    Attributes
    ----------
    k : int
        Number of folds (5).
    snr : float
        S/N per pixel of the simulated MUSE and LAMOST observations (100).
    teff_range : tuple of (float, float)
        Open Teff range in K of the validation stars (4000, 7000).
    feh_min : float
        Validation stars have [Fe/H] > feh_min, dex (-2.0).
    seed : int
        Seed of the fold assignment and noise; training seeds are ``train.seed + fold``.
    train : TrainConfig
        Training settings of each fold.
    instruments : tuple of str
        Observations to simulate, from 'muse' and 'lamost'.
    baseline : CannonConfig or None
        Quadratic-Cannon baseline settings, or None (no baseline).
    """

    k: int = 5
    snr: float = 100.0
    teff_range: tuple = (4000.0, 7000.0)
    feh_min: float = -2.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    instruments: tuple = ("muse", "lamost")
    #: :class:`musepayne.models.cannon.CannonConfig` of the quadratic-Cannon baseline, or None (no baseline)
    baseline: object = None


def _read_native(row):
    src = str(row["source"])
    return read_miles(src) if str(row["instrument"]) == "miles" else read_stelib(src)


def _read_natives(t, te, progress):
    """The native library spectra of rows ``te`` of ``t``: ``(spectra, rows read)``; unreadable ones are reported."""
    natives, keep = [], []
    for i in te:
        try:
            natives.append(_read_native(t[i]))
            keep.append(i)
        except (ReaderError, OSError) as exc:  # keep going; the star is reported as missing
            if progress:
                progress(f"  cannot re-read {t['source'][i]}: {exc}")
    return natives, keep


def _fit_fold(natives, cfg, rng, prep, fitters, templates, seconds):
    """Simulate, prepare and fit one fold's stars per instrument: ``{suffix: {instrument: catalogue}}``.

    ``fitters`` maps the column suffix to its fitter (``""``: the trained model, :data:`BASELINE_SUFFIX`:
    the Cannon baseline, fitted to the same prepared spectra, i.e. the same noise); ``seconds`` is updated.
    """
    sims = {"muse": simulate_muse_observation, "lamost": simulate_lamost_observation}
    cats = {suffix: {} for suffix in fitters}
    for inst in cfg.instruments:
        prepped = PreparedSpectra.concatenate([prep(sims[inst](s, cfg.snr, rng)) for s in natives])
        for suffix, fitter in fitters.items():
            t0 = time.perf_counter()
            with blas_threads(1):  # products per chunk (small): one BLAS thread, as musepayne fit
                res = fitter.fit_arrays(prepped)
            # for the baseline the Fitter adds the Cannon's scatter
            cats[suffix][inst] = fitter.catalogue(prepped.spectra, res, templates=templates)
            seconds["baseline_fit" if suffix else "fit"] += time.perf_counter() - t0
    return cats


def _fold_rows(t, keep, groups, f, names, lab, cats):
    """One output row (dict) per validation star of fold ``f``: literature and fitted labels per instrument."""
    rows = []
    for j, i in enumerate(keep):
        r = {"stellar_id": str(t["stellar_id"][i]), "star_key": str(groups[i]), "fold": f,
             "library": str(t["instrument"][i])}
        for k, n in enumerate(names):
            r[f"{n}_lit"] = float(lab[i, k])
        for suffix, cc in cats.items():
            for inst, cat in cc.items():
                for n in names:
                    r[f"{n}_{inst}{suffix}"] = float(cat[n][j])
                    r[f"{n}_err_{inst}{suffix}"] = float(cat[f"{n}_err"][j])
                    if f"{n}_gradcorr" in cat.colnames:
                        r[f"{n}_gradcorr_{inst}{suffix}"] = float(cat[f"{n}_gradcorr"][j])
                r[f"rv_{inst}{suffix}"] = float(cat["rv"][j])
                r[f"status_{inst}{suffix}"] = str(cat["status"][j])
        rows.append(r)
    return rows


def cross_validate(trainset: TrainingSet, templates=None, config: CVConfig | None = None, fit_config=None,
                   progress=None):
    """Run K-fold CV; returns ``(table, summary)``.

    ``table``: one row per validation star (stellar_id, fold, literature
    labels, fitted labels and errors per instrument, status, gradcorr);
    ``summary``: dict of dispersions, biases and median gradcorr.
    ``progress``: optional callable ``progress(message)``.

    Parameters
    ----------
    trainset : TrainingSet
        Training set with ``teff`` (K), ``logg``, ``fe_h`` (dex) labels and ``source``/``instrument``
        columns pointing at the native library files.
    templates : GradientTemplates, optional
        Gradient templates (regularisation and gradcorr).
    config : CVConfig, optional
        Settings (default ``CVConfig()``).
    fit_config : FitConfig, optional
        Fitter settings (default ``FitConfig()``).
    progress : callable, optional
        ``progress(message: str)``.

    Returns
    -------
    table : astropy.table.Table
        One row per validation star; labels in K and dex, RV in km/s.
    summary : dict
        See :func:`cv_summary`, plus ``seconds`` (wall time per step) and, with a baseline, ``baseline``.
    """

    cfg = config or CVConfig()
    fcfg = fit_config or FitConfig()
    names = trainset.label_names
    lab = trainset.labels
    t = trainset.table
    groups = np.asarray(t["star_key"]) if "star_key" in t.colnames else np.asarray(t["stellar_id"])
    folds = assign_folds(groups, cfg.k, cfg.seed)
    it, ig, ife = (names.index(n) for n in ("teff", "logg", "fe_h"))
    in_box = (lab[:, it] > cfg.teff_range[0]) & (lab[:, it] < cfg.teff_range[1]) & (lab[:, ife] > cfg.feh_min)
    prep = Preparer(PrepareConfig())
    rows = []
    seconds = {"train": 0.0, "fit": 0.0, "baseline_train": 0.0, "baseline_fit": 0.0}
    for f in range(cfg.k):
        tr = np.nonzero(folds != f)[0]
        te = np.nonzero((folds == f) & in_box)[0]
        if progress:
            progress(f"fold {f + 1}/{cfg.k}: training on {tr.size} stars, validating {te.size}")
        sub = trainset.select(tr)
        tcfg = replace(cfg.train, seed=cfg.train.seed + f)
        t0 = time.perf_counter()
        res = train_model(sub.flux, sub.ivar, sub.labels, names, sub.wave, tcfg, templates=templates,
                          groups=np.asarray(sub.table["star_key"]) if "star_key" in sub.table.colnames else None)
        model = res.to_model()
        fitter = Fitter(model, fcfg)
        seconds["train"] += time.perf_counter() - t0
        cannon = None
        if cfg.baseline is not None:
            t0 = time.perf_counter()
            cannon = train_cannon(sub.flux, sub.ivar, sub.labels, names, sub.wave, cfg.baseline)
            cfitter = Fitter(cannon, replace(fcfg, model_scatter="weights"))  # Ness et al.'s test step
            seconds["baseline_train"] += time.perf_counter() - t0
        natives, keep = _read_natives(t, te, progress)
        if not keep:
            continue
        rng = np.random.default_rng(cfg.seed * 1000 + f)
        fitters = {"": fitter} if cannon is None else {"": fitter, BASELINE_SUFFIX: cfitter}
        cats = _fit_fold(natives, cfg, rng, prep, fitters, templates, seconds)
        rows.extend(_fold_rows(t, keep, groups, f, names, lab, cats))
    table = Table(rows=rows) if rows else Table()
    summary = cv_summary(table, names, cfg.instruments)
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items() if cfg.baseline is not None
                          or not k.startswith("baseline")}
    if cfg.baseline is not None:
        summary["baseline"] = {"method": BASELINE_METHOD, **cv_summary(table, names, cfg.instruments, BASELINE_SUFFIX)}
    return table, summary


#: column suffix and description of the quadratic-Cannon baseline
BASELINE_SUFFIX = "_cannon"
BASELINE_METHOD = ("quadratic Cannon (Ness et al. 2015), same folds, training spectra and prepared test spectra; "
                   "test step with the same Fitter (RV free, LSF_EXCESS forward model, scatter in the weights)")


def cv_summary(table: Table, names=("teff", "logg", "fe_h"), instruments=("muse", "lamost"), suffix="") -> dict:
    """Dispersion / bias of fit - literature per instrument, MUSE - LAMOST, median gradcorr.

    ``suffix``: read the columns ``<label>_<instrument><suffix>`` (e.g. ``'_cannon'`` for the baseline).

    Parameters
    ----------
    table : astropy.table.Table
        Per-star table of :func:`cross_validate`.
    names : sequence of str, optional
        Labels (default teff, logg, fe_h).
    instruments : sequence of str, optional
        Instruments present (default muse, lamost).
    suffix : str, optional
        Column suffix.

    Returns
    -------
    dict
        ``n_stars``; ``<inst>_minus_lit`` and ``muse_minus_lamost``: ``{label: {"dispersion", "bias"}}``
        (K, dex); ``<inst>_gradcorr_median``: ``{label: float}`` when the columns exist.
    """
    out = {"n_stars": len(table)}
    if not len(table):
        return out
    for inst in instruments:
        d = np.stack([np.asarray(table[f"{n}_{inst}{suffix}"], float) - np.asarray(table[f"{n}_lit"], float)
                      for n in names], 1)
        out[f"{inst}_minus_lit"] = {n: {"dispersion": float(s), "bias": float(b)}
                                    for n, s, b in zip(names, dispersion(d), bias(d))}
        gcols = [f"{n}_gradcorr_{inst}{suffix}" for n in names]
        if all(c in table.colnames for c in gcols):
            out[f"{inst}_gradcorr_median"] = {n: float(np.nanmedian(np.asarray(table[c], float)))
                                              for n, c in zip(names, gcols)}
    if "muse" in instruments and "lamost" in instruments:
        d = np.stack([np.asarray(table[f"{n}_muse{suffix}"], float) - np.asarray(table[f"{n}_lamost{suffix}"], float)
                      for n in names], 1)
        out["muse_minus_lamost"] = {n: {"dispersion": float(s), "bias": float(b)}
                                    for n, s, b in zip(names, dispersion(d), bias(d))}
    return out


# --------------------------------------------------------------------------- `musepayne validate --cv`
#: the issue's acceptance thresholds: (label, dispersion limit) per comparison
CV_LIMITS = {
    "muse_minus_lit": {"teff": 100.0, "logg": 0.20, "fe_h": 0.10},
    "muse_minus_lamost": {"teff": 50.0, "logg": 0.10, "fe_h": 0.05},
}
GRADCORR_MIN = 0.7


def cv_checks(reg: dict, plain: dict | None = None) -> dict:
    """Pass/fail of the issue's criteria for CV summaries (regularised, and weight 0).

    Parameters
    ----------
    reg : dict
        :func:`cv_summary` of the regularised run.
    plain : dict, optional
        :func:`cv_summary` of the run without gradient regularisation.

    Returns
    -------
    dict of str to bool
        One entry per criterion of :data:`CV_LIMITS` (dispersion, and |bias| <= dispersion / 3 for
        fit - literature) and per label for gradcorr >= :data:`GRADCORR_MIN` and above weight 0.
    """
    out = {}
    for comp, lim in CV_LIMITS.items():
        for n, dmax in lim.items():
            s = reg.get(comp, {}).get(n)
            if s is None:
                continue
            out[f"{comp}_{n}_dispersion"] = bool(s["dispersion"] <= dmax)
            if comp == "muse_minus_lit":
                out[f"{comp}_{n}_bias"] = bool(abs(s["bias"]) <= s["dispersion"] / 3.0)
    g = reg.get("muse_gradcorr_median", {})
    g0 = (plain or {}).get("muse_gradcorr_median", {})
    for n, v in g.items():
        out[f"gradcorr_{n}_ge_{GRADCORR_MIN}"] = bool(v >= GRADCORR_MIN)
        if n in g0:
            out[f"gradcorr_{n}_above_weight0"] = bool(v > g0[n])
    return out


#: TrainConfig fields that are not part of a training recipe (set per run / per fold)
_NOT_RECIPE = ("seed", "device")


def default_recipe(label_names=("teff", "logg", "fe_h")) -> TrainConfig:
    """The :class:`TrainConfig` the shipped default model was trained with.

    Read from the default model's provenance ``train_config``; the documented defaults (gradient
    weight 3e-4 per label) when no default model is installed or it does not record them.

    Parameters
    ----------
    label_names : sequence of str, optional
        Labels for the fallback gradient weights.

    Returns
    -------
    TrainConfig
        The recipe (without seed and device).
    """
    fallback = TrainConfig(gradient_weight={n: 3e-4 for n in label_names})
    try:
        tc = dict(load_model("default").meta.get("train_config") or {})
    except Exception:  # noqa: BLE001 - no (readable) default model: the documented recipe
        return fallback
    kw = {f.name: tc[f.name] for f in fields(TrainConfig) if f.name not in _NOT_RECIPE and f.name in tc}
    if not kw.get("gradient_weight"):
        kw["gradient_weight"] = fallback.gradient_weight
    try:
        return TrainConfig(**kw)
    except (TypeError, ValueError):
        return fallback


def run_cv(options: dict):
    """``musepayne validate --cv``: K-fold CV of the default model's recipe, with and without regularisation.

    The recipe is :func:`default_recipe` (architecture, regularisation, model scatter, ...).

    Uses ``options['trainset']`` / ``options['templates']`` when given, else builds both in
    memory from ``$MUSEPAYNE_SHARED`` or ``../shared/data``.  ``options['plot_dir']``, when
    given, receives the per-star tables (``cv_regularised.fits``, ``cv_weight0.fits``).
    ``options['baseline']`` (default True): also train and test the quadratic-Cannon
    baseline beside the regularised run (``info['baseline']``; its per-star results are the
    ``*_cannon`` columns of ``cv_regularised.fits``).  Takes ~10 min on one core (10 trainings).

    Parameters
    ----------
    options : dict
        ``trainset``, ``templates``, ``k`` (5), ``snr`` (100), ``plot_dir``, ``baseline`` (True).

    Returns
    -------
    info : dict
        Summaries of both runs, ``checks``, ``all_pass`` and ``seconds``.
    lines : list of str
        A human-readable report.
    """


    t0 = time.perf_counter()
    shared = Path(os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
    if options.get("trainset"):
        ts = TrainingSet.read(options["trainset"])
    else:
        ts = build_trainset(shared / "libraries" / "miles", shared / "libraries" / "stelib")
    if options.get("templates"):
        tpl = GradientTemplates.load(options["templates"])
    else:
        tpl = build_templates(CannonEmulator.load(shared / "synthetic" / "doppler_cannon_coolstars_norm.npz"))
    recipe = default_recipe(ts.label_names)
    weights = dict(recipe.gradient_weight)
    k = int(options.get("k", 5))
    snr = float(options.get("snr", 100.0))
    runs = {}
    with_baseline = bool(options.get("baseline", True))
    for name, w in (("regularised", weights), ("weight0", {})):
        tcfg = replace(recipe, gradient_weight=w)
        # the baseline once, beside the regularised run (the folds and test spectra of both runs are the same)
        base = (CannonConfig(min_pixel_coverage=tcfg.min_pixel_coverage)
                if with_baseline and name == "regularised" else None)
        cfg = CVConfig(k=k, snr=snr, train=tcfg, baseline=base)
        table, summ = cross_validate(ts, tpl, cfg)
        runs[name] = summ
        if options.get("plot_dir"):
            d = Path(options["plot_dir"])
            d.mkdir(parents=True, exist_ok=True)
            table.write(d / f"cv_{name}.fits", overwrite=True)
    baseline = runs["regularised"].pop("baseline", None)
    checks = cv_checks(runs["regularised"], runs["weight0"])
    info = {"k": k, "snr": snr, "gradient_weight": weights, "regularised": runs["regularised"],
            "weight0": runs["weight0"], "checks": checks, "all_pass": all(checks.values()),
            "seconds": round(time.perf_counter() - t0, 1)}
    if baseline is not None:
        info["baseline"] = baseline
    r, p = runs["regularised"], runs["weight0"]
    lines = [f"K-fold CV ({k} folds, S/N {snr:g}) over {r.get('n_stars', 0)} library stars "
             f"(4000 < Teff < 7000 K, [Fe/H] > -2), gradient weight {weights}:"]
    for comp in ("muse_minus_lit", "lamost_minus_lit", "muse_minus_lamost"):
        if comp in r:
            lines.append(f"  {comp:18s} " + "  ".join(
                f"{n}: disp {v['dispersion']:.3g} bias {v['bias']:+.3g}" for n, v in r[comp].items()))
    if "muse_gradcorr_median" in r:
        lines.append("  median gradcorr (MUSE fits): regularised "
                     + ", ".join(f"{n} {v:.3f}" for n, v in r["muse_gradcorr_median"].items())
                     + " | weight 0 " + ", ".join(f"{n} {v:.3f}" for n, v in p.get("muse_gradcorr_median", {}).items()))
    if baseline is not None:
        lines.append("  quadratic Cannon baseline (same folds, training spectra and test spectra):")
        for comp in ("muse_minus_lit", "lamost_minus_lit", "muse_minus_lamost"):
            if comp in baseline:
                lines.append(f"  {comp:18s} " + "  ".join(
                    f"{n}: disp {v['dispersion']:.3g} bias {v['bias']:+.3g}" for n, v in baseline[comp].items()))
    failed = [c for c, ok in checks.items() if not ok]
    lines.append("all criteria pass" if not failed else "failing: " + ", ".join(failed))
    return info, lines
