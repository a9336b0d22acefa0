"""The ``prepare`` stage: any spectrum -> the exact form a LAMOST-grid model expects.

* :mod:`~musepayne.prepare.preparer` -- :class:`Preparer` / :class:`PrepareConfig`;
* :mod:`~musepayne.prepare.resample` -- resolution matching and flux-conserving rebinning
  (never ``np.interp`` of flux), variance propagation;
* :mod:`~musepayne.prepare.normalize` -- the 50 A Payne-style pseudo-continuum;
* :mod:`~musepayne.prepare.masks` -- the standard/bulge wavelength masks and sky cleaning.

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "masks": ["clean_sky_residuals", "mode_mask"],
        "normalize": ["ContinuumNormalizer", "normalize"],
        "preparer": ["PrepareConfig", "Preparer", "prepare_spectra"],
        "resample": [
            "SpectralOperator",
            "broadening_matrix",
            "build_operator",
            "convolution_matrix",
            "kernel_sigma",
            "rebin_matrix",
            "rebin_variance",
            "effective_lsf",
        ],
    },
)
