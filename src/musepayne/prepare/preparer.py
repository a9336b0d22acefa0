"""The ``prepare`` stage: any spectrum -> the exact form a LAMOST-grid model expects.

For each batch of spectra on one input grid (paper S3.1, S4.2.1):

1. pixels that are non-finite, have non-positive or non-finite variance, or
   are flagged by the input file are marked bad; their flux is bridged by
   linear interpolation so the convolution is not poisoned, and every output
   pixel that draws > 5 % of its weight from them is flagged ``BAD_INPUT``;
2. optionally (bulge mode by default) sky-emission residuals are detected
   and replaced by the mean of the adjacent clean pixels;
3. air -> vacuum, resolution matching to the target LSF (Eq. 1, with a
   kernel whose width varies with wavelength) and flux-conserving rebinning
   onto the model grid, all in one cached sparse operator per input grid
   (:mod:`musepayne.prepare.resample`), with variances propagated exactly;
4. the mode's wavelength masks (:mod:`musepayne.prepare.masks`);
5. the 50 A ivar-weighted pseudo-continuum (:mod:`musepayne.prepare.normalize`);
6. S/N per native pixel (median over used pixels; bulge mode: lambda > 5991 A)
   and per prepared pixel, and a status per spectrum.

A spectrum that cannot be prepared keeps its row with a status and reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table

from ..flags import EXCLUDING_BITS, SPECTRUM_STATUS, flag_value
from ..instrument.lsf import LAMOST_LSF, LSF, lsf_from_spec
from ..instrument.wavelength import LAMOST_COEFF0, LAMOST_COEFF1, LAMOST_NPIX, air_to_vacuum, log_linear_grid
from ..io.prepared import PreparedSpectra
from ..io.spectra import SpectrumSet
from .masks import BLUE_CUTOFF_BULGE, MODES, clean_sky_residuals, mode_mask
from .normalize import DEFAULT_WIDTH, ContinuumNormalizer
from .resample import SpectralOperator, build_operator

__all__ = ["PrepareConfig", "Preparer", "prepare_spectra", "CONTINUUM_EXCLUDING"]

#: Bits that keep a pixel out of the pseudo-continuum (data-quality bits only).
#: Fit masks such as DICHROIC, RED_CUTOFF or BLUE_CUTOFF do not change the
#: continuum; telluric absorption does (its depth varies with airmass, and the
#: O2 A band would pull the 50 A continuum down by ~15 % around 7600 A), so the
#: *standard* telluric bands are always left out of the continuum, in every
#: mode, and the same spectrum is normalised identically in every mode.
CONTINUUM_EXCLUDING = flag_value("NO_DATA", "BAD_INPUT", "EDGE", "AO_NOTCH", "USER_MASK")

_BAD_FRACTION = 0.05
_CONT_EDGE_TOL = 10.0  # A: input edges closer than this to the continuum range count as covering it
_EDGE_LOSS = 0.01


@dataclass(frozen=True)
class PrepareConfig:
    """Configuration of the prepare stage.

    Attributes
    ----------
    mode : str
        'standard' or 'bulge' (paper S4.2.1).
    ao_notch : str or None
        None, 'WFM-AO-N', 'WFM-AO-E' or 'NFM'.
    target_lsf : LSF
        LSF of the model grid (default LAMOST, R = 1800); a spec string is converted with
        :func:`~musepayne.instrument.lsf.lsf_from_spec`.
    grid : tuple
        (coeff0, coeff1, npix) of the log-linear vacuum model grid: log10 of the first wavelength
        in Angstrom, step in dex, number of pixels (default LAMOST's).
    continuum_width : float
        Sigma of the pseudo-continuum kernel in Angstrom (50).
    sky_clean : bool or None
        Replace sky-emission residuals; None = only in bulge mode.
    sky_nsigma : float
        Detection threshold for sky residuals, in units of the error (5).
    user_mask : tuple of (float, float)
        Extra (lo, hi) vacuum ranges in Angstrom to mask.
    min_coverage : float
        Fraction of unmasked model pixels below which status is low_coverage (0.3).
    continuum_range : tuple of (float, float) or None
        (lo, hi) vacuum Angstrom; only pixels inside enter the pseudo-continuum
        and pixels outside are flagged NO_CONTINUUM.  The default, 4750-9100 A, is
        the overlap of MUSE (nominal) and LAMOST, so a LAMOST or library training
        spectrum and a MUSE spectrum of the same star are normalised from the same
        wavelengths.  None: use every valid pixel.
    do_sky_clean : bool
        Whether sky cleaning is on (``sky_clean`` resolved for the mode).

    Raises
    ------
    ValueError
        For an unknown mode or LSF spec, a grid that is not (coeff0, coeff1, npix >= 2), or a
        continuum range with hi <= lo.
    """

    mode: str = "standard"
    ao_notch: str | None = None
    target_lsf: object = LAMOST_LSF
    grid: tuple = (LAMOST_COEFF0, LAMOST_COEFF1, LAMOST_NPIX)
    continuum_width: float = DEFAULT_WIDTH
    sky_clean: bool | None = None
    sky_nsigma: float = 5.0
    user_mask: tuple = ()
    min_coverage: float = 0.3
    continuum_range: tuple | None = (4750.0, 9100.0)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "target_lsf", lsf_from_spec(self.target_lsf))
        if len(self.grid) != 3 or int(self.grid[2]) < 2:
            raise ValueError("grid must be (coeff0, coeff1, npix)")
        object.__setattr__(self, "user_mask", tuple(tuple(map(float, r)) for r in self.user_mask))
        if self.continuum_range is not None:
            lo, hi = map(float, self.continuum_range)
            if not hi > lo:
                raise ValueError("continuum_range must be (lo, hi) with hi > lo")
            object.__setattr__(self, "continuum_range", (lo, hi))

    @property
    def do_sky_clean(self) -> bool:
        return self.mode == "bulge" if self.sky_clean is None else bool(self.sky_clean)

    def wave(self) -> np.ndarray:
        """The model grid.

        Returns
        -------
        numpy.ndarray
            Vacuum wavelengths in Angstrom, shape (npix,).
        """
        c0, c1, n = self.grid
        return log_linear_grid(float(c0), float(c1), int(n))


@dataclass(eq=False)
class Preparer:
    """Configure once, call on :class:`SpectrumSet` objects, get prepared spectra.

    Operators are cached per input grid and LSF inside the instance (no global
    state), so repeated batches on the same grid cost only matrix products.
    ``preparer(spectra)`` prepares a batch (in chunks of ``chunk`` spectra) and returns a
    :class:`~musepayne.io.prepared.PreparedSpectra`; a chunk that raises becomes rows with
    status ``failed``.

    Thread safety: one Preparer may be shared by several threads.  A call keeps its state
    local; the only shared state is the operator cache, whose entries are built
    deterministically from the input grid and never changed afterwards (two threads may both
    build the operator of a new grid; the one stored last wins and both are identical), so
    results are those of serial use (tested in ``tests/test_prepare_real.py``).  The library
    does not change thread-pool limits; set them at the call site.

    Parameters
    ----------
    config : PrepareConfig, optional
        The configuration (default ``PrepareConfig()``).
    chunk : int, optional
        Spectra per chunk (default 64).

    Attributes
    ----------
    wave : numpy.ndarray
        The model grid, vacuum Angstrom, shape (n_pix,).
    normalizer : ContinuumNormalizer
        The pseudo-continuum on ``wave`` restricted to ``config.continuum_range``.
    fixed_mask : numpy.ndarray
        int32 (n_pix,), the mode's fixed wavelength mask bits.
    telluric_continuum : numpy.ndarray
        bool (n_pix,), the standard telluric bands (always kept out of the continuum).
    """

    config: PrepareConfig = field(default_factory=PrepareConfig)
    chunk: int = 64

    def __post_init__(self):
        self.wave = self.config.wave()
        cr = self.config.continuum_range
        support = None if cr is None else (self.wave >= cr[0]) & (self.wave <= cr[1])
        self.normalizer = ContinuumNormalizer(self.wave, width=self.config.continuum_width, support=support)
        self.fixed_mask = mode_mask(self.wave, self.config.mode, self.config.ao_notch, self.config.user_mask)
        self.telluric_continuum = (mode_mask(self.wave, "standard") & flag_value("TELLURIC")) != 0
        self._ops: dict[str, SpectralOperator] = {}

    # ------------------------------------------------------------------ helpers
    def operator(self, wave, frame: str, lsf: LSF) -> SpectralOperator:
        """The (cached) resampling operator from an input grid to the model grid.

        Parameters
        ----------
        wave : array_like
            Input pixel-centre wavelengths in Angstrom, shape (n_in,), in ``frame``.
        frame : {'air', 'vacuum'}
            Frame of ``wave``.
        lsf : LSF
            LSF of the input spectra.

        Returns
        -------
        SpectralOperator
            Air -> vacuum, resolution matching to ``config.target_lsf`` and rebinning, as built by
            :func:`~musepayne.prepare.resample.build_operator`.
        """
        key = hashlib.sha1(np.ascontiguousarray(wave, np.float64).tobytes()).hexdigest() + frame + lsf.describe()
        op = self._ops.get(key)
        if op is None:
            op = build_operator(wave, frame, lsf, self.wave, self.config.target_lsf, "vacuum")
            self._ops[key] = op
        return op

    def meta(self) -> dict:
        """Header metadata describing this configuration (stored with prepared spectra).

        Returns
        -------
        dict
            Keys ``mode``, ``tgtlsf``, ``contwid`` (A), ``aonotch``, ``grid0``, ``grid1``, ``gridn``,
            ``contlo`` and ``conthi`` (vacuum A; 0 without a continuum range).
        """
        c = self.config
        return {
            "mode": c.mode,
            "tgtlsf": c.target_lsf.describe(),
            "contwid": float(c.continuum_width),
            "aonotch": c.ao_notch or "none",
            "grid0": float(c.grid[0]),
            "grid1": float(c.grid[1]),
            "gridn": int(c.grid[2]),
            "contlo": float(c.continuum_range[0]) if c.continuum_range else 0.0,
            "conthi": float(c.continuum_range[1]) if c.continuum_range else 0.0,
        }

    def normalize(self, flux, ivar, mask=None, input_range=None):
        """Normalise spectra already on the model grid, with this configuration's policy.

        The one normalisation used for observed spectra (inside ``__call__``),
        training spectra and model gradient spectra.  ``mask`` (int bits) keeps
        data-quality-flagged pixels out of the continuum; ``input_range`` (vacuum
        lo, hi of the input's coverage) flags ``CONT_EDGE`` where an input edge
        lies inside the continuum range.  Returns ``(flux_norm, ivar_norm, cont, mask)``;
        ``ivar_norm`` is zero wherever an excluding bit is set.

        Parameters
        ----------
        flux : array_like
            Flux on the model grid, shape (n_spec, n_pix) or (n_pix,).
        ivar : array_like
            Inverse variance of ``flux``, same shape.
        mask : array_like of int, optional
            Pixel bit mask, broadcastable to ``flux``'s shape (copied, not modified).
        input_range : tuple of (float, float), optional
            Vacuum wavelength range in Angstrom the input covers.

        Returns
        -------
        flux_norm : numpy.ndarray
            float64 (n_spec, n_pix), dimensionless; NaN where the continuum is not defined.
        ivar_norm : numpy.ndarray
            float64 (n_spec, n_pix).
        cont : numpy.ndarray
            float64 (n_spec, n_pix), the continuum in the unit of ``flux``.
        mask : numpy.ndarray
            int32 (n_spec, n_pix): the input bits plus CONT_EDGE, NO_CONTINUUM and BAD_INPUT (overflow).
        """
        f = np.atleast_2d(np.asarray(flux, dtype=np.float64))
        iv = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
        m = np.zeros(f.shape, np.int32) if mask is None else np.array(np.broadcast_to(mask, f.shape), np.int32)
        w = self.wave
        cr = self.config.continuum_range
        outside = np.zeros(w.shape, bool)
        no_cont = self.telluric_continuum
        if cr is not None:
            outside = (w < cr[0]) | (w > cr[1])
            if input_range is not None:
                lo_in, hi_in = input_range
                reach = 2.0 * self.config.continuum_width
                edge = np.zeros(w.shape, bool)
                if lo_in > cr[0] + _CONT_EDGE_TOL:
                    edge |= w < lo_in + reach
                if hi_in < cr[1] - _CONT_EDGE_TOL:
                    edge |= w > hi_in - reach
                m |= np.where(edge, flag_value("CONT_EDGE"), 0).astype(np.int32)[None, :]
        ivar_cont = np.where(((m & CONTINUUM_EXCLUDING) == 0) & ~(outside | no_cont)[None, :], iv, 0.0)
        fn, ivn, cont, defined = self.normalizer(f, ivar_cont)
        defined &= ~outside[None, :]
        m |= np.where(~defined, flag_value("NO_CONTINUUM"), 0).astype(np.int32)
        # normalised ivar from the full ivar (also where the pixel is not in the continuum)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            fn = np.where(defined, f / cont, np.nan)
            ivn = np.where(defined & np.isfinite(iv), iv * cont**2, 0.0)
        overflow = defined & ~(np.isfinite(ivn) & np.isfinite(fn))
        m |= np.where(overflow, flag_value("BAD_INPUT"), 0).astype(np.int32)
        ivn = np.where(((m & EXCLUDING_BITS) != 0) | ~np.isfinite(fn) | ~np.isfinite(ivn), 0.0, ivn)
        return fn, ivn, cont, m

    def failure(self, meta_rows: Table, status: str, reason: str) -> PreparedSpectra:
        """Prepared rows for spectra that could not be prepared at all.

        Parameters
        ----------
        meta_rows : astropy.table.Table
            Metadata of the spectra, one row each.
        status : str
            A key of :data:`musepayne.flags.SPECTRUM_STATUS`.
        reason : str
            Human-readable reason (truncated to 200 characters).

        Returns
        -------
        PreparedSpectra
            One row per spectrum: NaN flux, zero ivar, every pixel NO_DATA, the status and reason.

        Raises
        ------
        ValueError
            For an unknown ``status``.
        """
        if status not in SPECTRUM_STATUS:
            raise ValueError(f"unknown status {status!r}")
        n = len(meta_rows)
        npix = self.wave.size
        t = _spectra_table(meta_rows)
        t["snr"] = np.full(n, np.nan)
        t["snr_prepared"] = np.full(n, np.nan)
        t["n_used"] = np.zeros(n, np.int32)
        t["status"] = np.array([status] * n, dtype="U16")
        t["reason"] = np.array([reason[:200]] * n, dtype="U200")
        return PreparedSpectra(
            self.wave.copy(), np.full((n, npix), np.nan), np.zeros((n, npix)),
            np.full((n, npix), flag_value("NO_DATA"), np.int32), np.zeros((n, npix)),
            np.full((n, npix), np.nan), t, self.meta(),
        )

    def failure_for_file(self, source, reason: str, status: str = "read_error") -> PreparedSpectra:
        """One failed row for a file that could not be read.

        Parameters
        ----------
        source : str or os.PathLike
            The file (used as ``stellar_id`` and ``source``).
        reason : str
            Human-readable reason.
        status : str, optional
            Status of the row (default ``'read_error'``).

        Returns
        -------
        PreparedSpectra
            One row, as :meth:`failure`.
        """
        t = Table({"stellar_id": [str(source)], "ra": [np.nan], "dec": [np.nan],
                   "source": [str(source)], "instrument": ["unknown"]})
        return self.failure(t, status, reason)

    # ------------------------------------------------------------------ main
    def __call__(self, spectra: SpectrumSet) -> PreparedSpectra:
        """Prepare a batch; works in chunks of ``chunk`` spectra (cache-sized arrays).

        A chunk that raises unexpectedly becomes rows with status ``failed``;
        the other chunks are unaffected.
        """
        n = spectra.n_spectra
        parts = []
        for i0 in range(0, n, self.chunk):
            sub = spectra if (i0 == 0 and n <= self.chunk) else spectra.select(np.arange(i0, min(n, i0 + self.chunk)))
            try:
                parts.append(self._prepare(sub))
            except Exception as exc:  # never lose the rows of a batch
                parts.append(self.failure(sub.meta, "failed", f"{type(exc).__name__}: {exc}"))
        return parts[0] if len(parts) == 1 else PreparedSpectra.concatenate(parts)

    def _prepare(self, s: SpectrumSet) -> PreparedSpectra:
        cfg = self.config
        n, npix_out = s.n_spectra, self.wave.size
        flux = np.array(s.flux, dtype=np.float64)  # copies: never touch the caller's arrays
        var = np.array(s.variance, dtype=np.float64)
        bad = ~np.isfinite(flux) | ~np.isfinite(var) | (var <= 0)
        if s.bad is not None:
            bad |= s.bad
        status = np.array(["ok"] * n, dtype="U16")
        reason = np.array([""] * n, dtype="U200")
        finite_flux = np.isfinite(flux).any(axis=1)
        good_var = (np.isfinite(var) & (var > 0)).any(axis=1)
        status[~good_var] = "bad_variance"
        reason[~good_var] = "variance zero, negative or non-finite at every pixel"
        status[~finite_flux] = "no_valid_pixels"
        reason[~finite_flux] = "flux is NaN/inf at every pixel"

        # wavelength overlap with the model grid
        w_vac = air_to_vacuum(s.wave) if s.frame == "air" else s.wave
        if w_vac[-1] <= self.wave[0] or w_vac[0] >= self.wave[-1]:
            return self.failure(
                s.meta, "bad_wavelength",
                f"input covers {w_vac[0]:.1f}-{w_vac[-1]:.1f} A (vacuum), no overlap with the model grid "
                f"{self.wave[0]:.0f}-{self.wave[-1]:.0f} A; wrong units?",
            )

        replaced = np.zeros_like(bad)
        if cfg.do_sky_clean:
            flux, var, replaced = clean_sky_residuals(flux, var, bad, nsigma=cfg.sky_nsigma)

        # S/N per native pixel over the used range
        native_fixed = mode_mask(w_vac, cfg.mode, cfg.ao_notch, cfg.user_mask)
        used_native = ~bad & ((native_fixed & EXCLUDING_BITS) == 0)
        used_native &= (w_vac >= self.wave[0]) & (w_vac <= self.wave[-1])
        if cfg.mode == "bulge":
            used_native &= w_vac > BLUE_CUTOFF_BULGE
        with np.errstate(invalid="ignore", divide="ignore"):
            snr_pix = np.where(used_native, flux / np.sqrt(np.where(used_native, var, 1.0)), np.nan)
        snr_native = _nanmedian_rows(snr_pix)

        # bridge bad pixels for the linear operator
        flux_f = _bridge(flux, bad)
        var_f = np.where(bad, 0.0, var)

        op = self.operator(s.wave, s.frame, s.lsf)
        f_out = op.apply(flux_f)
        v_out = op.apply_variance(var_f)
        badfrac = op.bad_fraction(bad)
        repl_out = op.bad_fraction(replaced) > 0

        mask = np.broadcast_to(self.fixed_mask, (n, npix_out)).astype(np.int32)
        mask = mask | np.where(op.coverage < 0.999, flag_value("NO_DATA"), 0).astype(np.int32)[None, :]
        mask |= np.where(op.edge_loss > _EDGE_LOSS, flag_value("EDGE"), 0).astype(np.int32)[None, :]
        tgt_fwhm = cfg.target_lsf.fwhm(self.wave)
        mask |= np.where(op.excess_fwhm > 0.01 * tgt_fwhm, flag_value("RES_COARSE"), 0).astype(np.int32)[None, :]
        mask |= np.where(badfrac > _BAD_FRACTION, flag_value("BAD_INPUT"), 0).astype(np.int32)
        mask |= np.where(repl_out, flag_value("SKY_RESIDUAL"), 0).astype(np.int32)

        with np.errstate(divide="ignore", invalid="ignore"):
            ivar = np.where(v_out > 0, 1.0 / v_out, 0.0)
        cover = self.wave[op.coverage >= 0.999]
        in_range = (cover[0], cover[-1]) if cover.size else None
        fn, ivn, cont, mask = self.normalize(f_out, ivar, mask, in_range)
        # masked pixels keep their normalised flux (IVAR = 0) for plots and diagnostics
        n_used = np.count_nonzero(ivn > 0, axis=1)
        with np.errstate(invalid="ignore"):
            snr_prep = _nanmedian_rows(np.where(ivn > 0, fn * np.sqrt(ivn), np.nan))

        available = np.count_nonzero((self.fixed_mask & EXCLUDING_BITS) == 0)
        for i in range(n):
            if status[i] != "ok":
                continue
            if n_used[i] == 0:
                status[i] = "no_valid_pixels"
                reason[i] = "no usable pixel on the model grid after masking"
            elif n_used[i] < cfg.min_coverage * available:
                status[i] = "low_coverage"
                reason[i] = f"only {n_used[i]} of {available} model pixels usable"
        failed = np.isin(status, [k for k, v in SPECTRUM_STATUS.items() if not v.usable])
        fn[failed] = np.nan
        ivn[failed] = 0.0

        t = _spectra_table(s.meta)
        t["snr"] = snr_native
        t["snr_prepared"] = snr_prep
        t["n_used"] = n_used.astype(np.int32)
        t["status"] = status
        t["reason"] = reason
        excess = np.broadcast_to(op.excess_fwhm, (n, npix_out)).copy()
        return PreparedSpectra(self.wave.copy(), fn, ivn, mask, excess, cont, t, self.meta())


def _spectra_table(meta: Table) -> Table:
    t = Table()
    for col in ("stellar_id", "ra", "dec", "source", "instrument"):
        t[col] = meta[col] if col in meta.colnames else np.full(len(meta), np.nan if col in ("ra", "dec") else "")
    for col in meta.colnames:
        if col not in t.colnames:
            t[col] = meta[col]
    return t


def _nanmedian_rows(a):
    out = np.full(a.shape[0], np.nan)
    ok = np.isfinite(a).any(axis=1)
    if ok.any():
        out[ok] = np.nanmedian(a[ok], axis=1)
    return out


def _bridge(flux, bad):
    """Linear interpolation across bad pixels, row by row (flux only, for the operator)."""
    out = np.where(bad, 0.0, flux)
    rows = np.nonzero(bad.any(axis=1))[0]
    x = np.arange(flux.shape[1])
    for i in rows:
        g = ~bad[i]
        if g.sum() >= 2:
            out[i, bad[i]] = np.interp(x[bad[i]], x[g], flux[i, g])
        elif g.sum() == 1:
            out[i, bad[i]] = flux[i, g][0]
    return out


def prepare_spectra(spectra: SpectrumSet, config: PrepareConfig | None = None, **kw) -> PreparedSpectra:
    """Functional shortcut: ``Preparer(PrepareConfig(**kw))(spectra)``.

    Parameters
    ----------
    spectra : SpectrumSet
        The spectra to prepare (not modified).
    config : PrepareConfig, optional
        The configuration; when None it is built from ``**kw``.
    **kw
        :class:`PrepareConfig` fields, used only without ``config``.

    Returns
    -------
    PreparedSpectra
        Normalised spectra on the model grid with masks, continuum and a status per spectrum.
    """
    cfg = config or PrepareConfig(**kw)
    return Preparer(cfg)(spectra)
