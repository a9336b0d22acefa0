"""Property-based fuzzing of the readers and the prepare stage.

(astropy's warnings about truncated or non-standard files are expected here and silenced.)

Every generated case must end in a specific ``ReaderError`` or in prepared rows
whose status is one of the registered names -- never in another exception --
and a broken spectrum must not change the result of the good ones in its batch.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musepayne.flags import SPECTRUM_STATUS
from musepayne.instrument.lsf import MUSE_LSF
from musepayne.io.readers import read_spectra
from musepayne.io.spectra import ReaderError, SpectrumSet
from musepayne.prepare.preparer import Preparer
from musepayne.simulate.toyspec import muse_grid, toy_spectrum

pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")

PREP = Preparer()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                 derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"))  # reproducible CI runs


def _meta(n):
    return Table({"stellar_id": [str(i) for i in range(n)], "ra": np.zeros(n), "dec": np.zeros(n),
                  "source": ["fuzz"] * n, "instrument": ["muse"] * n})


def _assert_rows_ok(prep, n):
    assert prep.flux.shape == (n, PREP.wave.size)
    assert set(prep.spectra["status"]) <= set(SPECTRUM_STATUS)
    assert np.all(np.isfinite(prep.ivar)) and np.all(prep.ivar >= 0)
    usable = np.isin(prep.spectra["status"], ["ok", "low_coverage"])
    assert np.all(prep.ivar[~usable] == 0)


corruption = st.sampled_from(["none", "nan", "inf", "neg_var", "zero_var", "all_nan", "huge", "spikes"])


@FUZZ
@given(kind=corruption, frac=st.floats(0, 1), npix=st.integers(0, 4000), crval=st.floats(-1e4, 2e4),
       cdelt=st.floats(-2, 5), unit=st.sampled_from(["Angstrom", "nm", "", "furlong", "um"]),
       seed=st.integers(0, 2**16), cut=st.floats(0.0, 1.0), truncate=st.booleans(),
       sigma_ext=st.sampled_from(["SIGMA", "ERR", "STAT", None]))
def test_fuzz_muse_1d_files(tmp_path_factory, kind, frac, npix, crval, cdelt, unit, seed, cut, truncate, sigma_ext):
    rng = np.random.default_rng(seed)
    f = rng.uniform(0, 1e3, npix).astype(np.float32)
    e = np.sqrt(np.abs(f) + 1).astype(np.float32)
    sel = rng.random(npix) < frac
    if kind == "nan":
        f[sel] = np.nan
    elif kind == "inf":
        e[sel] = np.inf
    elif kind == "neg_var":
        e[sel] = -1
    elif kind == "zero_var":
        e[sel] = 0
    elif kind == "all_nan":
        f[:] = np.nan
    elif kind == "huge":
        f[sel] = 1e38
    elif kind == "spikes":
        f[sel] *= 1e4
    ph = fits.PrimaryHDU(f)
    ph.header.update(CRVAL1=crval, CDELT1=cdelt, CRPIX1=1.0, CTYPE1="AWAV")
    if unit:
        ph.header["CUNIT1"] = unit
    hl = [ph] + ([fits.ImageHDU(e, name=sigma_ext)] if sigma_ext else [])
    p = tmp_path_factory.mktemp("fz") / "s.fits"
    fits.HDUList(hl).writeto(p)
    if truncate:
        b = p.read_bytes()
        p.write_bytes(b[: int(len(b) * cut)])
    try:
        s = read_spectra(p, kind="muse")
    except ReaderError as exc:
        assert str(exc)  # a specific message
        return
    _assert_rows_ok(PREP(s), s.n_spectra)


@FUZZ
@given(n_bad=st.integers(0, 5), kind=st.lists(corruption, min_size=5, max_size=5), seed=st.integers(0, 2**16),
       rv=st.floats(-600, 600))
def test_fuzz_batches_do_not_corrupt_neighbours(n_bad, kind, seed, rv):
    rng = np.random.default_rng(seed)
    w = muse_grid()
    good = toy_spectrum(w, rv_kms=rv) * 1e4
    n = 6
    f = np.tile(good, (n, 1)) + rng.normal(size=(n, w.size)) * 10
    v = np.full((n, w.size), 100.0)
    for i in range(n_bad):
        sel = rng.random(w.size) < rng.random()
        k = kind[i]
        row = i + 1
        if k in ("nan", "all_nan"):
            f[row, sel if k == "nan" else slice(None)] = np.nan
        elif k == "inf":
            v[row, sel] = np.inf
        elif k in ("neg_var", "zero_var"):
            v[row, sel] = -1.0 if k == "neg_var" else 0.0
        elif k == "huge":
            f[row, sel] = 1e300
        elif k == "spikes":
            f[row, sel] *= -50
    s = SpectrumSet(w, f, v, "air", MUSE_LSF, _meta(n))
    prep = PREP(s)
    _assert_rows_ok(prep, n)
    alone = PREP(s.select([0]))
    assert prep.spectra["status"][0] == "ok"
    # identical up to float32 summation order inside BLAS (which may depend on batch size)
    assert np.array_equal(np.isfinite(prep.flux[0]), np.isfinite(alone.flux[0]))
    assert np.allclose(prep.flux[0], alone.flux[0], rtol=1e-5, atol=0, equal_nan=True)
    assert np.allclose(prep.ivar[0], alone.ivar[0], rtol=5e-5, atol=0)


@FUZZ
@given(lo=st.floats(100, 12000), step=st.floats(0.01, 10), npix=st.integers(2, 3000),
       frame=st.sampled_from(["air", "vacuum"]), fwhm=st.floats(0, 20))
def test_fuzz_grids_and_lsfs(lo, step, npix, frame, fwhm):
    from musepayne.instrument.lsf import ConstantFWHM

    w = lo + step * np.arange(npix)
    f = np.ones((1, npix))
    s = SpectrumSet(w, f, np.ones((1, npix)), frame, ConstantFWHM(fwhm), _meta(1))
    prep = PREP(s)
    _assert_rows_ok(prep, 1)
    if prep.spectra["status"][0] == "ok":
        # a flat spectrum stays flat wherever it is used
        used = prep.ivar[0] > 0
        assert np.allclose(prep.flux[0][used], 1.0, atol=1e-5)


def test_fuzz_case_count():
    """The three fuzz tests above run 900 generated cases, plus the LAMOST/table cases below."""
    assert FUZZ.max_examples * 3 >= 900


@FUZZ
@given(rows=st.integers(0, 7), npix=st.integers(0, 4000), coeff=st.booleans(), seed=st.integers(0, 999),
       ivar_kind=st.sampled_from(["ok", "zero", "neg", "nan"]))
def test_fuzz_lamost_images(tmp_path_factory, rows, npix, coeff, seed, ivar_kind):
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 100, (rows, npix)).astype(np.float32)
    if rows >= 3 and npix:
        data[2] = 10 ** (3.5682 + 1e-4 * np.arange(npix))
    if rows >= 2:
        data[1] = {"ok": 1.0, "zero": 0.0, "neg": -1.0, "nan": np.nan}[ivar_kind]
    h = fits.PrimaryHDU(data)
    if coeff:
        h.header.update(COEFF0=3.5682, COEFF1=1e-4, TELESCOP="LAMOST")
    p = tmp_path_factory.mktemp("lm") / "l.fits"
    h.writeto(p)
    try:
        s = read_spectra(p, kind="lamost")
    except ReaderError as exc:
        assert str(exc)
        return
    _assert_rows_ok(PREP(s), s.n_spectra)
