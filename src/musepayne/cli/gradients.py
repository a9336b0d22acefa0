"""``musepayne gradients``: theoretical gradient templates (paper S3.2, Eq. 4)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from ..models.files import load_model
from ..models.gradients import CannonEmulator, build_templates, default_emulator_path, reference_grid
from ..models.model import ModelError
from ._common import Timer, emit, exc_text, fail, json_option, reproducible_command


@click.group(name="gradients")
def gradients():
    """Theoretical gradient spectra for DD-Payne regularisation and per-label flags."""


@gradients.command(name="build")
@click.option("--emulator", type=click.Path(dir_okay=False), default=None,
              help="Emulator .npz (default: $MUSEPAYNE_EMULATOR or "
                   "../shared/data/synthetic/doppler_cannon_coolstars_norm.npz relative to the current directory).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output template file (FITS).")
@click.option("--teff", "teff_grid", default="4000,7000,250", show_default=True, help="Reference Teff grid lo,hi,step (K).")
@click.option("--logg", "logg_grid", default="1,5,0.5", show_default=True, help="Reference logg grid lo,hi,step.")
@click.option("--feh", "feh_grid", default="-2.5,0.5,0.5", show_default=True, help="Reference [Fe/H] grid lo,hi,step.")
@click.option("--target-lsf", default="lamost", show_default=True, help="Resolution of the model grid (LSF spec).")
@click.option("--for-model", "for_model", default=None,
              help="Keep only the pixels this model uses (its pixel mask) and write compressed: the form "
                   "shipped beside a model as <model>.templates.fits, which fits then use for the per-label flags.")
@json_option
def build(emulator, output, teff_grid, logg_grid, feh_grid, target_lsf, for_model, as_json):
    """Build gradient templates d f/d label on the LAMOST grid from the emulator.

    Emulator spectra at label +- delta are convolved to the target LSF,
    converted air -> vacuum, rebinned onto the LAMOST grid and normalised
    with the same 50 A pseudo-continuum as data; the gradients are central
    differences of the normalised spectra.
    """

    timer = Timer()
    path = Path(emulator) if emulator else default_emulator_path()
    try:
        grids = [tuple(float(x) for x in g.split(",")) for g in (teff_grid, logg_grid, feh_grid)]
        if any(len(g) != 3 or g[2] <= 0 or g[1] < g[0] for g in grids):
            raise ValueError("each grid is lo,hi,step with hi >= lo and step > 0")
    except ValueError as exc:
        fail(f"bad reference grid: {exc}", as_json)
    try:
        with timer("load"):
            emu = CannonEmulator.load(path)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc_text(exc), as_json)
    ref = reference_grid(emu, *grids)
    if len(ref) == 0:
        fail("the reference grid has no star inside the emulator's training range", as_json)

    with timer("build"):
        tpl = build_templates(emu, ref, target_lsf=target_lsf)
    tpl = replace(tpl, meta={**tpl.meta, "command": reproducible_command("musepayne gradients")})
    if for_model is not None:
        try:
            model = load_model(for_model)
        except ModelError as exc:
            fail(str(exc), as_json)
        if model.wave.shape != tpl.wave.shape or not np.allclose(model.wave, tpl.wave, rtol=1e-9, atol=0):
            fail(f"{for_model}: the model's grid differs from the templates' grid", as_json)
        tpl = tpl.restricted(~np.asarray(model.pixel_mask, bool))
        tpl = replace(tpl, meta={**tpl.meta, "formodel": str(model.meta.get("name", for_model))})
    with timer("write"):
        tpl.save(output, compress=for_model is not None)
    info = {"output": str(output), "n_ref": int(tpl.n_ref), "labels": list(tpl.label_names),
            "n_pix": int(tpl.wave.size), "n_usable": int(tpl.usable.sum()), "emulator": str(path),
            "timings": timer.timings}
    emit(info, as_json, [f"{tpl.n_ref} reference stars x {len(tpl.label_names)} labels "
                         f"({', '.join(tpl.label_names)}) on {tpl.wave.size} px ({int(tpl.usable.sum())} usable) -> {output}"])
