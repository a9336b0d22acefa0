"""Spectral emulators (The Payne family) and their self-describing model file.

A :class:`SpectralModel` maps physical labels (Teff, log g, [Fe/H], ...) to a
continuum-normalised spectrum on its own wavelength grid, in batches, and gives
the analytic Jacobian d flux / d label (physical units).  Two architectures:

* :class:`PerPixelPayne` -- one small network per pixel (Ting et al. 2017,
  Xiang et al. 2019): ``z = W0[p] s + b0[p]``, ``f_p = W1[p] . sigmoid(z) + b1[p]``.
* :class:`MLPPayne` -- one network for all pixels (Ting et al. 2019, "The
  Payne"): ``labels -> h1 -> h2 -> ... -> pixels`` with leaky ReLU (slope 0.01).

Labels enter the networks scaled to the training range:
``s = (x - x_min) / (x_max - x_min) - 0.5`` (so the training box is
``[-0.5, 0.5]`` in every label).

File format (FITS, no pickle; :func:`load_model` / :meth:`SpectralModel.save`)
------------------------------------------------------------------------------
========== =================================================================
HDU        content
========== =================================================================
primary    ``MPFORMAT='musepayne-model'``, ``MPMVERS`` (format version),
           ``ARCH`` ('perpixel' | 'mlp' | 'cannon', :mod:`musepayne.models.cannon`), ``CREATED`` (UTC ISO date),
           ``MPSOFT`` (software version), ``NLABELS``, ``NPIX``, ``NLAYERS``
           (mlp), ``NEGSLOPE`` (mlp leaky-ReLU slope)
``W0``...  weight arrays: perpixel ``W0 (n_pix, n_hidden, n_labels)``,
           ``B0 (n_pix, n_hidden)``, ``W1 (n_pix, n_hidden)``, ``B1 (n_pix,)``;
           mlp ``W0, B0, W1, B1, ...`` (torch ``Linear`` convention
           ``(n_out, n_in)``), stored at their own precision (float32 usually)
``LABELS`` table: name, unit, x_min, x_max (float64)
``WAVE``   (n_pix,) float64 Angstrom, header ``FRAME`` = 'vacuum' | 'air'
``PIXMASK`` optional (n_pix,) uint8, 1 where the model is not to be used
           (e.g. pixels covered by too few training spectra); fits ignore them
``SCATTER`` optional (n_pix,) float64, the model's intrinsic scatter ``s_p`` per pixel
           (normalised flux; fits add ``s_p^2`` to the variance)
``BENCHCAL`` optional table: benchmark-scale calibration of the labels and their systematic
           errors (:class:`musepayne.models.benchcal.BenchmarkCalibration`; fits apply it)
``M1_W0``... optional seed members (primary ``NMEMBERS``): networks of the same recipe and
           training set trained with other seeds, member ``k``'s weight arrays named
           ``M<k>_<name>``; the first carries ``MEMMETA`` (JSON: seed, command, ...).  Fits
           propagate their disagreement to the labels (``X_err_seed``, :mod:`musepayne.fit.errors`)
``PROVENANCE`` one-row table with a ``json`` column: the ``meta`` dict
           (training-set hash, command, versions, normalisation recipe, ...)
========== =================================================================

Reading and writing round-trips exactly (arrays bit for bit, meta as JSON).

Length: the module is over 600 lines, about half of them numpydoc sections; the base class and
the two architectures share the file format above, so they stay in one module.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import __version__
from ..io.fits import atomic_write_fits

__all__ = [
    "SpectralModel",
    "PerPixelPayne",
    "MLPPayne",
    "ModelError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DEFAULT_UNITS",
    "read_seed_members",
]

FORMAT_NAME = "musepayne-model"
FORMAT_VERSION = 1

#: Units assumed for well-known label names when the user gives none.
DEFAULT_UNITS = {
    "teff": "K",
    "logg": "dex",
    "vmic": "km/s",
    "vmacro": "km/s",
    "vbroad": "km/s",
    "vsini": "km/s",
}


def _sigmoid_inplace(z):
    """Logistic function in place, as 0.5 (1 + tanh(z/2)): exact identity, no overflow, and
    numpy's vectorised tanh is several times faster than exp-based forms."""
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    return z


#: provenance keys kept for a seed member (the model's own provenance describes the recipe)
_MEMBER_KEYS = ("seed", "command", "created", "trainset_sha256", "templates_sha256", "best_epoch", "epochs_run",
                "final_val_loss", "name", "software_version", "train_seconds")


def _member_meta(meta) -> dict:
    return {k: meta[k] for k in _MEMBER_KEYS if k in meta}


