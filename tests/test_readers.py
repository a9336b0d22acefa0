"""Readers: real files of every kind, and clear errors for broken ones."""

import glob
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from musepayne.io.cube import open_cube
from musepayne.io.readers import (
    detect_kind,
    read_lamost,
    read_miles,
    read_miles_params,
    read_muse_spectra,
    read_spectra,
    read_stelib,
)
from musepayne.io.spectra import ReaderError, SpectrumSet
from musepayne.prepare.preparer import Preparer
from musepayne.simulate.toyspec import muse_grid, toy_spectrum


def _pampelmuse(path, flux, sigma, crval=4749.75, cdelt=1.25, cunit="Angstrom", with_sigma=True):
    ph = fits.PrimaryHDU(np.asarray(flux, np.float32))
    ph.header.update(CRVAL1=crval, CDELT1=cdelt, CRPIX1=1.0, CTYPE1="AWAV", CUNIT1=cunit)
    hl = [ph]
    if with_sigma:
        hl.append(fits.ImageHDU(np.asarray(sigma, np.float32), name="SIGMA"))
    fits.HDUList(hl).writeto(path)
    return path


def test_detect_kinds(shared):
    assert detect_kind(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits") == "muse"
    assert detect_kind(shared / "lamost/dr6_dr7/spec-58397-EG014118N254444M01_sp03-031.fits") == "lamost"
    assert detect_kind(sorted(glob.glob(str(shared / "lamost/dr1/SampleFits/*.fits")))[0]) == "lamost"
    assert detect_kind(shared / "libraries/miles/MILES_res2.50_star_m0001V.fits") == "miles"
    assert detect_kind(shared / "libraries/stelib/STELIB_v3.2_HD102224.fits") == "stelib"


def test_miles_labels(shared):
    t = read_miles_params(shared / "libraries/miles/paramsMILES_v9.1.txt")
    complete = np.isfinite(t["teff"]) & np.isfinite(t["logg"]) & np.isfinite(t["fe_h"])
    assert 940 <= complete.sum() <= 946  # 946 in the MILES database; one row has a corrupt id
    s = read_miles(shared / "libraries/miles/MILES_res2.50_star_m0001V.fits", params=t)
    assert s.meta["stellar_id"][0] == "MILES0001"
    assert (s.meta["teff"][0], s.meta["logg"][0], s.meta["fe_h"][0]) == (5305.0, 4.49, -0.75)
    assert s.frame == "air" and s.lsf.fwhm(5000.0) == 2.5 and s.synthetic_errors
    # cluster stars (names with spaces) are parsed
    row = t[t["miles_id"] == "0940"][0]
    assert (row["teff"], row["logg"], row["fe_h"]) == (4072.0, 1.71, 0.40)


def test_stelib_labels(shared):
    s = read_stelib(shared / "libraries/stelib/STELIB_v3.2_HD102224.fits")
    assert np.isfinite(s.meta["teff"][0]) and s.lsf.fwhm(6000.0) == 3.0


def test_lamost_layouts(shared):
    s7 = read_lamost(shared / "lamost/dr6_dr7/spec-58397-EG014118N254444M01_sp03-031.fits")
    assert s7.n_pix == 3909 and s7.frame == "vacuum"
    s1 = read_lamost(sorted(glob.glob(str(shared / "lamost/dr1/SampleFits/*.fits")))[0])
    assert s1.n_pix == 3904
    assert s7.bad is not None and s7.bad[0].sum() >= np.sum(s7.variance[0] == np.inf)


def test_lamost_dr9_coadd_table(tmp_path, shared):
    s = read_lamost(shared / "lamost/dr6_dr7/spec-58397-EG014118N254444M01_sp03-031.fits")
    ivar = np.where(np.isfinite(s.variance[0]), 1 / s.variance[0], 0)
    t = Table({"FLUX": [s.flux[0]], "IVAR": [ivar], "WAVELENGTH": [s.wave],
               "ANDMASK": [np.zeros(s.n_pix, np.int32)], "ORMASK": [np.zeros(s.n_pix, np.int32)]})
    h = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(t)])
    h[1].name = "COADD"
    p = tmp_path / "dr9.fits"
    h.writeto(p)
    s9 = read_spectra(p)
    assert s9.frame == "vacuum" and s9.n_pix == 3909
    a, b = Preparer()(s), Preparer()(s9)
    ok = (a.ivar[0] > 0) & (b.ivar[0] > 0)
    assert np.allclose(a.flux[0][ok], b.flux[0][ok], rtol=1e-5)


