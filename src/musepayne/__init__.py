"""musepayne: stellar labels for every resolved star in VLT/MUSE data cubes.

A library first, with the ``musepayne`` command line tool on top.  Data flow one
way through one subpackage per pipeline stage::

    cube --extract--> spectra --prepare--> prepared --fit--> labels --> catalogue

=====================  ============================================================
subpackage             owns
=====================  ============================================================
``instrument``         air/vacuum, wavelength grids, line-spread functions
``io``                 spectrum and cube readers, the prepared-spectra format, atomic FITS
``prepare``            resolution matching, flux-conserving rebinning, masks, continuum
``extract``            spectra from cubes: PSF fitting or apertures; Moffat PSF
``models``             Payne emulators, the Cannon, gradient templates, model files
``fit``                labels, RV, errors, flags; the label catalogue
``simulate``           mock MUSE cubes with truth (injection-recovery, demo)
``train``              training sets, DD-Payne training, cross-validation (PyTorch extra)
``science``            validation, selection (paper cuts), forecasts, calibrations
``pipeline``           resumable cube -> catalogue runs, surveys on Dask, the report
``cli``                the ``musepayne`` command (a thin layer over the above)
=====================  ============================================================

Entry points re-exported here (the README's two examples)::

    import musepayne as mp
    spectra = mp.read_spectra("star.fits")                     # MUSE/LAMOST/library file
    prepared = mp.Preparer(mp.PrepareConfig())(spectra)        # onto the model's grid
    catalogue = mp.Fitter(mp.load_model("default"))(prepared)  # astropy Table with units
    mp.write_catalogue(catalogue, "labels.fits")

    record = mp.Pipeline("out", mp.RunConfig()).run(["cube.fits"], "sources.csv")

One stage at a time: ``mp.Extractor(mp.ExtractConfig())(cube, sources)`` gives an
:class:`~musepayne.extract.ExtractionResult`.  The bit-flag registries (pixel mask,
spectrum status, fit flags) are in :mod:`musepayne.flags`; configuration files are read
by :mod:`musepayne.config`.
"""

__version__ = "0.1.0"

from ._lazy import attach  # noqa: E402

__getattr__, _dir, _public = attach(
    __name__,
    {
        "flags": ["PIXEL_FLAGS", "FIT_FLAGS", "FIT_STATUS", "SPECTRUM_STATUS"],
        "io": ["read_spectra", "open_cube", "MuseCube", "SpectrumSet", "PreparedSpectra"],
        "prepare": ["Preparer", "PrepareConfig", "prepare_spectra"],
        "extract": ["Extractor", "ExtractConfig", "ExtractionResult", "read_source_catalogue", "MoffatPSF"],
        "models": ["load_model", "SpectralModel"],
        "fit": ["Fitter", "FitConfig", "read_catalogue", "write_catalogue"],
        "pipeline": ["Pipeline", "RunConfig", "Survey", "SurveyConfig"],
        "science": ["select", "compare"],
        "simulate": ["Simulator", "SimulateConfig"],
    },
)
__all__ = ["__version__", *_public]


def __dir__():
    return list(__all__)