class _MemberHDUs:
    """Seed member ``k``'s arrays of an open model file under their plain names (``W0`` for
    ``M<k>_W0``), the primary HDU as is: what the architectures' ``_from_hdus`` read."""

    def __init__(self, hdul, k):
        self._h, self._k = hdul, k

    def __getitem__(self, key):
        return self._h[0] if key == 0 else self._h[f"M{self._k}_{key}"]


def read_seed_members(hdul, cls, common) -> tuple:
    """The seed members stored in an open model file (``NMEMBERS`` in the primary header).

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The open model file.
    cls : type
        The model's architecture class.
    common : dict
        The keyword arguments shared with the model (labels, box, wavelengths, frame).

    Returns
    -------
    tuple of SpectralModel
        The members (empty without ``NMEMBERS``), each with its ``MEMMETA`` provenance as meta.

    Raises
    ------
    ModelError
        If a declared member has no HDUs.
    """
    out = []
    n = int(hdul[0].header.get("NMEMBERS", 0))
    for k in range(1, n + 1):
        first = next((h for h in hdul if str(h.name).startswith(f"M{k}_")), None)
        if first is None:
            raise ModelError(f"the file declares {n} seed members (NMEMBERS) but has no HDUs of member {k}")
        meta = json.loads(str(first.header.get("MEMMETA", "{}")))
        out.append(cls._from_hdus(_MemberHDUs(hdul, k), {**common, "meta": meta}))
    return tuple(out)


def _native(a):
    """FITS arrays are big-endian: return a native-byte-order copy with the same precision."""
    a = np.asarray(a)
    return a.astype(a.dtype.newbyteorder("="), copy=True)


class ModelError(ValueError):
    """A model file or model definition is unusable."""



def wave_ranges(wave, ok) -> list[tuple[float, float]]:
    """``[(w_first, w_last), ...]`` of the runs of ``ok`` pixels along ``wave``."""
    ok = np.asarray(ok, bool)
    if not ok.any():
        return []
    d = np.diff(np.concatenate([[0], ok.astype(np.int8), [0]]))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1
    return [(float(wave[a]), float(wave[b])) for a, b in zip(starts, ends)]


def format_ranges(ranges) -> str:
    return ", ".join(f"{a:.0f}-{b:.0f}" for a, b in ranges) + " A" if ranges else "none"


def coverage_note(wave, data_ok, model_ok) -> str:
    """One sentence: the data's usable range, the model's usable range and their overlap in pixels."""
    data_ok, model_ok = np.asarray(data_ok, bool), np.asarray(model_ok, bool)
    both = data_ok & model_ok
    return (f"the spectrum covers {format_ranges(wave_ranges(wave, data_ok))}, the model's usable pixels are "
            f"{format_ranges(wave_ranges(wave, model_ok))} ({int(model_ok.sum())} px); overlap "
            f"{format_ranges(wave_ranges(wave, both))} = {int(both.sum())} px "
            f"({100.0 * both.sum() / max(int(model_ok.sum()), 1):.0f}% of the model's)")


