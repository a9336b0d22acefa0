"""musepayne: stellar labels for every resolved star in VLT/MUSE data cubes.

The package is a library first; the ``musepayne`` command line tool is a thin
layer on top of it.  Pipeline stages live in one module each:

- :mod:`musepayne.readers`   -- MUSE, LAMOST and stellar-library readers, lazy cubes
- :mod:`musepayne.wavelength` -- air/vacuum conversion and the LAMOST grid
- :mod:`musepayne.lsf`        -- line-spread functions (MUSE, LAMOST, libraries)
- :mod:`musepayne.resample`   -- resolution matching and flux-conserving rebinning
- :mod:`musepayne.normalize`  -- the Payne-style pseudo-continuum
- :mod:`musepayne.flags`      -- the pixel bit-mask and spectrum status registries
- :mod:`musepayne.prepare`    -- the ``prepare`` stage (spectra -> model grid)
- :mod:`musepayne.prepared`   -- the prepared-spectra interchange file format
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
