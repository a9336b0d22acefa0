"""Reading and writing: spectra, MUSE cubes, the prepared-spectra format, atomic FITS.

* :mod:`~musepayne.io.fits` -- atomic writes, format/version checks, checksums;
* :mod:`~musepayne.io.spectra` -- :class:`SpectrumSet`, the in-memory container of
  spectra on one grid;
* :mod:`~musepayne.io.readers` -- MUSE, LAMOST, MILES, STELIB readers and lazy,
  memory-mapped MUSE cubes (:class:`MuseCube`); the library readers are defined in
  :mod:`~musepayne.io.libraries`;
* :mod:`~musepayne.io.prepared` -- :class:`PreparedSpectra`, the interchange file
  between ``prepare`` and ``fit``;
* :mod:`~musepayne.io.batching` -- grouping spectra that share a grid.

May import: :mod:`musepayne.flags`, :mod:`musepayne.instrument`.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "batching": ["group_sets"],
        "fits": ["atomic_path", "atomic_write_fits", "atomic_write_json", "atomic_write_text", "check_format", "sha256_file"],
        "cube": ["MuseCube", "open_cube"],
        "prepared": ["PreparedSpectra"],
        "readers": [
            "detect_kind",
            "library_variance",
            "read_lamost",
            "read_miles",
            "read_miles_params",
            "read_muse_spectra",
            "read_spectra",
            "read_stelib",
        ],
        "spectra": ["ReaderError", "SpectrumSet"],
        "specutils": ["from_specutils", "read_specutils", "prepared_to_specutils"],
    },
)
