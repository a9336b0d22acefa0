"""Named bit flags: the pixel mask registry, the spectrum status registry and the fit
quality flags.

Pixel mask (``MASK`` HDU of a prepared file)
--------------------------------------------
Each prepared pixel carries an integer bit mask.  Bits in :data:`PIXEL_FLAGS`
are either *excluding* (the pixel carries no information for a fit; its
``IVAR`` is set to zero) or *informational* (the pixel is used, but something
about it is worth knowing).  ``decode_mask`` turns a mask value into names.

Spectrum status (``status`` column)
-----------------------------------
A spectrum that cannot be used is never dropped: it keeps its row, with a
status name from :data:`SPECTRUM_STATUS` and a human-readable reason.

Fit quality (``fit_flags`` column of a catalogue)
-------------------------------------------------
One integer per catalogue row, the OR of the :data:`FIT_FLAGS` that apply
(0 = a clean fit); ``decode_fit_flags`` turns a value into names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_RED_CHI2",
    "FlagThresholds",
    "FitStatus",
    "FIT_STATUS",
    "fit_status_name",
    "fit_status_counts",
    "PixelFlag",
    "PIXEL_FLAGS",
    "EXCLUDING_BITS",
    "flag_value",
    "decode_mask",
    "SpectrumStatus",
    "SPECTRUM_STATUS",
    "OK",
    "FitFlag",
    "FIT_FLAGS",
    "fit_flag_value",
    "decode_fit_flags",
    "fit_flags_description",
]


@dataclass(frozen=True)
class PixelFlag:
    name: str
    bit: int
    excluding: bool
    description: str

    @property
    def value(self) -> int:
        return 1 << self.bit


_PIXEL_FLAG_LIST = (
    PixelFlag("NO_DATA", 0, True, "outside the input spectrum's wavelength coverage"),
    PixelFlag("BAD_INPUT", 1, True,
              "input pixel(s) non-finite, with zero/negative/non-finite variance, or flagged bad by the input file"),
    PixelFlag("TELLURIC", 2, True, "inside a telluric absorption band of the chosen mode"),
    PixelFlag("RED_CUTOFF", 3, True, "lambda > 8750 A (standard mode; LAMOST red end)"),
    PixelFlag("DICHROIC", 4, True, "LAMOST dichroic region 5720-6060 A (standard mode)"),
    PixelFlag("BLUE_CUTOFF", 5, True, "lambda < 5991 A (bulge / high-extinction mode)"),
    PixelFlag("AO_NOTCH", 6, True, "NaD laser notch filter of MUSE AO modes"),
    PixelFlag("SKY_RESIDUAL", 7, False,
              "sky-emission residual detected; flux replaced by the mean of adjacent clean pixels"),
    PixelFlag("RES_COARSE", 8, False,
              "input LSF is broader than the target LSF: not sharpened; excess broadening recorded in LSF_EXCESS"),
    PixelFlag("NO_CONTINUUM", 9, True, "pseudo-continuum undefined (no valid pixels within ~3x the 50 A kernel)"),
    PixelFlag("USER_MASK", 10, True, "masked by a user-supplied wavelength range"),
    PixelFlag("EDGE", 11, True, "within one LSF kernel of the input coverage edge (convolution incomplete)"),
    PixelFlag("CONT_EDGE", 12, True,
              "within 2 continuum-kernel widths of an input coverage edge that lies inside the continuum range: "
              "the pseudo-continuum there differs from that of a spectrum covering the whole range"),
)

#: Registry of pixel flags by name.
PIXEL_FLAGS = {f.name: f for f in _PIXEL_FLAG_LIST}

#: OR of every flag that excludes a pixel from fitting.
EXCLUDING_BITS = int(sum(f.value for f in _PIXEL_FLAG_LIST if f.excluding))


def _or_value(registry: dict, names, kind: str) -> int:
    """OR of the named flags of ``registry`` (a clear error for an unknown name)."""
    try:
        return int(sum(registry[n].value for n in names))
    except KeyError as exc:
        raise KeyError(f"unknown {kind} flag {exc.args[0]!r}; known: {sorted(registry)}") from None


def _decode(registry: dict, value: int) -> list[str]:
    """Names of the flags of ``registry`` set in ``value`` (in bit order)."""
    v = int(value)
    return [f.name for f in registry.values() if v & f.value]


def flag_value(*names: str) -> int:
    """Integer value of the OR of named pixel flags."""
    return _or_value(PIXEL_FLAGS, names, "pixel")


def decode_mask(value: int) -> list[str]:
    """Names of the flags set in one mask value."""
    return _decode(PIXEL_FLAGS, value)


@dataclass(frozen=True)
class SpectrumStatus:
    name: str
    usable: bool
    description: str


_STATUS_LIST = (
    SpectrumStatus("ok", True, "prepared without problems"),
    SpectrumStatus("low_coverage", True, "fewer than 30 % of the model pixels are usable"),
    SpectrumStatus("no_valid_pixels", False, "no usable pixel after masking (all NaN, zero variance or masked)"),
    SpectrumStatus("bad_variance", False, "variance/error array zero, negative or non-finite everywhere"),
    SpectrumStatus("bad_wavelength", False,
                   "wavelength axis unusable (not increasing, wrong units or does not overlap the target grid)"),
    SpectrumStatus("read_error", False, "the input file could not be read; see the reason column"),
    SpectrumStatus("low_snr", False, "not fitted: native S/N below the run's threshold (RunConfig.min_snr)"),
    SpectrumStatus("failed", False, "an unexpected error; see the reason column"),
)

#: Registry of spectrum status names.
SPECTRUM_STATUS = {s.name: s for s in _STATUS_LIST}

OK = "ok"


@dataclass(frozen=True)
class FitStatus:
    name: str
    usable: bool
    description: str


_FIT_STATUS_LIST = (
    FitStatus("converged", True, "the fit converged inside the label and RV bounds"),
    FitStatus("edge", True, "converged with a label or the RV at its bound (fit flag LABEL_EDGE)"),
    FitStatus("not_converged", True, "stopped at max_iter before converging (fit flag NOT_CONVERGED)"),
    FitStatus("failed", False, "no fit; the value reads 'failed:<cause>' (a spectrum status such as "
                               "no_valid_pixels, or numerical) and the reason column says more"),
)

#: Registry of fit status names (the catalogue's ``status`` column; ``failed`` values carry
#: their cause after a colon, e.g. ``failed:no_valid_pixels``).
FIT_STATUS = {s.name: s for s in _FIT_STATUS_LIST}


def fit_status_name(status: str) -> str:
    """The :data:`FIT_STATUS` entry of a catalogue ``status`` value (``failed:<cause>`` -> ``failed``)."""
    s = str(status)
    return "failed" if s.startswith("failed") else s


def fit_status_counts(statuses) -> dict:
    """Count of catalogue rows per :data:`FIT_STATUS` name (``failed:<cause>`` counted as ``failed``)."""
    counts: dict = {}
    for s in statuses:
        k = fit_status_name(s)
        counts[k] = counts.get(k, 0) + 1
    return counts


@dataclass(frozen=True)
class FitFlag:
    name: str
    bit: int
    description: str

    @property
    def value(self) -> int:
        return 1 << self.bit


_FIT_FLAG_LIST = (
    FitFlag("FAILED", 0, "no fit (status failed:<reason>); the values are NaN"),
    FitFlag("NOT_CONVERGED", 1, "the fit stopped at max_iter before converging (status not_converged)"),
    FitFlag("LABEL_EDGE", 2, "a label or the RV at its bound: the model would have to extrapolate (status edge)"),
    FitFlag("HIGH_CHI2", 3,
            "red_chi2_model (red_chi2 for a model without a scatter) above FitConfig.max_red_chi2 "
            "(default 3): with the model's own scatter in the variances the spectrum is described worse "
            "than the model's validation stars are -- a star "
            "unlike the training set (e.g. an M giant below the 3800 K training edge), a peculiar or "
            "composite spectrum, or a bad extraction; treat its labels and errors with suspicion"),
    FitFlag("LOW_SNR", 4, "snr_muse below FlagThresholds.min_snr (default 20, where the paper's Eq. 11 "
                          "precision is ~230 K / 0.58 / 0.21 dex)"),
    FitFlag("BLENDED", 5, "the brightest neighbour contributes more than FlagThresholds.max_neighbour_frac "
                          "(default 0.5) of the star's light within 1 FWHM (neighbour_frac): in injection-"
                          "recovery the labels' bias exceeds 0.3 sigma above it"),
    FitFlag("LARGE_ERRORS", 6, "a statistical label error above FlagThresholds.max_err (default Teff 250 K, "
                               "log g 0.5 dex, [Fe/H] 0.25 dex: worse than the paper's Eq. 11 precision at S/N 20)"),
    FitFlag("MISFIT", 7, "catastrophic misfit, at any S/N: the spectrum differs from its best fit by more than "
                         "FlagThresholds.max_misfit (default 2.75) times what the model's cross-validation stars of "
                         "similar labels reach ((misfit - 2 misfit_err) / misfit_ref; misfit is noise-subtracted, "
                         "so it does not shrink toward 1 at low S/N as red_chi2_model does). Arcturus as MUSE at "
                         "S/N 100 fits ~480 K too hot at red_chi2_model 2.1, under HIGH_CHI2, with misfit ~2.5-2.8 "
                         "where the default model's stars reach ~0.75"),
    FitFlag("SPARSE_LABELS", 8, "the fitted labels lie where the model's training stars are sparse: the 5th-nearest "
                                "of its cross-validation stars is farther than FlagThresholds.max_ref_dist (default "
                                "5.5) in the paper's Eq. 4 metric (ref_dist); the model interpolates over a wide gap"),
    FitFlag("HIDDEN_NEIGHBOUR", 9, "unmodelled light: a point source missing from the source list (e.g. an undetected "
                                   "neighbour of a cube-only run) brings more than FlagThresholds.max_hidden_frac "
                                   "(default 0.03) of the star's light within 1 FWHM (hidden_frac, fitted to "
                                   "the extraction residual), or an unresolved companion of another colour moves "
                                   "the star's light centroid with wavelength by more than "
                                   "FlagThresholds.max_chroma_shift (default 0: any significant shift; chroma_shift, "
                                   "in FWHM, 3-sigma lower bound); its light is partly in the spectrum"),
)


#: default ``FlagThresholds.max_hidden_frac``: ``HIDDEN_NEIGHBOUR`` above this ``hidden_frac``
HIDDEN_FRAC_MAX = 0.03

#: default ``FlagThresholds.max_chroma_shift``: ``HIDDEN_NEIGHBOUR`` above this ``chroma_shift`` (FWHM)
CHROMA_SHIFT_MAX = 0.0

#: default ``FitConfig.max_red_chi2``: ``HIGH_CHI2`` above this ``red_chi2_model``
DEFAULT_MAX_RED_CHI2 = 3.0


@dataclass(frozen=True)
class FlagThresholds:
    """Thresholds of the catalogue quality flags ``LOW_SNR``, ``BLENDED``, ``HIDDEN_NEIGHBOUR``, ``LARGE_ERRORS``,
    ``MISFIT`` and ``SPARSE_LABELS`` (:func:`musepayne.fit.catalogue.apply_quality_flags`).

    Attributes
    ----------
    min_snr : float
        ``LOW_SNR`` below this ``snr_muse`` (per pixel).
    max_neighbour_frac : float
        ``BLENDED`` above this ``neighbour_frac`` (light of the brightest neighbour within 1 FWHM
        relative to the star's own); 0.5 from the injection-recovery budget
        (``benchmarks/bias_budget.py``): below it crowding adds < 0.3 sigma of bias.
    max_hidden_frac : float
        ``HIDDEN_NEIGHBOUR`` above this ``hidden_frac`` (light within 1 FWHM of an unmodelled point source fitted to
        the extraction residual, relative to the star's own; 3-sigma lower bound).  0.03: the lowest value at
        which runs with the complete true catalogue of simulated crowded fields flag no star (0 of 237; 0.02: 1),
        while on runs from the cube alone the unflagged rows' dispersion falls with it (0.1 -> 0.03: Teff 93 ->
        87 K, log g 0.20 -> 0.15, [Fe/H] 0.13 -> 0.11 dex; ``benchmarks/detect_vs_catalogue.py --sweep``, seeds
        7 11 12); not from benchmark stars.
    max_chroma_shift : float
        ``HIDDEN_NEIGHBOUR`` also above this ``chroma_shift`` (the largest shift of the star's light centroid in a
        broad band from its mean over the bands, 3-sigma lower bound, in FWHM: an unresolved companion of another
        colour, closer than ``hidden_frac`` can see).  0: the lowest value at which runs with the complete true
        catalogue of simulated crowded fields flag no star (all 237 converged stars of seeds 7 11 12 have 0).
    max_err : tuple of (label, error) pairs
        ``LARGE_ERRORS`` when a label's statistical error exceeds its value (unit of the label).
    max_misfit : float
        ``MISFIT`` when ``(misfit - misfit_sigma * misfit_err) / max(misfit_ref, 0.5)`` exceeds this:
        the catalogue's ``misfit`` (noise-subtracted mean squared residual of the best fit in units of
        the model's mean squared intrinsic scatter) relative to what the model's cross-validation stars
        of similar labels reach (``misfit_ref``; 1 for a model without a reference).
    misfit_sigma : float
        Noise margin of the ``MISFIT`` test in units of ``misfit_err``, so that noisy spectra are not
        flagged by chance.
    max_ref_dist : float
        ``SPARSE_LABELS`` when the 5th-nearest cross-validation star of the model is farther than this
        from the fitted labels (``ref_dist``, paper Eq. 4 metric).
    """

    min_snr: float = 20.0
    max_neighbour_frac: float = 0.5
    max_hidden_frac: float = HIDDEN_FRAC_MAX
    max_chroma_shift: float = CHROMA_SHIFT_MAX
    max_err: tuple = (("teff", 250.0), ("logg", 0.5), ("fe_h", 0.25))
    max_misfit: float = 2.75
    misfit_sigma: float = 2.0
    max_ref_dist: float = 5.5

    def __post_init__(self):
        for name in ("min_snr", "max_neighbour_frac", "max_hidden_frac", "max_chroma_shift", "max_misfit",
                     "misfit_sigma", "max_ref_dist"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v:
                raise ValueError(f"FlagThresholds.{name} must be a number, got {v!r}")
        if self.misfit_sigma < 0:
            raise ValueError("FlagThresholds.misfit_sigma must be >= 0")

#: Registry of fit quality flags (the ``fit_flags`` catalogue column).
FIT_FLAGS = {f.name: f for f in _FIT_FLAG_LIST}


def fit_flag_value(*names: str) -> int:
    """Integer value of the OR of named fit flags."""
    return _or_value(FIT_FLAGS, names, "fit")


def decode_fit_flags(value: int) -> list[str]:
    """Names of the fit flags set in one ``fit_flags`` value."""
    return _decode(FIT_FLAGS, value)


def fit_flags_description() -> str:
    """One-line description of the bits (the catalogue column description)."""
    return "bit flags, 0 = clean: " + ", ".join(f"{f.value} {f.name}" for f in _FIT_FLAG_LIST) + \
        " (musepayne.flags.FIT_FLAGS)"
