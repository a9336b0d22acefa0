"""specutils interoperability: spectra in (Spectrum objects, tabular-fits files) and out."""

import numpy as np
import pytest
from astropy import units as u
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

from musepayne import PrepareConfig, Preparer, read_spectra
from musepayne.flags import EXCLUDING_BITS
from musepayne.instrument.lsf import MUSE_LSF
from musepayne.io import ReaderError, SpectrumSet, from_specutils, prepared_to_specutils, read_specutils
from musepayne.simulate import muse_grid, toy_spectrum

specutils = pytest.importorskip("specutils")
Spectrum = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D


def _toy(n=2, snr=80.0, seed=1):
    wave = muse_grid()
    flux = np.array([toy_spectrum(wave, teff_like=4500 + 800 * i) for i in range(n)]) * 1e3
    err = flux / snr
    flux = flux + np.random.default_rng(seed).normal(0, err)
    return wave, flux, err


def _set(wave, flux, err, ids):
    from astropy.table import Table

    n = len(ids)
    meta = Table({"stellar_id": ids, "ra": np.full(n, np.nan), "dec": np.full(n, np.nan),
                  "source": ["specutils"] * n, "instrument": ["specutils"] * n})
    return SpectrumSet(wave, flux, err**2, "air", MUSE_LSF, meta)


def test_spectrum_in_gives_the_same_prepared_spectra_as_the_arrays():
    wave, flux, err = _toy()
    spec = Spectrum(flux=flux * u.Unit("1e-20 erg / (s cm2 AA)"), spectral_axis=wave * u.AA,
                    uncertainty=StdDevUncertainty(err))
    before = spec.flux.value.copy()
    s = from_specutils(spec, frame="air", lsf="muse", stellar_id=["a", "b"])
    assert np.array_equal(spec.flux.value, before)  # the caller's object is untouched
    prep = Preparer(PrepareConfig())(s)
    ref = Preparer(PrepareConfig())(_set(wave, flux, err, ["a", "b"]))
    assert np.array_equal(prep.flux, ref.flux, equal_nan=True) and np.array_equal(prep.ivar, ref.ivar)


@pytest.mark.parametrize("make", [lambda e: VarianceUncertainty(e**2), lambda e: InverseVariance(1 / e**2)])
def test_every_uncertainty_type_gives_the_variance(make):
    wave, flux, err = _toy(1)
    s = from_specutils(Spectrum(flux=flux * u.Jy, spectral_axis=wave * u.AA, uncertainty=make(err)),
                       frame="air", lsf="muse")
    assert np.allclose(s.variance, err**2, rtol=1e-12)


def test_frequency_axis_and_nanometres_come_out_in_angstrom():
    wave, flux, err = _toy(1)
    nm = from_specutils(Spectrum(flux=flux * u.Jy, spectral_axis=(wave / 10) * u.nm,
                                 uncertainty=StdDevUncertainty(err)), frame="air", lsf="muse")
    freq = (wave * u.AA).to(u.Hz, equivalencies=u.spectral())[::-1]
    hz = from_specutils(Spectrum(flux=flux[:, ::-1] * u.Jy, spectral_axis=freq, uncertainty=StdDevUncertainty(err[:, ::-1])),
                        frame="air", lsf="muse")
    assert np.allclose(nm.wave, wave, rtol=1e-13) and np.allclose(hz.wave, wave, rtol=1e-12)
    assert np.array_equal(hz.flux, flux)


def test_mask_marks_bad_pixels():
    wave, flux, err = _toy(1)
    mask = np.zeros(flux.shape, bool)
    mask[0, 1000:1010] = True
    s = from_specutils(Spectrum(flux=flux * u.Jy, spectral_axis=wave * u.AA, uncertainty=StdDevUncertainty(err),
                                mask=mask), frame="air", lsf="muse")
    assert np.array_equal(s.bad, mask)


