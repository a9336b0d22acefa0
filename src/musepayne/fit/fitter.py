"""Fit prepared spectra with a spectral emulator: labels, radial velocity, errors.

Paper §3.2: each continuum-normalised spectrum ``O`` (errors ``e``) is fitted
with a model spectrum ``P(labels, v)`` by minimising
``chi2 = sum_i (P_i - O_i)^2 / e_i^2`` over the unmasked pixels; Eq. 3 reports
``red_chi2 = chi2 / n_pix_used``.

This module owns the public entry points -- :class:`FitConfig`, :class:`Fitter` (blocks of
rows read from the prepared file, validated, fitted in chunks, optionally in threads) and
:class:`FitArrays` (raw results) -- and the orchestration of one chunk.  The work is done by
the parts :class:`Fitter` is composed of, one module each:

* :mod:`musepayne.fit.forward` -- the forward model ``P(labels, v) = K_exc . S(v) . M(labels)``
  (relativistic Doppler shift by cubic interpolation, LSF-excess convolution) and its
  Jacobian, chi2 and the normal equations;
* :mod:`musepayne.fit.operators` -- the LSF-excess operators of the rows of a call;
* :mod:`musepayne.fit.starts` -- coarse RV, starting labels from a quasi-random label grid,
  refined RV;
* :mod:`musepayne.fit.lm` -- the batched, bounded Levenberg-Marquardt optimiser;
* :mod:`musepayne.fit.errors` -- covariance, error scaling and the per-spectrum results.

One chunk: coarse RV, best grid points, refined RV; every start explores ``explore_iter``
LM iterations; the lowest-chi2 start of each spectrum continues to convergence (on the
window of grid columns with weight, :mod:`musepayne.fit.lm`); errors from the covariance
at the solution.

May import: numpy, :mod:`musepayne.flags`, :mod:`musepayne.instrument`,
:mod:`musepayne.models`, :mod:`musepayne.fit` (its other modules).

(Length: about 620 lines, a fifth of them :class:`FitConfig`'s documentation of its settings
and their measured effects, kept with the settings.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..flags import DEFAULT_MAX_RED_CHI2, EXCLUDING_BITS, SPECTRUM_STATUS
from ..instrument.wavelength import C_KMS, air_to_vacuum
from ..models.model import SpectralModel, coverage_note
from .catalogue import build_catalogue
from .errors import _ErrorEstimates
from .forward import _catmull_rom, _ForwardModel, doppler_factor, grid_segments, shift_weights
from .lm import _LevenbergMarquardt
from .operators import _BandedOp, _RowOps, _RowOpsBuilder
from .starts import _parabola_offset, _StartSearch, scrambled_sobol

__all__ = ["FitConfig", "Fitter", "FitArrays", "BlockPlan", "doppler_factor", "shift_weights", "grid_segments", "scrambled_sobol"]

# names other modules import from here (kept after the split of this module)
_REEXPORTED = (_BandedOp, _RowOps, _RowOpsBuilder, _catmull_rom, _parabola_offset)


@dataclass(frozen=True)
class FitConfig:
    """Configuration of :class:`Fitter` (frozen).

    Parameters
    ----------
    rv_range : float
        Half-width (km/s) of the coarse RV search and bound of the fitted RV.
    rv_step : float or None
        Coarse RV grid step (km/s); ``None``: two model pixels (the second pass then
        searches +-4 single pixels around the coarse minimum).
    fit_rv : bool
        Fit the RV (else fixed at ``rv_fixed``).
    rv_fixed : float
        The RV (km/s) used when ``fit_rv`` is False.
    n_grid : int
        Size of the quasi-random label grid used to choose starting points.
    n_starts : int
        Number of starting points per spectrum (best grid points).
    explore_iter : int
        LM iterations run from every start before keeping the best.
    max_iter : int
        Maximum LM iterations in total.
    chi2_tol : float
        Converged when the undamped Gauss-Newton step promises a chi2 gain below this.
    stall_tol : float
        Also stop when an accepted step gained less than this, or a rejected step
        promised less (kinks of leaky-ReLU models).  A chi2 within 0.03 of the minimum is a
        parameter offset below ~0.17 sigma in the worst direction; measured on 1000 mock
        spectra per model, 0.01 -> 0.03 changed the rms of (fit - truth)/sigma by <= 0.001.
    lambda_init : float
        Initial Levenberg-Marquardt damping (dimensionless, relative to the normal matrix's diagonal).
    lsf_excess : bool
        Forward-model the prepared ``LSF_EXCESS`` (Gaussian convolution of the model).
    model_scatter : {'errors', 'weights', 'off'}
        How the model's intrinsic per-pixel scatter ``s_p`` (``model.scatter``, in
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
    precision : {'float32', 'float64'}
        'float32' (fast; network, shift and normal matrix) or 'float64'.
    chunk_size : int
        Spectra fitted together (memory ~ chunk * n_starts * n_pix * (n_labels+1) * 4 B * 6).
    block_size : int
        Spectra read from the prepared arrays at a time and returned together by
        :meth:`Fitter.fit_blocks` (rounded up to whole chunks); memory ~ block * n_pix * 12 B.
        Results do not depend on it.
    n_threads : int
        Chunks fitted in parallel threads (numpy releases the GIL in its kernels).
        Results are identical for any value when BLAS is held to one thread around the fit
        (the caller's job: see :class:`Fitter`; ``musepayne fit`` does it).
        Measured on the quiet 2-core development machine (``benchmarks/bench_fit.py``, 1000
        spectra): 2 threads give 1.50x (APOGEE per-pixel network) and 1.67x (LAMOST-grid MLP)
        the 1-thread rate.  Default 1 (pipelines and Dask workers parallelise at a higher
        level); ``musepayne fit`` uses all cores.
    min_pixels : int
        Fewer usable pixels -> failed row.
    scale_errors : bool
        Multiply errors by sqrt(chi2/(n-n_par)) when it exceeds 1 (chi2 with the
        model's scatter in the variance when it has one and ``model_scatter`` is not 'off').
    keep_model : bool
        Add the best-fit model spectrum to the output (column ``model_flux``).
    max_red_chi2 : float
        Rows with a larger ``red_chi2_model`` (``red_chi2`` when the model has no
        scatter) get the ``HIGH_CHI2`` bit of ``fit_flags``.
        With the model scatter in the variances, the default model's validation-like stars
        have red_chi2 ~0.5-1 (CV test spectra: median 0.6; 176 real LAMOST DR1 spectra:
        median 0.85, 95th percentile 2.5); above 3 the spectrum is not like the training set.
    gradcorr_threshold : float
        X_flag = 1 when X_gradcorr exceeds this (paper: 0.5).
    model_name : str or None
        Value of the catalogue's ``model`` column (default: model meta 'name' or file name).
    seed : int
        Seed of the scrambled Sobol start grid (results are deterministic).
    seed_errors : bool
        When the model carries seed members (networks of its recipe trained with other seeds,
        :meth:`~musepayne.models.model.SpectralModel.with_seed_members`), give each label the
        spread of the members' labels at the solution (``X_err_seed``, linearised:
        :meth:`_ErrorEstimates._seed_spread`); with the benchmark calibration it enters the
        systematic error, ``X_err_sys = sqrt(sys_type^2 + X_err_seed^2)``.  Costs one network
        evaluation per member and spectrum.
    benchmark_calibration : bool
        Apply the model's benchmark-scale calibration when it has one
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
    seed_errors: bool = True
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



@dataclass
class FitArrays:
    """Raw per-spectrum results of :meth:`Fitter.fit_arrays` (physical units).

    One row per spectrum; rows of spectra that were not fitted hold NaN and a ``failed:<reason>``
    status.  :meth:`Fitter.catalogue` turns them into the catalogue Table.

    Attributes
    ----------
    labels, labels_err : ndarray of float, shape (n, n_labels)
        Labels and their errors in the model's units (e.g. K, dex).
    rv, rv_err : ndarray of float, shape (n,)
        Radial velocity and its error, km/s.
    chi2, red_chi2 : ndarray of float, shape (n,)
        chi2 with the observed errors and chi2 / n_pix_used (paper Eq. 3).
    red_chi2_model : ndarray of float, shape (n,)
        Reduced chi2 with the model's scatter in the variance (NaN: the model has none).
    corr_flux : ndarray of float, shape (n,)
        Pearson correlation of data and best-fit model over the used pixels.
    n_pix_used, n_iter : ndarray of int, shape (n,)
        Pixels used and Levenberg-Marquardt iterations.
    status, reason, edge_labels : ndarray of str (object), shape (n,)
        Fit status, a human-readable reason, and the parameters at a bound (``"teff<,rv>"``).
    error_scale : ndarray of float, shape (n,)
        Factor applied to the errors (``sqrt(chi2 / dof)`` when above 1).
    model_flux : ndarray of float32, shape (n, n_pix), or None
        Best-fit model spectra (``FitConfig.keep_model``).
    cov : ndarray of float, shape (n, n_par, n_par), or None
        Covariance of (labels..., rv) in physical units.
    labels_err_seed : ndarray of float, shape (n, n_labels), or None
        Spread of the labels over the model's seed members (``FitConfig.seed_errors``; None when
        the model has none).
    """

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
    labels_err_seed: np.ndarray | None = None  # (n, L) spread over the model's seed members

    @staticmethod
    def concatenate(parts) -> FitArrays:
        """Rows of several results in order (e.g. the blocks of :meth:`Fitter.fit_blocks`).

        Parameters
        ----------
        parts : iterable of FitArrays
            Results to stack, in row order.

        Returns
        -------
        FitArrays
            All rows (the one part itself when there is only one).
        """
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        vals = {}
        for name in FitArrays.__dataclass_fields__:
            xs = [getattr(p, name) for p in parts]
            vals[name] = None if any(x is None for x in xs) else np.concatenate(xs)
        return FitArrays(**vals)



def _good_pixels(f, iv, mk):
    """Finite flux, finite ivar > 0 and no excluding mask bit, element by element."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(f) & (iv > 0) & (iv < np.inf) & ((np.asarray(mk) & EXCLUDING_BITS) == 0)


def _whole_chunks(block_size, chunk_size) -> int:
    """Spectra per block rounded up to whole chunks (so chunks are those of one pass)."""
    B = max(int(block_size), 1)
    return -(-B // chunk_size) * chunk_size


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of one set of prepared spectra (:meth:`Fitter.plan_blocks`).

    Made once (e.g. before forking worker processes) it spares each worker the validation.

    Attributes
    ----------
    block_size : int
        Fitted spectra per block (whole chunks).
    status, reason : numpy.ndarray of object, shape (n,)
        Set for the rows that are not fitted (``failed:...`` and why).
    fit_ok : numpy.ndarray of bool, shape (n,)
        Rows that are fitted.
    bounds : list of (int, int)
        ``(start, stop)`` row ranges of the blocks, in order, together all rows.
    """

    block_size: int
    status: np.ndarray
    reason: np.ndarray
    fit_ok: np.ndarray
    bounds: list


def _block_bounds(fit_ok, B):
    """Block j: rows ``a_j .. b_j - 1`` holding the fitted rows ``todo[j*B:(j+1)*B]`` (B: a
    multiple of the chunk size, so chunks are those of one pass over all rows)."""
    todo = np.flatnonzero(fit_ok)
    starts = [0] + [int(todo[k]) for k in range(B, todo.size, B)]
    return list(zip(starts, starts[1:] + [int(np.size(fit_ok))]))



class Fitter(_ForwardModel, _StartSearch, _LevenbergMarquardt, _ErrorEstimates):
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

    Parameters
    ----------
    model : SpectralModel
        The emulator (labels -> normalised rest-frame spectrum, with its Jacobian).
    config : FitConfig, optional
        Fit settings (default ``FitConfig()``).
    templates : object, optional
        Gradient templates for the per-label flags (``.gradcorr(model, labels)``); default the
        model's own ``model.templates``, else none.

    Attributes
    ----------
    model : SpectralModel
        The model.
    config : FitConfig
        The settings.
    templates : object or None
        The gradient templates used by :meth:`catalogue`.
    wave_vac : ndarray of float, shape (n_pix,)
        The model's pixel grid, vacuum Angstrom.
    n_par : int
        Fitted parameters per spectrum (labels, plus the RV when fitted).
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
        # the LM keeps the Jacobian planes at the solution when the errors need them (the sandwich
        # covariance with the model's scatter in the variance, :mod:`musepayne.fit.errors`)
        # whether the errors include the spread over the model's seed members (X_err_seed)
        self._use_members = bool(cfg.seed_errors and getattr(model, "seed_members", ()))
        self._keep_jac = (self._use_scatter and cfg.model_scatter == "errors") or self._use_members
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
        self._grid_flux2 = self.grid_flux * self.grid_flux  # (for the start search)
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
        """Fit ``prepared`` and return its catalogue (:meth:`fit_arrays` then :meth:`catalogue`)."""
        return self.catalogue(prepared.spectra, self.fit_arrays(prepared), templates)

    def catalogue(self, spectra, res: FitArrays, templates=None):
        """The catalogue Table of results ``res`` for the rows of the prepared ``SPECTRA`` table
        ``spectra`` (e.g. ``prepared.spectra[a:b]`` for a block of :meth:`fit_blocks`).

        Parameters
        ----------
        spectra : astropy.table.Table
            The prepared ``SPECTRA`` rows the results belong to (same length as ``res``).
        res : FitArrays
            Fit results of those rows.
        templates : object, optional
            Gradient templates for the ``X_gradcorr`` / ``X_flag`` columns (default: the fitter's).

        Returns
        -------
        astropy.table.Table
            The catalogue (:func:`musepayne.fit.catalogue.build_catalogue`): labels (K, dex),
            RV (km/s), errors, fit quality, flags and status, with units and descriptions.
        """
        return build_catalogue(spectra, self.model, res, self.config,
                               templates=templates if templates is not None else self.templates,
                               model_name=self.config.model_name)

    def fit_arrays(self, prepared) -> FitArrays:
        """Fit every spectrum; failed spectra get NaN values and a ``failed:<reason>`` status.

        Parameters
        ----------
        prepared : PreparedSpectra
            Prepared spectra on the model's grid (read or opened).

        Returns
        -------
        FitArrays
            One row per spectrum of ``prepared``.
        """
        return FitArrays.concatenate([res for _, _, res in self.fit_blocks(prepared)])

    def fit_blocks(self, prepared, block_size: int | None = None, plan: BlockPlan | None = None, take=None):
        """Fit in blocks of rows and yield ``(start, stop, FitArrays of rows start..stop-1)``
        as each block finishes (blocks in row order, together all rows).

        Prepared arrays are only read a block of rows at a time (``flux[a:b]``), so with
        :meth:`PreparedSpectra.open <musepayne.io.prepared.PreparedSpectra.open>` memory does not
        grow with the number of spectra.  Results do not depend on ``block_size``
        (default ``config.block_size``) or ``config.n_threads``: blocks are cut at multiples
        of ``chunk_size`` fitted spectra, so every chunk holds the same spectra as in one call.

        All state of a call (validation, LSF-excess operators, thread pool) is local to it:
        one Fitter may be shared by several threads.

        Parameters
        ----------
        prepared : PreparedSpectra
            Prepared spectra on the model's grid (:meth:`PreparedSpectra.open` keeps memory flat).
        block_size : int, optional
            Spectra per block (rounded up to whole chunks); default ``config.block_size``.
        plan : BlockPlan, optional
            :meth:`plan_blocks` of ``prepared`` made earlier (e.g. once before forking worker
            processes, so that the spectra are validated once); ``block_size`` is then ignored.
        take : iterable of int, optional
            Indices into ``plan.bounds`` of the blocks to fit, in the order they are drawn
            (e.g. from a counter shared by several processes); default every block in order.

        Yields
        ------
        start, stop : int
            The block's rows of ``prepared``.
        res : FitArrays
            Results of rows ``start .. stop - 1``.
        """
        cfg = self.config
        n = prepared.n_spectra
        B = plan.block_size if plan is not None else _whole_chunks(block_size or cfg.block_size, cfg.chunk_size)
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
        plan = plan if plan is not None else self.plan_blocks(prepared, B)
        if plan.fit_ok.size != n:
            raise ValueError(f"the block plan is for {plan.fit_ok.size} spectra, not these {n}")
        status, reason, fit_ok = plan.status, plan.reason, plan.fit_ok
        ops = _RowOpsBuilder(self, wave) if cfg.lsf_excess else None
        pool = None
        if cfg.n_threads > 1 and np.count_nonzero(fit_ok) > cfg.chunk_size:
            pool = ThreadPoolExecutor(max_workers=cfg.n_threads)
        try:
            for j in (range(len(plan.bounds)) if take is None else take):
                a, b = plan.bounds[j]
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
        the results of one call: every chunk holds the same spectra.

        Parameters
        ----------
        prepared : PreparedSpectra
            The spectra (validated here to know which rows are fitted).
        block_size : int, optional
            Spectra per block; default ``config.block_size``.

        Returns
        -------
        list of (int, int)
            ``(start, stop)`` row ranges, in order, together all rows.
        """
        return self.plan_blocks(prepared, block_size).bounds

    def plan_blocks(self, prepared, block_size: int | None = None) -> BlockPlan:
        """Validate ``prepared`` once and cut its blocks (see :class:`BlockPlan`).

        Parameters
        ----------
        prepared : PreparedSpectra
            The spectra (read a block of rows at a time).
        block_size : int, optional
            Spectra per block (rounded up to whole chunks); default ``config.block_size``.

        Returns
        -------
        BlockPlan
            Statuses of the rows that are not fitted and the blocks' row ranges.
        """
        B = _whole_chunks(block_size or self.config.block_size, self.config.chunk_size)
        status, reason, fit_ok = self._validate(prepared)
        return BlockPlan(B, status, reason, fit_ok, _block_bounds(fit_ok, B))

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
            labels_err_seed=np.full((n, L), np.nan) if self._use_members else None,
        )

    def _model_ok(self):
        """Pixels the model itself does not mask (where it is trusted), shape (n_pix,)."""
        return ~np.asarray(getattr(self.model, "pixel_mask", np.zeros(self.model.n_pix, bool)), bool)

    def _usable(self, f, iv, mk):
        """Pixels that count: :func:`_good_pixels` and not masked by the model itself."""
        return _good_pixels(f, iv, mk) & self._model_ok()[None, :]

    def _n_usable(self, f, iv, mk):
        """Usable pixels per row, ``_usable(f, iv, mk).sum(1)``, counted on the runs of columns the
        model does not mask only (the default model masks 58 % of its pixels)."""
        edges = np.flatnonzero(np.diff(np.r_[0, self._model_ok().astype(np.int8), 0]))
        f, iv, mk = np.asarray(f), np.asarray(iv), np.asarray(mk)
        n = np.zeros(f.shape[0], np.int64)
        for a, b in zip(edges[::2], edges[1::2]):
            n += np.count_nonzero(_good_pixels(f[:, a:b], iv[:, a:b], mk[:, a:b]), axis=1)
        return n

    def _validate(self, prepared):
        """Per-spectrum validation (rows read in blocks): ``(status, reason, fit_ok)``; the
        status and reason of rows that will not be fitted are set."""
        cfg = self.config
        n = prepared.n_spectra
        P = self.n_par
        flux, ivar, mask = prepared.flux, prepared.ivar, prepared.mask
        n_good = np.zeros(n, np.int64)
        for k in range(0, n, 2048):
            n_good[k:k + 2048] = self._n_usable(flux[k:k + 2048], ivar[k:k + 2048], mask[k:k + 2048])
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
                m_ok = self._model_ok()
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

    def _fit_chunk(self, idx, d, w_obs, opi, out):
        """Fit the spectra of one chunk (data ``d``, observed weights ``w_obs``, operators
        ``opi``) and write their results into rows ``idx`` of ``out``."""
        cfg = self.config
        # the weights the labels are fitted with: observed, or 1/(1/ivar + s_p^2) ('weights')
        w = self.model.inflate_ivar(w_obs) if (self._use_scatter and cfg.model_scatter == "weights") else w_obs
        c0, c1 = self._window(w)
        if (c0, c1) != (0, d.shape[1]):  # the LM (and the covariance's planes) on that window
            opi = opi.windowed(c0, c1, self._rest_model)
        st, iters = self._optimise(d, w, opi)
        if opi.window is not None:  # back on the whole grid: zero weight outside the window
            for k in ("f", "ww"):
                full = np.zeros((d.shape[0], d.shape[1]), st[k].dtype)
                full[:, c0:c1] = st[k]
                st[k] = full
        est = self._estimates(st, d, w_obs, opi)
        self._store(idx, st, iters, est, out)

    def _optimise(self, d, w, opi):
        """Starting points, exploration of every start and LM to convergence from the best:
        ``(st, iters)``, the solutions (what :meth:`_lm` returns) and iterations per spectrum.

        With a window on ``opi`` (:meth:`_RowOps.windowed`), the LM runs on its columns
        ``c0 .. c1 - 1`` only (the pixels with weight): ``f`` and ``ww`` of ``st`` are that wide."""
        cfg = self.config
        m = d.shape[0]
        v0 = self._coarse_rv(d, w)
        best = self._starts(d, w, v0)
        if cfg.fit_rv:
            v0 = self._refine_rv(d, w, best[:, 0], v0)
        if opi.window is not None:
            c0, c1 = opi.window[2:4]
            d, w = d[:, c0:c1], w[:, c0:c1]
        K = best.shape[1]
        rows = np.repeat(np.arange(m), K)
        th0 = self.grid_s[best.ravel()]
        if cfg.fit_rv:
            th0 = np.hstack([th0, v0[rows, None]])
        lam0 = np.full(rows.size, cfg.lambda_init)
        # the starts are grid points: their rest-frame flux and Jacobian are precomputed
        d_r, w_r, op_r = d[rows], w[rows], opi[rows]
        state0 = self._assess(th0, op_r, d_r, w_r, rest=best.ravel())
        n_explore = min(cfg.explore_iter, cfg.max_iter) if K > 1 else 0
        iters = np.zeros(m, np.int64)
        if n_explore:
            # every start takes one probed step; only the kept start's Jacobian is then evaluated
            st = self._lm(th0, d_r, w_r, op_r, n_explore, lam0, state0, probe_all=True, final_jac=False)
            chi = st["chi2"].reshape(m, K)
            pick = np.arange(m) * K + np.nanargmin(np.where(np.isfinite(chi), chi, np.inf), axis=1)
            th1, lam1, stale1 = st["theta"][pick], st["lam"][pick], st["stale"][pick]
            state = tuple(None if st[k] is None else st[k][pick] for k in ("f", "chi2", "ww", "A", "g", "J"))
            iters += st["iters"][pick]
        else:
            th1, lam1, state, stale1 = th0[::K], lam0[::K], state0, None
        st = self._lm(th1, d, w, opi, max(cfg.max_iter - n_explore, 1), lam1, state, stale1)
        iters += st["iters"]
        return st, iters

    def with_config(self, **changes) -> Fitter:
        """A new fitter with some configuration fields changed.

        Parameters
        ----------
        **changes
            :class:`FitConfig` fields and their new values.

        Returns
        -------
        Fitter
            A fitter of the same model, the same gradient templates and the changed configuration.
        """
        return Fitter(self.model, replace(self.config, **changes), templates=self.templates)
