"""``musepayne train``: train a DD-Payne model on a training set (needs PyTorch)."""

from __future__ import annotations

import click

from ..io.fits import sha256_file
from ..train.trainset import TrainingSet
from ._common import Timer, check_output_not_input, emit, exc_text, fail, json_option, reproducible_command


@click.command(name="train")
@click.argument("trainset", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output model file (FITS).")
@click.option("--arch", type=click.Choice(["mlp", "perpixel"]), default="mlp", show_default=True,
              help="mlp: labels -> hidden (leaky ReLU) -> pixels; perpixel: one sigmoid network per pixel.")
@click.option("--hidden", default=None,
              help="Hidden sizes, comma separated (mlp default 100,100; perpixel default 10).")
@click.option("--gradient-templates", "templates_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Gradient templates (musepayne gradients build) for the DD-Payne regularisation.")
@click.option("--gradient-weight", default=None,
              help="Weight of the gradient term: one number for all labels or 'teff=W,logg=W,fe_h=W'. 0 = data driven.")
@click.option("--gradient-loss", type=click.Choice(["corr", "mse"]), default="corr", show_default=True,
              help="corr: mean (1 - correlation) with the templates; mse: normalised squared difference.")
@click.option("--epochs", default=3000, show_default=True, help="Maximum number of (full-batch) epochs.")
@click.option("--learning-rate", default=3e-3, show_default=True, help="Adam step size.")
@click.option("--batch-size", default=None, type=int, help="Spectra per step (default: full batch).")
@click.option("--patience", default=30, show_default=True,
              help="Evaluations (every 20 epochs) without improvement before stopping.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Fraction of stars held out for early stopping.")
@click.option("--seed", default=0, show_default=True, help="Random seed (split, initialisation).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
@click.option("--outlier-clip", default=None, type=float,
              help="Retrain without training stars whose loss exceeds this many times the median (e.g. 5).")
@click.option("--min-pixel-coverage", default=0.5, show_default=True,
              help="Model pixels with data in fewer than this fraction of training spectra go to the model's "
                   "pixel mask (fits ignore them); 0 disables.")
@click.option("--model-scatter/--no-model-scatter", default=True, show_default=True,
              help="Estimate the model's intrinsic per-pixel scatter on the validation stars (each fitted at its "
                   "best labels) and store it in the model; fits put it into the errors and red_chi2_model.")
@click.option("--name", default=None, help="Model name stored in the file (the catalogue's 'model' column).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@json_option
def train(trainset, output, arch, hidden, templates_path, gradient_weight, gradient_loss, epochs, learning_rate,
          batch_size, patience, val_fraction, seed, device, threads, outlier_clip, min_pixel_coverage, model_scatter,
          name, progress, as_json):
    """Train a Payne emulator on TRAINSET (musepayne trainset build) and write a model file.

    The loss is the ivar-weighted squared residual (masked pixels, IVAR = 0,
    ignored) plus, per label, WEIGHT x (1 - correlation) between the network's
    gradient spectra and theoretical templates at the reference stars
    (DD-Payne; Ting et al. 2017, Xiang et al. 2019).  Early stopping on the
    validation loss; the model file records the training set hash, labels and
    ranges, this command, versions, regularisation and losses.
    """

    try:
        import torch

        from ..train.trainer import TrainConfig, parse_gradient_weights, train_model
    except ImportError:
        fail("training needs PyTorch: pip install 'musepayne[train]'", as_json)
    check_output_not_input(output, [trainset, templates_path], as_json)
    timer = Timer()
    with timer("read"):
        ts = TrainingSet.read(trainset)
        tpl = None
        if templates_path:
            from ..models.gradients import GradientTemplates

            tpl = GradientTemplates.load(templates_path)
    try:
        hid = tuple(int(h) for h in hidden.split(",")) if hidden else ((100, 100) if arch == "mlp" else (10,))
        gw = parse_gradient_weights(gradient_weight, ts.label_names)
        if any(v > 0 for v in gw.values()) and tpl is None:
            raise ValueError("--gradient-weight > 0 needs --gradient-templates")
        cfg = TrainConfig(arch=arch, hidden=hid, epochs=epochs, learning_rate=learning_rate, val_fraction=val_fraction,
                          patience=patience, seed=seed, device=device, gradient_weight=gw,
                          gradient_loss=gradient_loss, batch_size=batch_size, outlier_clip=outlier_clip,
                          min_pixel_coverage=min_pixel_coverage, model_scatter=model_scatter)
    except ValueError as exc:
        fail(exc_text(exc), as_json)
    if threads:
        torch.set_num_threads(threads)
    groups = ts.table["star_key"] if "star_key" in ts.table.colnames else None
    prov = {
        "command": reproducible_command("musepayne train"),
        "trainset": str(trainset).rsplit("/", 1)[-1],
        "trainset_sha256": sha256_file(trainset),
        "trainset_n": int(ts.n_spectra),
        "trainset_cuts": ts.meta.get("tscuts", ""),
        "trainset_source": ts.meta.get("tssource", ""),
        "trainset_command": ts.meta.get("tscmd", ""),
        "normalisation": f"musepayne.prepare.normalize pseudo-continuum, sigma {ts.meta.get('contwid', 50)} A",
        "resolution": str(ts.meta.get("tgtlsf", "")),
    }
    if name:
        prov["name"] = name
    if tpl is not None:
        prov["templates"] = str(templates_path).rsplit("/", 1)[-1]
        prov["templates_sha256"] = sha256_file(templates_path)
        prov["templates_command"] = str(tpl.meta.get("command", ""))
    try:
        with timer("train"):
            res = train_model(ts.flux, ts.ivar, ts.labels, ts.label_names, ts.wave, cfg, templates=tpl,
                              groups=groups, provenance=prov, progress=progress and not as_json,
                              label_units=tuple("K" if n == "teff" else "dex" for n in ts.label_names))
    except (ValueError, RuntimeError) as exc:
        fail(exc_text(exc), as_json)
    if res.meta.get("clipped"):
        res.meta["clipped_stars"] = [str(ts.table["stellar_id"][i]) for i in res.meta["clipped"]]
    with timer("write"):
        res.to_model().save(output)
    m = res.meta
    info = {"output": str(output), "arch": arch, "hidden": list(hid), "n_train": m["n_train"], "n_val": m["n_val"],
            "final_train_loss": m["final_train_loss"], "final_val_loss": m["final_val_loss"],
            "final_grad_loss": m["final_grad_loss"], "best_epoch": m["best_epoch"], "stopped": m["stopped"],
            "timings": timer.timings}
    emit(info, as_json, [
        f"trained {arch} {hid} on {m['n_train']} stars (val {m['n_val']}) -> {output}",
        f"loss train {m['final_train_loss']:.3e} val {m['final_val_loss']:.3e}; gradient terms {m['final_grad_loss']}; "
        f"best epoch {m['best_epoch']} ({m['stopped']}); {timer.timings['train']:.0f} s",
    ])
