"""Spectral models: Payne emulators, the Cannon, gradient templates; the model file format.

* :mod:`~musepayne.models.model` -- :class:`SpectralModel` (per-pixel and MLP Payne);
* :mod:`~musepayne.models.files` -- :func:`load_model` (``"default"`` is the model shipped in this
  folder, with its templates ``default.templates.fits``), imports of external Payne networks;
* :mod:`~musepayne.models.cannon` -- a quadratic Cannon in the same interface (the
  cross-validation baseline);
* :mod:`~musepayne.models.benchcal` -- the Gaia FGK benchmark-scale calibration a model file carries
  (post-fit label map and systematic errors, HDU ``BENCHCAL``);
* :mod:`~musepayne.models.gradients` -- theoretical gradient templates d f / d label
  (paper Eq. 4) for regularisation and the per-label flags;
* :mod:`~musepayne.models.emulator` -- the Cannon emulator of synthetic spectra the templates are
  built from, and the reference-star grid.

The shipped default model (``default.fits``) lives in this folder.

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`,
:mod:`musepayne.prepare` (templates are prepared like data).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "benchcal": ["BenchmarkCalibration", "read_benchmarks", "match_benchmarks"],
        "cannon": ["CannonConfig", "CannonModel", "train_cannon"],
        "gradients": ["CannonEmulator", "GradientTemplates", "build_templates", "default_emulator_path"],
        "model": ["MLPPayne", "ModelError", "PerPixelPayne", "SpectralModel"],
        "files": ["load_model", "import_payne_npz", "templates_path"],
    },
)
