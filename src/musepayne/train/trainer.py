"""Training Payne-style emulators the DD-Payne way (PyTorch, optional extra).

Two architectures (the two Payne families the fitter reads):

``mlp``
    one network ``labels -> h1 -> h2 -> ... -> n_pix``, leaky-ReLU hidden
    layers (slope 0.01), linear output (The Payne, Ting et al. 2019).
``perpixel``
    one tiny network per pixel, ``labels -> n_h sigmoid neurons -> 1``
    (Ting et al. 2017; Xiang et al. 2019).

Labels enter scaled as ``(l - x_min) / (x_max - x_min) - 0.5`` with
``x_min``/``x_max`` the training-label ranges.

Loss
----
``L = L_data + sum_l w_l L_grad,l``

* ``L_data = sum ivar (f_model - f)^2 / sum ivar`` over all spectra and pixels
  of the batch: the ivar-weighted mean squared residual.  Masked pixels have
  ``ivar = 0`` and do not enter.
* DD-Payne gradient regularisation (Ting et al. 2017 S5; Xiang et al. 2019
  S3.2): at every reference star ``r`` of a template library
  (:class:`musepayne.models.gradients.GradientTemplates`) the network's gradient
  spectrum ``d f / d l`` (computed analytically by forward-mode
  differentiation through the network, hence itself differentiable) is
  compared with the theoretical gradient ``T_r,l`` over the template's
  usable pixels:

  - ``'corr'`` (default): ``L_grad,l = mean_r (1 - corr(df/dl, T_r,l))``,
    the quantity the per-label quality flag checks (paper Eq. 4 and S3.2);
  - ``'mse'``: ``L_grad,l = mean_r sum_p (df/dl - T)^2 / sum_p T^2``.

  Reference stars outside the training label range are not used.  With all
  weights 0 the model is purely data driven.

Training is full batch (or mini-batch with ``batch_size``) Adam with a
fixed seed (``torch.manual_seed``, deterministic algorithms); a random
validation fraction (grouped by ``star_key`` where present, so one star
observed by two libraries never sits on both sides) drives early stopping on
the validation loss ``L_data(val) + sum_l w_l L_grad,l``; the parameters of the
best validation loss are returned.

This module holds the configuration, the result and the numpy side (inputs, split,
provenance, model scatter); the torch networks and the optimisation loop are in
:mod:`musepayne.train.network`.

Length: the module is slightly over 600 lines because of the numpydoc sections of its public API
(the torch side is already in :mod:`musepayne.train.network`).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from dataclasses import replace as _replace

import numpy as np
from astropy.table import Table

from .. import __version__
from ..fit.fitter import FitConfig, Fitter
from ..io.prepared import PreparedSpectra
from ..models.cannon import ml_scatter
from ..models.model import MLPPayne, PerPixelPayne
from ..threads import blas_threads
from .network import fit_network, torch_module

__all__ = ["TrainConfig", "TrainResult", "train_model", "parse_gradient_weights", "split_indices"]


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of :func:`train_model`.

    Attributes
    ----------
    arch : 'mlp' or 'perpixel'
    hidden : hidden-layer sizes (mlp) or neurons per pixel (perpixel, one number)
    epochs : maximum number of optimisation steps (full-batch epochs)
    learning_rate : Adam step size
    weight_decay : L2 penalty on the weights (Adam's decoupled form is not used)
    val_fraction : fraction of stars held out for validation / early stopping
    patience : stop after this many evaluations without a better validation loss
    eval_every : evaluate the validation loss every this many epochs
    seed : seeds numpy (split) and torch (initialisation, mini-batches)
    device : 'cpu', 'cuda' or 'auto' (cuda if available)
    gradient_weight : {label: weight} of the DD-Payne term (0 or missing = off)
    gradient_loss : 'corr' or 'mse'
    batch_size : spectra per step (None = full batch)
    val_metric : 'mean' (ivar-weighted loss over all validation pixels) or
        'median' (median over validation stars of their own weighted loss:
        robust to a few stars with peculiar spectra or wrong labels)
    outlier_clip : drop training stars whose loss exceeds this many times the
        median and retrain (None = off); see :func:`train_model`
    restore_best : return the parameters of the best validation score (else the last)
    ref_batch : reference stars drawn (seeded) per step for the gradient term
        (None = all); the validation/early-stopping score always uses all
    dtype : 'float32' or 'float64'
    negative_slope : leaky-ReLU slope of the mlp
    model_scatter : estimate the model's intrinsic per-pixel scatter ``s_p`` on the held-out
        validation stars (each fitted at its own best labels and RV, so label errors in the
        training catalogue do not count) and store it in the model; fits put ``s_p^2`` into
        the pixel variances of the errors and of ``red_chi2_model``
        (:attr:`musepayne.fit.fitter.FitConfig.model_scatter`).  Needs
        ``val_fraction > 0``.
    min_pixel_coverage : model pixels with usable data (IVAR > 0) in fewer than this
        fraction of the training spectra are written to the model's pixel mask, so
        fits ignore them.  A network is only constrained where most training stars
        have data: MILES stops at 7410 A, so redder pixels are learnt from the ~20 %
        of STELIB stars alone and extrapolate badly for labels STELIB does not cover
        (e.g. the NGC 6397 giant's RV moved by 40 km/s).  0 disables the mask.
    """

    arch: str = "mlp"
    hidden: tuple = (100, 100)
    epochs: int = 3000
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 30
    eval_every: int = 20
    seed: int = 0
    device: str = "cpu"
    gradient_weight: dict = field(default_factory=dict)
    gradient_loss: str = "corr"
    batch_size: int | None = None
    ref_batch: int | None = 128
    restore_best: bool = True
    outlier_clip: float | None = None
    val_metric: str = "mean"
    dtype: str = "float32"
    negative_slope: float = 0.01
    min_pixel_coverage: float = 0.5
    model_scatter: bool = True

    def __post_init__(self):
        if self.arch not in ("mlp", "perpixel"):
            raise ValueError(f"arch must be 'mlp' or 'perpixel', got {self.arch!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError("hidden sizes must be positive integers")
        if self.arch == "perpixel" and len(self.hidden) != 1:
            raise ValueError("perpixel takes one hidden size (neurons per pixel)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.gradient_loss not in ("corr", "mse"):
            raise ValueError("gradient_loss must be 'corr' or 'mse'")
        gw = {str(k): float(v) for k, v in dict(self.gradient_weight).items()}
        if any(v < 0 or not np.isfinite(v) for v in gw.values()):
            raise ValueError("gradient weights must be finite and >= 0")
        object.__setattr__(self, "gradient_weight", gw)
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError("device must be cpu, cuda or auto")
        if self.val_metric not in ("mean", "median"):
            raise ValueError("val_metric must be 'mean' or 'median'")
        if self.dtype not in ("float32", "float64"):
            raise ValueError("dtype must be float32 or float64")


def parse_gradient_weights(text, label_names) -> dict:
    """``'0.1'`` (all labels) or ``'teff=0.1,logg=0.05'`` -> ``{label: weight}``.

    Parameters
    ----------
    text : str or None
        The command-line value; None or empty means no gradient term.
    label_names : sequence of str
        The model's labels.

    Returns
    -------
    dict of str to float
        Dimensionless weight of the DD-Payne gradient term per label.

    Raises
    ------
    ValueError
        For an unknown label or a value that is not a number.
    """
    if text is None or str(text).strip() == "":
        return {}
    text = str(text).strip()
    if "=" not in text:
        w = float(text)
        return {n: w for n in label_names}
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in label_names:
            raise ValueError(f"gradient weight for unknown label {k!r}; labels are {list(label_names)}")
        out[k] = float(v)
    return out


def split_indices(n, val_fraction, seed, groups=None):
    """Random train/validation split (grouped: all members of a group on one side).

    Parameters
    ----------
    n : int
        Number of spectra.
    val_fraction : float
        Target fraction of spectra in the validation set (0: none).
    seed : int
        Seed of the numpy generator (the split is reproducible).
    groups : array_like, optional
        (n,) group id per spectrum (e.g. ``star_key``); default every spectrum its own group.

    Returns
    -------
    train : numpy.ndarray
        Row indices (int) of the training spectra, ascending.
    val : numpy.ndarray
        Row indices (int) of the validation spectra, ascending.
    """
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, int)
    if groups is None:
        groups = np.arange(n)
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    perm = rng.permutation(uniq.size)
    n_val_target = max(1, int(round(val_fraction * n)))
    val_groups, count = [], 0
    sizes = {g: c for g, c in zip(*np.unique(groups, return_counts=True))}
    for i in perm:
        if count >= n_val_target:
            break
        val_groups.append(uniq[i])
        count += sizes[uniq[i]]
    is_val = np.isin(groups, val_groups)
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


@dataclass(eq=False)
class TrainResult:
    """A trained network as plain numpy arrays, plus provenance.

    mlp: ``weights`` [(n_out, n_in)...], ``biases`` [(n_out,)...];
    perpixel: ``weights`` [w0 (npix, nh, nl), w1 (npix, nh)], ``biases`` [b0 (npix, nh), b1 (npix,)].

    Attributes
    ----------
    arch : str
        'mlp' or 'perpixel'.
    weights, biases : list of numpy.ndarray
        The network parameters (float64), layouts above.
    label_names : tuple of str
        Labels in input order.
    x_min, x_max : numpy.ndarray
        (n_labels,) label ranges of the scaling, physical units (K, dex).
    wave : numpy.ndarray
        (n_pix,) wavelengths in Angstrom, in ``frame``.
    frame : str
        'vacuum' or 'air'.
    meta : dict
        Provenance (versions, configuration, losses, split sizes, scatter estimate).
    history : list of dict
        Losses at every evaluation (epoch, train_data, val_data, val_score, reg, grad_<label>).
    negative_slope : float
        Leaky-ReLU slope of the mlp.
    label_units : tuple of str
        Units per label (empty: defaults).
    pixel_mask : numpy.ndarray or None
        (n_pix,) bool, pixels with too little training coverage.
    scatter : numpy.ndarray or None
        (n_pix,) intrinsic model scatter in normalised flux.
    """

    arch: str
    weights: list
    biases: list
    label_names: tuple
    x_min: np.ndarray
    x_max: np.ndarray
    wave: np.ndarray
    frame: str
    meta: dict
    history: list
    negative_slope: float = 0.01
    label_units: tuple = ()
    pixel_mask: np.ndarray | None = None
    scatter: np.ndarray | None = None

    # ------------------------------------------------------------ numpy inference
    def scale(self, labels):
        """Physical labels -> network input ``(l - x_min) / (x_max - x_min) - 0.5``.

        Parameters
        ----------
        labels : array_like of float
            (n, n_labels) or (n_labels,), physical units (K, dex).

        Returns
        -------
        numpy.ndarray
            (n, n_labels) scaled labels (dimensionless).
        """
        lab = np.atleast_2d(np.asarray(labels, np.float64))
        return (lab - self.x_min) / (self.x_max - self.x_min) - 0.5

    def predict(self, labels):
        """Model spectra (n, n_pix) in numpy (mirrors the torch forward pass).

        Parameters
        ----------
        labels : array_like of float
            (n, n_labels) or (n_labels,), physical units (K, dex).

        Returns
        -------
        numpy.ndarray
            (n, n_pix) normalised flux (float64).
        """
        x = self.scale(labels)
        if self.arch == "mlp":
            h = x
            for i, (W, b) in enumerate(zip(self.weights, self.biases)):
                h = h @ W.T + b
                if i < len(self.weights) - 1:
                    h = np.where(h > 0, h, self.negative_slope * h)
            return h
        w0, w1 = self.weights
        b0, b1 = self.biases
        z = np.einsum("pkl,nl->npk", w0, x) + b0[None]
        return np.einsum("pk,npk->np", w1, 1.0 / (1.0 + np.exp(-z))) + b1[None]

    def to_model(self):
        """The trained network as a :mod:`musepayne.models.model` spectral model.

        Returns
        -------
        SpectralModel
            :class:`MLPPayne` or :class:`PerPixelPayne` with float32 weights, the pixel mask and the
            scatter (when estimated) and ``meta`` as provenance.
        """

        common = dict(label_names=self.label_names, x_min=self.x_min, x_max=self.x_max, wave=self.wave,
                      frame=self.frame, label_units=self.label_units or None, meta=dict(self.meta))
        f32 = np.float32
        if self.arch == "mlp":
            model = MLPPayne([np.asarray(w, f32) for w in self.weights], [np.asarray(b, f32) for b in self.biases],
                             negative_slope=self.negative_slope, **common)
        else:
            model = PerPixelPayne(np.asarray(self.weights[0], f32), np.asarray(self.biases[0], f32),
                                  np.asarray(self.weights[1], f32), np.asarray(self.biases[1], f32), **common)
        if self.pixel_mask is not None:
            model = model.with_pixel_mask(self.pixel_mask)
        if self.scatter is not None:
            model = model.with_scatter(self.scatter)
        return model
def train_model(flux, ivar, labels, label_names, wave, config: TrainConfig | None = None, templates=None,
                groups=None, frame="vacuum", provenance: dict | None = None, progress: bool = False,
                label_units=None, x_min=None, x_max=None) -> TrainResult:
    """Train a Payne emulator on ``flux`` (n, n_pix) with ``ivar`` and ``labels`` (n, n_labels).

    ``templates``: optional :class:`~musepayne.models.gradients.GradientTemplates` on
    the same grid for the DD-Payne term (weights in ``config.gradient_weight``).
    ``groups``: optional per-spectrum group ids for the validation split.
    With ``config.outlier_clip = k`` the network is trained twice: training
    stars whose own ivar-weighted loss under the first network exceeds
    ``k`` times the median are dropped (peculiar spectra, wrong literature
    labels) and the network is retrained from the same seed; the validation
    set is unchanged.  ``meta['clipped']`` lists the dropped row indices.
    Caveat (measured on MILES+STELIB): rare stars (metal-poor giants, cluster
    stars) are fitted worst and are clipped first, so clipping can hurt the
    sparse corners of label space; it is off by default.
    Returns a :class:`TrainResult` with numpy arrays and provenance; the
    inputs are not modified.

    Parameters
    ----------
    flux, ivar : array_like of float
        (n, n_pix) normalised training spectra and their inverse variances (0 or non-finite: unused).
    labels : array_like of float
        (n, n_labels) finite labels (K, dex).
    label_names : sequence of str
        Label names, in column order.
    wave : array_like of float
        (n_pix,) wavelengths in Angstrom, in ``frame``.
    config : TrainConfig, optional
        Settings (default ``TrainConfig()``).
    templates : GradientTemplates, optional
        Theoretical gradients on ``wave`` (needed when a gradient weight is > 0).
    groups : array_like, optional
        (n,) group ids for the validation split.
    frame : str, optional
        'vacuum' (default) or 'air'.
    provenance : dict, optional
        Extra entries for ``meta``.
    progress : bool, optional
        Show a progress bar.
    label_units : sequence of str, optional
        Units per label.
    x_min, x_max : array_like of float, optional
        Label ranges of the scaling (default the training labels' ranges).

    Returns
    -------
    TrainResult
        The network, its history and provenance.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    ValueError
        For inconsistent shapes, non-finite labels, no usable pixel, unknown gradient labels, missing
        or mismatched templates.
    RuntimeError
        If ``config.device`` is 'cuda' and no CUDA device is available.
    """
    cfg = config or TrainConfig()
    kw = dict(templates=templates, groups=groups, frame=frame, provenance=provenance, label_units=label_units,
              x_min=x_min, x_max=x_max)
    if not cfg.outlier_clip:
        res = _train(flux, ivar, labels, label_names, wave, cfg, progress=progress, exclude=None, **kw)
        return _finish(res, flux, ivar, cfg)
    first = _train(flux, ivar, labels, label_names, wave, cfg, progress=False, exclude=None, **kw)
    f = np.asarray(flux, np.float64)
    iv = np.asarray(ivar, np.float64)
    good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    iv = np.where(good, iv, 0.0)
    r = np.where(good, f - first.predict(labels), 0.0)
    per = (iv * r**2).sum(1) / np.maximum(iv.sum(1), 1e-300)
    tr = np.asarray(first.meta["_train_idx"])
    exclude = np.zeros(f.shape[0], bool)
    exclude[tr] = per[tr] > cfg.outlier_clip * np.median(per[tr])
    res = _train(flux, ivar, labels, label_names, wave, cfg, progress=progress, exclude=exclude, **kw)
    res.meta["clipped"] = np.nonzero(exclude)[0].tolist()
    res.meta["n_clipped"] = int(exclude.sum())
    res.meta["train_seconds"] = round(res.meta["train_seconds"] + first.meta["train_seconds"], 2)
    return _finish(res, flux, ivar, cfg)


def _finish(res, flux, ivar, cfg):
    """Drop the internal index lists from the provenance; add the model scatter (validation stars)."""
    res.meta.pop("_train_idx", None)
    va = np.asarray(res.meta.pop("_val_idx", []), int)
    if not cfg.model_scatter:
        res.meta["scatter"] = {"method": "none"}
        return res
    if va.size < 10:
        res.meta["scatter"] = {"method": "none", "why": f"only {va.size} validation spectra (need >= 10)"}
        return res
    t0 = time.perf_counter()
    model = res.to_model()
    s, n_used = estimate_scatter(model, np.asarray(flux)[va], np.asarray(ivar)[va])
    res.scatter = s
    ok = ~model.pixel_mask
    res.meta["scatter"] = {
        "method": "maximum-likelihood intrinsic scatter per pixel of the validation spectra, each fitted "
                  "(labels and RV free, float64) with this model; residuals at the fitted labels",
        "n_stars": int(n_used),
        "median": float(np.median(s[ok])) if ok.any() else float("nan"),
        "p90": float(np.percentile(s[ok], 90)) if ok.any() else float("nan"),
        "seconds": round(time.perf_counter() - t0, 2)}
    return res


def estimate_scatter(model, flux, ivar, fit_config=None):
    """Intrinsic per-pixel scatter ``s_p`` of ``model`` from held-out spectra on its grid.

    Every spectrum (``flux``, ``ivar`` (n, n_pix), prepared like the training set) is
    fitted with ``model`` (labels and RV free; the model's existing scatter is not used);
    ``s_p`` maximises the likelihood of the residuals at the fitted labels with variance
    ``1/ivar + s_p^2`` (:func:`musepayne.models.cannon.ml_scatter`).  Fitting each star at its own
    best labels keeps errors of the catalogue labels out of ``s_p``: what remains is what
    the model cannot predict from any labels.  Returns ``(s_p (n_pix,), n_spectra_used)``;
    ``s_p = 0`` on the model's masked pixels.  Pure numpy; the inputs are not modified.

    Parameters
    ----------
    model : SpectralModel
        The model whose scatter is estimated.
    flux, ivar : array_like of float
        (n, n_pix) held-out prepared spectra on the model's grid and their inverse variances.
    fit_config : FitConfig, optional
        Fitter settings (default float64, labels and RV free).

    Returns
    -------
    s_p : numpy.ndarray
        (n_pix,) intrinsic scatter in normalised-flux units (0 on masked pixels).
    n_used : int
        Number of spectra whose fit converged and entered the estimate.
    """



    f = np.asarray(flux, np.float64)
    iv = np.asarray(ivar, np.float64)
    good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    f, iv = np.where(good, f, 0.0), np.where(good, iv, 0.0)
    n = f.shape[0]
    zeros = np.zeros(f.shape)
    prep = PreparedSpectra(np.asarray(model.wave, np.float64), f, iv, np.zeros(f.shape, np.int32), zeros, zeros + 1.0,
                           Table({"stellar_id": [f"val{i}" for i in range(n)]}))
    cfg = _replace(fit_config or FitConfig(precision="float64"), keep_model=True, model_scatter="off",
                   lsf_excess=False)
    fitter = Fitter(model, cfg)

    with blas_threads(1):  # the fit's products are per chunk (small): one BLAS thread, as musepayne fit
        res = fitter.fit_arrays(prep)
    ok = np.all(np.isfinite(res.model_flux), axis=1) & (res.status.astype(str) == "converged")
    used = good[ok] & ~model.pixel_mask[None, :]
    if not ok.any():
        return np.zeros(model.n_pix), 0
    var = np.where(used, 1.0 / np.where(used, iv[ok], 1.0), 1.0)
    s2 = ml_scatter(np.where(used, f[ok] - res.model_flux[ok], 0.0), var, used)
    s = np.sqrt(s2)
    s[model.pixel_mask] = 0.0
    return s, int(ok.sum())


def _checked_inputs(flux, ivar, labels, label_names, wave, cfg, templates):
    """Copies of the inputs as float64 (flux, ivar zeroed where unusable), label names, active gradient weights."""
    flux = np.array(flux, np.float64)
    ivar = np.array(ivar, np.float64)
    labels = np.atleast_2d(np.array(labels, np.float64))
    wave = np.asarray(wave, np.float64)
    names = tuple(label_names)
    n, npix = flux.shape
    if ivar.shape != flux.shape or labels.shape != (n, len(names)) or wave.size != npix:
        raise ValueError("flux, ivar (n, n_pix), labels (n, n_labels) and wave (n_pix,) disagree")
    if not np.all(np.isfinite(labels)):
        raise ValueError("labels must be finite")
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    ivar = np.where(good, ivar, 0.0)
    flux = np.where(good, flux, 0.0)
    if not good.any():
        raise ValueError("no pixel with ivar > 0")
    unknown = [k for k in cfg.gradient_weight if k not in names]
    if unknown:
        raise ValueError(f"gradient weight for unknown labels {unknown}")
    active = {k: w for k, w in cfg.gradient_weight.items() if w > 0}
    if active and templates is None:
        raise ValueError("gradient weights > 0 need gradient templates")
    return flux, ivar, labels, wave, names, active


def _train(flux, ivar, labels, label_names, wave, cfg, templates=None, groups=None, frame="vacuum",
           provenance=None, progress=False, label_units=None, x_min=None, x_max=None, exclude=None):
    torch = torch_module()
    t_start = time.perf_counter()
    flux, ivar, labels, wave, names, active = _checked_inputs(flux, ivar, labels, label_names, wave, cfg, templates)
    n = flux.shape[0]

    xmin = labels.min(0) if x_min is None else np.asarray(x_min, np.float64)
    xmax = labels.max(0) if x_max is None else np.asarray(x_max, np.float64)
    if np.any(xmax <= xmin):
        raise ValueError("every label needs a non-zero range in the training set")
    xs = (labels - xmin) / (xmax - xmin) - 0.5

    tr, va = split_indices(n, cfg.val_fraction, cfg.seed, groups)
    if exclude is not None:
        tr = tr[~np.asarray(exclude, bool)[tr]]
    # weight of each pixel in the mean spectrum (start of the output bias)
    wsum = ivar[tr].sum(0)
    mean_flux = np.where(wsum > 0, (ivar[tr] * flux[tr]).sum(0) / np.where(wsum > 0, wsum, 1), 1.0)

    fit = fit_network(torch, cfg, xs, flux, ivar, tr, va, mean_flux, names, xmin, xmax, wave, templates, active,
                      progress)
    meta = _train_meta(cfg, names, xmin, xmax, tr, va, fit, active, templates, time.perf_counter() - t_start)
    coverage = np.mean(ivar[tr] > 0, axis=0)
    pixel_mask = coverage < cfg.min_pixel_coverage
    meta["pixel_mask"] = {"rule": f"IVAR > 0 in fewer than {cfg.min_pixel_coverage:g} of the training spectra",
                          "n_masked": int(pixel_mask.sum())}
    if provenance:
        meta.update(provenance)
    return TrainResult(cfg.arch, fit["weights"], fit["biases"], names, xmin.copy(), xmax.copy(), wave.copy(), frame,
                       meta, fit["history"], cfg.negative_slope, tuple(label_units or ()), pixel_mask, None)


def _train_meta(cfg, names, xmin, xmax, tr, va, fit, active, templates, elapsed):
    """The provenance of one training run (``meta`` of :class:`TrainResult`, before the pixel mask)."""
    history = fit["history"]
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": f"musepayne {__version__}",
        "software_version": __version__,
        "versions": {"musepayne": __version__, "torch": fit["torch_version"], "numpy": np.__version__,
                     "python": platform.python_version()},
        "arch": cfg.arch,
        "hidden": ",".join(str(h) for h in cfg.hidden),
        "labels": ",".join(names),
        "label_ranges": {k: [float(a), float(b)] for k, a, b in zip(names, xmin, xmax)},
        "n_train": int(tr.size),
        "_train_idx": tr.tolist(),
        "_val_idx": va.tolist(),
        "n_val": int(va.size),
        "seed": int(cfg.seed),
        "device": fit["device"],
        "epochs_run": int(history[-1]["epoch"]) if history else 0,
        "best_epoch": fit["best_epoch"],
        "stopped": fit["stopped"],
        "final_train_loss": fit["final_train_loss"],
        "final_val_loss": fit["final_val_loss"],
        "final_grad_loss": fit["final_grad_loss"],
        "regularisation": {"method": "DD-Payne gradient-spectrum penalty (Ting+17, Xiang+19)" if active
                           else "none (purely data driven)",
                           "gradient_weight": dict(cfg.gradient_weight), "gradient_loss": cfg.gradient_loss,
                           "n_ref": fit["n_ref_used"],
                           "templates": ({k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                          for k, v in templates.meta.items()}
                                         if (templates is not None and active) else None)},
        "train_config": json.loads(json.dumps(asdict(cfg), default=str)),
        "loss": "sum ivar (model - flux)^2 / sum ivar  +  sum_l w_l * gradient term",
        "train_seconds": round(elapsed, 2),
        "command": " ".join(sys.argv) if sys.argv else "",
    }
