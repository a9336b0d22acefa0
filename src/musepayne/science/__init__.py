"""Working with catalogues: validation, selection, forecasts, calibrations.

* :mod:`~musepayne.science.validation` -- comparisons with reference catalogues and
  repeat-based error scaling (paper Eq. 10; defined in :mod:`~musepayne.science.stats` and
  :mod:`~musepayne.science.repeats`);
* :mod:`~musepayne.science.selection` -- the paper's cuts (Eq. 5, 6, 8) and a safe
  expression language;
* :mod:`~musepayne.science.forecast` -- precision vs S/N, magnitude and exposure time
  (Eq. 11-13, defined in :mod:`~musepayne.science.relations`) and Cramer-Rao bounds;
* :mod:`~musepayne.science.calibration` -- the [Mg/Fe]-Teff trend correction (App. A).

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`,
:mod:`musepayne.prepare`, :mod:`musepayne.models`, :mod:`musepayne.fit`; matplotlib only
inside plotting functions.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "calibration": ["MgFeTeffCalibration", "apply_region_offsets"],
        "forecast": ["cramer_rao", "limiting_vmag", "required_exptime", "sigma_from_snr", "snr_for_sigma"],
        "selection": ["Preset", "SelectionError", "best_per_star", "select"],
        "validation": ["Comparison", "compare", "repeat_error_factors"],
    },
)
