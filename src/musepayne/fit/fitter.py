"""Fit prepared spectra with a spectral emulator: labels, radial velocity, errors.

Paper §3.2: each continuum-normalised spectrum ``O`` (errors ``e``) is fitted
with a model spectrum ``P(labels, v)`` by minimising
``chi2 = sum_i (P_i - O_i)^2 / e_i^2`` over the unmasked pixels; Eq. 3 reports
``red_chi2 = chi2 / n_pix_used``.

The forward model
-----------------
``P(labels, v) = K_exc . S(v) . M(labels)``

* ``M`` -- the emulator (:mod:`musepayne.models.model`), a normalised rest-frame
  spectrum on the model's pixel grid, with its analytic Jacobian.
* ``S(v)`` -- the exact relativistic Doppler shift: a pixel observed at
  ``lambda_obs`` sees the rest wavelength ``lambda_obs / D``,
  ``D = sqrt((1 + v/c) / (1 - v/c))``.  The model is known only at its pixel
  centres, so ``S`` *interpolates* it at ``lambda_obs / D`` with a cubic
  Catmull-Rom (Keys a = -1/2) kernel in ``ln lambda``: four taps,
  C1-continuous, exact for quadratics, linear in the model flux (so the same
  weights shift the Jacobian) and differentiable in ``v`` (the weights'
  derivatives give d P / d v analytically).  Interpolating a *smooth model*
  sampled at >= 2 pixels per resolution element is accurate to well below
  the noise; linear interpolation would broaden lines by a shift-dependent
  amount and pull RVs to whole pixels.  Pixels whose rest wavelength falls
  outside the model grid (minus one pixel at each end) are not used.
* ``K_exc`` -- optional forward modelling of ``LSF_EXCESS``: where the data are
  broader than the model's LSF (MUSE below ~5400 A for LAMOST-grid models),
  the model is convolved by a Gaussian of that extra FWHM (a fixed sparse
  matrix per distinct excess profile, :func:`musepayne.prepare.resample.convolution_matrix`).
  Without it the model's lines are narrower than the data's there.  Measured
  (``benchmarks/lsf_offset_study.py``, 175 MILES stars simulated as MUSE and as
  LAMOST at S/N 1000): both the default model and a quadratic Cannon reach their
  lowest chi2 with the recorded excess (not with 0.5x or 1.5x it), and it moves
  Teff by only +6 K (ours) / -3 K (Cannon).  The MUSE - LAMOST Teff offset of
  +14 to +27 K reported for such comparisons is not a resolution effect: it comes
  from the IVAR-weighted pseudo-continuum, since MUSE pixels rebinned onto the LAMOST
  grid leave a beat pattern in IVAR (see the README).
  Switch: ``FitConfig.lsf_excess``.

The optimiser
-------------
Vectorised over spectra (no Python loop per spectrum on the hot path):

1. *Coarse RV*: chi2 of the data against a few templates (model at the centre of
   the label box, and Teff-like first label at +-0.3) shifted over a velocity grid
   (``+-rv_range``, step two model pixels by default), as matrix products; a parabola
   through the minimum refines it.
2. *Starting labels*: chi2 of the (velocity-corrected) data against a
   quasi-random (Sobol) grid of model spectra covering the label box; the
   ``n_starts`` best grid points start the fit.  The RV is then refined with
   each spectrum's best grid template (+-4 single pixels, exact shift).
3. *Bounded Levenberg-Marquardt* on (scaled labels, v) with per-spectrum
   damping (Marquardt diagonal scaling, Nielsen 1999 update), Gauss-Newton normal
   matrix ``J^T W J`` from the analytic Jacobian, and an active-set projection that
   keeps labels inside the training box ``[x_min, x_max]`` and ``|v| <= rv_range``
   (parameters at a bound whose gradient points outward are frozen for the step).
   All ``n_starts`` starts run ``explore_iter`` iterations; each spectrum then keeps
   its lowest-chi2 start and continues until the undamped Gauss-Newton step promises
   less than ``chi2_tol`` (or, at the kinks of leaky-ReLU networks, an accepted step
   gains -- or a rejected one promised -- less than ``stall_tol``).

Where the time goes, and how it is kept small (all vectorised over the rows of a chunk):

* the model and its Jacobian are one *planar* array ``(rows, 1 + n_labels, n_pix)``
  (:meth:`SpectralModel.planar_kernel`), so every plane is a contiguous spectrum;
* on log-linear grids the shift is one whole-pixel offset per row plus a 4-tap filter:
  rows are aligned by one block gather and filtered with one weight per row and tap;
  grids split into segments on one common lattice (APOGEE chips) are shifted in one go;
* the residual replaces the flux plane and one batched product of the sqrt(W)-weighted
  planes with themselves gives chi2, ``J^T W r`` and ``J^T W J`` together;
* the grid points' flux and Jacobian are precomputed, so the starts cost no network call;
* lazy Jacobians: the explored steps of all starts, and any trial that follows a
  rejected one, are first evaluated without the Jacobian (flux only); the Jacobian is
  computed only for the kept start and for accepted points;
* a rejected sub-sigma step (a kink) raises the damping to ~1 at once.

Per row only ``J^T W J`` and ``J^T W r`` are kept (the Jacobian itself is never stored).

Errors
------
Covariance ``C = (J^T W J)^{-1}`` at the solution (labels and RV jointly, so
label errors include their correlation with v).  When the fit is worse than the
stated errors allow, ``chi2 / (n - n_par) > 1``, errors are multiplied by
``sqrt(chi2 / (n - n_par))``: MUSE pipeline flux errors are underestimated by a
factor 2-5 (paper Fig. 3), and the covariance with the stated errors would then
understate the label errors by the same factor.  With correct errors the factor
is ~1 and the errors are the Cramér-Rao bound of the model.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..flags import DEFAULT_MAX_RED_CHI2, EXCLUDING_BITS, SPECTRUM_STATUS
from ..instrument.lsf import FWHM_TO_SIGMA
from ..instrument.wavelength import C_KMS, air_to_vacuum
from ..models.model import SpectralModel, coverage_note
from ..prepare.resample import convolution_matrix
from .catalogue import build_catalogue

__all__ = ["FitConfig", "Fitter", "FitArrays", "doppler_factor", "shift_weights", "grid_segments", "scrambled_sobol"]


@dataclass(frozen=True)
class FitConfig:
    """Configuration of :class:`Fitter` (frozen).

    rv_range: half-width (km/s) of the coarse RV search and bound of the fitted RV.
    rv_step: coarse RV grid step (km/s); ``None``: two model pixels (the second pass then
        searches +-4 single pixels around the coarse minimum).
    fit_rv: fit the RV (else fixed at ``rv_fixed``).
    n_grid: size of the quasi-random label grid used to choose starting points.
    n_starts: number of starting points per spectrum (best grid points).
    explore_iter: LM iterations run from every start before keeping the best.
    max_iter: maximum LM iterations in total.
    chi2_tol: converged when the undamped Gauss-Newton step promises a chi2 gain below this.
    stall_tol: also stop when an accepted step gained less than this, or a rejected step
        promised less (kinks of leaky-ReLU models).  A chi2 within 0.03 of the minimum is a
        parameter offset below ~0.17 sigma in the worst direction; measured on 1000 mock
        spectra per model, 0.01 -> 0.03 changed the rms of (fit - truth)/sigma by <= 0.001.
    lsf_excess: forward-model the prepared ``LSF_EXCESS`` (Gaussian convolution of the model).
    model_scatter: how the model's intrinsic per-pixel scatter ``s_p`` (``model.scatter``, in
        the model file; ignored when the model has none) enters.  'errors' (default): the labels
        minimise the paper's chi2 with the observed errors (Eq. 3, as without a scatter); their
        covariance is that of this estimator when the pixel variance is ``1/ivar + s_p^2``
        (sandwich ``A^-1 B A^-1``), and ``red_chi2_model`` uses that variance.  'weights': the
        labels minimise chi2 with the variance ``1/ivar + s_p^2`` (the Cannon's test step;
        pixels the model predicts poorly weigh less); covariance ``(J^T W J)^-1`` with those
        weights.  'off': no scatter.  Measured on the 5-fold CV (two sets of fold models, each
        fitted both ways), 'weights' instead of 'errors' changes the MUSE - literature
        dispersion by +1.8 / +4.6 K, +0.004 / -0.006 dex (log g) and -0.005 / -0.003 dex
        ([Fe/H]), and the Teff bias by +12 / +13 K: no consistent gain, so the default keeps
        the paper's estimator.
    precision: 'float32' (fast; network, shift and normal matrix) or 'float64'.
    chunk_size: spectra fitted together (memory ~ chunk * n_starts * n_pix * (n_labels+1) * 4 B * 6).
    block_size: spectra read from the prepared arrays at a time and returned together by
        :meth:`Fitter.fit_blocks` (rounded up to whole chunks); memory ~ block * n_pix * 12 B.
        Results do not depend on it.
    n_threads: chunks fitted in parallel threads (numpy releases the GIL in its kernels).
        Results are identical for any value when BLAS is held to one thread around the fit
        (the caller's job: see :class:`Fitter`; ``musepayne fit`` does it).
        Measured on the quiet 2-core development machine (``benchmarks/bench_fit.py``, 1000
        spectra): 2 threads give 1.50x (APOGEE per-pixel network) and 1.67x (LAMOST-grid MLP)
        the 1-thread rate.  Default 1 (pipelines and Dask workers parallelise at a higher
        level); ``musepayne fit`` uses all cores.
    min_pixels: fewer usable pixels -> failed row.
    scale_errors: multiply errors by sqrt(chi2/(n-n_par)) when it exceeds 1 (chi2 with the
        model's scatter in the variance when it has one and ``model_scatter`` is not 'off').
    keep_model: add the best-fit model spectrum to the output (column ``model_flux``).
    max_red_chi2: rows with a larger ``red_chi2_model`` (``red_chi2`` when the model has no
        scatter) get the ``HIGH_CHI2`` bit of ``fit_flags``.
        With the model scatter in the variances, the default model's validation-like stars
        have red_chi2 ~0.5-1 (CV test spectra: median 0.6; 176 real LAMOST DR1 spectra:
        median 0.85, 95th percentile 2.5); above 3 the spectrum is not like the training set.
    gradcorr_threshold: X_flag = 1 when X_gradcorr exceeds this (paper: 0.5).
    model_name: value of the catalogue's ``model`` column (default: model meta 'name' or file name).
    seed: seed of the scrambled Sobol start grid (results are deterministic).
    benchmark_calibration: apply the model's benchmark-scale calibration when it has one
        (``BENCHCAL`` in the model file, :mod:`musepayne.models.benchcal`): labels on the Gaia FGK
        benchmark scale, the model's values in ``X_uncal``, ``X_err`` = sqrt(``X_err_stat``^2 +
        ``X_err_sys``^2).  False: the model's labels and statistical errors only.
    """

    rv_range: float = 600.0
    rv_step: float | None = None
    fit_rv: bool = True
    rv_fixed: float = 0.0
    n_grid: int = 256
    n_starts: int = 2
    explore_iter: int = 1
    max_iter: int = 40
    chi2_tol: float = 1e-3
    stall_tol: float = 0.03
    lambda_init: float = 1e-3
    lsf_excess: bool = True
    model_scatter: str = "errors"
    precision: str = "float32"
    chunk_size: int = 32
    block_size: int = 2048
    n_threads: int = 1
    min_pixels: int = 50
    scale_errors: bool = True
    keep_model: bool = False
    max_red_chi2: float = DEFAULT_MAX_RED_CHI2
    gradcorr_threshold: float = 0.5
    model_name: str | None = None
    seed: int = 0
    benchmark_calibration: bool = True

    def __post_init__(self):
        if not 0 < self.rv_range < C_KMS:
            raise ValueError("rv_range must be positive and below the speed of light")
        if self.precision not in ("float32", "float64"):
            raise ValueError("precision must be 'float32' or 'float64'")
        if (self.n_starts < 1 or self.n_grid < 1 or self.max_iter < 1 or self.chunk_size < 1
                or self.block_size < 1 or self.n_threads < 1):
            raise ValueError("n_starts, n_grid, max_iter, chunk_size, block_size and n_threads must be >= 1")
        if self.model_scatter not in SCATTER_MODES:
            raise ValueError(f"model_scatter must be one of {SCATTER_MODES}, got {self.model_scatter!r}")


#: ways the model's intrinsic scatter enters a fit (:attr:`FitConfig.model_scatter`)
SCATTER_MODES = ("errors", "weights", "off")


# ---------------------------------------------------------------- pure helpers
def _parabola_offset(chi, k):
    """Vertex of the parabola through ``chi[i, k-1:k+2]`` for each row, in grid steps from ``k``.

    Rows whose minimum ``k`` sits on the grid edge, or whose three points are not
    convex, get 0; offsets are clipped to one step.
    """
    off = np.zeros(chi.shape[0])
    ii = np.flatnonzero((k > 0) & (k < chi.shape[1] - 1))
    if ii.size:
        cm, c0, cp = chi[ii, k[ii] - 1], chi[ii, k[ii]], chi[ii, k[ii] + 1]
        den = cm - 2 * c0 + cp
        off[ii] = np.clip(np.where(den > 0, 0.5 * (cm - cp) / np.where(den > 0, den, 1), 0.0), -1, 1)
    return off


def doppler_factor(v_kms):
    """Relativistic Doppler factor ``D = lambda_obs / lambda_rest = sqrt((1+b)/(1-b))``, ``b = v/c``."""
    b = np.asarray(v_kms, np.float64) / C_KMS
    return np.sqrt((1.0 + b) / (1.0 - b))


def _catmull_rom(t):
    """Cubic convolution weights (4 taps at j-1, j, j+1, j+2) and their t-derivatives."""
    t2 = t * t
    t3 = t2 * t
    c = np.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], -1)
    dc = np.stack([(-3 * t2 + 4 * t - 1) / 2, (9 * t2 - 10 * t) / 2, (-9 * t2 + 8 * t + 1) / 2, (3 * t2 - 2 * t) / 2], -1)
    return c, dc


def grid_segments(lnw):
    """Segment number of each pixel: a new segment starts after a gap (a step in ln lambda
    more than 1.5 times its neighbour's, e.g. between detector chips)."""
    d = np.diff(lnw)
    brk = np.zeros(d.size, bool)
    brk[1:] |= d[1:] > 1.5 * d[:-1]
    brk[:-1] |= d[:-1] > 1.5 * d[1:]
    if d.size == 1:
        brk[:] = False
    return np.r_[0, np.cumsum(brk)]


def shift_weights(lnw_model, lnw_data, v_kms, segments=None):
    """Interpolation taps for evaluating a rest-frame model at ``lambda_data / D(v)``.

    Returns ``(j0, c, dc_dv, valid)``: first tap index ``(m, n_data)`` (taps
    ``j0 .. j0+3``), weights ``c (m, n_data, 4)``, their derivatives with respect to
    ``v`` (km/s) and the pixels whose rest wavelength lies inside the model grid
    (one pixel margin each side) with all four taps in one grid segment
    (``segments``: :func:`grid_segments`; no interpolation across chip gaps).
    """
    v = np.atleast_1d(np.asarray(v_kms, np.float64))
    b = v / C_KMS
    lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
    x = lnw_data[None, :] - lnD[:, None]
    p = lnw_model.size
    u = np.interp(x, lnw_model, np.arange(p, dtype=np.float64))
    valid = (x >= lnw_model[1]) & (x <= lnw_model[-2])
    j = np.clip(np.floor(u).astype(np.int64), 1, p - 3)
    if segments is not None:
        valid &= segments[j - 1] == segments[j + 2]
    t = u - j
    c, dc = _catmull_rom(t)
    dudx = 1.0 / (lnw_model[j + 1] - lnw_model[j])
    # d lnD / dv = 1 / (c (1 - b^2)) ; x = ln(lambda) - lnD  => du/dv = -du/dx * dlnD/dv
    dudv = -dudx / (C_KMS * (1.0 - b * b))[:, None]
    return j - 1, c, dc * dudv[:, :, None], valid


@dataclass
class FitArrays:
    """Raw per-spectrum results of :meth:`Fitter.fit_arrays` (physical units)."""

    labels: np.ndarray  # (n, L)
    labels_err: np.ndarray  # (n, L)
    rv: np.ndarray
    rv_err: np.ndarray
    chi2: np.ndarray
    red_chi2: np.ndarray
    red_chi2_model: np.ndarray  # with the model's scatter in the variance (NaN: none)
    corr_flux: np.ndarray
    n_pix_used: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray  # object array of str
    reason: np.ndarray
    edge_labels: np.ndarray
    error_scale: np.ndarray
    model_flux: np.ndarray | None = None
    cov: np.ndarray | None = None  # (n, P, P) physical units (labels..., rv)

    @staticmethod
    def concatenate(parts) -> FitArrays:
        """Rows of several results in order (e.g. the blocks of :meth:`Fitter.fit_blocks`)."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        vals = {}
        for name in FitArrays.__dataclass_fields__:
            xs = [getattr(p, name) for p in parts]
            vals[name] = None if any(x is None for x in xs) else np.concatenate(xs)
        return FitArrays(**vals)


def scrambled_sobol(d: int, n: int, seed: int, bits: int = 30) -> np.ndarray:
    """``scipy.stats.qmc.Sobol(d, scramble=True, seed=seed).random(n)``, bit for bit, without
    importing ``scipy.stats`` (half a second of a small fit's start-up).

    The same algorithm: Joe & Kuo direction numbers (scipy's own table file), linear matrix
    scramble and digital shift drawn from ``numpy.random.default_rng(seed)`` in scipy's order,
    Gray-code order of points.  Falls back to scipy when its table file is not found; the
    tests compare both."""
    spec = importlib.util.find_spec("scipy")
    table = (os.path.join(os.path.dirname(spec.origin), "stats", "_sobol_direction_numbers.npz")
             if spec is not None and spec.origin else "")
    if not (d >= 1 and os.path.isfile(table)):
        from scipy.stats import qmc  # noqa: PLC0415 - fallback only; scipy.stats costs 0.5 s of a fit's start-up

        return qmc.Sobol(d=d, scramble=True, seed=seed).random(n)
    with np.load(table) as dns:
        poly = [int(p) for p in dns["poly"][:d]]
        vinit = dns["vinit"][:d].astype(np.uint64)
    # direction numbers (Bratley & Fox 1988), then scaled to ``bits`` bits
    v = np.zeros((d, bits), np.uint64)
    v[0, :] = 1
    for k in range(1, d):
        p = poly[k]
        m = p.bit_length() - 1
        row = [int(x) for x in vinit[k, :m]] + [0] * (bits - m)
        for j in range(m, bits):
            new, pow2 = row[j - m], 1
            for q in range(m):
                pow2 <<= 1
                if (p >> (m - 1 - q)) & 1:
                    new ^= pow2 * row[j - q - 1]
            row[j] = new
        v[k] = row
    v = v * (np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64))[None, :]
    # scramble: digital shift, then lower-triangular (unit diagonal) linear matrix scramble
    rng = np.random.default_rng(seed)
    shift = (rng.integers(2, size=(d, bits), dtype=np.uint32).astype(np.uint64)
             @ (np.uint64(1) << np.arange(bits, dtype=np.uint64)))
    ltm = np.tril(rng.integers(2, size=(d, bits, bits), dtype=np.uint32))
    ltm[:, np.arange(bits), np.arange(bits)] = 1
    sv = np.zeros_like(v)
    for k in range(d):
        rows = [sum(int(ltm[k, p, bits - 1 - i]) << i for i in range(bits)) for p in range(bits)]
        for j in range(bits):
            vdj, t2 = int(v[k, j]), 0
            for p in range(bits):  # row p of the scramble gives bit bits-1-p
                t2 = 2 * t2 + (bin(rows[p] & vdj).count("1") & 1)
            sv[k, j] = t2
    # points in Gray-code order: x_0 = shift, x_{i+1} = x_i XOR sv[:, lowest zero bit of i]
    out = np.empty((n, d))
    quasi = shift.copy()
    if n:
        out[0] = quasi * (1.0 / 2 ** bits)
    for i in range(n - 1):
        low = ((~i) & (i + 1)).bit_length() - 1
        quasi = quasi ^ sv[:, low]
        out[i + 1] = quasi * (1.0 / 2 ** bits)
    return out


def _block_bounds(fit_ok, B):
    """Block j: rows ``a_j .. b_j - 1`` holding the fitted rows ``todo[j*B:(j+1)*B]`` (B: a
    multiple of the chunk size, so chunks are those of one pass over all rows)."""
    todo = np.flatnonzero(fit_ok)
    starts = [0] + [int(todo[k]) for k in range(B, todo.size, B)]
    return list(zip(starts, starts[1:] + [int(np.size(fit_ok))]))


class _BandedOp:
    """A sparse LSF-excess operator applied to the last axis of planes, in place.

    Only rows of the matrix that are not the identity are computed (the excess is zero over
    most of the grid), each as the sum of its taps in the matrix's own (CSR) order: the same
    float operations, in the same order, as the sparse product ``K @ x``, so the results are
    bit-identical to it while touching a fraction of the pixels."""

    def __init__(self, K, dtype):
        K = K.tocsr().astype(dtype)
        nnz = np.diff(K.indptr)
        r = np.arange(K.shape[0])
        ident = nnz == 1
        if K.nnz:
            first = np.where(ident, K.indptr[:-1], 0)
            ident &= (K.indices[first] == r) & (K.data[first] == 1)
        self.rows = np.flatnonzero(~ident)
        t = max(int(nnz[self.rows].max()) if self.rows.size else 0, 1)
        cols = np.empty((t, self.rows.size), np.int64)
        vals = np.zeros((t, self.rows.size), dtype)
        for j, i in enumerate(self.rows):
            a, b = K.indptr[i], K.indptr[i + 1]
            c = K.indices[a:b]
            cols[:b - a, j] = c
            cols[b - a:, j] = c[-1] if c.size else i  # padding: weight 0 on a tap already used
            vals[:b - a, j] = K.data[a:b]
        self.c0 = int(cols.min()) if cols.size else 0
        self.c1 = int(cols.max()) + 1 if cols.size else 0
        self.cols, self.vals = cols - self.c0, vals
        self.empty = nnz[self.rows] == 0  # all-zero rows of K: output 0

    def apply(self, Y, sel):
        """``Y[sel, :, :] = (K @ Y[sel, q].T).T`` for every plane ``q``."""
        if self.rows.size == 0:
            return
        X = Y if sel.size == Y.shape[0] else Y[sel]  # sel: sorted distinct rows
        X = X[:, :, self.c0:self.c1]  # the columns the taps use
        acc = X[:, :, self.cols[0]] * self.vals[0]
        for k in range(1, self.cols.shape[0]):
            acc += X[:, :, self.cols[k]] * self.vals[k]
        if np.any(self.empty):
            acc[:, :, self.empty] = 0
        if sel.size == Y.shape[0]:
            Y[:, :, self.rows] = acc
        else:
            Y[np.ix_(sel, np.arange(Y.shape[1]), self.rows)] = acc


class _RowOps:
    """LSF-excess operators of the rows of one fit call: ``index[i]`` into ``ops`` (-1: none).
    Indexing selects rows and keeps the operator list."""

    __slots__ = ("index", "ops")

    def __init__(self, index, ops):
        self.index = np.asarray(index)
        self.ops = ops

    def __getitem__(self, rows):
        return _RowOps(self.index[rows], self.ops)


class _RowOpsBuilder:
    """One operator per distinct (rounded to 1e-4 A) non-zero ``LSF_EXCESS`` profile, found
    block by block by the profile's bytes (consecutive equal rows looked up once), without
    sorting the rows; local to one fit call."""

    def __init__(self, fitter, wave):
        self.fitter, self.wave = fitter, wave
        self.ops, self._key = [], {}

    def rows(self, lsf_excess, a, b, idx) -> _RowOps:
        index = np.full(b - a, -1)
        if idx.size == 0:
            return _RowOps(index, self.ops)
        exc = np.asarray(lsf_excess[a + idx], np.float64)
        exc = np.clip(np.nan_to_num(exc, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
        nz = np.flatnonzero(exc.max(1) > 0)
        if nz.size == 0:
            return _RowOps(index, self.ops)
        prof = np.round(exc[nz], 4) + 0.0  # + 0.0: -0.0 -> 0.0, one key per profile
        new = np.r_[True, np.any(prof[1:] != prof[:-1], axis=1)]
        run = np.cumsum(new) - 1
        op_of_run = []
        for k in np.flatnonzero(new):
            key = prof[k].tobytes()
            o = self._key.get(key)
            if o is None:
                o = len(self.ops)
                self.ops.append(_BandedOp(convolution_matrix(self.wave, prof[k] * FWHM_TO_SIGMA)[0],
                                          self.fitter.dtype))
                self._key[key] = o
            op_of_run.append(o)
        index[idx[nz]] = np.asarray(op_of_run)[run]
        return _RowOps(index, self.ops)


class Fitter:
    """Fit :class:`~musepayne.io.prepared.PreparedSpectra` with one :class:`SpectralModel`.

    ``Fitter(model, FitConfig(...))(prepared, templates=None) -> astropy Table``
    (the catalogue of :mod:`musepayne.fit.catalogue`).  ``templates`` (optional, here or at
    construction; default the model's own ``model.templates``) is any object with
    ``.gradcorr(model, labels) -> (n, n_labels)``; it fills the ``X_gradcorr`` and ``X_flag``
    columns (paper Eq. 4); without templates they stay NaN / -1.

    Threads: a Fitter holds no state of a call (everything a fit needs beyond the model and
    the configuration is local to the call), so one Fitter may be shared by several threads.
    The library does not change thread-pool limits: hold BLAS to one thread around a fit
    (``with musepayne.threads.blas_threads(1): ...``), as ``musepayne fit``, the pipeline,
    training and cross-validation do -- the products are per chunk (small), more BLAS threads
    only oversubscribe the cores, and floating-point sums may then depend on the machine's
    thread count.  Results then do not depend on ``n_threads`` or ``block_size``.
    """

    def __init__(self, model: SpectralModel, config: FitConfig | None = None, templates=None):
        self.model = model
        self.config = config or FitConfig()
        #: gradient templates for the per-label flags (paper Eq. 4): the given ones, else the
        #: model's own (``model.templates``, shipped beside the default model), else None (flags -1)
        self.templates = templates if templates is not None else getattr(model, "templates", None)
        cfg = self.config
        self.dtype = np.dtype(cfg.precision)
        # whether this fit uses the model's intrinsic scatter (model.scatter, model.inflate_ivar)
        self._use_scatter = cfg.model_scatter != "off" and bool(np.any(getattr(model, "scatter", 0.0)))
        self._chi2_noise = 1e-7 if self.dtype == np.float32 else 1e-13
        L = model.n_labels
        self.n_par = L + (1 if cfg.fit_rv else 0)
        wave = model.wave if model.frame == "vacuum" else air_to_vacuum(model.wave)
        self.wave_vac = np.asarray(wave, np.float64)
        self.lnw = np.log(self.wave_vac)
        self.segments = grid_segments(self.lnw)
        self._uniform = self._uniform_segments()
        # start grid: centre + scrambled Sobol points in the inner 90 % of the box
        n_grid = max(int(cfg.n_grid), cfg.n_starts)
        pts = scrambled_sobol(L, n_grid, cfg.seed)
        self.grid_s = np.vstack([np.zeros((1, L)), 0.9 * (pts - 0.5)])
        # flux and Jacobian planes at every grid point (the fits start there; ~n_grid * 6 * n_pix * 4 B)
        self.grid_planes = model.planar_kernel(self.grid_s, dtype=self.dtype)
        self.grid_flux = self.grid_planes[:, 0]
        tpl = np.zeros((3 if L >= 1 else 1, L))
        if L >= 1:
            tpl[1, 0], tpl[2, 0] = -0.3, 0.3
        self.ccf_flux = model.predict_scaled(tpl, dtype=self.dtype)
        self._dv_pix = C_KMS * float(np.median(np.diff(self.lnw)))  # velocity of one model pixel
        self._ccf = self._ccf_templates() if cfg.fit_rv else None
        self.lo = np.r_[np.full(L, -0.5), [-cfg.rv_range] if cfg.fit_rv else []]
        self.hi = np.r_[np.full(L, 0.5), [cfg.rv_range] if cfg.fit_rv else []]

    # ---------------------------------------------------------------- public
    def __call__(self, prepared, templates=None):
        return self.catalogue(prepared.spectra, self.fit_arrays(prepared), templates)

    def catalogue(self, spectra, res: FitArrays, templates=None):
        """The catalogue Table of results ``res`` for the rows of the prepared ``SPECTRA`` table
        ``spectra`` (e.g. ``prepared.spectra[a:b]`` for a block of :meth:`fit_blocks`)."""
        return build_catalogue(spectra, self.model, res, self.config,
                               templates=templates if templates is not None else self.templates,
                               model_name=self.config.model_name)

    def fit_arrays(self, prepared) -> FitArrays:
        """Fit every spectrum; failed spectra get NaN values and a ``failed:<reason>`` status."""
        return FitArrays.concatenate([res for _, _, res in self.fit_blocks(prepared)])

    def fit_blocks(self, prepared, block_size: int | None = None):
        """Fit in blocks of rows and yield ``(start, stop, FitArrays of rows start..stop-1)``
        as each block finishes (blocks in row order, together all rows).

        Prepared arrays are only read a block of rows at a time (``flux[a:b]``), so with
        :meth:`PreparedSpectra.open <musepayne.io.prepared.PreparedSpectra.open>` memory does not
        grow with the number of spectra.  Results do not depend on ``block_size``
        (default ``config.block_size``) or ``config.n_threads``: blocks are cut at multiples
        of ``chunk_size`` fitted spectra, so every chunk holds the same spectra as in one call.

        All state of a call (validation, LSF-excess operators, thread pool) is local to it:
        one Fitter may be shared by several threads.
        """
        cfg = self.config
        n = prepared.n_spectra
        B = max(int(block_size or cfg.block_size), 1)
        B = -(-B // cfg.chunk_size) * cfg.chunk_size  # whole chunks per block
        wave = np.asarray(prepared.wave, np.float64)
        if wave.shape != self.wave_vac.shape or not np.allclose(wave, self.wave_vac, rtol=1e-7, atol=0):
            msg = (f"prepared grid ({wave.size} px, {wave.min():.1f}-{wave.max():.1f} A) differs from the model "
                   f"grid ({self.wave_vac.size} px, {self.wave_vac[0]:.1f}-{self.wave_vac[-1]:.1f} A vacuum); "
                   "prepare the spectra for this model")
            for a in range(0, max(n, 1), B):
                b = min(n, a + B)
                out = self._empty_arrays(b - a, wave.size)
                out.status[:] = "failed:bad_wavelength"
                out.reason[:] = msg
                yield a, b, out
            return
        status, reason, fit_ok = self._validate(prepared)
        ops = _RowOpsBuilder(self, wave) if cfg.lsf_excess else None
        todo = np.flatnonzero(fit_ok)
        bounds = _block_bounds(fit_ok, B)
        pool = None
        if cfg.n_threads > 1 and todo.size > cfg.chunk_size:
            pool = ThreadPoolExecutor(max_workers=cfg.n_threads)
        try:
            for a, b in bounds:
                out = self._empty_arrays(b - a, wave.size)
                out.status[:], out.reason[:] = status[a:b], reason[a:b]
                idx = np.flatnonzero(fit_ok[a:b])  # block-local rows to fit
                opi = ops.rows(prepared.lsf_excess, a, b, idx) if ops is not None else _RowOps(np.full(b - a, -1), ())
                self._fit_rows(prepared, a, idx, opi, out, pool)
                yield a, b, out
        finally:
            if pool is not None:
                pool.shutdown()

    def block_bounds(self, prepared, block_size: int | None = None) -> list:
        """Row ranges ``[(a, b), ...]`` of the blocks :meth:`fit_blocks` yields.  Fitting
        ``prepared.rows(a, b)`` for each range separately (e.g. in several processes) gives
        the results of one call: every chunk holds the same spectra."""
        B = max(int(block_size or self.config.block_size), 1)
        B = -(-B // self.config.chunk_size) * self.config.chunk_size
        return _block_bounds(self._validate(prepared)[2], B)

    def _empty_arrays(self, n, n_pix) -> FitArrays:
        L, P = self.model.n_labels, self.n_par
        return FitArrays(
            labels=np.full((n, L), np.nan), labels_err=np.full((n, L), np.nan),
            rv=np.full(n, np.nan), rv_err=np.full(n, np.nan), chi2=np.full(n, np.nan),
            red_chi2=np.full(n, np.nan), red_chi2_model=np.full(n, np.nan), corr_flux=np.full(n, np.nan),
            n_pix_used=np.zeros(n, np.int64),
            n_iter=np.zeros(n, np.int64), status=np.full(n, "", dtype=object),
            reason=np.full(n, "", dtype=object), edge_labels=np.full(n, "", dtype=object),
            error_scale=np.full(n, np.nan),
            model_flux=np.full((n, n_pix), np.nan, np.float32) if self.config.keep_model else None,
            cov=np.full((n, P, P), np.nan),
        )

    def _usable(self, f, iv, mk):
        """Pixels that count: finite flux and ivar, ivar > 0, no excluding mask bit, and not
        masked by the model itself (pixels where the model is not trusted)."""
        model_ok = ~np.asarray(getattr(self.model, "pixel_mask", np.zeros(self.model.n_pix, bool)), bool)
        with np.errstate(invalid="ignore"):
            good = np.isfinite(f) & np.isfinite(iv) & (iv > 0) & ((np.asarray(mk) & EXCLUDING_BITS) == 0)
        return good & model_ok[None, :]

    def _validate(self, prepared):
        """Per-spectrum validation (rows read in blocks): ``(status, reason, fit_ok)``; the
        status and reason of rows that will not be fitted are set."""
        cfg = self.config
        n = prepared.n_spectra
        P = self.n_par
        flux, ivar, mask = prepared.flux, prepared.ivar, prepared.mask
        n_good = np.zeros(n, np.int64)
        for k in range(0, n, 2048):
            n_good[k:k + 2048] = self._usable(flux[k:k + 2048], ivar[k:k + 2048], mask[k:k + 2048]).sum(1)
        st_in = (np.asarray(prepared.spectra["status"]).astype(str) if "status" in prepared.spectra.colnames
                 else np.full(n, "ok"))
        rs_in = (np.asarray(prepared.spectra["reason"]).astype(str) if "reason" in prepared.spectra.colnames
                 else np.full(n, ""))
        status, reason = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        fit_ok = np.ones(n, bool)
        need = max(cfg.min_pixels, P + 1)
        for i in range(n):
            s = st_in[i].strip()
            known = SPECTRUM_STATUS.get(s)
            if known is not None and not known.usable:
                status[i], reason[i] = f"failed:{s}", rs_in[i] or known.description
                fit_ok[i] = False
            elif n_good[i] < need:
                why = "no_valid_pixels" if n_good[i] == 0 else "too_few_pixels"
                status[i] = f"failed:{why}"
                with np.errstate(invalid="ignore"):
                    d_ok = np.isfinite(flux[i]) & np.isfinite(ivar[i]) & (ivar[i] > 0)
                m_ok = ~np.asarray(getattr(self.model, "pixel_mask", np.zeros(self.model.n_pix, bool)), bool)
                reason[i] = (f"{n_good[i]} usable pixels (finite flux, ivar > 0, unmasked); need >= {need}: "
                             + coverage_note(np.asarray(prepared.wave, np.float64), d_ok, m_ok))
                fit_ok[i] = False
        return status, reason, fit_ok

    def _fit_rows(self, prepared, a, idx, opi, out, pool=None):
        """Fit rows ``a + idx`` of ``prepared`` into rows ``idx`` of ``out``, in chunks of
        ``chunk_size`` (in ``pool``'s threads when given; each chunk writes disjoint rows)."""
        cfg = self.config
        flux, ivar, mask = prepared.flux, prepared.ivar, prepared.mask

        def work(loc):
            g = a + loc
            try:
                # (flux, weights) in float64, weight 0 where not usable; built per chunk so memory
                # stays ~ chunk size (the caller's arrays are not modified)
                f = np.asarray(flux[g], np.float64)
                iv = np.asarray(ivar[g], np.float64)
                good = self._usable(f, iv, mask[g])
                self._fit_chunk(loc, np.where(good, f, 0.0), np.where(good, iv, 0.0), opi[loc], out)
            except (np.linalg.LinAlgError, FloatingPointError, ValueError) as exc:  # pragma: no cover
                out.status[loc] = "failed:numerical"
                out.reason[loc] = f"{type(exc).__name__}: {exc}"

        chunks = [idx[k:k + cfg.chunk_size] for k in range(0, idx.size, cfg.chunk_size)]
        if pool is not None and len(chunks) > 1:
            list(pool.map(work, chunks))
        else:
            for loc in chunks:
                work(loc)

    # ---------------------------------------------------------------- internals
    def _uniform_segments(self):
        """Blocks on which the shift is one constant number of pixels, or None (general path).

        Every grid segment must be uniform in ln lambda (log-linear grids: LAMOST, APOGEE
        chips) to 1e-4 pixel.  When all segments also lie on one common lattice (same step,
        starts a whole number of steps apart: the APOGEE chips), they form one block, so the
        shift runs once over the whole spectrum.  Returns ``[(start, stop, step, s0, s1)]``
        where ``s0``/``s1`` give, per pixel of the block, the bounds of its own segment.
        """
        segs = []
        for sg in np.unique(self.segments):
            idx = np.flatnonzero(self.segments == sg)
            if idx.size < 5:
                return None
            x = self.lnw[idx]
            i = np.arange(idx.size, dtype=np.float64)
            h, a = np.polyfit(i, x, 1)
            if np.max(np.abs(x - (a + h * i))) > 1e-4 * h:
                return None
            segs.append((int(idx[0]), int(idx[-1]) + 1, float(h)))
        h0 = segs[0][2]
        k = (self.lnw[[a for a, _, _ in segs]] - self.lnw[0]) / h0
        if all(abs(h / h0 - 1) < 1e-6 for _, _, h in segs) and np.all(np.abs(k - np.round(k)) < 1e-3):
            s0 = np.concatenate([np.full(e - a, a) for a, e, _ in segs])
            s1 = np.concatenate([np.full(e - a, e) for a, e, _ in segs])
            blocks = [(0, self.lnw.size, float(np.mean([h for _, _, h in segs])), s0, s1)]
        else:
            blocks = [(a, e, h, np.full(e - a, a), np.full(e - a, e)) for a, e, h in segs]
        # pixel i (taps i+o-1 ... i+o+2) is valid for whole-pixel offsets lo_i <= o <= hi_i:
        # all taps inside its own segment [s0, s1) with a one-pixel margin at each end
        out = []
        for a, e, h, s0, s1 in blocks:
            i = np.arange(a, e)
            out.append((a, e, h, (s0 - i + 2).astype(np.int32), (s1 - i - 4).astype(np.int32)))
        return out

    def _shift(self, X, v, rv_plane=False):
        """Shift rest-frame planes ``X (m, Q, n_pix)`` (plane 0 the flux) to velocities ``v``.

        Returns ``(Y, valid)``: ``Y (m, Q + rv_plane, n_pix)`` the planes interpolated at
        ``lambda_obs / D(v)`` and, with ``rv_plane``, a last plane d flux / d v (the
        derivative of the interpolation weights applied to plane 0); ``valid (m, n_pix)``
        marks pixels whose four taps lie inside the pixel's own grid segment with a
        one-pixel margin.  Values at invalid pixels are finite but meaningless (weights zero them).

        On log-linear blocks a row's shift is one constant number of pixels, so each row
        is first aligned by its whole-pixel offset (one block gather through a sliding-window
        view of the zero-padded block, no per-pixel index arrays) and the four-tap filter
        then runs on contiguous planes with one weight per row and tap.
        """
        if self._uniform is None:
            return self._shift_general(X, v, rv_plane)
        dt = self.dtype
        m, Q, p = X.shape
        b = np.asarray(v, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
        Y = np.empty((m, Q + int(rv_plane), p), dt)
        valid = np.zeros((m, p), bool)
        for a, e, h, o_lo, o_hi in self._uniform:
            n_s = e - a
            delta = -lnD / h  # rest position of obs pixel i: u = i + delta
            fl = np.floor(delta)
            c, dc = _catmull_rom(delta - fl)  # (m, 4)
            c = c.astype(dt)
            o = fl.astype(np.int64)  # taps at i + o - 1 ... i + o + 2
            o32 = np.clip(o, -2**30, 2**30).astype(np.int32)[:, None]
            np.logical_and(o32 >= o_lo, o32 <= o_hi, out=valid[:, a:e])
            # al[r, :, j] = X[r, :, a + j + o_r - 1], zero outside the block: each row is one
            # slice copy (offsets beyond the block are clipped as a zero padding of
            # min(|o|, n_s) + 2 pixels would clip them)
            pad = int(min(np.abs(o).max(), n_s)) + 2
            s0 = np.clip(pad + o - 1, 0, n_s + 2 * pad - (n_s + 3)) - pad  # first tap, block pixels
            al = np.empty((m, Q, n_s + 3), dt)
            for r in range(m):
                lo, hi = max(0, -s0[r]), min(n_s + 3, n_s - s0[r])
                if hi > lo:
                    al[r, :, lo:hi] = X[r, :, a + s0[r] + lo:a + s0[r] + hi]
                else:
                    lo = hi = 0
                al[r, :, :lo] = 0
                al[r, :, hi:] = 0
            seg = Y[:, :Q, a:e]
            tmp = np.empty_like(seg)
            np.multiply(al[:, :, 0:n_s], c[:, 0, None, None], out=seg)
            for k in range(1, 4):
                seg += np.multiply(al[:, :, k:k + n_s], c[:, k, None, None], out=tmp)
            if rv_plane:
                dudv = -1.0 / (h * C_KMS * (1.0 - b * b))
                dcv = (dc * dudv[:, None]).astype(dt)
                rv = Y[:, Q, a:e]
                np.multiply(al[:, 0, 0:n_s], dcv[:, 0, None], out=rv)
                tmp = tmp[:, 0]
                for k in range(1, 4):
                    rv += np.multiply(al[:, 0, k:k + n_s], dcv[:, k, None], out=tmp)
        return Y, valid

    def _shift_general(self, X, v, rv_plane=False):
        """General grids: per-pixel interpolation weights (see :func:`shift_weights`)."""
        m, Q, p = X.shape
        j0, c, dc, valid = shift_weights(self.lnw, self.lnw, v, self.segments)
        c = c.astype(self.dtype)
        Y = np.zeros((m, Q + int(rv_plane), p), self.dtype)
        for k in range(4):
            Xk = np.take_along_axis(X, (j0 + k)[:, None, :], axis=2)
            Y[:, :Q] += c[:, None, :, k] * Xk
            if rv_plane:
                Y[:, Q] += dc[:, :, k].astype(self.dtype) * Xk[:, 0]
        return Y, valid

    def _apply_ops(self, Y, opi):
        """Convolve the rows that have an LSF-excess operator (every plane: flux and Jacobian), in place."""
        idx = opi.index
        for o in np.unique(idx[idx >= 0]):
            sel = np.flatnonzero(idx == o)
            opi.ops[o].apply(Y, sel)
        return Y

    def _planes(self, theta, opi, want_jac=True, rest=None):
        """Observed-frame model planes at ``theta``: ``(Y, valid)``, ``Y (m, 1 [+ n_par], n_pix)``,
        plane 0 the flux, then d flux / d (scaled labels, v).  ``rest``: the rest-frame planes
        at ``theta``'s labels when already known (grid points)."""
        L = self.model.n_labels
        s = theta[:, :L]
        v = theta[:, L] if self.config.fit_rv else np.full(theta.shape[0], self.config.rv_fixed)
        if rest is not None:
            X = rest
        elif want_jac:
            X = self.model.planar_kernel(s, self.dtype)
        else:
            X = self.model.predict_scaled(s, self.dtype)[:, None, :]
        Y, valid = self._shift(X, v, rv_plane=want_jac and self.config.fit_rv)
        if np.any(opi.index >= 0):
            Y = self._apply_ops(Y, opi)
        return Y, valid

    def _evaluate(self, theta, opi, want_jac=True):
        """``(f (m, n_pix), J (m, n_pix, n_par) or None, valid)`` (for tests and benchmarks);
        ``opi``: :class:`_RowOps`, or an index array of -1 (no LSF-excess operator)."""
        if not isinstance(opi, _RowOps):
            opi = _RowOps(np.asarray(opi), ())
        Y, valid = self._planes(theta, opi, want_jac)
        J = np.ascontiguousarray(Y[:, 1:].transpose(0, 2, 1)) if want_jac else None
        return np.ascontiguousarray(Y[:, 0]), J, valid

    def _chi2(self, f, valid, d, w):
        r = d - f
        ww = w * valid
        return np.einsum("np,np->n", ww, r * r), r, ww

    def _assess(self, theta, opi, d, w, rest=None):
        """Model at ``theta`` and what LM needs there: f, chi2, weights used, A = J^T W J, g = J^T W r.

        The residual replaces the flux plane, every plane is multiplied by sqrt(W), and one
        batched product of the planes with themselves gives chi2, ``g`` and ``A`` together."""
        Y, valid = self._planes(theta, opi, rest=rest)
        f = Y[:, 0].copy()
        chi2, r, ww = self._chi2(f, valid, d, w)
        Y[:, 0] = r
        Y *= np.sqrt(ww).astype(self.dtype)[:, None, :]
        M = np.einsum("nqp,nrp->nqr", Y, Y).astype(np.float64)
        return f, chi2, ww, np.ascontiguousarray(M[:, 1:, 1:]), np.ascontiguousarray(M[:, 1:, 0])

    def _ccf_templates(self):
        """Templates shifted over the coarse velocity grid (fixed for a model and config)."""
        cfg = self.config
        step = float(cfg.rv_step) if cfg.rv_step else 2.0 * self._dv_pix
        nv = int(np.floor(cfg.rv_range / step))
        vgrid = np.arange(-nv, nv + 1) * step
        nt = self.ccf_flux.shape[0]
        tf = np.repeat(self.ccf_flux, vgrid.size, axis=0)
        T, valid = self._shift(tf[:, None, :], np.tile(vgrid, nt))
        T = T[:, 0]
        common = valid.all(0)
        Tc = np.where(common, T, 0).astype(self.dtype)
        return vgrid, step, Tc, (Tc * Tc), common

    def _coarse_rv(self, d, w):
        """Coarse RV: minimum over templates and the velocity grid of chi2, refined by a parabola."""
        cfg = self.config
        if not cfg.fit_rv:
            return np.full(d.shape[0], cfg.rv_fixed)
        vgrid, step, Tc, T2, common = self._ccf
        nt = self.ccf_flux.shape[0]
        wc = (w * common).astype(self.dtype)
        wd = wc * d.astype(self.dtype)
        chi = -2.0 * (wd @ Tc.T) + wc @ T2.T  # (n, nt*nv), up to a constant per spectrum
        chi = chi.astype(np.float64).reshape(-1, nt, vgrid.size)
        best_t = np.argmin(chi.min(2), 1)
        c = chi[np.arange(chi.shape[0]), best_t]
        k = np.argmin(c, 1)
        v0 = vgrid[k].astype(np.float64)
        v0 += _parabola_offset(c, k) * step
        return np.clip(v0, -cfg.rv_range, cfg.rv_range)

    def _refine_rv(self, d, w, g_best, v0, half_width=4):
        """Second RV pass with each spectrum's own best grid template: chi2 at v0 +- ``half_width``
        model pixels (one-pixel steps, exact shift), parabola through the minimum.  The coarse
        search uses generic templates and can miss by a few pixels for broad-lined stars.

        On a single log-linear lattice the template is shifted once, to ``v0``; one more pixel
        of velocity is then one whole pixel of offset, so the other trial velocities are
        windows of that one shifted template (``lnD = lnD0 + k h``, ``v = c tanh(lnD)``).
        Only pixels valid at every trial offset and not crossing a segment gap count."""
        cfg = self.config
        hw = int(half_width)
        blocks = self._uniform
        if blocks is None or len(blocks) != 1 or d.shape[1] <= 2 * hw + 1:
            return self._refine_rv_general(d, w, g_best, v0, hw)
        dt = self.dtype
        m, p = d.shape
        h = blocks[0][2]
        T0, valid = self._shift(self.grid_flux[g_best][:, None, :], v0)
        T0 = T0[:, 0]
        n_c = p - 2 * hw
        win = np.lib.stride_tricks.sliding_window_view
        # window j holds T0[j + t] at centre pixel i = hw + t, i.e. the template at offset k = hw - j
        common = win(valid, n_c, axis=1).all(1) & self._same_segment(hw)[None, :]
        wc = (w[:, hw:p - hw] * common).astype(dt)
        wd = wc * d[:, hw:p - hw].astype(dt)
        chi = (np.einsum("nt,njt->nj", wc, win(T0 * T0, n_c, axis=1))
               - 2.0 * np.einsum("nt,njt->nj", wd, win(T0, n_c, axis=1)))
        chi = chi[:, ::-1].astype(np.float64)  # column q <-> offset k = q - hw
        q = np.argmin(chi, 1)
        b = np.asarray(v0, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b)) + (q - hw + _parabola_offset(chi, q)) * h
        return np.clip(C_KMS * np.tanh(lnD), -cfg.rv_range, cfg.rv_range)

    def _same_segment(self, hw):
        """Pixels ``hw .. n_pix - hw - 1`` whose +-``hw`` neighbours are all in their own segment."""
        seg = self.segments
        n_c = seg.size - 2 * hw
        return (np.lib.stride_tricks.sliding_window_view(seg, n_c) == seg[hw:seg.size - hw]).all(0)

    def _refine_rv_general(self, d, w, g_best, v0, half_width):
        """:meth:`_refine_rv` on general grids: the template shifted to every trial velocity."""
        cfg = self.config
        m = d.shape[0]
        step = self._dv_pix
        k = np.arange(-half_width, half_width + 1)
        vv = np.clip(v0[:, None] + k[None, :] * step, -cfg.rv_range, cfg.rv_range)
        T, valid = self._shift(np.repeat(self.grid_flux[g_best], k.size, axis=0)[:, None, :], vv.ravel())
        T = T[:, 0].reshape(m, k.size, -1)
        common = valid.reshape(m, k.size, -1).all(1)
        wc = (w * common).astype(self.dtype)
        # chi2 up to a per-spectrum constant: sum w T^2 - 2 sum w d T
        chi = (np.einsum("np,nkp->nk", wc, T * T) - 2.0 * np.einsum("np,nkp->nk", wc * d.astype(self.dtype), T))
        chi = chi.astype(np.float64)
        j = np.argmin(chi, 1)
        v1 = vv[np.arange(m), j]
        v1 += _parabola_offset(chi, j) * step
        return np.clip(v1, -cfg.rv_range, cfg.rv_range)

    def _starts(self, d, w, v0):
        """Best ``n_starts`` grid points per spectrum (chi2 in the rest frame, nearest-pixel shift)."""
        cfg = self.config
        Dm, Wm = self._to_rest(d, w, v0)
        G = self.grid_flux
        chi = -2.0 * (Dm @ G.T) + Wm @ (G * G).T
        k = min(cfg.n_starts, G.shape[0])
        best = np.argsort(chi, axis=1)[:, :k]
        return best

    def _to_rest(self, d, w, v):
        """Data moved to the rest frame at velocities ``v``, to the nearest model pixel:
        per rest pixel the sums of ``w d`` and of ``w`` (float32 ``(m, n_pix)`` each)."""
        m, p = d.shape
        b = np.asarray(v, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
        u = np.interp(self.lnw[None, :] - lnD[:, None], self.lnw, np.arange(p, dtype=np.float64))
        j = np.clip(np.rint(u).astype(np.int64), 0, p - 1)
        flat = (np.arange(m)[:, None] * p + j).ravel()
        Dm = np.bincount(flat, weights=(w * d).ravel(), minlength=m * p).reshape(m, p).astype(self.dtype)
        Wm = np.bincount(flat, weights=w.ravel(), minlength=m * p).reshape(m, p).astype(self.dtype)
        return Dm, Wm

    def _chi2_at(self, theta, opi, d, w):
        """Flux, chi2 and used weights at ``theta`` without the Jacobian (a probe)."""
        Y, valid = self._planes(theta, opi, want_jac=False)
        f = Y[:, 0]
        chi2, _, ww = self._chi2(f, valid, d, w)
        return f, chi2, ww

    def _lm(self, theta, d, w, opi, n_iter, lam, state=None, stale=None, probe_all=False, final_jac=True):
        """Bounded Levenberg-Marquardt on the rows of ``theta`` (one row per spectrum/start).

        Per iteration and row: normal matrix ``A = J^T W J`` and gradient ``g = J^T W r``;
        parameters at a bound whose gradient points outward are frozen; the damped
        step solves ``(A + lam diag A) delta = g``; the trial point is clipped into the
        bounds and accepted when chi2 falls or rejected (damping update of Nielsen 1999).
        A row has converged when the undamped Gauss-Newton step predicts a chi2 gain
        below ``chi2_tol`` (or the float32 rounding noise of chi2), or when it is stuck
        (``lam > 1e8``).  ``state``: (f, chi2, ww, A, g) at ``theta`` if already known.
        Only ``A`` and ``g`` are kept per row (the Jacobian itself is never stored).

        Lazy Jacobians: a trial that is likely to be rejected is first *probed* (flux and
        chi2 only, a fraction of the cost); its Jacobian is computed only if it is accepted,
        at the start of the next iteration (rows marked ``stale``).  Probed are all trials
        with ``probe_all`` (the exploration of several starts, of which one is kept) and
        otherwise the trials that follow a rejection.  With ``final_jac=False`` rows may come
        back ``stale`` (their ``A``, ``g`` not yet evaluated at ``theta``).
        """
        cfg = self.config
        m, P = theta.shape
        theta = theta.copy()
        lam = lam.copy()
        if state is None:
            f, chi2, ww, A_all, g_all = self._assess(theta, opi, d, w)
        else:
            f, chi2, ww, A_all, g_all = (x.copy() for x in state)
        stale = np.zeros(m, bool) if stale is None else stale.copy()
        done = np.zeros(m, bool)
        iters = np.zeros(m, np.int64)
        nu = np.full(m, 2.0)
        rejected = np.zeros(m, bool)
        eps = 1e-9
        eye = np.eye(P)

        def refresh(rows):
            if rows.size:
                f[rows], chi2[rows], ww[rows], A_all[rows], g_all[rows] = self._assess(
                    theta[rows], opi[rows], d[rows], w[rows])
                stale[rows] = False

        for _ in range(n_iter):
            refresh(np.flatnonzero(~done & stale))
            act = np.flatnonzero(~done)
            if act.size == 0:
                break
            A, g = A_all[act], g_all[act]
            th = theta[act]
            fixed = ((th <= self.lo + eps) & (g < 0)) | ((th >= self.hi - eps) & (g > 0))
            free = (~fixed).astype(np.float64)
            Af = A * free[:, :, None] * free[:, None, :] + eye * fixed[:, :, None]
            rhs = g * free
            diag = np.einsum("nkk->nk", Af).copy()
            diag = np.maximum(diag, 1e-12 * np.maximum(diag.max(1, keepdims=True), 1e-30))
            M = Af + (lam[act, None] * diag)[:, :, None] * eye
            try:
                delta = np.linalg.solve(M, rhs[:, :, None])[:, :, 0]
                d_gn = np.linalg.solve(Af + 1e-12 * diag[:, :, None] * eye, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                delta = np.stack([np.linalg.lstsq(Mi, ri, rcond=None)[0] for Mi, ri in zip(M, rhs)])
                d_gn = delta
            # tolerance: chi2_tol, or the rounding noise of chi2 at this precision
            tol = np.maximum(cfg.chi2_tol, self._chi2_noise * chi2[act])
            pred_gn = np.einsum("nk,nk->n", d_gn, rhs)  # chi2 gain the undamped step promises
            conv = (pred_gn < tol) | (np.max(np.abs(d_gn) / (self.hi - self.lo), axis=1) < 1e-9)
            done[act[conv]] = True
            keep = ~conv
            pred_d = (2 * np.einsum("nk,nk->n", delta, rhs)
                      - np.einsum("nk,nkl,nl->n", delta, Af - eye * fixed[:, :, None], delta))[keep]
            act, th, delta, tol = act[keep], th[keep], delta[keep], tol[keep]
            if act.size == 0:
                break
            th_new = np.clip(th + delta, self.lo, self.hi)
            probe = np.ones(act.size, bool) if probe_all else rejected[act]
            full, pr = np.flatnonzero(~probe), np.flatnonzero(probe)
            f_n, chi_n, ww_n = np.empty((act.size, f.shape[1]), f.dtype), np.empty(act.size), np.empty((act.size, ww.shape[1]))
            if full.size:
                f_n[full], chi_n[full], ww_n[full], A_n, g_n = self._assess(
                    th_new[full], opi[act[full]], d[act[full]], w[act[full]])
            if pr.size:
                f_n[pr], chi_n[pr], ww_n[pr] = self._chi2_at(th_new[pr], opi[act[pr]], d[act[pr]], w[act[pr]])
            acc = np.isfinite(chi_n) & (chi_n < chi2[act])
            ia = act[acc]
            gain = chi2[ia] - chi_n[acc]
            theta[ia], f[ia], chi2[ia], ww[ia] = th_new[acc], f_n[acc], chi_n[acc], ww_n[acc]
            if full.size:
                ka = acc[full]  # accepted rows evaluated with their Jacobian
                A_all[act[full[ka]]], g_all[act[full[ka]]] = A_n[ka], g_n[ka]
            stale[act[acc & probe]] = True
            rejected[act] = ~acc
            iters[act] += 1
            # damping update of Nielsen (1999): rho = achieved / predicted gain
            rho = gain / np.maximum(pred_d[acc], 1e-300)
            lam[ia] = np.maximum(lam[ia] * np.maximum(1.0 / 3.0, 1.0 - (2.0 * np.clip(rho, 0, 1) - 1.0) ** 3), 1e-9)
            nu[ia] = 2.0
            ir = act[~acc]
            lam[ir] *= nu[ir]
            nu[ir] *= 2.0
            # a rejected step that promised less than one unit of chi2 (a sub-sigma step) failed
            # on a non-linearity at that small scale (a kink of a leaky-ReLU network): damp at
            # once to about half the step instead of doubling lam from ~1e-5 over many trials
            lam[ir] = np.where(pred_d[~acc] < 1.0, np.maximum(lam[ir], 1.0), lam[ir])
            # piecewise-smooth models (leaky ReLU) have kinks where Gauss-Newton keeps promising a
            # gain it cannot deliver: stop when an accepted step gains less than the stall
            # tolerance, or a rejected step was predicted to gain less than that (had it been
            # accepted, the fit would have stopped after it anyway)
            stall = np.maximum(tol, cfg.stall_tol)
            done[ia[gain < stall[acc]]] = True
            done[ir[(lam[ir] > 1e8) | (pred_d[~acc] < stall[~acc])]] = True
        if final_jac:
            refresh(np.flatnonzero(stale))
        return dict(theta=theta, f=f, chi2=chi2, ww=ww, A=A_all, g=g_all, lam=lam, done=done, iters=iters,
                    stale=stale)

    def _fit_chunk(self, idx, d, w_obs, opi, out):
        cfg = self.config
        L = self.model.n_labels
        P = self.n_par
        m = idx.size
        scatter = self._use_scatter
        # the weights the labels are fitted with: observed, or 1/(1/ivar + s_p^2) ('weights')
        w = self.model.inflate_ivar(w_obs) if (scatter and cfg.model_scatter == "weights") else w_obs
        v0 = self._coarse_rv(d, w)
        best = self._starts(d, w, v0)
        if cfg.fit_rv:
            v0 = self._refine_rv(d, w, best[:, 0], v0)
        K = best.shape[1]
        rows = np.repeat(np.arange(m), K)
        th0 = self.grid_s[best.ravel()]
        if cfg.fit_rv:
            th0 = np.hstack([th0, v0[rows, None]])
        lam0 = np.full(rows.size, cfg.lambda_init)
        # the starts are grid points: their rest-frame flux and Jacobian are precomputed
        state0 = self._assess(th0, opi[rows], d[rows], w[rows], rest=self.grid_planes[best.ravel()])
        n_explore = min(cfg.explore_iter, cfg.max_iter) if K > 1 else 0
        iters = np.zeros(m, np.int64)
        if n_explore:
            # every start takes one probed step; only the kept start's Jacobian is then evaluated
            st = self._lm(th0, d[rows], w[rows], opi[rows], n_explore, lam0, state0, probe_all=True, final_jac=False)
            chi = st["chi2"].reshape(m, K)
            pick = np.arange(m) * K + np.nanargmin(np.where(np.isfinite(chi), chi, np.inf), axis=1)
            th1, lam1, stale1 = st["theta"][pick], st["lam"][pick], st["stale"][pick]
            state = tuple(st[k][pick] for k in ("f", "chi2", "ww", "A", "g"))
            iters += st["iters"][pick]
        else:
            th1, lam1, state, stale1 = th0[::K], lam0[::K], state0, None
        st = self._lm(th1, d, w, opi, max(cfg.max_iter - n_explore, 1), lam1, state, stale1)
        iters += st["iters"]
        theta, ww, f, A = st["theta"], st["ww"], st["f"], st["A"]
        used = ww > 0
        n_used = used.sum(1)
        # chi2 with the observed errors (paper Eq. 3) and, with a scatter, with 1/ivar + s_p^2
        r2 = np.where(used, (d - f.astype(np.float64)) ** 2, 0.0)
        w_obs_used = np.where(used, w_obs, 0.0)
        chi2 = np.einsum("np,np->n", w_obs_used, r2)
        chi2_model = (np.einsum("np,np->n", self.model.inflate_ivar(w_obs_used), r2) if scatter
                      else np.full(m, np.nan))
        # covariance in (scaled labels, v); guard singular matrices
        cov = np.full((m, P, P), np.nan)
        for i in range(m):
            try:
                cov[i] = np.linalg.inv(A[i])
            except np.linalg.LinAlgError:
                cov[i] = np.linalg.pinv(A[i])
        if scatter and cfg.model_scatter == "errors":
            # labels fitted with W = ivar while the variance is 1/ivar + s^2: cov = A^-1 B A^-1 with
            # B = J^T W (W^-1 + S) W J = A + J^T diag(W^2 s^2) J
            Y, _ = self._planes(theta, opi)
            Jw = Y[:, 1:].astype(np.float64) * (w_obs_used * self.model.scatter)[:, None, :]
            B = A + np.einsum("nqp,nrp->nqr", Jw, Jw)
            cov = np.einsum("nij,njk,nkl->nil", cov, B, cov)
        dof = np.maximum(n_used - P, 1)
        rchi_dof = (chi2_model if scatter else chi2) / dof
        scale = np.sqrt(np.maximum(rchi_dof, 1.0)) if cfg.scale_errors else np.ones(m)
        conv_scale = np.r_[self.model.scale_width, [1.0] if cfg.fit_rv else []]
        cov_phys = cov * conv_scale[None, :, None] * conv_scale[None, None, :] * (scale ** 2)[:, None, None]
        err = np.sqrt(np.clip(np.einsum("nkk->nk", cov_phys), 0, None))
        labels = self.model.unscale(theta[:, :L])
        # Pearson correlation of data and best-fit model over used pixels
        dd = np.where(used, d, 0.0)
        ff = np.where(used, f.astype(np.float64), 0.0)
        nu = np.maximum(n_used, 1)
        md, mf = dd.sum(1) / nu, ff.sum(1) / nu
        xd, xf = np.where(used, d - md[:, None], 0), np.where(used, ff - mf[:, None], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = (xd * xf).sum(1) / np.sqrt((xd * xd).sum(1) * (xf * xf).sum(1))
        at_lo = theta <= self.lo + 1e-6 * (self.hi - self.lo)
        at_hi = theta >= self.hi - 1e-6 * (self.hi - self.lo)
        names = list(self.model.label_names) + (["rv"] if cfg.fit_rv else [])
        for i in range(m):
            g = idx[i]
            edge = [names[k] + ("<" if at_lo[i, k] else ">") for k in range(P) if at_lo[i, k] or at_hi[i, k]]
            finite = np.isfinite(chi2[i]) and np.all(np.isfinite(theta[i]))  # chi2 with observed errors
            if not finite:
                out.status[g], out.reason[g] = "failed:numerical", "non-finite chi2 or labels"
                continue
            out.labels[g] = labels[i]
            out.labels_err[g] = err[i, :L]
            out.rv[g] = theta[i, L] if cfg.fit_rv else cfg.rv_fixed
            out.rv_err[g] = err[i, L] if cfg.fit_rv else 0.0
            out.chi2[g] = chi2[i]
            out.red_chi2[g] = chi2[i] / max(n_used[i], 1)
            out.red_chi2_model[g] = chi2_model[i] / max(n_used[i], 1)
            out.corr_flux[g] = corr[i]
            out.n_pix_used[g] = n_used[i]
            out.n_iter[g] = iters[i]
            out.error_scale[g] = scale[i]
            out.cov[g] = cov_phys[i]
            out.edge_labels[g] = ",".join(edge)
            if edge:
                out.status[g] = "edge"
                out.reason[g] = "solution at the model's training-range (or RV) bound: " + ", ".join(edge)
            elif not st["done"][i]:
                out.status[g] = "not_converged"
                out.reason[g] = f"no convergence in {cfg.max_iter} iterations"
            else:
                out.status[g] = "converged"
            if out.model_flux is not None:
                out.model_flux[g] = f[i]

    def with_config(self, **changes) -> Fitter:
        """A new fitter with some configuration fields changed."""
        return Fitter(self.model, replace(self.config, **changes))
