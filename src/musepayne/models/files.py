"""Model files: reading a musepayne model (any architecture, with its pixel mask, scatter,
benchmark calibration and gradient templates) and importing Payne networks from ``.npz``.

The model classes are in :mod:`musepayne.models.model` (and :mod:`musepayne.models.cannon`);
this module sits above both, so loading any architecture needs no import inside a function.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import __version__
from ..io.fits import check_format, sha256_file
from ..io.spectra import ReaderError
from .benchcal import BenchmarkCalibration
from .cannon import CannonModel
from .gradients import GradientTemplates
from .model import FORMAT_NAME, FORMAT_VERSION, MLPPayne, ModelError, PerPixelPayne, SpectralModel, read_seed_members

__all__ = ["load_model", "import_payne_npz", "templates_path"]

_ARCHS = {"perpixel": PerPixelPayne, "mlp": MLPPayne, "cannon": CannonModel}


def _default_model_path():
    try:
        ref = resources.files("musepayne").joinpath("models", "default.fits")
        if ref.is_file():
            return Path(str(ref))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return None


def load_model(path) -> SpectralModel:
    """Read a musepayne model file and return the matching :class:`SpectralModel`.

    ``path='default'`` loads the package's shipped ``musepayne/models/default.fits``.

    Parameters
    ----------
    path : str or os.PathLike
        A musepayne model file (FITS), or ``'default'``.

    Returns
    -------
    SpectralModel
        The model (:class:`PerPixelPayne`, :class:`MLPPayne` or a Cannon), with ``path`` set, its pixel
        mask, scatter and benchmark calibration when the file has them, and its gradient templates when
        ``<stem>.templates.fits`` lies beside it.

    Raises
    ------
    ModelError
        If the file is missing, not a musepayne model, of an unknown architecture or inconsistent, or
        if its templates are unreadable.
    """
    if str(path) == "default":
        p = _default_model_path()
        if p is None:
            raise ModelError(
                "no default model shipped yet; train one with 'musepayne train ...' or import one with "
                "'musepayne model import ...' and pass it with --model")
        path = p
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        with fits.open(path, memmap=False) as h:
            ph = h[0].header
            check_format(ph, path, FORMAT_NAME, FORMAT_VERSION, "model", ModelError, version_key="MPMVERS",
                         hint="; convert Payne .npz files with 'musepayne model import'")
            arch = ph.get("ARCH")
            archs = _ARCHS
            if arch not in archs:
                raise ModelError(f"{path}: unknown architecture {arch!r}")
            lab = Table.read(h["LABELS"])
            meta = json.loads(str(Table.read(h["PROVENANCE"])["json"][0])) if "PROVENANCE" in h else {}
            common = dict(
                label_names=[str(x) for x in lab["name"]],
                label_units=[str(x) for x in lab["unit"]],
                x_min=np.array(lab["x_min"], np.float64),
                x_max=np.array(lab["x_max"], np.float64),
                wave=np.array(h["WAVE"].data, np.float64),
                frame=str(h["WAVE"].header.get("FRAME", "vacuum")),
                meta=meta,
            )
            model = archs[arch]._from_hdus(h, common)
            members = read_seed_members(h, archs[arch], common)
            if members:
                model = model.with_seed_members(members)
            if "PIXMASK" in h:
                model = model.with_pixel_mask(np.asarray(h["PIXMASK"].data) != 0)
            if "SCATTER" in h:
                model = model.with_scatter(np.asarray(h["SCATTER"].data, np.float64))
            if "BENCHCAL" in h:
                model.benchmark_calibration = BenchmarkCalibration.from_hdu(h["BENCHCAL"])
    except ModelError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read model ({type(exc).__name__}: {exc})") from None
    model.path = str(path)
    model.templates = _sibling_templates(path)
    model.misfit_reference = _sibling_misfit_reference(path)
    return model


def _sibling_path(model_path, kind: str) -> Path:
    """``<stem>.<kind>.fits`` beside the model file ``<stem>.fits`` (the files a model carries)."""
    p = Path(model_path)
    return p.with_name(f"{p.name.removesuffix('.fits')}.{kind}.fits")


def templates_path(model_path) -> Path:
    """Where a model's own gradient templates live: ``<stem>.templates.fits`` beside the model file.

    Parameters
    ----------
    model_path : str or os.PathLike
        The model file.

    Returns
    -------
    pathlib.Path
        The templates file (not checked for existence).
    """
    return _sibling_path(model_path, "templates")


def _sibling_templates(path):
    """The gradient templates shipped beside a model file, or None."""
    tp = templates_path(path)
    if not tp.is_file():
        return None
    try:
        return GradientTemplates.load(tp)
    except ReaderError as exc:
        raise ModelError(f"{tp}: the model's gradient templates are unreadable ({exc})") from None


def misfit_reference_path(model_path) -> Path:
    """Where a model's misfit reference lives: ``<stem>.misfitref.fits`` beside the model file
    (:func:`musepayne.fit.catalogue.misfit_reference`)."""
    return _sibling_path(model_path, "misfitref")


def _sibling_misfit_reference(path):
    """The misfit reference table shipped beside a model file, or None."""
    rp = misfit_reference_path(path)
    if not rp.is_file():
        return None
    try:
        ref = Table.read(rp)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{rp}: the model's misfit reference is unreadable ({exc})") from None
    missing = [c for c in ("teff", "logg", "fe_h", "misfit") if c not in ref.colnames]
    if missing:
        raise ModelError(f"{rp}: the model's misfit reference lacks the column(s) {', '.join(missing)}")
    return ref


def _read_wavelength(path) -> np.ndarray:
    """Wavelength grid from an .npz (first array, or 'wavelength'/'wave') or a FITS file
    (HDU 'WAVE', or a 1-D primary image, or a table column 'wave'/'wavelength')."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as d:
            for k in ("wavelength", "wave", "WAVE", "lambda"):
                if k in d.files:
                    return np.array(d[k], np.float64).ravel()
            if len(d.files) == 1:
                return np.array(d[d.files[0]], np.float64).ravel()
            raise ModelError(f"{path}: no 'wavelength' or 'wave' array (has {d.files})")
    with fits.open(path, memmap=False) as h:
        if "WAVE" in h and h["WAVE"].data is not None:
            d = h["WAVE"].data
            if isinstance(d, np.ndarray) and d.dtype.names is None:
                return np.array(d, np.float64).ravel()
        if h[0].data is not None and h[0].data.ndim == 1:
            return np.array(h[0].data, np.float64)
        for hdu in h[1:]:
            if isinstance(hdu, fits.BinTableHDU):
                for c in hdu.columns.names:
                    if c.lower() in ("wave", "wavelength", "lambda"):
                        return np.array(hdu.data[c], np.float64).ravel()
    raise ModelError(f"{path}: no wavelength array found")


