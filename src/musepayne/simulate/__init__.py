"""Mock MUSE cubes with known truth, for injection-recovery tests and the demo.

* :mod:`~musepayne.simulate.simulator` -- :class:`Simulator` / :class:`SimulateConfig`:
  a King-profile cluster plus field stars, Moffat PSF, sky, noise, written as an
  ESO-like cube with a truth table;
* :mod:`~musepayne.simulate.sources` -- spectrum sources (toy, any function, real libraries);
* :mod:`~musepayne.simulate.synthesis` -- spectra from a model on the MUSE grid;
* :mod:`~musepayne.simulate.toyspec` -- analytic toy spectra and the MUSE grid.

May import: every stage below :mod:`musepayne.fit` (instrument, io, prepare, extract, models).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "simulator": ["CallableSpectra", "LibrarySpectra", "SimulateConfig", "Simulator", "ToySpectra", "default_psf"],
        "synthesis": ["ModelSpectra", "globular_cluster_sampler"],
        "toyspec": ["muse_grid", "toy_spectrum"],
    },
)
