"""``musepayne model``: import Payne networks into the musepayne format, describe model files."""

from __future__ import annotations

import os
from pathlib import Path

import click
from astropy.table import Table

from ..io.fits import sha256_file
from ..models.benchcal import info_lines, strip_benchmark_labels
from ..models.files import import_payne_npz, load_model
from ..models.gradients import GradientTemplates
from ..models.model import ModelError
from ..train.benchcal import BenchCalConfig, calibrate, figures_lines, pull_lines
from ..train.trainset import TrainingSet
from ._common import check_output_not_input, emit, exc_text, fail, json_option, reproducible_command


@click.group(name="model")
def model():
    """Model files: import Payne networks, describe models, add seed members, attach a benchmark calibration."""


@model.command(name="import")
@click.argument("npz", type=click.Path(dir_okay=False, exists=True))
@click.option("--format", "fmt", required=True, type=click.Choice(["payne-perpixel", "payne-mlp"]),
              help="payne-perpixel: per-pixel sigmoid networks (3-D w_array_0); payne-mlp: leaky-ReLU MLP.")
@click.option("--labels", required=True, help="Comma-separated label names in network order, e.g. teff,logg,fe_h.")
@click.option("--units", default=None, help="Comma-separated units (default: K for teff, km/s for v*, else dex).")
@click.option("--wavelength", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Wavelength grid: .npz ('wavelength' array) or .fits (WAVE HDU, 1-D image or table column).")
@click.option("--vacuum/--air", "vacuum", default=True, show_default=True, help="Frame of the wavelengths.")
@click.option("--name", default=None, help="Model name recorded in the file (catalogue 'model' column).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output model file (.fits).")
@json_option
def import_(npz, fmt, labels, units, wavelength, vacuum, name, output, as_json):
    """Convert a The Payne .npz network NPZ into a self-describing musepayne model file."""
    check_output_not_input(output, [npz, wavelength], as_json)
    names = [s.strip() for s in labels.split(",") if s.strip()]
    unit_list = [s.strip() for s in units.split(",")] if units else None
    meta = {"command": reproducible_command("musepayne model")}
    if name:
        meta["name"] = name
    try:
        m = import_payne_npz(npz, fmt, names, wavelength, frame="vacuum" if vacuum else "air",
                             label_units=unit_list, meta=meta)
        m.save(output)
    except (ModelError, ValueError, OSError) as exc:
        fail(exc_text(exc), as_json)
    d = m.describe()
    info = {"output": str(Path(output)), **{k: d[k] for k in ("arch", "n_pix", "frame", "labels")}}
    emit(info, as_json, [f"imported {fmt} network ({m.n_labels} labels, {m.n_pix} px, {m.frame}) -> {output}"])


def _recipe_mismatch(model_meta, member_meta) -> str:
    """Why a member is not the model's recipe trained with another seed ('' when it is)."""
    a, b = model_meta.get("trainset_sha256"), member_meta.get("trainset_sha256")
    if a and b and a != b:
        return "trained on another training set (trainset_sha256 differs)"
    if a and not b:
        return "its provenance does not record its training set (no trainset_sha256)"
    na, nb = model_meta.get("n_train"), member_meta.get("n_train")
    if na is not None and nb is not None and na != nb:
        return f"trained on another training set ({nb} training spectra, the model {na})"
    ca, cb = dict(model_meta.get("train_config") or {}), dict(member_meta.get("train_config") or {})
    ca.pop("seed", None)
    cb.pop("seed", None)
    if ca and cb and ca != cb:
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        return "trained with another recipe (" + ", ".join(diff) + " differ)"
    if model_meta.get("seed") is not None and member_meta.get("seed") == model_meta.get("seed"):
        return f"trained with the model's own seed ({model_meta.get('seed')})"
    return ""


@model.command(name="add-members")
@click.argument("path")
@click.argument("members", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output model file (.fits).")
@json_option
def add_members(path, members, output, as_json):
    """Store seed members in MODEL: MEMBERS are MODEL's recipe trained on its training set with other seeds
    (e.g. ``musepayne train ... --seed 1``).  Fits then report the labels' spread over them, X_err_seed (part of
    X_err_sys with a benchmark calibration; re-run ``calibrate-benchmark`` so the sys errors are solved beside it).
    """
    check_output_not_input(output, list(members), as_json)
    try:
        m = load_model(path)
        mems = [load_model(p) for p in members]
    except ModelError as exc:
        fail(exc_text(exc), as_json)
    for p, mm in zip(members, mems):
        why = _recipe_mismatch(m.meta, mm.meta)
        if why:
            fail(f"{p}: not a seed member of {path}: {why}", as_json)
    seeds = [mm.meta.get("seed") for mm in mems]
    if len(set(seeds)) != len(seeds):
        fail(f"members must have distinct seeds, got {seeds}", as_json)
    try:
        new = m.with_seed_members(mems)
    except ModelError as exc:
        fail(exc_text(exc), as_json)
    new.meta = dict(m.meta)
    new.meta["seed_members"] = [{"seed": mm.meta.get("seed"), "file": Path(p).name, "sha256": sha256_file(p)}
                                for p, mm in zip(members, mems)]
    new.meta["seed_members_command"] = reproducible_command("musepayne model")
    try:
        new.save(output)
    except OSError as exc:
        fail(exc_text(exc), as_json)
    lines = [f"{len(mems)} seed members (seeds {', '.join(str(s) for s in seeds)}) -> {output}"]
    if new.benchmark_calibration is not None:
        lines.append("note: the model's benchmark calibration was solved without the seed spread; re-run "
                     "'musepayne model calibrate-benchmark' on the output")
    emit({"output": str(output), "seeds": seeds}, as_json, lines)


@model.command(name="info")
@click.argument("path")
@json_option
def info(path, as_json):
    """Describe a musepayne model file (labels, ranges, grid, provenance)."""
    try:
        m = load_model(path)
    except ModelError as exc:
        fail(exc_text(exc), as_json)
    d = m.describe()
    d["path"] = m.path
    lines = [f"{m.path}: {m.arch} model, {m.n_pix} px {m.wave[0]:.2f}-{m.wave[-1]:.2f} A ({m.frame})"]
    if m.arch == "perpixel":
        lines[0] += f", {m.n_hidden} hidden neurons per pixel"
    else:
        lines[0] += ", layers " + "-".join(str(w.shape[1]) for w in m.weights) + f"-{m.n_pix}"
    lines.append(f"  usable pixels: {d['n_pix_usable']} of {m.n_pix}, "
                 + ", ".join(f"{a:.2f}-{b:.2f}" for a, b in d["usable_ranges"]) + f" A ({m.frame})")
    for lab in d["labels"]:
        lines.append(f"  {lab['name']:>10s} [{lab['unit']}]  {lab['x_min']:.4g} .. {lab['x_max']:.4g}")
    for k, v in sorted(m.meta.items()):
        lines.append(f"  {k}: {v}")
    if m.seed_members:
        d["n_seed_members"] = len(m.seed_members)
        lines.append(f"  seed members: {len(m.seed_members)} (seeds "
                     + ", ".join(str(mm.meta.get('seed', '?')) for mm in m.seed_members)
                     + "): fits report the labels' spread over them, X_err_seed")
    if m.benchmark_calibration is not None:
        d["benchmark_calibration"] = m.benchmark_calibration.describe()
        lines += info_lines(m.benchmark_calibration)
    emit(d, as_json, lines)


@model.command(name="calibrate-benchmark")
@click.argument("path")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Model file to write: MODEL with the benchmark calibration (HDU BENCHCAL) attached.")
@click.option("--shared", "shared", default=None, type=click.Path(file_okay=False),
              help="Shared data folder (libraries/, benchmarks/, synthetic/); default $MUSEPAYNE_SHARED or ../shared/data.")
@click.option("--holdout-model", "holdout", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Model(s) of MODEL's recipe trained WITHOUT the benchmark stars (one per seed; repeatable). "
                   "Default: train them here (--seeds), a few minutes each.")
@click.option("--trainset", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Training set to train the hold-out models on (benchmark stars are removed); default: build it.")
@click.option("--templates", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Gradient templates for the hold-out models; default: build them.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds of the hold-out models trained here.")
@click.option("--snr", default=100.0, show_default=True, help="S/N of the simulated MUSE / LAMOST observations.")
@click.option("--k", default=5, show_default=True, help="Folds over the benchmark stars for the CV figures.")
@click.option("--select/--no-select", default=True, show_default=True,
              help="Choose each label's map (inputs, offset / linear / quadratic, ridge) by CV over the benchmark "
                   "stars; --no-select: the polynomial of --degree with --ridge for every label.")
@click.option("--degree", default=2, show_default=True, type=click.IntRange(0, 2),
              help="Degree of the post-fit map (--no-select).")
@click.option("--ridge", default=1.0, show_default=True, help="Ridge penalty of the map's non-constant terms (--no-select).")
@click.option("--sys-bins", type=click.Choice(["all", "type"]), default="type", show_default=True,
              help="Systematic errors: one per label, or per star type (dwarf / giant / metal-poor giant).")
@click.option("--threads", default=1, show_default=True, help="torch threads when training hold-out models.")
@click.option("--table", "table_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the per-spectrum hold-out fits (FITS table; without the benchmark labels, "
                   "which --holdout-table re-attaches from the benchmark table by HD).")
@click.option("--holdout-table", "table_in", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Reuse the hold-out fits of a previous run (its --table): nothing is trained or fitted.")
@click.option("--save-holdout", default=None, type=click.Path(file_okay=False),
              help="Folder to keep the hold-out models trained here (holdout_seed<S>.fits), for --holdout-model.")
@click.option("--check-snr", default="20,50", show_default=True,
              help="Further S/N at which the benchmark spectra are fitted to check the errors ('' for none).")
@json_option
def calibrate_benchmark(path, output, shared, holdout, trainset, templates, seeds, snr, k, select, degree, ridge,
                        sys_bins, threads, table_out, table_in, save_holdout, check_snr, as_json):
    """Attach a Gaia FGK benchmark-scale calibration (label map + systematic errors) to MODEL.

    Benchmark-star spectra of MILES/STELIB (matched by HD number) are observed as MUSE and LAMOST,
    prepared and fitted by hold-out models (MODEL's recipe trained without them); the map and
    the sys errors are fitted to them, and cross-validated over the stars (musepayne.models.benchcal).
    """
    try:
        m = load_model(path)
        hold = [load_model(h) for h in holdout] or None
    except ModelError as exc:
        fail(str(exc), as_json)
    shared = Path(shared or os.environ.get("MUSEPAYNE_SHARED", Path("..") / "shared" / "data"))
    ts = tpl = tab_in = None
    inputs = {Path(p).name: sha256_file(p) for p in (path, trainset, templates, table_in, *holdout)
              if p and Path(p).is_file()}
    if table_in:
        tab_in = Table.read(table_in)
    elif hold is None:
        try:
            import torch  # noqa: PLC0415 - heavy optional dependency, only to train hold-out models
        except ImportError:
            fail("training hold-out models needs PyTorch: pip install 'musepayne[train]' (or pass --holdout-model)",
                 as_json)
        torch.set_num_threads(max(1, threads))
        if trainset:
            ts = TrainingSet.read(trainset)
        if templates:
            tpl = GradientTemplates.load(templates)
    try:
        checks = tuple(float(x) for x in check_snr.split(",") if x.strip())
    except ValueError:
        fail(f"--check-snr: not a comma-separated list of numbers: {check_snr!r}", as_json)
    cfg = BenchCalConfig(seeds=tuple(int(x) for x in seeds.split(",") if x.strip()), k=k, snr=snr, degree=degree,
                         ridge=ridge, sys_bins=sys_bins, select=select, check_snr=checks)
    command = reproducible_command("musepayne model")
    say = None if as_json else (lambda msg: click.echo(msg, err=True))

    def keep(seed, hm):
        Path(save_holdout).mkdir(parents=True, exist_ok=True)
        hm.save(Path(save_holdout) / f"holdout_seed{seed}.fits")

    try:
        cal, figures, tab = calibrate(m, shared, cfg, holdout_models=hold, trainset=ts, templates=tpl, progress=say,
                                      command=command, table=tab_in, save_holdout=keep if save_holdout else None,
                                      inputs=inputs)
    except (ValueError, OSError) as exc:
        fail(str(exc), as_json)
    m.benchmark_calibration = cal
    m.meta["benchmark_calibration_command"] = command
    m.save(output)
    if table_out:  # the benchmark labels (third-party) are not copied: re-attached by HD when read back
        strip_benchmark_labels(tab).write(table_out, overwrite=True)
    info = {"output": str(output), "sys_err": cal.sys_err, "checks_muse": cal.meta["checks_muse"],
            "cv": cal.meta["cv"], "n_stars": cal.meta["n_stars"]}

    pulls = {i: {float(sn): v for sn, v in d.items()} for i, d in cal.meta["cv_pulls"].items()}
    chosen = ", ".join(f"{n} {v['choice']}" for n, v in cal.meta.get("map", {}).items())
    emit(info, as_json, figures_lines(figures)
         + [f"map chosen by CV: {chosen}",
            "error calibration, pulls teff/logg/fe_h (out of fold, seeds pooled):"] + pull_lines(pulls)
         + [f"checks (MUSE, seed mean): {cal.meta['checks_muse']}", f"-> {output}"])
