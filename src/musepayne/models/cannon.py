"""A quadratic Cannon (Ness et al. 2015): the baseline our DD-Payne models are compared with.

Model (Ness et al. 2015, Eq. 1-3): every pixel ``p`` of a continuum-normalised
spectrum is a quadratic polynomial in the (scaled) labels plus Gaussian noise
with the pixel's own error and an intrinsic scatter ``s_p``:

``f_np = theta_p . X(l_n) + noise,   noise ~ N(0, sigma_np^2 + s_p^2)``

with the *design vector* ``X(l) = [1, l_1, ..., l_L, l_1^2, l_1 l_2, ..., l_L^2]``
(``1 + L + L(L+1)/2`` terms; 10 for Teff, log g, [Fe/H]).

Training step (Eq. 4): per pixel, ``theta_p`` by ivar-weighted linear least
squares with weights ``1 / (sigma_np^2 + s_p^2)``; optionally alternated with the
maximum-likelihood ``s_p^2`` given ``theta_p`` (root of
``sum_n [r_np^2 / (sigma_np^2 + s^2)^2 - 1 / (sigma_np^2 + s^2)] = 0``, by
bisection in ``log s^2``, all pixels at once).  Pixels with usable data in
fewer than ``min_pixel_coverage`` of the training spectra (or fewer spectra
than the number of coefficients + 2) go to the model's pixel mask, as for
:func:`musepayne.train.trainer.train_model`.

Test step (Eq. 5): per spectrum, the labels that minimise
``chi2 = sum_p (f_p - theta_p . X(l))^2 / (sigma_p^2 + s_p^2)``.  The model is a
:class:`musepayne.models.model.SpectralModel` (analytic Jacobian of the design
vector), so :class:`musepayne.fit.fitter.Fitter` does this step -- vectorised over
spectra, with the same radial-velocity fit, ``LSF_EXCESS`` forward model,
masks and label box as for the networks, which makes the comparison fair.
For this test step use ``FitConfig(model_scatter='weights')``: the Fitter then puts
``s_p`` into the weights itself (as for any model with a scatter); the default
'errors' fits with the observed errors and puts ``s_p`` into the covariance only.

Labels enter scaled as for the networks, ``s = (l - x_min)/(x_max - x_min) - 0.5``;
a quadratic polynomial is the same family under any affine label scaling, so
this is Ness et al.'s pivot-and-scale up to a re-parametrisation.

Pure array functions: :func:`design_matrix`, :func:`design_jacobian`,
:func:`fit_coefficients`, :func:`ml_scatter`; class: :class:`CannonModel`
(built by :func:`train_cannon`).  numpy only; nothing is pickled: ``model.save(path)``
writes the package's model file (``ARCH = 'cannon'``, HDUs ``THETA`` (n_pix, K) and
``SCATTER`` (n_pix,)), which :func:`musepayne.models.model.load_model` (and so ``musepayne fit
--model``) reads back, scatter included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import SpectralModel

__all__ = ["CannonConfig", "CannonModel", "design_matrix", "design_jacobian", "fit_coefficients",
           "ml_scatter", "train_cannon", "n_terms"]


def n_terms(n_labels: int) -> int:
    """Number of coefficients of the quadratic model: ``1 + L + L(L+1)/2``.

    Parameters
    ----------
    n_labels : int
        Number of labels L.

    Returns
    -------
    int
        K, the length of the design vector.
    """
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


def _pairs(n_labels):
    return [(i, j) for i in range(n_labels) for j in range(i, n_labels)]


def design_matrix(s):
    """Quadratic design vectors ``[1, s_i, s_i s_j (i <= j)]`` of scaled labels ``s`` (n, L) -> (n, K).

    Parameters
    ----------
    s : array_like
        Scaled (dimensionless) labels, shape (n, L) or (L,).

    Returns
    -------
    numpy.ndarray
        float64, shape (n, K) with K = :func:`n_terms` (L).
    """
    s = np.atleast_2d(np.asarray(s, np.float64))
    n, L = s.shape
    cols = [np.ones(n)] + [s[:, i] for i in range(L)] + [s[:, i] * s[:, j] for i, j in _pairs(L)]
    return np.stack(cols, axis=1)


def design_jacobian(s):
    """``d X / d s``: (n, K, L) for scaled labels ``s`` (n, L).

    Parameters
    ----------
    s : array_like
        Scaled labels, shape (n, L) or (L,).

    Returns
    -------
    numpy.ndarray
        float64, shape (n, K, L).
    """
    s = np.atleast_2d(np.asarray(s, np.float64))
    n, L = s.shape
    J = np.zeros((n, n_terms(L), L))
    for i in range(L):
        J[:, 1 + i, i] = 1.0
    for k, (i, j) in enumerate(_pairs(L)):
        J[:, 1 + L + k, i] += s[:, j]
        J[:, 1 + L + k, j] += s[:, i]
    return J


def fit_coefficients(X, flux, weight, ridge=1e-10):
    """Per-pixel weighted least squares: ``theta_p = (X^T W_p X)^-1 X^T W_p f_p`` for all pixels.

    ``X`` (n, K); ``flux``, ``weight`` (n, p) (weight 0 = unused).  Returns
    ``theta`` (p, K).  A tiny ridge (relative to the diagonal) keeps pixels with
    nearly degenerate designs solvable; pixels without any weight get NaN.

    Parameters
    ----------
    X : array_like
        Design matrix, shape (n, K).
    flux : array_like
        Normalised flux, shape (n, p); ignored where ``weight`` is 0.
    weight : array_like
        Weights (inverse variances), shape (n, p).
    ridge : float, optional
        Ridge relative to each diagonal element (default 1e-10).

    Returns
    -------
    numpy.ndarray
        float64 coefficients, shape (p, K).
    """
    X = np.asarray(X, np.float64)
    w = np.asarray(weight, np.float64)
    f = np.where(w > 0, np.asarray(flux, np.float64), 0.0)
    K = X.shape[1]
    XX = (X[:, :, None] * X[:, None, :]).reshape(X.shape[0], K * K)
    A = (w.T @ XX).reshape(-1, K, K)  # (p, K, K) without an (n, p, K, K) intermediate
    b = (w * f).T @ X
    diag = np.einsum("pkk->pk", A)
    ok = diag[:, 0] > 0
    A = A + np.eye(X.shape[1])[None] * (ridge * np.maximum(diag, 1e-300))[:, :, None]
    theta = np.full((w.shape[1], X.shape[1]), np.nan)
    if ok.any():
        theta[ok] = np.linalg.solve(A[ok], b[ok][:, :, None])[:, :, 0]
    return theta


def ml_scatter(resid, var, used, n_iter=60, s2_max=1.0):
    """Maximum-likelihood intrinsic variance ``s_p^2`` per pixel given residuals.

    Solves ``sum_n [r^2/(v + s^2)^2 - 1/(v + s^2)] = 0`` over the ``used`` entries
    of each column (``resid``, ``var`` (n, p)) by bisection in ``log10 s^2`` on
    ``[1e-12, s2_max]``; 0 where the residuals are consistent with ``var`` alone.

    Parameters
    ----------
    resid : array_like
        Residuals of the normalised flux, shape (n, p).
    var : array_like
        Their variances, shape (n, p).
    used : array_like of bool
        Entries that enter, shape (n, p).
    n_iter : int, optional
        Bisection steps (default 60).
    s2_max : float, optional
        Upper end of the search interval for ``s^2`` (default 1, normalised-flux units squared).

    Returns
    -------
    numpy.ndarray
        ``s_p^2`` per pixel, shape (p,), >= 0.
    """
    r2 = np.where(used, np.asarray(resid, np.float64) ** 2, 0.0)
    v = np.where(used, np.asarray(var, np.float64), 1.0)

    def dlnl(s2):
        t = 1.0 / (v + s2[None, :])
        return np.sum(np.where(used, r2 * t * t - t, 0.0), axis=0)

    p = r2.shape[1]
    lo = np.full(p, -12.0)
    hi = np.full(p, np.log10(s2_max))
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        up = dlnl(10.0 ** mid) > 0  # likelihood still rising: the root lies above
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    s2 = 10.0 ** (0.5 * (lo + hi))
    return np.where(dlnl(np.full(p, 1e-12)) > 0, s2, 0.0)


class CannonModel(SpectralModel):
    """Quadratic Cannon as a :class:`~musepayne.models.model.SpectralModel` (fit with :class:`~musepayne.fit.fitter.Fitter`).

    ``theta`` (n_pix, K) coefficients on the scaled labels, ``scatter`` (n_pix,)
    intrinsic scatter ``s_p`` (0 when not fitted).  Masked pixels (``pixel_mask``)
    predict 1 (continuum) with zero gradient.

    Parameters
    ----------
    theta : array_like
        Coefficients, shape (n_pix, K); rows with a non-finite value are untrained (masked).
    scatter : array_like or None
        ``s_p`` per pixel (normalised-flux units), shape (n_pix,), or None (none; e.g. set later by ``load_model``).
    label_names : sequence of str
        Label names in order (e.g. teff, logg, fe_h).
    x_min, x_max : array_like
        Label box used for the scaling, physical units (K, dex), shape (n_labels,).
    wave : array_like
        Pixel-centre wavelengths in Angstrom, shape (n_pix,), in ``frame``.
    frame : {'vacuum', 'air'}, optional
        Wavelength frame (default vacuum, the LAMOST grid).
    label_units : sequence of str, optional
        Unit per label.
    meta : dict, optional
        Provenance.

    Attributes
    ----------
    theta : numpy.ndarray
        (n_pix, K) float64; untrained rows are (1, 0, ..., 0).
    arch : str
        ``"cannon"``.

    Raises
    ------
    ValueError
        If ``theta`` is not (n_pix, K) or ``scatter`` has the wrong length, or (ModelError) for
        invalid names, ranges, frame or wavelengths.
    """

    arch = "cannon"

    def __init__(self, theta, scatter, label_names, x_min, x_max, wave, frame="vacuum", label_units=None,
                 meta=None):
        """``scatter``: ``s_p`` per pixel, or None (none; e.g. set later by ``load_model``)."""
        super().__init__(label_names, x_min, x_max, wave, frame, label_units, meta)
        theta = np.array(theta, np.float64)
        if theta.shape != (self.n_pix, n_terms(self.n_labels)):
            raise ValueError(f"theta must be (n_pix={self.n_pix}, {n_terms(self.n_labels)}), got {theta.shape}")
        bad = ~np.all(np.isfinite(theta), axis=1)
        theta[bad] = 0.0
        theta[bad, 0] = 1.0
        self.theta = theta
        if scatter is not None:
            if np.size(scatter) != self.n_pix:
                raise ValueError("scatter must have one entry per pixel")
            self.scatter = self._checked_scatter(scatter)
        self._untrained = bad
        self.pixel_mask = self._checked_mask(bad)

    def _checked_mask(self, mask):
        """Pixels without coefficients always stay masked."""
        return super()._checked_mask(np.asarray(mask, bool).ravel() | self._untrained)

    def _theta(self, dtype):
        dt = np.dtype(dtype)
        t = self._cache.get(dt.str)
        if t is None:
            t = self._cache[dt.str] = np.ascontiguousarray(self.theta.T.astype(dt))  # (K, p)
        return t

    def predict_scaled(self, s, dtype=np.float64):
        """Normalised flux at scaled labels: ``X(s) @ theta.T``.

        Parameters
        ----------
        s : array_like
            Scaled labels ``(l - x_min)/(x_max - x_min) - 0.5``, shape (n, n_labels).
        dtype : numpy dtype, optional
            Precision of the product (default float64).

        Returns
        -------
        numpy.ndarray
            Shape (n, n_pix), dimensionless.
        """
        return design_matrix(s).astype(dtype) @ self._theta(dtype)

    def planar_kernel(self, s, dtype=np.float64):
        """Flux and d flux / d s as one planar array ``(n, 1 + n_labels, n_pix)`` (the fitter's layout).

        Parameters
        ----------
        s : array_like
            Scaled labels, shape (n, n_labels).
        dtype : numpy dtype, optional
            Precision of the product (default float64).

        Returns
        -------
        numpy.ndarray
            Plane 0 the flux, plane ``1 + l`` d flux / d s_l; shape (n, 1 + n_labels, n_pix).
        """
        th = self._theta(dtype)  # (K, p)
        s = np.atleast_2d(np.asarray(s, np.float64))
        A = np.concatenate([design_matrix(s)[:, None, :], design_jacobian(s).transpose(0, 2, 1)], axis=1)
        return np.ascontiguousarray(A.astype(dtype) @ th)  # (n, 1 + L, K) @ (K, p)

    def _arrays(self):
        theta = self.theta.copy()
        theta[self._untrained] = np.nan  # untrained pixels stay untrained after a round trip
        return [("THETA", theta)]  # SCATTER is written by the base class

    @classmethod
    def _from_hdus(cls, h, common):
        # SCATTER is read by load_model for every architecture
        return cls(np.array(h["THETA"].data, np.float64), None, **common)


@dataclass(frozen=True)
class CannonConfig:
    """Training settings of the quadratic Cannon.

    Attributes
    ----------
    fit_scatter : bool
        Alternate least squares with the ML intrinsic scatter ``s_p`` (default True).
    n_scatter_iter : int
        Number of (scatter, coefficients) alternations (default 3; at least 1 is done).
    min_pixel_coverage : float
        Pixels with usable data in fewer than this fraction of the training spectra are masked
        (default 0.5; the networks' rule, :class:`musepayne.train.trainer.TrainConfig`).
    """

    fit_scatter: bool = True
    n_scatter_iter: int = 3
    min_pixel_coverage: float = 0.5


def train_cannon(flux, ivar, labels, label_names, wave, config: CannonConfig | None = None, frame="vacuum",
                 x_min=None, x_max=None, label_units=None) -> CannonModel:
    """Train a quadratic Cannon on ``flux``/``ivar`` (n, n_pix) with ``labels`` (n, L).

    Pixels with ``ivar <= 0`` or non-finite values are ignored.  The inputs are
    not modified.  ``meta`` records the recipe and per-pixel scatter statistics.

    Parameters
    ----------
    flux : array_like
        Normalised training flux, shape (n, n_pix).
    ivar : array_like
        Its inverse variance, shape (n, n_pix).
    labels : array_like
        Training labels, shape (n, L), physical units (K, dex), finite.
    label_names : sequence of str
        Names of the L labels.
    wave : array_like
        Pixel-centre wavelengths in Angstrom, shape (n_pix,), in ``frame``.
    config : CannonConfig, optional
        Training settings (default ``CannonConfig()``).
    frame : {'vacuum', 'air'}, optional
        Wavelength frame of ``wave``.
    x_min, x_max : array_like, optional
        Label box for the scaling (default the training labels' range).
    label_units : sequence of str, optional
        Unit per label.

    Returns
    -------
    CannonModel
        The trained model, ``scatter`` = ``s_p`` per pixel.

    Raises
    ------
    ValueError
        If the shapes disagree, a label is not finite, or a label has no range.
    """
    cfg = config or CannonConfig()
    f = np.asarray(flux, np.float64)
    iv = np.asarray(ivar, np.float64)
    lab = np.atleast_2d(np.asarray(labels, np.float64))
    names = tuple(label_names)
    n, p = f.shape
    if iv.shape != f.shape or lab.shape != (n, len(names)) or np.size(wave) != p:
        raise ValueError("flux, ivar (n, n_pix), labels (n, n_labels) and wave (n_pix,) disagree")
    if not np.all(np.isfinite(lab)):
        raise ValueError("labels must be finite")
    used = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
    lo = lab.min(0) if x_min is None else np.asarray(x_min, np.float64)
    hi = lab.max(0) if x_max is None else np.asarray(x_max, np.float64)
    if np.any(hi <= lo):
        raise ValueError("every label needs a non-zero range in the training set")
    s = (lab - lo) / (hi - lo) - 0.5
    X = design_matrix(s)
    K = X.shape[1]
    coverage = used.mean(0)
    masked = (coverage < cfg.min_pixel_coverage) | (used.sum(0) < K + 2)
    var = np.where(used, 1.0 / np.where(used, iv, 1.0), np.inf)
    s2 = np.zeros(p)
    theta = fit_coefficients(X, f, np.where(used, iv, 0.0))
    if cfg.fit_scatter:
        for _ in range(max(int(cfg.n_scatter_iter), 1)):
            resid = np.where(used, f - X @ np.nan_to_num(theta).T, 0.0)
            s2 = ml_scatter(resid, var, used)
            theta = fit_coefficients(X, f, np.where(used, 1.0 / (var + s2[None, :]), 0.0))
    theta[masked] = np.nan
    meta = {"arch": "cannon", "model": "quadratic Cannon (Ness et al. 2015)", "n_train": int(n),
            "labels": ",".join(names), "n_terms": int(K), "fit_scatter": bool(cfg.fit_scatter),
            "label_ranges": {k: [float(a), float(b)] for k, a, b in zip(names, lo, hi)},
            "median_scatter": float(np.median(np.sqrt(s2[~masked]))) if (~masked).any() else float("nan"),
            "pixel_mask": {"rule": f"IVAR > 0 in fewer than {cfg.min_pixel_coverage:g} of the training spectra "
                                   f"or fewer than {K + 2} spectra", "n_masked": int(masked.sum())}}
    return CannonModel(theta, np.sqrt(s2), names, lo, hi, wave, frame, label_units, meta)

