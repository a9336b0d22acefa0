"""The ``fit`` stage: prepared spectra -> labels, RV, errors, flags -> catalogue.

* :mod:`~musepayne.fit.fitter` -- :class:`Fitter` / :class:`FitConfig` (paper Sect. 3.2), composed
  of :mod:`~musepayne.fit.forward` (Doppler shift, LSF-excess convolution, normal equations),
  :mod:`~musepayne.fit.operators` (LSF-excess operators), :mod:`~musepayne.fit.starts`
  (coarse RV, starting labels), :mod:`~musepayne.fit.lm` (batched Levenberg-Marquardt) and
  :mod:`~musepayne.fit.errors` (covariance, errors, per-spectrum results);
* :mod:`~musepayne.fit.catalogue` -- the label catalogue (paper Table 2): columns with
  units and descriptions, the Eq. 4 gradient-correlation flags, the metal-poor model
  combination, catalogue I/O (FITS, CSV, Parquet).

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`,
:mod:`musepayne.prepare`, :mod:`musepayne.models`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "catalogue": [
            "CatalogueStream",
            "apply_gradcorr",
            "build_catalogue",
            "catalogue_labels",
            "combine_metal_poor",
            "fit_flags",
            "label_columns",
            "merge_by_gradcorr",
            "read_catalogue",
            "write_catalogue",
        ],
        "fitter": ["FitArrays", "FitConfig", "Fitter", "doppler_factor"],
    },
)
