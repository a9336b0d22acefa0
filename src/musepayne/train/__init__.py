"""Training models and cross-validating them (PyTorch is imported only when training runs).

* :mod:`~musepayne.train.trainset` -- training sets from MILES/STELIB; library stars
  observed as MUSE or LAMOST;
* :mod:`~musepayne.train.trainer` -- DD-Payne training with gradient regularisation,
  the model's intrinsic scatter (the torch networks and the optimisation loop are in
  :mod:`~musepayne.train.network`);
* :mod:`~musepayne.train.benchcal` -- building the benchmark-scale calibration (hold-out models,
  cross-validation over the Gaia FGK benchmark stars);
* :mod:`~musepayne.train.crossval` -- K-fold cross-validation on library stars.

May import: every stage up to :mod:`musepayne.fit`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "benchcal": ["BenchCalConfig", "calibrate", "fit_calibration", "cross_validate_calibration"],
        "crossval": ["CVConfig", "cross_validate", "cv_summary", "run_cv"],
        "trainer": ["TrainConfig", "TrainResult", "estimate_scatter", "train_model"],
        "trainset": ["TrainingSet", "TrainsetCuts", "build_trainset", "simulate_lamost_observation", "simulate_muse_observation"],
    },
)
