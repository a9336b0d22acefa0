"""The Payne-style pseudo-continuum (Ting et al. 2017; Xiang et al. 2019).

``cont_i = sum_j w_ij ivar_j f_j / sum_j w_ij ivar_j``,
``w_ij = exp(-(l_i - l_j)^2 / (2 L^2))`` with ``L = 50`` Angstrom.

Masked pixels enter with ``ivar = 0``.  The normalised flux is ``f / cont`` and
its inverse variance ``ivar * cont^2``.  **One** implementation,
:class:`ContinuumNormalizer`, serves training spectra, observed spectra and
model gradient spectra, so that the three are normalised identically.

Speed: the numerator ``N = W (ivar f)`` and denominator ``D = W ivar`` are
Gaussian-smoothed with L = 50 A and therefore smooth on scales much larger than
a pixel.  By default we evaluate them exactly at nodes every ``L / 5`` = 10 A
and interpolate with a cubic spline; the relative error of the continuum is
< 1e-5 (tested against the exact dense sum, ``exact=True``).  Both products are
dense matrix products over a whole batch, i.e. BLAS-bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ContinuumNormalizer", "normalize", "DEFAULT_WIDTH"]

#: Width (sigma, Angstrom) of the Gaussian pseudo-continuum kernel.
DEFAULT_WIDTH = 50.0

#: Minimum relative support of the continuum (see ``ContinuumNormalizer``).
MIN_SUPPORT = 0.05


@dataclass(frozen=True, eq=False)
class ContinuumNormalizer:
    """Pseudo-continuum on a fixed wavelength grid, applied to batches.

    Calling the instance, ``nz(flux, ivar)``, normalises a batch and returns
    ``(flux_norm, ivar_norm, cont, defined)``.

    Parameters
    ----------
    wave : array_like
        The grid, shape (n_pix,), Angstrom (any frame), at least two pixels.
    width : float, optional
        Gaussian sigma of the kernel in Angstrom (50 A, as T17/X19).
    exact : bool, optional
        Use the dense ``n_pix x n_pix`` weight matrix instead of nodes (default False).
    node_spacing : float, optional
        Node spacing in Angstrom for the fast path (default ``width / 5``).
    support : array_like of bool, optional
        Boolean array over ``wave``; only these pixels enter the continuum and only there is
        it evaluated (NaN elsewhere).  Restricting the work to the pixels that matter is the
        main speed lever.  Default: every pixel.
    dtype : type, optional
        Float type of the matrix products (float32 by default: the sums carry relative
        errors ~1e-7, far below the noise of any spectrum).

    Raises
    ------
    ValueError
        If ``wave`` is not 1-D with at least two values, ``width`` is not positive, or ``support``
        does not match ``wave`` or selects no pixel.
    """

    wave: np.ndarray
    width: float = DEFAULT_WIDTH
    exact: bool = False
    node_spacing: float | None = None
    support: np.ndarray | None = None
    dtype: type = np.float32
    _left: np.ndarray = field(init=False, repr=False)
    _right: np.ndarray | None = field(init=False, repr=False)
    _norm: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        w = np.asarray(self.wave, dtype=np.float64)
        if w.ndim != 1 or w.size < 2:
            raise ValueError("ContinuumNormalizer needs a 1-D wavelength grid")
        if not self.width > 0:
            raise ValueError("continuum width must be positive")
        object.__setattr__(self, "wave", w)
        sup = np.ones(w.size, bool) if self.support is None else np.asarray(self.support, bool)
        if sup.shape != w.shape or not sup.any():
            raise ValueError("support must be a boolean array over wave with at least one True")
        object.__setattr__(self, "support", sup)
        ws = w[sup]
        dt = self.dtype
        if self.exact:
            W = np.exp(-0.5 * ((ws[:, None] - ws[None, :]) / self.width) ** 2)
            object.__setattr__(self, "_left", W.T.astype(dt))  # (n_sup, n_sup): x @ W.T
            object.__setattr__(self, "_right", None)
        else:
            h = self.node_spacing or self.width / 5.0
            n_nodes = int(np.ceil((ws[-1] - ws[0]) / h)) + 1
            nodes = np.linspace(ws[0], ws[-1], max(n_nodes, 4))
            Wn = np.exp(-0.5 * ((nodes[:, None] - ws[None, :]) / self.width) ** 2)  # (n_nodes, n_sup)
            # cubic-spline evaluation matrix nodes -> pixels (linear in node values)
            from scipy.interpolate import CubicSpline  # noqa: PLC0415 - 0.2 s of every `fit` start otherwise

            S = CubicSpline(nodes, np.eye(nodes.size), axis=0, bc_type="not-a-knot")(ws)  # (n_sup, n_nodes)
            object.__setattr__(self, "_left", np.ascontiguousarray(Wn.T, dtype=dt))  # (n_sup, n_nodes)
            object.__setattr__(self, "_right", np.ascontiguousarray(S.T, dtype=dt))  # (n_nodes, n_sup)
        # support of an all-ones ivar, to judge where the continuum is defined
        object.__setattr__(self, "_norm", self._smooth(np.ones((1, ws.size)))[0].astype(np.float64))

    def _smooth(self, x):
        """Gaussian-weighted sums over the support pixels; ``x`` is (n, n_support)."""
        with np.errstate(over="ignore", invalid="ignore"):  # absurd inputs end up NaN -> NO_CONTINUUM
            y = np.asarray(x, dtype=self.dtype) @ self._left
            if self._right is not None:
                y = y @ self._right
        return y.astype(np.float64)

    def continuum(self, flux, ivar):
        """Pseudo-continuum of a batch.

        Returns ``(cont, defined)``: ``defined`` is False where the weighted
        support ``D_i / (max(ivar) * sum_j w_ij)`` is below 5 %, i.e. where
        no valid pixel lies within ~2.5 kernel widths.  ``cont`` is NaN there.

        Parameters
        ----------
        flux : array_like
            Flux, shape (n_spec, n_pix) or (n_pix,), any unit.
        ivar : array_like
            Inverse variance of ``flux``, same shape; non-finite or <= 0 keeps a pixel out.

        Returns
        -------
        cont : numpy.ndarray
            float64 (n_spec, n_pix), in the unit of ``flux``; NaN where not defined or outside ``support``.
        defined : numpy.ndarray
            bool (n_spec, n_pix).

        Raises
        ------
        ValueError
            If ``flux`` and ``ivar`` do not both have shape (n_spec, n_pix).
        """
        f = np.atleast_2d(np.asarray(flux, dtype=np.float64))
        iv = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
        if f.shape != iv.shape or f.shape[-1] != self.wave.size:
            raise ValueError(
                f"flux {f.shape} and ivar {iv.shape} must both be (n_spec, {self.wave.size})"
            )
        sup = self.support
        fs, ivs = f[:, sup], iv[:, sup]
        good = np.isfinite(fs) & np.isfinite(ivs) & (ivs > 0)
        ivs = np.where(good, ivs, 0.0)
        # scale both products so float32 sums cannot overflow or underflow
        fscale = np.array([np.median(np.abs(r[g])) if g.any() else 1.0 for r, g in zip(fs, good)])
        fscale = np.where(fscale > 0, fscale, 1.0)[:, None]
        iscale = np.array([np.percentile(r[r > 0], 90) if np.any(r > 0) else 1.0 for r in ivs])[:, None]
        ivn = ivs / iscale
        fi = np.where(good, fs / fscale * ivn, 0.0)
        n = f.shape[0]
        nd = self._smooth(np.vstack([fi, ivn]))
        num, den = nd[:n], nd[n:]
        # relative support: 1 where every pixel within reach has the typical (90th pct) ivar
        support = den / np.maximum(self._norm[None, :], 1e-300)
        defined_s = (support > MIN_SUPPORT) & (den > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cont_s = np.where(defined_s, num / np.where(den > 0, den, 1.0) * fscale, np.nan)
        defined_s &= np.isfinite(cont_s) & (cont_s > 0)
        cont = np.full(f.shape, np.nan)
        defined = np.zeros(f.shape, bool)
        cont[:, sup] = np.where(defined_s, cont_s, np.nan)
        defined[:, sup] = defined_s
        return cont, defined

    def __call__(self, flux, ivar):
        """Normalise a batch: returns ``(flux_norm, ivar_norm, cont, defined)``."""
        f = np.atleast_2d(np.asarray(flux, dtype=np.float64))
        iv = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
        cont, defined = self.continuum(f, iv)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            fn = np.where(defined, f / cont, np.nan)
            ivn = np.where(defined & np.isfinite(iv), iv * cont**2, 0.0)
        return fn, ivn, cont, defined


def normalize(wave, flux, ivar, width: float = DEFAULT_WIDTH, exact: bool = False):
    """Convenience wrapper: normalise one or many spectra on ``wave``.

    Returns ``(flux_norm, ivar_norm, cont)`` with the batch shape of the input.

    Parameters
    ----------
    wave : array_like
        Wavelengths in Angstrom, shape (n_pix,).
    flux : array_like
        Flux, shape (n_pix,) or (n_spec, n_pix).
    ivar : array_like
        Inverse variance of ``flux``, same shape.
    width : float, optional
        Kernel sigma in Angstrom (default 50).
    exact : bool, optional
        Dense weights instead of nodes (default False).

    Returns
    -------
    flux_norm : numpy.ndarray
        ``flux / cont`` (dimensionless), NaN where the continuum is not defined.
    ivar_norm : numpy.ndarray
        ``ivar * cont**2``, 0 where the continuum is not defined.
    cont : numpy.ndarray
        Pseudo-continuum in the unit of ``flux``.

    Raises
    ------
    ValueError
        As :class:`ContinuumNormalizer` and :meth:`ContinuumNormalizer.continuum`.
    """
    f = np.asarray(flux, dtype=np.float64)
    nz = ContinuumNormalizer(np.asarray(wave), width=width, exact=exact)
    fn, ivn, cont, _ = nz(f, ivar)
    if f.ndim == 1:
        return fn[0], ivn[0], cont[0]
    return fn, ivn, cont
