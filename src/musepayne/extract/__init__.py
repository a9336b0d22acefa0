"""The ``extract`` stage: one spectrum per catalogued star from a MUSE cube.

* :mod:`~musepayne.extract.extractor` -- :class:`Extractor` / :class:`ExtractConfig`:
  simultaneous PSF fitting of all stars layer by layer (PampelMUSE-like) or exact
  apertures; source catalogues; the catalogue -> cube coordinate transform;
* :mod:`~musepayne.extract.psf` -- the wavelength-dependent Moffat PSF
  (:class:`MoffatPSF`), which round-trips through FITS headers.

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "extractor": [
            "CoordinateTransform",
            "ExtractConfig",
            "ExtractionResult",
            "Extractor",
            "aperture_matrix",
            "circle_overlap",
            "factorise",
            "read_source_catalogue",
        ],
        "psf": ["MoffatPSF", "moffat_alpha", "moffat_profile", "psf_design_matrix"],
    },
)