class SpectralModel:
    """Common interface of all emulators (see module docstring).

    Parameters
    ----------
    label_names : sequence of str
        Label names (stripped, lower-cased; unique), e.g. ``("teff", "logg", "fe_h")``.
    x_min, x_max : array_like of float
        (n_labels,) training ranges in physical units (K for Teff, dex otherwise); ``x_max > x_min``.
    wave : array_like of float
        (n_pix,) strictly increasing pixel-centre wavelengths in Angstrom.
    frame : {'vacuum', 'air'}, optional
        Frame of ``wave`` (default 'vacuum').
    label_units : sequence of str, optional
        One unit per label (default from :data:`DEFAULT_UNITS`, else 'dex').
    meta : dict, optional
        Provenance (stored as JSON in the model file).

    Attributes
    ----------
    label_names, label_units : tuple of str
        As given (normalised).
    x_min, x_max : numpy.ndarray
        (n_labels,) float64 training ranges (K, dex).
    wave : numpy.ndarray
        (n_pix,) float64 wavelengths in Angstrom, in ``frame``.
    pixel_mask : numpy.ndarray
        (n_pix,) bool, True where fits ignore the model.
    scatter : numpy.ndarray
        (n_pix,) float64 intrinsic scatter ``s_p`` (normalised flux; 0 = none).
    benchmark_calibration : BenchmarkCalibration or None
        Post-fit benchmark-scale calibration the fits apply.
    templates : GradientTemplates or None
        Theoretical gradients for the per-label flags.
    meta : dict
        Provenance.
    path : str or None
        File the model was loaded from.

    Raises
    ------
    ModelError
        For inconsistent names, ranges, units, frame or wavelengths.

    Notes
    -----
    A model may be shared by several threads: prediction keeps its state local; the only lazily
    filled state is the per-dtype cache of cast weights, whose entries are deterministic.
    """

    arch = "base"

    def __init__(self, label_names, x_min, x_max, wave, frame="vacuum", label_units=None, meta=None):
        names = tuple(str(n).strip().lower() for n in label_names)
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ModelError(f"label names must be unique and non-empty: {names}")
        self.label_names = names
        self.x_min = np.array(x_min, dtype=np.float64).ravel()
        self.x_max = np.array(x_max, dtype=np.float64).ravel()
        if self.x_min.size != len(names) or self.x_max.size != len(names):
            raise ModelError(
                f"{len(names)} label names but x_min/x_max have {self.x_min.size}/{self.x_max.size} entries")
        if not np.all(self.x_max > self.x_min):
            raise ModelError("x_max must exceed x_min for every label")
        if label_units is None:
            label_units = [DEFAULT_UNITS.get(n, "dex") for n in names]
        self.label_units = tuple(str(u) for u in label_units)
        if len(self.label_units) != len(names):
            raise ModelError("label_units must have one entry per label")
        self.wave = np.array(wave, dtype=np.float64).ravel()
        if frame not in ("vacuum", "air"):
            raise ModelError(f"frame must be 'vacuum' or 'air', not {frame!r}")
        self.frame = frame
        if self.wave.size < 2 or not np.all(np.diff(self.wave) > 0):
            raise ModelError("model wavelengths must be strictly increasing")
        self.meta = dict(meta or {})
        self.path = None
        self._cache = {}  # per-instance casts of the weights (float32/float64)
        #: True where the model is not to be trusted (too little training data); fits ignore these pixels
        self.pixel_mask = np.zeros(self.wave.size, bool)
        #: intrinsic per-pixel scatter ``s_p`` of the model (normalised-flux units; 0 = none): what the
        #: model cannot predict from the labels; fits add ``s_p^2`` to each pixel's variance
        self.scatter = np.zeros(self.wave.size)
        #: :class:`musepayne.models.benchcal.BenchmarkCalibration` or None (fits then give the model's labels)
        self.benchmark_calibration = None
        #: networks of the same architecture, label box and grid trained with other seeds
        #: (:meth:`with_seed_members`); fits turn their disagreement into ``X_err_seed``
        self.seed_members = ()
        #: :class:`musepayne.models.gradients.GradientTemplates` or None: the theoretical gradient
        #: spectra fits compare the model's Jacobian with for the per-label flags (paper Eq. 4);
        #: :func:`load_model` reads them from ``<model>.templates.fits`` beside the model file
        self.templates = None

    def _checked_mask(self, mask) -> np.ndarray:
        m = np.asarray(mask, dtype=bool).ravel()
        if m.shape != self.wave.shape:
            raise ModelError(f"pixel mask has {m.size} entries for {self.wave.size} model pixels")
        return m.copy()

    def usable_ranges(self) -> list[tuple[float, float]]:
        """Wavelength ranges (model frame, Angstrom) of contiguous pixels that fits use (not in ``pixel_mask``).

        Returns
        -------
        list of tuple of (float, float)
            ``(first, last)`` pixel-centre wavelength in Angstrom of each run of usable pixels.
        """
        return wave_ranges(self.wave, ~np.asarray(self.pixel_mask, bool))

    def _checked_scatter(self, scatter) -> np.ndarray:
        s = np.nan_to_num(np.array(scatter, dtype=np.float64).ravel(), nan=0.0, posinf=0.0)
        if s.shape != self.wave.shape:
            raise ModelError(f"scatter has {s.size} entries for {self.wave.size} model pixels")
        if np.any(s < 0):
            raise ModelError("scatter must be >= 0")
        return s

    def with_pixel_mask(self, mask) -> SpectralModel:
        """A copy of the model with another pixel mask (the model itself is not changed).

        Parameters
        ----------
        mask : array_like of bool, shape (n_pix,)
            True where the model is not to be used.

        Returns
        -------
        SpectralModel
            A shallow copy sharing the network weights, with the new ``pixel_mask``.

        Raises
        ------
        ModelError
            If the mask does not have one entry per model pixel.
        """
        new = copy.copy(self)
        new.pixel_mask = self._checked_mask(mask)
        return new

    def with_scatter(self, scatter) -> SpectralModel:
        """A copy of the model with another intrinsic per-pixel scatter ``s_p`` (the model itself is
        not changed).

        Parameters
        ----------
        scatter : array_like of float, shape (n_pix,)
            ``s_p`` in normalised-flux units, >= 0; NaN becomes 0.

        Returns
        -------
        SpectralModel
            A shallow copy sharing the network weights, with the new ``scatter``.

        Raises
        ------
        ModelError
            Wrong length or negative values.
        """
        new = copy.copy(self)
        new.scatter = self._checked_scatter(scatter)
        return new

    def with_seed_members(self, members) -> SpectralModel:
        """A copy of the model carrying seed members (the model itself is not changed).

        Seed members are networks of the same recipe trained on the same training set with other
        random seeds.  Their spread is the model's own (epistemic) uncertainty: fits propagate
        the members' disagreement at the solution to the labels (``X_err_seed``).

        Parameters
        ----------
        members : sequence of SpectralModel
            Models of the same class, labels, label box and wavelength grid (their own members,
            pixel masks, scatter and calibration are ignored).

        Returns
        -------
        SpectralModel
            A shallow copy sharing the network weights, with ``seed_members`` set.

        Raises
        ------
        ModelError
            If a member does not match the model.
        """
        kept = []
        for i, m in enumerate(members):
            if (type(m) is not type(self) or m.label_names != self.label_names
                    or not np.array_equal(m.x_min, self.x_min) or not np.array_equal(m.x_max, self.x_max)
                    or m.wave.shape != self.wave.shape or not np.allclose(m.wave, self.wave, rtol=0, atol=1e-6)
                    or m.frame != self.frame):
                raise ModelError(f"seed member {i + 1} does not match the model (class, labels, label box, "
                                 "wavelength grid and frame must be the same)")
            if m.seed_members:  # members do not nest
                m = copy.copy(m)
                m.seed_members = ()
            kept.append(m)
        new = copy.copy(self)
        new.seed_members = tuple(kept)
        return new

    def inflate_ivar(self, ivar):
        """Fit weights ``1 / (1/ivar + s_p^2)`` for observed ``ivar`` ``(..., n_pix)`` (0 stays 0).

        Parameters
        ----------
        ivar : array_like of float
            Inverse variances, shape (..., n_pix), in 1 / (normalised flux)^2; not modified.

        Returns
        -------
        numpy.ndarray
            A new float64 array of the same shape: the inverse variances with ``s_p^2`` added to the variance.
        """
        iv = np.asarray(ivar, np.float64)
        s2 = self.scatter ** 2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where(iv > 0, iv / (1.0 + iv * s2), 0.0)

    # ----------------------------------------------------------- basics
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pix(self) -> int:
        return self.wave.size

    @property
    def scale_width(self) -> np.ndarray:
        return self.x_max - self.x_min

    def scale(self, labels):
        """Physical labels -> network input ``(x - x_min)/(x_max - x_min) - 0.5``.

        Parameters
        ----------
        labels : array_like of float
            Shape (..., n_labels), physical units (K, dex).

        Returns
        -------
        numpy.ndarray
            Scaled labels, same shape, dimensionless (the training box is [-0.5, 0.5]).
        """
        return (np.asarray(labels, dtype=np.float64) - self.x_min) / self.scale_width - 0.5

    def unscale(self, scaled):
        """Network input -> physical labels (inverse of :meth:`scale`).

        Parameters
        ----------
        scaled : array_like of float
            Shape (..., n_labels), dimensionless.

        Returns
        -------
        numpy.ndarray
            Physical labels (K, dex), same shape.
        """
        return (np.asarray(scaled, dtype=np.float64) + 0.5) * self.scale_width + self.x_min

    def _as_batch(self, labels):
        x = np.asarray(labels, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_labels:
            raise ValueError(f"labels must have shape (n, {self.n_labels}); got {np.shape(labels)}")
        return x

    # ---------------------------------------------- scaled-space kernels
    def predict_scaled(self, s, dtype=np.float64):  # pragma: no cover - abstract
        """Normalised flux at scaled labels (implemented by each architecture).

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) or (n_labels,) scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation (float64 or float32).

        Returns
        -------
        numpy.ndarray
            (n, n_pix) normalised flux.
        """
        raise NotImplementedError

    def predict_scaled_columns(self, s, c0, c1, dtype=np.float64):
        """Columns ``c0 .. c1 - 1`` of :meth:`predict_scaled` (architectures that can compute only
        those override this).

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) scaled labels (dimensionless).
        c0, c1 : int
            First and one-past-last model pixel.
        dtype : numpy dtype, optional
            Precision of the computation.

        Returns
        -------
        numpy.ndarray
            (n, c1 - c0) normalised flux.
        """
        return self.predict_scaled(s, dtype)[:, c0:c1]

    def planar_kernel(self, s, dtype=np.float64):
        """Flux and Jacobian at scaled labels ``s`` as one planar array ``(n, 1 + n_labels, n_pix)``:
        plane 0 is the flux, plane ``1 + l`` is d flux / d s_l.  Each plane is a contiguous
        spectrum, the layout the fitter shifts and reduces without reshuffling.

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) or (n_labels,) scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation (float64 or float32).

        Returns
        -------
        numpy.ndarray
            (n, 1 + n_labels, n_pix): normalised flux, then its derivatives per unit scaled label.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def predict_scaled_with_jacobian(self, s, dtype=np.float64):
        """(flux (n, n_pix), d flux / d s (n, n_pix, n_labels)) at scaled labels ``s``.

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) or (n_labels,) scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation (float64 or float32).

        Returns
        -------
        flux : numpy.ndarray
            (n, n_pix) normalised flux.
        jac : numpy.ndarray
            (n, n_pix, n_labels) d flux / d scaled label.
        """
        x = self.planar_kernel(s, dtype)
        return np.ascontiguousarray(x[:, 0]), np.ascontiguousarray(x[:, 1:].transpose(0, 2, 1))

    def predict(self, labels):
        """Normalised flux ``(n, n_pix)`` at physical ``labels`` ``(n, n_labels)``.

        Parameters
        ----------
        labels : array_like of float
            (n, n_labels) or (n_labels,) physical labels (K, dex), in the order of ``label_names``.

        Returns
        -------
        numpy.ndarray
            (n, n_pix) normalised flux (float64).

        Raises
        ------
        ValueError
            If ``labels`` has the wrong shape.
        """
        return self.predict_scaled(self.scale(self._as_batch(labels)))

    def predict_with_jacobian(self, labels):
        """``(flux (n, n_pix), jac (n, n_pix, n_labels))``; ``jac`` is d flux / d label
        in physical label units, computed analytically (chain rule through the network).

        Parameters
        ----------
        labels : array_like of float
            (n, n_labels) or (n_labels,) physical labels (K, dex).

        Returns
        -------
        flux : numpy.ndarray
            (n, n_pix) normalised flux.
        jac : numpy.ndarray
            (n, n_pix, n_labels) d flux / d label, per K for Teff and per dex otherwise.

        Raises
        ------
        ValueError
            If ``labels`` has the wrong shape.
        """
        f, js = self.predict_scaled_with_jacobian(self.scale(self._as_batch(labels)))
        return f, js / self.scale_width

    def describe(self) -> dict:
        """A JSON-able summary of the model.

        Returns
        -------
        dict
            ``arch``, ``labels`` (name, unit, x_min, x_max in physical units), ``n_pix``,
            ``n_pix_usable``, ``usable_ranges`` (Angstrom), ``wave_min``, ``wave_max`` (Angstrom),
            ``frame`` and ``meta``.
        """
        return {
            "arch": self.arch,
            "labels": [
                {"name": n, "unit": u, "x_min": float(a), "x_max": float(b)}
                for n, u, a, b in zip(self.label_names, self.label_units, self.x_min, self.x_max)
            ],
            "n_pix": int(self.n_pix),
            "n_pix_usable": int((~np.asarray(self.pixel_mask, bool)).sum()),
            "usable_ranges": [[round(a, 2), round(b, 2)] for a, b in self.usable_ranges()],
            "wave_min": float(self.wave[0]),
            "wave_max": float(self.wave[-1]),
            "frame": self.frame,
            "meta": self.meta,
        }

    # ------------------------------------------------------------- I/O
    def _arrays(self) -> list[tuple[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_header(self) -> dict:
        return {}

    def to_hdulist(self) -> fits.HDUList:
        """The model file's HDUs (layout in the module docstring).

        Returns
        -------
        astropy.io.fits.HDUList
            Primary header, weight arrays, ``LABELS``, ``WAVE`` and the optional ``PIXMASK``,
            ``SCATTER``, ``BENCHCAL`` plus ``PROVENANCE``.
        """
        ph = fits.Header()
        ph["MPFORMAT"] = (FORMAT_NAME, "musepayne model file")
        ph["MPMVERS"] = (FORMAT_VERSION, "model format version")
        ph["ARCH"] = (self.arch, "network architecture")
        ph["CREATED"] = (str(self.meta.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")),
                         "creation date (UTC)")
        ph["MPSOFT"] = (str(self.meta.get("software_version", __version__)), "musepayne version")
        ph["NLABELS"] = self.n_labels
        ph["NPIX"] = self.n_pix
        for k, v in self._extra_header().items():
            ph[k] = v
        if self.seed_members:
            ph["NMEMBERS"] = (len(self.seed_members), "seed members (networks of other training seeds)")
        hdus = [fits.PrimaryHDU(header=ph)]
        for name, arr in self._arrays():
            hdus.append(fits.ImageHDU(np.ascontiguousarray(arr), name=name))
        for k, m in enumerate(self.seed_members, 1):
            for j, (name, arr) in enumerate(m._arrays()):
                hm = fits.ImageHDU(np.ascontiguousarray(arr), name=f"M{k}_{name}")
                if j == 0:
                    hm.header["MEMMETA"] = json.dumps(_member_meta(m.meta), sort_keys=True, default=str)
                hdus.append(hm)
        lab = Table()
        lab["name"] = list(self.label_names)
        lab["unit"] = list(self.label_units)
        lab["x_min"] = self.x_min
        lab["x_max"] = self.x_max
        hl = fits.table_to_hdu(lab)
        hl.name = "LABELS"
        hdus.append(hl)
        hw = fits.ImageHDU(self.wave, name="WAVE")
        hw.header["FRAME"] = (self.frame, "wavelength frame")
        hw.header["BUNIT"] = "Angstrom"
        hdus.append(hw)
        if self.pixel_mask.any():
            hm = fits.ImageHDU(self.pixel_mask.astype(np.uint8), name="PIXMASK")
            hm.header["COMMENT"] = "1 = model pixel not to be used in fits (insufficient training coverage)"
            hdus.append(hm)
        if self.scatter.any():
            hs = fits.ImageHDU(self.scatter, name="SCATTER")
            hs.header["COMMENT"] = "intrinsic model scatter s_p per pixel (normalised flux); fits add s_p^2 to the variance"
            hdus.append(hs)
        if self.benchmark_calibration is not None:
            hdus.append(self.benchmark_calibration.to_hdu())
        prov = Table({"json": [json.dumps(self.meta, sort_keys=True, default=str)]})
        hp = fits.table_to_hdu(prov)
        hp.name = "PROVENANCE"
        hdus.append(hp)
        return fits.HDUList(hdus)

    def save(self, path, overwrite: bool = True):
        """Write the model file atomically (see module docstring for the layout).

        Parameters
        ----------
        path : str or os.PathLike
            Output FITS file.
        overwrite : bool, optional
            Replace an existing file (default True).

        Returns
        -------
        None
        """
        atomic_write_fits(self.to_hdulist(), path, overwrite=overwrite)


class PerPixelPayne(SpectralModel):
    """Per-pixel networks: labels -> ``n_hidden`` sigmoid neurons -> 1 output, per pixel.

    ``w0 (n_pix, n_hidden, n_labels)``, ``b0 (n_pix, n_hidden)``,
    ``w1 (n_pix, n_hidden)``, ``b1 (n_pix,)`` -- the layout of The Payne's
    ``NN_normalized_spectra.npz`` (``w_array_0``, ``b_array_0``, ``w_array_1``,
    ``b_array_1``; ``einsum('ijk,k->ij', w_array_0, s)``).

    Parameters
    ----------
    w0, b0, w1, b1 : array_like of float
        The weights, shapes as above (usually float32).
    label_names, x_min, x_max, wave, frame, label_units, meta
        As for :class:`SpectralModel`.

    Attributes
    ----------
    w0, b0, w1, b1 : numpy.ndarray
        The weights.
    n_hidden : int
        Hidden neurons per pixel.

    Raises
    ------
    ModelError
        If the weight shapes do not match the labels and the grid.
    """

    arch = "perpixel"

    def __init__(self, w0, b0, w1, b1, label_names, x_min, x_max, wave, frame="vacuum",
                 label_units=None, meta=None):
        super().__init__(label_names, x_min, x_max, wave, frame, label_units, meta)
        self.w0 = np.asarray(w0)
        self.b0 = np.asarray(b0)
        self.w1 = np.asarray(w1)
        self.b1 = np.asarray(b1)
        p, h, l = self.w0.shape if self.w0.ndim == 3 else (None, None, None)
        if (p is None or l != self.n_labels or p != self.n_pix or self.b0.shape != (p, h)
                or self.w1.shape != (p, h) or self.b1.shape != (p,)):
            raise ModelError(
                f"per-pixel weights inconsistent: w0 {self.w0.shape} (want (n_pix={self.n_pix}, n_hidden, "
                f"n_labels={self.n_labels})), b0 {self.b0.shape}, w1 {self.w1.shape}, b1 {self.b1.shape}")
        self.n_hidden = h

    def _cast(self, dtype):
        """Weights at ``dtype`` in the hidden-unit-major layout of the kernels (cached per dtype)."""
        dt = np.dtype(dtype)
        c = self._cache.get(dt.str)
        if c is None:
            p, h, l = self.w0.shape
            c = (np.ascontiguousarray(self.w0.transpose(2, 1, 0).reshape(l, h * p)).astype(dt),  # (L, H*p)
                 np.ascontiguousarray(self.b0.T).reshape(h * p).astype(dt),
                 np.ascontiguousarray(self.w1.T).astype(dt),  # (H, p)
                 self.b1.astype(dt),
                 np.ascontiguousarray(self.w0.transpose(1, 2, 0)).astype(dt))  # (H, L, p)
            self._cache[dt.str] = c
        return c

    def _hidden(self, s, dtype):
        """Sigmoid activations laid out ``(n, n_hidden, n_pix)``."""
        w0t, b0f = self._cast(dtype)[:2]
        z = np.asarray(s, dtype) @ w0t
        z += b0f
        return _sigmoid_inplace(z).reshape(s.shape[0], self.n_hidden, self.n_pix)

    def predict_scaled(self, s, dtype=np.float64):
        """Normalised flux (n, n_pix) at scaled labels ``s`` (n, n_labels).

        Parameters
        ----------
        s : array_like of float
            Scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation.

        Returns
        -------
        numpy.ndarray
            (n, n_pix) normalised flux.
        """
        s = np.atleast_2d(np.asarray(s, np.float64))
        _, _, w1, b1, _ = self._cast(dtype)
        return np.einsum("nhp,hp->np", self._hidden(s, dtype), w1) + b1

    def planar_kernel(self, s, dtype=np.float64):
        """Flux and d flux / d s as planes ``(n, 1 + n_labels, n_pix)`` (see :meth:`SpectralModel.planar_kernel`).

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation.

        Returns
        -------
        numpy.ndarray
            (n, 1 + n_labels, n_pix).
        """
        s = np.atleast_2d(np.asarray(s, np.float64))
        _, _, w1, b1, w0 = self._cast(dtype)
        a = self._hidden(s, dtype)
        x = np.empty((s.shape[0], 1 + self.n_labels, self.n_pix), a.dtype)
        np.einsum("nhp,hp->np", a, w1, out=x[:, 0])
        x[:, 0] += b1
        a *= 1.0 - a  # sigmoid'(z) = a (1 - a), in place
        a *= w1
        # d f_p / d s_l = sum_h w1[p,h] sigmoid'(z)[p,h] w0[p,h,l]
        np.einsum("nhp,hlp->nlp", a, w0, out=x[:, 1:])
        return x

    def _arrays(self):
        return [("W0", self.w0), ("B0", self.b0), ("W1", self.w1), ("B1", self.b1)]

    @classmethod
    def _from_hdus(cls, h, common):
        return cls(*(_native(h[k].data) for k in ("W0", "B0", "W1", "B1")), **common)


class MLPPayne(SpectralModel):
    """One fully connected network for all pixels with leaky-ReLU hidden layers.

    ``weights[i]`` has the torch ``Linear`` shape ``(n_out, n_in)``; the last
    layer is linear and outputs ``n_pix`` values.  Any number of hidden layers.

    Parameters
    ----------
    weights, biases : sequence of array_like
        Per layer ``(n_out, n_in)`` weights and ``(n_out,)`` biases; the first layer takes n_labels
        inputs, the last outputs n_pix values.
    label_names, x_min, x_max, wave, frame, label_units, meta
        As for :class:`SpectralModel`.
    negative_slope : float, optional
        Leaky-ReLU slope of the hidden layers (default 0.01).

    Attributes
    ----------
    weights, biases : list of numpy.ndarray
        The layers.
    negative_slope : float
        Leaky-ReLU slope.

    Raises
    ------
    ModelError
        If the layers do not chain from n_labels inputs to n_pix outputs.
    """

    arch = "mlp"

    def __init__(self, weights, biases, label_names, x_min, x_max, wave, frame="vacuum",
                 label_units=None, meta=None, negative_slope=0.01):
        super().__init__(label_names, x_min, x_max, wave, frame, label_units, meta)
        self.weights = [np.asarray(w) for w in weights]
        self.biases = [np.asarray(b).ravel() for b in biases]
        self.negative_slope = float(negative_slope)
        if len(self.weights) < 1 or len(self.weights) != len(self.biases):
            raise ModelError("need one bias per weight matrix and at least one layer")
        n_in = self.n_labels
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[1] != n_in or b.shape != (w.shape[0],):
                raise ModelError(f"layer {i}: weight {w.shape} / bias {b.shape} do not chain from {n_in} inputs")
            n_in = w.shape[0]
        if n_in != self.n_pix:
            raise ModelError(f"last layer outputs {n_in} values but the wavelength grid has {self.n_pix} pixels")

    def _cast(self, dtype):
        dt = np.dtype(dtype)
        c = self._cache.get(dt.str)
        if c is None:
            c = ([w.astype(dt) for w in self.weights], [b.astype(dt) for b in self.biases])
            self._cache[dt.str] = c
        return c

    def predict_scaled(self, s, dtype=np.float64):
        """Normalised flux (n, n_pix) at scaled labels ``s`` (n, n_labels).

        Parameters
        ----------
        s : array_like of float
            Scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation.

        Returns
        -------
        numpy.ndarray
            (n, n_pix) normalised flux.
        """
        ws, bs = self._cast(dtype)
        h = np.atleast_2d(np.asarray(s, dtype))
        for w, b in zip(ws[:-1], bs[:-1]):
            h = h @ w.T + b
            h = np.where(h > 0, h, self.negative_slope * h)
        return h @ ws[-1].T + bs[-1]

    def predict_scaled_columns(self, s, c0, c1, dtype=np.float64):
        """:meth:`SpectralModel.predict_scaled_columns` computing only those columns: the last layer
        is linear, its rows ``c0 .. c1 - 1`` give the same values as the whole product.

        Parameters
        ----------
        s, c0, c1, dtype
            As for the base class: scaled labels, the pixel range, the precision.

        Returns
        -------
        numpy.ndarray
            ``predict_scaled(s, dtype)[:, c0:c1]``, bit for bit.
        """
        ws, bs = self._cast(dtype)
        h = np.atleast_2d(np.asarray(s, dtype))
        for w, b in zip(ws[:-1], bs[:-1]):
            h = h @ w.T + b
            h = np.where(h > 0, h, self.negative_slope * h)
        return h @ ws[-1][c0:c1].T + bs[-1][c0:c1]

    def planar_kernel(self, s, dtype=np.float64):
        """Flux and d flux / d s as planes ``(n, 1 + n_labels, n_pix)`` by forward-mode differentiation.

        Parameters
        ----------
        s : array_like of float
            (n, n_labels) scaled labels (dimensionless).
        dtype : numpy dtype, optional
            Precision of the computation.

        Returns
        -------
        numpy.ndarray
            (n, 1 + n_labels, n_pix).
        """
        ws, bs = self._cast(dtype)
        h = self.hidden_planes(s, dtype)
        n, P, _ = h.shape
        x = (h.reshape(n * P, -1) @ ws[-1].T).reshape(n, P, -1)
        x[:, 0] += bs[-1]
        return x

    def hidden_planes(self, s, dtype=np.float64):
        """The last hidden layer's activation and its derivatives by the scaled labels, as planes
        ``(n, 1 + n_labels, width)`` (the input of the linear last layer: :meth:`planar_kernel` is
        ``planes @ weights[-1].T``, plus the bias on plane 0).

        Parameters
        ----------
        s : array_like of float
            Scaled labels, (n, n_labels) or (n_labels,), dimensionless.
        dtype : numpy dtype, optional
            Precision (float32 or float64).

        Returns
        -------
        numpy.ndarray
            Planes (n, 1 + n_labels, width); width is n_labels for a network without hidden layers.
        """
        ws, bs = self._cast(dtype)
        s = np.atleast_2d(np.asarray(s, dtype))
        n, L = s.shape
        # forward mode: activations and their derivatives carried together as planes
        # (n, 1 + L, width): plane 0 the activation, plane 1 + l its derivative by s_l
        h = np.zeros((n, 1 + L, L), dtype)
        h[:, 0] = s
        h[:, 1:] = np.eye(L, dtype=dtype)
        for w, b in zip(ws[:-1], bs[:-1]):
            z = (h.reshape(n * (1 + L), -1) @ w.T).reshape(n, 1 + L, -1)  # one GEMM for all planes
            z[:, 0] += b
            slope = np.where(z[:, 0] > 0, 1.0, self.negative_slope).astype(dtype)
            z *= slope[:, None, :]
            h = z
        return h

    def _arrays(self):
        out = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out += [(f"W{i}", w), (f"B{i}", b)]
        return out

    def _extra_header(self):
        return {"NLAYERS": (len(self.weights), "number of weight matrices"),
                "NEGSLOPE": (self.negative_slope, "leaky ReLU negative slope")}

    @classmethod
    def _from_hdus(cls, h, common):
        n = int(h[0].header["NLAYERS"])
        ws = [_native(h[f"W{i}"].data) for i in range(n)]
        bs = [_native(h[f"B{i}"].data) for i in range(n)]
        return cls(ws, bs, negative_slope=float(h[0].header.get("NEGSLOPE", 0.01)), **common)
