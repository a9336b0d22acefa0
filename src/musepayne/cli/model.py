"""``musepayne model``: import Payne networks into the musepayne format, describe model files."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, fail, json_option


@click.group(name="model")
def model():
    """Model files: import Payne networks, describe models."""


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
    import sys

    from ..models.model import ModelError, import_payne_npz

    names = [s.strip() for s in labels.split(",") if s.strip()]
    unit_list = [s.strip() for s in units.split(",")] if units else None
    meta = {"command": " ".join(["musepayne"] + sys.argv[1:]) if sys.argv else "musepayne model import"}
    if name:
        meta["name"] = name
    try:
        m = import_payne_npz(npz, fmt, names, wavelength, frame="vacuum" if vacuum else "air",
                             label_units=unit_list, meta=meta)
        m.save(output)
    except (ModelError, ValueError, OSError) as exc:
        fail(str(exc), as_json)
    d = m.describe()
    info = {"output": str(Path(output)), **{k: d[k] for k in ("arch", "n_pix", "frame", "labels")}}
    emit(info, as_json, [f"imported {fmt} network ({m.n_labels} labels, {m.n_pix} px, {m.frame}) -> {output}"])


@model.command(name="info")
@click.argument("path")
@json_option
def info(path, as_json):
    """Describe a musepayne model file (labels, ranges, grid, provenance)."""
    from ..models.model import ModelError, load_model

    try:
        m = load_model(path)
    except ModelError as exc:
        fail(str(exc), as_json)
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
    emit(d, as_json, lines)