def import_payne_npz(path, fmt, label_names, wavelength, frame="vacuum", label_units=None,
                     meta=None) -> SpectralModel:
    """Convert a The Payne ``.npz`` network into a :class:`SpectralModel`.

    ``fmt='payne-perpixel'``: ``w_array_0 (n_pix, n_hidden, n_labels)``,
    ``w_array_1 (n_pix, n_hidden)``, ``b_array_0 (n_pix, n_hidden)``,
    ``b_array_1 (n_pix,)``, ``x_min``, ``x_max``.
    ``fmt='payne-mlp'``: ``w_array_0, w_array_1, w_array_2, ...`` each
    ``(n_out, n_in)``, ``b_array_i``, ``x_min``, ``x_max``; leaky ReLU 0.01.
    ``wavelength``: an array or a path to an .npz/.fits file holding it.

    Parameters
    ----------
    path : str or os.PathLike
        The Payne ``.npz`` file (read without pickle).
    fmt : {'payne-perpixel', 'payne-mlp'}
        Its layout (above).
    label_names : sequence of str
        Label names in the order of the network's inputs.
    wavelength : array_like or str or os.PathLike
        (n_pix,) pixel-centre wavelengths in Angstrom, or a file holding them.
    frame : {'vacuum', 'air'}, optional
        Frame of the wavelengths (default 'vacuum').
    label_units : sequence of str, optional
        One unit per label (default K for teff, dex otherwise).
    meta : dict, optional
        Provenance; the source file's name and sha256 are added.

    Returns
    -------
    SpectralModel
        The network as a :class:`PerPixelPayne` or :class:`MLPPayne`.

    Raises
    ------
    ModelError
        If the file is unreadable, misses arrays, or its shapes do not fit the labels and grid.
    """
    path = Path(path)
    if isinstance(wavelength, (str, Path)):
        wave_src = str(wavelength)
        wave = _read_wavelength(wavelength)
    else:
        wave_src = "array"
        wave = np.asarray(wavelength, np.float64)
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read as .npz without pickle ({exc})") from None
    with d:
        files = set(d.files)
        need = {"x_min", "x_max", "w_array_0", "b_array_0"}
        if not need <= files:
            raise ModelError(f"{path}: not a Payne network file (missing {sorted(need - files)})")
        x_min, x_max = d["x_min"], d["x_max"]
        m = dict(meta or {})
        m.setdefault("imported_from", path.name)
        m.setdefault("imported_sha256", sha256_file(path))
        m.setdefault("import_format", fmt)
        m.setdefault("wavelength_source", Path(wave_src).name if wave_src != "array" else "array")
        m.setdefault("software_version", __version__)
        m.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if fmt == "payne-perpixel":
            if d["w_array_0"].ndim != 3:
                raise ModelError(f"{path}: w_array_0 is {d['w_array_0'].ndim}-D; a per-pixel network has a 3-D "
                                 "w_array_0 (use --format payne-mlp for 2-D weights)")
            m.setdefault("architecture", "per-pixel sigmoid network (Ting et al. 2017 / Xiang et al. 2019)")
            return PerPixelPayne(d["w_array_0"], d["b_array_0"], d["w_array_1"], d["b_array_1"],
                                 label_names, x_min, x_max, wave, frame, label_units, m)
        if fmt == "payne-mlp":
            ws, bs, i = [], [], 0
            while f"w_array_{i}" in files:
                ws.append(d[f"w_array_{i}"])
                bs.append(d[f"b_array_{i}"])
                i += 1
            if any(w.ndim != 2 for w in ws):
                raise ModelError(f"{path}: payne-mlp weights must be 2-D (use --format payne-perpixel)")
            m.setdefault("architecture", f"MLP {len(ws) - 1} hidden leaky-ReLU layers (Ting et al. 2019)")
            return MLPPayne(ws, bs, label_names, x_min, x_max, wave, frame, label_units, m)
    raise ModelError(f"unknown format {fmt!r}; use 'payne-perpixel' or 'payne-mlp'")