@pytest.mark.parametrize("kw, words", [({"lsf": "muse"}, "air or vacuum"), ({"frame": "air"}, "line-spread"),
                                       ({"frame": "air", "lsf": "nonsense"}, "unknown LSF")])
def test_missing_frame_or_lsf_is_a_clear_error(kw, words):
    wave, flux, err = _toy(1)
    with pytest.raises(ReaderError, match=words):
        from_specutils(Spectrum(flux=flux * u.Jy, spectral_axis=wave * u.AA, uncertainty=StdDevUncertainty(err)), **kw)


def test_no_uncertainty_is_refused():
    wave, flux, _ = _toy(1)
    with pytest.raises(ReaderError, match="no uncertainty"):
        from_specutils(Spectrum(flux=flux * u.Jy, spectral_axis=wave * u.AA), frame="air", lsf="muse")


def test_tabular_fits_file_round_trip(tmp_path):
    wave, flux, err = _toy(1)
    Spectrum(flux=flux[0] * u.Jy, spectral_axis=wave * u.AA, uncertainty=StdDevUncertainty(err[0])).write(
        tmp_path / "s.fits", format="tabular-fits")
    s = read_specutils(tmp_path / "s.fits", format="tabular-fits", frame="air", lsf="muse", stellar_id="x")
    assert np.allclose(s.flux, flux) and np.allclose(s.variance, err**2) and s.meta["stellar_id"][0] == "x"
    with pytest.raises(ReaderError, match="specutils cannot read"):
        (tmp_path / "junk.fits").write_bytes(b"not a fits file")
        read_specutils(tmp_path / "junk.fits", frame="air", lsf="muse")


def test_prepared_spectra_out_and_back(tmp_path):
    wave, flux, err = _toy(2)
    prep = Preparer(PrepareConfig())(_set(wave, flux, err, ["a", "b"]))
    spec = prepared_to_specutils(prep)
    assert spec.spectral_axis.unit == u.AA and np.array_equal(spec.flux.value, prep.flux, equal_nan=True)
    excluded = ((prep.mask.astype(np.int64) & EXCLUDING_BITS) != 0) | ~(prep.ivar > 0)
    assert np.array_equal(spec.mask, excluded) and spec.meta["frame"] == "vacuum" and spec.meta["lsf"] == "R=1800"
    back = from_specutils(spec)  # frame and LSF travel in meta
    assert np.array_equal(back.wave, prep.wave) and back.lsf.fwhm(6000.0) == pytest.approx(6000.0 / 1800)
    models = prepared_to_specutils(prep, model_flux=np.ones_like(prep.flux))
    assert np.all(models.flux.value == 1) and np.array_equal(models.uncertainty.array, prep.ivar)
    with pytest.raises(ValueError, match="does not match"):
        prepared_to_specutils(prep, model_flux=np.ones(3))


def test_real_giant_through_specutils_fits_the_same(shared):
    """The NGC 6397 giant read by musepayne, handed to specutils and back: identical labels."""
    from musepayne import Fitter, load_model

    s = read_spectra(shared / "muse" / "spectra" / "ngc6397_id10554_pampelmuse.fits")
    mask = None if s.bad is None else s.bad
    spec = Spectrum(flux=s.flux * u.Jy, spectral_axis=s.wave * u.AA,
                    uncertainty=VarianceUncertainty(s.variance), mask=mask)
    s2 = from_specutils(spec, frame=s.frame, lsf=s.lsf, stellar_id=list(s.meta["stellar_id"]))
    fitter = Fitter(load_model("default"))
    a = fitter(Preparer(PrepareConfig())(s))
    b = fitter(Preparer(PrepareConfig())(s2))
    for c in ("teff", "logg", "fe_h", "rv", "red_chi2"):
        assert np.array_equal(np.asarray(a[c]), np.asarray(b[c]), equal_nan=True), c
    assert 4700 < a["teff"][0] < 5150
