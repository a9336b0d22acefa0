"""The ``extract`` stage: one spectrum per catalogued star from a MUSE cube.

* :mod:`~musepayne.extract.extractor` -- :class:`Extractor` / :class:`ExtractConfig`:
  simultaneous PSF fitting of all stars layer by layer (PampelMUSE-like) or exact
  apertures, step by step;
* :mod:`~musepayne.extract.sources` -- source catalogues (:func:`read_source_catalogue`);
* :mod:`~musepayne.extract.transform` -- the catalogue -> cube coordinate transform;
* :mod:`~musepayne.extract.imagefit` -- crowded-field image fits (transform, PSF shape);
* :mod:`~musepayne.extract.linsolve` -- the normal-equation solves (:func:`factorise`);
* :mod:`~musepayne.extract.apertures` -- exact apertures and annulus sky;
* :mod:`~musepayne.extract.result` -- :class:`ExtractionResult`, its files, the SOURCES table;
* :mod:`~musepayne.extract.fields`, :mod:`~musepayne.extract.blocks` -- field geometry, cube streaming;
* :mod:`~musepayne.extract.psf` -- the wavelength-dependent Moffat PSF
  (:class:`MoffatPSF`), which round-trips through FITS headers;
* :mod:`~musepayne.extract.detect` -- star detection from the cube alone.

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`, :mod:`musepayne.io`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "extractor": ["ExtractConfig", "Extractor"],
        "result": ["ExtractionResult"],
        "transform": ["CoordinateTransform"],
        "apertures": ["aperture_matrix", "circle_overlap"],
        "linsolve": ["factorise"],
        "sources": ["read_source_catalogue"],
        "psf": ["MoffatPSF", "moffat_alpha", "moffat_profile", "psf_design_matrix"],
    },
)