def test_muse_table_and_multi_spectrum_files(tmp_path):
    w = muse_grid()
    f = np.vstack([toy_spectrum(w), toy_spectrum(w, rv_kms=100)]) * 100
    e = np.sqrt(f)
    p2 = tmp_path / "two.fits"
    _pampelmuse(p2, f, e)
    s = read_spectra(p2)
    assert s.n_spectra == 2 and s.meta["stellar_id"][1].endswith("_1")
    t = Table({"stellar_id": ["a", "b"], "wave": [w, w], "flux": f, "err": e})
    p3 = tmp_path / "table.fits"
    t.write(p3)
    s3 = read_muse_spectra(p3)
    assert s3.n_spectra == 2 and list(s3.meta["stellar_id"]) == ["a", "b"]
    assert np.allclose(s3.variance, e**2)


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable FITS|truncated"),
    ("no_sigma", "no error extension"),
    ("nm", "look like nm"),
    ("all_nan", "NaN/inf everywhere"),
    ("zero_var", "zero, negative or non-finite everywhere"),
    ("not_fits", "not a readable FITS"),
])
def test_broken_files_give_specific_errors(tmp_path, case, message):
    w = muse_grid()
    f = toy_spectrum(w) * 100
    e = np.sqrt(f)
    p = tmp_path / f"{case}.fits"
    if case == "truncated":
        _pampelmuse(tmp_path / "ok.fits", f, e)
        data = (tmp_path / "ok.fits").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "no_sigma":
        _pampelmuse(p, f, e, with_sigma=False)
    elif case == "nm":
        _pampelmuse(p, f, e, crval=474.975, cdelt=0.125, cunit="")
    elif case == "all_nan":
        _pampelmuse(p, np.full_like(f, np.nan), e)
    elif case == "zero_var":
        _pampelmuse(p, f, np.zeros_like(e))
    elif case == "not_fits":
        p.write_text("this is not a FITS file\n")
    with pytest.raises(ReaderError, match=message):
        read_spectra(p, kind="muse")


def test_nm_with_unit_is_converted(tmp_path):
    w = muse_grid()
    f = toy_spectrum(w) * 100
    p = _pampelmuse(tmp_path / "nm.fits", f, np.sqrt(f), crval=474.975, cdelt=0.125, cunit="nm")
    s = read_spectra(p, kind="muse")
    assert s.wave[0] == pytest.approx(4749.75)


def test_bad_spectra_in_a_batch_become_status_rows():
    w = muse_grid()
    good = toy_spectrum(w) * 1e4
    f = np.vstack([good, np.full(w.size, np.nan), good, good])
    v = np.vstack([good / 100, good / 100, np.zeros(w.size), good / 100])
    v[3, :] = np.where(w < 9000, np.inf, v[3])  # nearly everything bad
    meta = Table({"stellar_id": ["a", "b", "c", "d"], "ra": [0.0] * 4, "dec": [0.0] * 4,
                  "source": ["x"] * 4, "instrument": ["muse"] * 4})
    s = SpectrumSet(w, f, v, "air", __import__("musepayne.instrument.lsf").instrument.lsf.MUSE_LSF, meta)
    f0, v0 = f.copy(), v.copy()
    prep = Preparer()(s)
    assert list(prep.spectra["status"]) == ["ok", "no_valid_pixels", "bad_variance", "no_valid_pixels"]
    assert np.all(prep.ivar[1:] == 0)
    # the good spectrum equals the same spectrum prepared alone
    alone = Preparer()(s.select([0]))
    assert np.allclose(prep.flux[0], alone.flux[0], equal_nan=True)
    assert np.array_equal(f, f0, equal_nan=True) and np.array_equal(v, v0)


def test_udf_cube_lazy(shared):
    path = shared / "muse/cubes/udf_subcube_mosaic.fits"
    with open_cube(path) as cube:
        assert cube.shape == (500, 30, 30)
        assert cube.wave[0] == pytest.approx(4750.0) and cube.wave[1] - cube.wave[0] == pytest.approx(1.25)
        assert cube.frame == "air"
        ra, dec = cube.wcs.wcs_pix2world([[0, 0]], 0)[0]
        assert ra == pytest.approx(53.16, abs=0.05) and dec == pytest.approx(-27.8, abs=0.05)
        blk = cube.data_block(10, 20)
        assert blk.dtype == np.float32 and blk.shape == (10, 30, 30)
        st = cube.stat_block(10, 20)
        assert np.nanmedian(st) > 0
        d, s = cube.spectrum(5, 7)
        with fits.open(path) as h:
            assert np.allclose(d, h["DATA"].data[:, 7, 5], equal_nan=True)


def test_mpdaf_cube(shared):
    with open_cube(shared / "muse/cubes/mpdaf_CUBE.fits") as cube:
        assert cube.shape == (1595, 10, 20)
        assert cube.wave[0] == pytest.approx(7300.0)
        assert cube.data_block(0, 5).dtype == np.float32  # DATA is float64 on disk


def test_corrupt_cubes(tmp_path, shared):
    src = shared / "muse/cubes/udf_subcube_mosaic.fits"
    with fits.open(src) as h:
        no_stat = fits.HDUList([h[0].copy(), h["DATA"].copy()])
        no_stat.writeto(tmp_path / "nostat.fits")
        swapped = h["DATA"].copy()
        swapped.data = np.ascontiguousarray(np.moveaxis(h["DATA"].data, 0, 2))
        hd = swapped.header
        for k in ("CTYPE", "CUNIT", "CRVAL", "CRPIX"):
            hd[f"{k}1"], hd[f"{k}3"] = hd[f"{k}3"], hd[f"{k}1"]
        fits.HDUList([h[0].copy(), swapped, h["STAT"].copy()]).writeto(tmp_path / "swapped.fits")
    with pytest.raises(ReaderError, match="no STAT"):
        open_cube(tmp_path / "nostat.fits")
    with open_cube(tmp_path / "nostat.fits", allow_missing_stat=True) as c:
        assert c.stat_block(0, 2) is None
    with pytest.raises(ReaderError, match="wrong axis order|no wavelength axis"):
        open_cube(tmp_path / "swapped.fits")
    shutil.copy(src, tmp_path / "nan.fits")
    with fits.open(tmp_path / "nan.fits", mode="update") as h:
        h["DATA"].data[3] = np.nan
    with open_cube(tmp_path / "nan.fits") as c:
        nl = c.nan_layers()
        assert nl[3] and nl.sum() == 1
