"""Instrument facts: wavelength frames and grids, line-spread functions.

Owns the physics shared by every stage: air <-> vacuum (IAU, Morton 2000 /
Ciddor 1996), the LAMOST and MUSE wavelength grids, and the LSFs of MUSE
(Bacon et al. 2017), LAMOST and the stellar libraries.

May import: numpy/scipy only (this is the bottom layer, with
:mod:`musepayne.flags`).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "lsf": ["LSF", "ConstantFWHM", "ConstantResolvingPower", "MuseLSF", "TabulatedLSF", "lsf_from_spec", "lsf_to_spec"],
        "wavelength": [
            "C_KMS",
            "air_to_vacuum",
            "bin_edges",
            "lamost_wavelength",
            "linear_grid",
            "log_linear_grid",
            "vacuum_to_air",
        ],
    },
)
