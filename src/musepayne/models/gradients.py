"""Theoretical gradient spectra and the per-label gradient check (paper S3.2, Eq. 4).

A label measured by a data-driven model is only trustworthy if the model
"looks at" the right spectral features.  Following Xiang et al. (2019) and
the paper (S3.2), for each star and label we correlate the model's gradient
spectrum ``d f / d label`` (its Jacobian column at the fitted labels) with
the *theoretical* gradient spectrum of the reference star nearest in

``D = sqrt((dTeff / 100 K)^2 + (dlogg / 0.2)^2 + (d[Fe/H] / 0.1)^2)``  (Eq. 4)

and flag the label as reliable when the Pearson correlation exceeds 0.5.
The same templates regularise training (:mod:`musepayne.train.trainer`).

Template library format (FITS, no pickle)
-----------------------------------------
========== ==================================================================
HDU        content
========== ==================================================================
primary    ``MPFORMAT='musepayne-gradients'``, ``MPVERS``, ``FRAME``
           (wavelength frame of WAVE), ``TGTLSF`` (resolution of the
           gradients), ``CONTWID`` (pseudo-continuum sigma, A), ``NORM``
           (normalisation recipe), ``SOURCE``/``SRCSHA`` (emulator file and
           its sha256), ``MPSOFT``, ``DATE``
``WAVE``   (n_pix,) float64 pixel centres (Angstrom, in ``FRAME``)
``USABLE`` (n_pix,) uint8: 1 where the gradients are defined (covered by the
           emulator, continuum defined) and outside the standard fit masks
           (tellurics, lambda > 8750 A, LAMOST dichroic)
``GRAD``   (n_ref, n_labels, n_pix) float32: d (normalised flux) / d label,
           per physical label unit (per K, per dex); NaN where undefined
``REFSTARS`` table: the reference stars' labels (at least ``teff``, ``logg``,
           ``fe_h``; more columns allowed)
``LABELS`` table: ``name``, ``unit``, ``delta`` (finite-difference step)
           -- one row per gradient label, in the order of GRAD's axis 1
========== ==================================================================

Users can supply templates for more labels (e.g. ``mg_fe``) in the same
format: any label listed in ``LABELS`` whose name matches a model label gets
a gradient correlation.

Building templates from the emulator
------------------------------------
:func:`build_templates` uses a physics-based emulator of normalised synthetic
spectra (:class:`musepayne.models.emulator.CannonEmulator`, Doppler's cubic Cannon
model trained on a synthetic grid: air wavelengths, 0.1 A sampling, effectively
unconvolved; re-exported here with :func:`reference_grid` and :func:`default_emulator_path`).
For each reference star the emulator spectra at ``label +- delta`` are
taken through **the same chain as data**: resolution matching to the target
LSF (input LSF ~0 FWHM) and air -> vacuum flux-conserving rebinning onto the
model grid in one :func:`musepayne.prepare.resample.build_operator`, then the
:class:`musepayne.prepare.normalize.ContinuumNormalizer` pseudo-continuum with the
photon-like library variance (:func:`musepayne.io.readers.library_variance`)
as weights.  The weights of a reference star are computed once from its
central spectrum and used for the ``+-`` spectra as well, so the finite
difference is the derivative of the normalised spectrum at fixed noise
weights.  Gradients are central differences of the *normalised* spectra.

Length: the module is slightly over 600 lines because :class:`GradientTemplates` and its FITS
format (documented above) belong together; the emulator lives in :mod:`musepayne.models.emulator`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import __version__
from ..flags import EXCLUDING_BITS
from ..instrument.lsf import LAMOST_LSF, LSF, ConstantFWHM, lsf_from_spec
from ..instrument.wavelength import lamost_wavelength
from ..io.fits import atomic_write_fits, check_format
from ..io.readers import library_variance
from ..io.spectra import ReaderError
from ..prepare.masks import mode_mask
from ..prepare.normalize import DEFAULT_WIDTH, ContinuumNormalizer
from ..prepare.resample import build_operator
from .emulator import DEFAULT_EMULATOR, EMULATOR_ENV, CannonEmulator, default_emulator_path, reference_grid

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EQ4_SCALES",
    "DEFAULT_EMULATOR",
    "EMULATOR_ENV",
    "CannonEmulator",
    "GradientTemplates",
    "eq4_distance",
    "pearson_rows",
    "reference_grid",
    "build_templates",
    "default_emulator_path",
]

FORMAT_NAME = "musepayne-gradients"
FORMAT_VERSION = 1

#: Eq. 4 distance scales: 100 K in Teff, 0.2 dex in logg, 0.1 dex in [Fe/H].
EQ4_SCALES = {"teff": 100.0, "logg": 0.2, "fe_h": 0.1}

_UNITS = {"teff": "K", "logg": "dex", "fe_h": "dex"}
#: Default finite-difference half steps.
DEFAULT_DELTA = {"teff": 25.0, "logg": 0.05, "fe_h": 0.05}


# --------------------------------------------------------------------------- helpers
def eq4_distance(labels_a: dict, labels_b: dict):
    """Paper Eq. 4 distance between label sets (dicts of arrays, broadcastable).

    Only the labels of :data:`EQ4_SCALES` present in both are used.

    Parameters
    ----------
    labels_a, labels_b : dict of str to array_like
        Labels by name: ``teff`` in K, ``logg`` and ``fe_h`` in dex.

    Returns
    -------
    numpy.ndarray
        Dimensionless distance, broadcast shape of the inputs.

    Raises
    ------
    ValueError
        If no Eq. 4 label is in both.
    """
    d2 = 0.0
    used = 0
    for name, s in EQ4_SCALES.items():
        if name in labels_a and name in labels_b:
            d2 = d2 + ((np.asarray(labels_a[name], float) - np.asarray(labels_b[name], float)) / s) ** 2
            used += 1
    if not used:
        raise ValueError("no Eq. 4 label (teff, logg, fe_h) in common")
    return np.sqrt(d2)


def pearson_rows(a, b, use=None):
    """Pearson correlation of matching rows of ``a`` and ``b`` over ``use`` pixels.

    ``a``, ``b``: (n, n_pix); ``use``: (n_pix,) or (n, n_pix) bool.  Pixels
    where either is non-finite are skipped.  Rows with < 3 pixels or zero
    variance give NaN.

    Parameters
    ----------
    a, b : array_like
        Shape (n, n_pix) (or (n_pix,)).
    use : array_like of bool, optional
        Pixels to use, (n_pix,) or (n, n_pix).

    Returns
    -------
    numpy.ndarray
        Correlation per row, shape (n,), in [-1, 1] or NaN.
    """
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    ok = np.isfinite(a) & np.isfinite(b)
    if use is not None:
        ok &= np.broadcast_to(np.asarray(use, bool), ok.shape)
    n = ok.sum(axis=1)
    a0 = np.where(ok, a, 0.0)
    b0 = np.where(ok, b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma = a0.sum(1) / n
        mb = b0.sum(1) / n
        da = np.where(ok, a0 - ma[:, None], 0.0)
        db = np.where(ok, b0 - mb[:, None], 0.0)
        r = (da * db).sum(1) / np.sqrt((da * da).sum(1) * (db * db).sum(1))
    r = np.where((n >= 3) & np.isfinite(r), r, np.nan)
    return r


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True, eq=False)
class GradientTemplates:
    """Reference stars and their theoretical gradient spectra on one model grid.

    Attributes
    ----------
    wave : numpy.ndarray
        (n_pix,) pixel centres (Angstrom) in ``frame``.
    grad : numpy.ndarray
        (n_ref, n_labels, n_pix) d f / d label per physical unit (per K, per dex); NaN = undefined.
    ref_labels : astropy.table.Table
        One row per reference star (teff in K, logg, fe_h in dex, ...).
    label_names : tuple of str
        Names of the gradient labels (axis 1 of ``grad``).
    label_units : tuple of str
        Unit per gradient label (default K for teff, dex otherwise).
    delta : tuple of float
        Finite-difference half step per gradient label (NaN when unknown).
    usable : numpy.ndarray
        (n_pix,) bool, pixels entering correlations (default: defined for some template).
    frame : str
        'vacuum' or 'air'.
    meta : dict
        Provenance (target LSF, continuum width, source emulator, ...).
    n_ref : int
        Number of reference stars.

    Raises
    ------
    ValueError
        If ``grad`` is not (n_ref, n_labels, n_pix), ``ref_labels`` has another number of rows, or
        lacks teff, logg or fe_h.
    """

    wave: np.ndarray
    grad: np.ndarray
    ref_labels: Table
    label_names: tuple
    label_units: tuple = ()
    delta: tuple = ()
    usable: np.ndarray | None = None
    frame: str = "vacuum"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        w = np.asarray(self.wave, np.float64)
        g = np.asarray(self.grad)
        if g.ndim != 3 or g.shape[2] != w.size or g.shape[1] != len(self.label_names):
            raise ValueError(f"grad must be (n_ref, {len(self.label_names)}, {w.size}), got {g.shape}")
        if len(self.ref_labels) != g.shape[0]:
            raise ValueError("one reference-star row per gradient set needed")
        missing = [k for k in EQ4_SCALES if k not in self.ref_labels.colnames]
        if missing:
            raise ValueError(f"reference-star table lacks Eq. 4 labels {missing}")
        object.__setattr__(self, "wave", w)
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if not self.label_units:
            object.__setattr__(self, "label_units", tuple(_UNITS.get(n, "dex") for n in self.label_names))
        if not self.delta:
            object.__setattr__(self, "delta", tuple(np.nan for _ in self.label_names))
        u = (np.isfinite(g).any(axis=(0, 1)) if self.usable is None else np.asarray(self.usable, bool))
        object.__setattr__(self, "usable", u)

    @property
    def n_ref(self) -> int:
        return self.grad.shape[0]

    # ------------------------------------------------------------------ lookup
    def nearest(self, labels, label_names=("teff", "logg", "fe_h")):
        """Index of the nearest reference star (Eq. 4) for each row of ``labels``.

        ``labels`` is (n, k) in the order of ``label_names`` (or a Table /
        dict with those columns); only Teff, logg, [Fe/H] enter the distance.
        Returns ``(index (n,), distance (n,))``.

        Parameters
        ----------
        labels : array_like, astropy.table.Table or dict
            Shape (n, k) in the order of ``label_names``, or columns by name (K, dex).
        label_names : sequence of str, optional
            Column order of an array ``labels`` (default teff, logg, fe_h).

        Returns
        -------
        index : numpy.ndarray
            int, shape (n,), rows of ``ref_labels``.
        distance : numpy.ndarray
            Eq. 4 distance (dimensionless), shape (n,); inf where the labels are not finite.
        """
        if isinstance(labels, (Table, dict)):
            lab = {k: np.atleast_1d(np.asarray(labels[k], float)) for k in EQ4_SCALES if k in labels}
        else:
            arr = np.atleast_2d(np.asarray(labels, float))
            lab = {n: arr[:, i] for i, n in enumerate(label_names) if n in EQ4_SCALES}
        ref = {k: np.asarray(self.ref_labels[k], float) for k in EQ4_SCALES}
        d = eq4_distance({k: v[:, None] for k, v in lab.items()}, {k: v[None, :] for k, v in ref.items()})
        d = np.where(np.isfinite(d), d, np.inf)
        idx = np.argmin(d, axis=1)
        return idx, d[np.arange(d.shape[0]), idx]

    def gradient(self, label: str, index):
        """Template gradient spectra (len(index), n_pix) of one label.

        Parameters
        ----------
        label : str
            A gradient label name.
        index : int or array_like of int
            Reference-star rows.

        Returns
        -------
        numpy.ndarray
            float64, per physical unit of the label.

        Raises
        ------
        ValueError
            If ``label`` has no template.
        """
        j = self.label_names.index(label)
        return self.grad[np.asarray(index), j, :].astype(np.float64)

    def gradcorr_from_jacobian(self, jac, labels, label_names, use=None):
        """Correlations of given Jacobians with the nearest templates.

        ``jac``: (n, n_pix, n_labels) on this template grid; ``labels``: (n,
        n_labels) in the order ``label_names``.  Returns (n, n_labels) with
        NaN for labels without a template.

        Parameters
        ----------
        jac : array_like
            d flux / d label per physical unit, shape (n, n_pix, n_labels).
        labels : array_like
            Label values, shape (n, n_labels), physical units.
        label_names : sequence of str
            Names of the n_labels columns.
        use : array_like of bool, optional
            (n_pix,) pixels allowed besides ``usable``.

        Returns
        -------
        numpy.ndarray
            Pearson correlations, shape (n, n_labels).

        Raises
        ------
        ValueError
            If ``jac`` is not on the template grid.
        """
        jac = np.asarray(jac, np.float64)
        lab = np.atleast_2d(np.asarray(labels, float))
        names = tuple(label_names)
        if jac.shape[1] != self.wave.size:
            raise ValueError(f"Jacobian has {jac.shape[1]} pixels, templates {self.wave.size}")
        idx, _ = self.nearest(lab, names)
        out = np.full((lab.shape[0], len(names)), np.nan)
        u = self.usable if use is None else (self.usable & np.asarray(use, bool))
        for k, name in enumerate(names):
            if name not in self.label_names:
                continue
            out[:, k] = pearson_rows(jac[:, :, k], self.gradient(name, idx), u)
        return out

    def gradcorr(self, model, labels):
        """Per-label gradient correlation of ``model`` at ``labels`` (paper S3.2).

        ``model`` follows the :class:`musepayne.models.model.SpectralModel` API
        (``label_names``, ``wave``, ``frame``, ``predict_with_jacobian``).
        The model grid must be the template grid.  Returns (n, n_model_labels):
        Pearson correlation over the usable pixels (template usable and not
        in the model's ``pixel_mask``)
        of the model's Jacobian column with the nearest reference star's
        template; NaN where the label has no template.

        Parameters
        ----------
        model : SpectralModel
            The model.
        labels : array_like
            Labels, shape (n, n_model_labels), physical units.

        Returns
        -------
        numpy.ndarray
            Shape (n, n_model_labels).

        Raises
        ------
        ValueError
            If the model's wavelength grid or frame differs from the templates'.
        """
        mw = np.asarray(model.wave, np.float64)
        if mw.shape != self.wave.shape or not np.allclose(mw, self.wave, rtol=1e-9, atol=0):
            raise ValueError("model and templates are on different wavelength grids; rebuild the "
                             "templates on the model grid (musepayne gradients build)")
        if getattr(model, "frame", self.frame) != self.frame:
            raise ValueError(f"model frame {model.frame!r} differs from template frame {self.frame!r}")
        lab = np.atleast_2d(np.asarray(labels, float))
        use = None
        m = getattr(model, "pixel_mask", None)  # True where the model is not to be used
        if m is not None and np.shape(m) == self.wave.shape:
            use = ~np.asarray(m, bool)
        out = self._gradcorr_hidden(model, lab, use)
        if out is not None:
            return out
        _, jac = model.predict_with_jacobian(lab)
        return self.gradcorr_from_jacobian(jac, lab, tuple(model.label_names), use)

    def _gradcorr_hidden(self, model, lab, use):
        """:meth:`gradcorr` of a network whose last layer is linear (``model.hidden_planes``), in the
        space of its last hidden layer, or None (another model, or templates not finite on the pixels).

        Over the pixels ``u`` the Jacobian column is ``J = W h`` (``W``: the last layer's rows of
        ``u``, ``h``: the hidden layer's derivative), so with the template ``b`` centred over ``u``
        (``b_c``) and ``W_c`` the rows of ``W`` centred: ``sum (J - <J>)(b - <b>) = h . (W^T b_c)``
        and ``sum (J - <J>)^2 = h^T (W_c^T W_c) h`` -- the Pearson correlation of
        :func:`pearson_rows` without the (n, n_pix) Jacobian (same value to ~1e-13; 1/50 of the cost)."""
        planes, weights = getattr(model, "hidden_planes", None), getattr(model, "weights", None)
        if planes is None or weights is None:
            return None
        names = tuple(model.label_names)
        cols = np.flatnonzero(self.usable if use is None else (self.usable & use))
        idx, _ = self.nearest(lab, names)
        t, inv = np.unique(idx, return_inverse=True)
        have = [(k, self.label_names.index(n)) for k, n in enumerate(names) if n in self.label_names]
        grads = {k: self.grad[t, j][:, cols].astype(np.float64) for k, j in have}
        if cols.size < 3 or not all(np.isfinite(g).all() for g in grads.values()):
            return None
        W = np.asarray(weights[-1], np.float64)[cols]  # (n_u, width)
        Wc = W - W.mean(0)
        cw = Wc.T @ Wc
        h = planes(model.scale(lab), np.float64)
        out = np.full((lab.shape[0], len(names)), np.nan)
        for k, g in grads.items():
            gc = g - (g.sum(1) / cols.size)[:, None]
            hk = h[:, 1 + k]
            sab = np.einsum("nh,nh->n", hk, (gc @ W)[inv])
            saa = np.einsum("nh,nh->n", hk @ cw, hk)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = sab / np.sqrt(saa * np.einsum("tp,tp->t", gc, gc)[inv])
            out[:, k] = np.where(np.isfinite(r), r, np.nan)
        return out

    def restricted(self, use) -> GradientTemplates:
        """A copy whose correlations use only the pixels where ``use`` (and ``usable``) is True.

        Gradients outside are set to 0 (they never enter a correlation), which makes a
        compressed file small; correlations over the kept pixels are unchanged.

        Parameters
        ----------
        use : array_like of bool
            Shape (n_pix,).

        Returns
        -------
        GradientTemplates
            The copy (``grad`` float32).

        Raises
        ------
        ValueError
            If ``use`` has the wrong length.
        """
        use = np.asarray(use, bool) & self.usable
        if use.shape != self.wave.shape:
            raise ValueError(f"pixel selection has {use.size} pixels, templates {self.wave.size}")
        grad = np.where(use[None, None, :], np.asarray(self.grad, np.float32), np.float32(0.0))
        return replace(self, grad=grad, usable=use, meta=dict(self.meta))

    # ------------------------------------------------------------------ I/O
    def to_hdulist(self, compress: bool = False) -> fits.HDUList:
        """FITS form of the templates (the module docstring's format).

        ``compress`` stores GRAD as int16 (per reference star and label scaled to
        +-32767 of its largest |gradient|, relative precision 3e-5; -32768 marks NaN) in a
        Rice-compressed image, with the scales in ``GRADSCL``.

        Parameters
        ----------
        compress : bool, optional
            Default False (GRAD as float32).

        Returns
        -------
        astropy.io.fits.HDUList
            PRIMARY, WAVE, USABLE, GRAD, [GRADSCL,] REFSTARS, LABELS.
        """
        ph = fits.Header()
        ph["MPFORMAT"] = (FORMAT_NAME, "musepayne gradient templates")
        ph["MPVERS"] = (FORMAT_VERSION, "format version")
        ph["MPSOFT"] = (__version__, "musepayne version that wrote the file")
        ph["FRAME"] = (self.frame, "wavelength frame of WAVE")
        for k, v in self.meta.items():
            key = k.upper()[:8]
            if isinstance(v, (bool, int, float, np.integer, np.floating)):
                ph[key] = v
            else:
                ph[key] = str(v)  # long strings become CONTINUE cards
        hw = fits.ImageHDU(self.wave, name="WAVE")
        hw.header["BUNIT"] = "Angstrom"
        hu = fits.ImageHDU(self.usable.astype(np.uint8), name="USABLE")
        extra = []
        if compress:
            g = np.asarray(self.grad, np.float64)
            scale = np.nanmax(np.abs(g), axis=2) / 32767.0
            scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
            q = np.rint(np.nan_to_num(g / scale[:, :, None], nan=0.0)).astype(np.int16)
            q[~np.isfinite(g)] = -32768
            hg = fits.CompImageHDU(q, name="GRAD", compression_type="RICE_1")
            hs = fits.ImageHDU(scale, name="GRADSCL")
            hs.header["COMMENT"] = "GRAD (int16) x GRADSCL[ref, label] = d flux / d label; -32768 = NaN"
            extra.append(hs)
        else:
            hg = fits.ImageHDU(np.asarray(self.grad, np.float32), name="GRAD")
        hg.header["BUNIT"] = ("1/label", "d normalised flux / d label (physical units)")
        rt = fits.table_to_hdu(Table(self.ref_labels, copy=True))
        rt.name = "REFSTARS"
        lt = fits.table_to_hdu(Table({"name": list(self.label_names), "unit": list(self.label_units),
                                      "delta": np.asarray(self.delta, float)}))
        lt.name = "LABELS"
        return fits.HDUList([fits.PrimaryHDU(header=ph), hw, hu, hg, *extra, rt, lt])

    def save(self, path, overwrite: bool = True, compress: bool = False):
        """Write atomically (``compress``: see :meth:`to_hdulist`).

        Parameters
        ----------
        path : str or os.PathLike
            Output FITS file.
        overwrite : bool, optional
            Replace an existing file (default True).
        compress : bool, optional
            int16 + Rice compression of GRAD (default False).

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is False.
        """
        atomic_write_fits(self.to_hdulist(compress), path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> GradientTemplates:
        """Read templates written by :meth:`save` (plain or compressed).

        Parameters
        ----------
        path : str or os.PathLike
            The FITS file.

        Returns
        -------
        GradientTemplates
            The templates; header cards other than the format cards become ``meta`` (lower-case keys).

        Raises
        ------
        ReaderError
            If the file is not a musepayne gradient-template file of a supported version, or cannot be read.
        """
        try:
            with fits.open(path, memmap=False) as h:
                ph = h[0].header
                check_format(ph, path, FORMAT_NAME, FORMAT_VERSION, "gradient-template", ReaderError)
                wave = np.array(h["WAVE"].data, np.float64)
                usable = np.array(h["USABLE"].data, bool)
                grad = np.array(h["GRAD"].data, np.float32)
                if "GRADSCL" in h:  # compressed int16 form
                    q = np.asarray(h["GRAD"].data)
                    grad = (q * np.asarray(h["GRADSCL"].data, np.float64)[:, :, None]).astype(np.float32)
                    grad[q == -32768] = np.nan
                ref = Table.read(h["REFSTARS"])
                lt = Table.read(h["LABELS"])
                skip = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "MPFORMAT", "MPVERS", "FRAME"}
                meta = {k.lower(): ph[k] for k in ph if k not in skip and k not in ("COMMENT", "HISTORY", "")}
                frame = str(ph.get("FRAME", "vacuum"))
        except ReaderError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ReaderError(f"{path}: cannot read gradient templates ({type(exc).__name__}: {exc})") from None
        return cls(wave, grad, ref, tuple(str(n).strip() for n in lt["name"]),
                   tuple(str(u).strip() for u in lt["unit"]), tuple(float(x) for x in lt["delta"]),
                   usable, frame, meta)


# --------------------------------------------------------------------------- building
def build_templates(emulator, ref_labels: Table | None = None, wave=None, target_lsf: LSF | str = LAMOST_LSF,
                    continuum_width: float = DEFAULT_WIDTH, delta: dict | None = None,
                    input_fwhm: float = 0.0, batch: int = 64, progress=None) -> GradientTemplates:
    """Theoretical gradient templates on a model grid from an emulator.

    Parameters
    ----------
    emulator : CannonEmulator or str or os.PathLike
        The emulator or the path to its ``.npz``.
    ref_labels : astropy.table.Table, optional
        Reference stars with the emulator's labels (default :func:`reference_grid`).
    wave : array_like, optional
        Model grid, vacuum Angstrom (default the 3909-px LAMOST grid).
    target_lsf : LSF or str, optional
        Resolution of the model (default LAMOST R = 1800).
    continuum_width : float, optional
        Pseudo-continuum sigma in Angstrom, as in ``prepare`` (default 50).
    delta : dict of str to float, optional
        Finite-difference half steps per label (default 25 K, 0.05 dex, 0.05 dex).
    input_fwhm : float, optional
        FWHM in Angstrom of the emulator's own LSF (~0: unconvolved).
    batch : int, optional
        Reference stars per batch (default 64).
    progress : callable, optional
        ``progress(n_done, n_total)``.

    Returns
    -------
    GradientTemplates
        Gradients per physical unit on ``wave`` (vacuum), with provenance in ``meta``.

    Raises
    ------
    FileNotFoundError
        If the emulator file does not exist.
    ReaderError
        If the emulator file is malformed.
    ValueError
        For an invalid LSF spec or grid.
    """
    emu = emulator if isinstance(emulator, CannonEmulator) else CannonEmulator.load(emulator)
    lsf_t = lsf_from_spec(target_lsf)
    w_out = lamost_wavelength() if wave is None else np.asarray(wave, np.float64)
    ref = reference_grid(emu) if ref_labels is None else Table(ref_labels, copy=True)
    dl = dict(DEFAULT_DELTA)
    dl.update(delta or {})
    names = emu.label_names
    op = build_operator(emu.wave, emu.frame, ConstantFWHM(float(input_fwhm)), w_out, lsf_t, "vacuum")
    nz = ContinuumNormalizer(w_out, width=continuum_width)
    covered = (op.coverage >= 0.999) & (op.edge_loss <= 0.01)
    fixed = mode_mask(w_out, "standard")
    lab0 = np.stack([np.asarray(ref[n], float) for n in names], axis=1)
    n_ref, nl = lab0.shape
    grad = np.full((n_ref, nl, w_out.size), np.nan, np.float32)
    defined_any = np.zeros(w_out.size, bool)
    for i0 in range(0, n_ref, batch):
        lab = lab0[i0:i0 + batch]
        nb = lab.shape[0]
        f0 = emu.flux(lab)
        fo = op.apply(f0)
        var = op.apply_variance(library_variance(f0))
        with np.errstate(divide="ignore"):
            ivar = np.where(covered & (var > 0) & np.isfinite(var), 1.0 / var, 0.0)
        cont0, defined = nz.continuum(fo, ivar)
        defined &= covered
        defined_any |= defined.any(axis=0)
        for k, name in enumerate(names):
            step = np.zeros(nl)
            step[k] = dl[name]
            fp = op.apply(emu.flux(lab + step))
            fm = op.apply(emu.flux(lab - step))
            cp, _ = nz.continuum(fp, ivar)
            cm, _ = nz.continuum(fm, ivar)
            g = (fp / cp - fm / cm) / (2.0 * dl[name])
            grad[i0:i0 + nb, k] = np.where(defined, g, np.nan)
        if progress is not None:
            progress(min(i0 + nb, n_ref), n_ref)
    usable = defined_any & ((fixed & EXCLUDING_BITS) == 0)
    meta = {
        "tgtlsf": lsf_t.describe(),
        "contwid": float(continuum_width),
        "norm": "payne-gaussian-ivar (musepayne.prepare.normalize), photon-like library ivar of the central spectrum",
        "source": Path(emu.source).name,
        "srcsha": emu.sha256[:64] if emu.sha256 else "",
        "infwhm": float(input_fwhm),
        "method": "central difference of normalised spectra",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return GradientTemplates(w_out, grad, ref, names, tuple(_UNITS.get(n, "dex") for n in names),
                             tuple(float(dl[n]) for n in names), usable, "vacuum", meta)
