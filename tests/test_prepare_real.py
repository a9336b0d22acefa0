"""Issue 2 must-be-true checks on real data (../shared/data)."""

import glob

import numpy as np
import pytest

from musepayne.flags import EXCLUDING_BITS, flag_value
from musepayne.instrument.lsf import MUSE_LSF
from musepayne.io.readers import read_lamost, read_miles, read_muse_spectra, read_spectra, read_stelib
from musepayne.io.spectra import SpectrumSet
from musepayne.prepare.masks import TELLURIC_STANDARD
from musepayne.prepare.preparer import PrepareConfig, Preparer
from musepayne.prepare.resample import broadening_matrix, build_operator
from musepayne.simulate.toyspec import muse_grid

#: vacuum windows with few strong lines in FGK spectra at R ~ 1800 (used to check normalisation)
LINE_FREE = ((6080, 6100), (6690, 6710), (7040, 7100), (7400, 7500), (7860, 7890), (8020, 8080), (8380, 8420))


@pytest.fixture(scope="module")
def preparer():
    return Preparer()


def _line_free_median(prep):
    w = prep.wave
    sel = np.zeros(w.size, bool)
    for a, b in LINE_FREE:
        sel |= (w > a) & (w < b)
    return np.array([np.nanmedian(f[sel & (iv > 0)]) for f, iv in zip(prep.flux, prep.ivar)])


def _check_masks(prep):
    w = prep.wave
    for lo, hi in TELLURIC_STANDARD:
        assert np.all(prep.ivar[:, (w > lo) & (w < hi)] == 0)
    assert np.all(prep.ivar[:, (w > 5720) & (w < 6060)] == 0)  # dichroic
    assert np.all(prep.ivar[:, w > 8750] == 0)
    assert np.all(prep.ivar[(prep.mask & EXCLUDING_BITS) != 0] == 0)


def test_ngc6397_muse_spectrum(shared, preparer):
    s = read_muse_spectra(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits")
    assert s.frame == "air" and s.n_pix == 3680
    prep = preparer(s)
    assert prep.spectra["status"][0] == "ok"
    assert abs(_line_free_median(prep)[0] - 1) < 0.03
    _check_masks(prep)
    w = prep.wave
    assert np.all(prep.ivar[0, w < 4750] == 0)  # MUSE does not cover it
    assert prep.spectra["n_used"][0] > 1500
    # MUSE is coarser than LAMOST in the blue: flagged, excess recorded, not sharpened
    blue = (w > 4800) & (w < 5000)
    assert np.all(prep.mask[0, blue] & flag_value("RES_COARSE"))
    assert np.all(prep.lsf_excess[0, blue] > 0.5)
    assert np.all(prep.lsf_excess[0, (w > 6000) & (w < 8700)] == 0)


def test_westerlund2_extended_mode(shared, preparer):
    s = read_spectra(shared / "muse/spectra/westerlund2_musepack_star.fits")
    assert s.n_pix == 3800 and s.wave[0] == pytest.approx(4600.22, abs=0.01)
    prep = preparer(s)
    assert prep.spectra["status"][0] == "ok"


def test_lamost_spectra(shared, preparer):
    files = sorted(glob.glob(str(shared / "lamost/dr6_dr7/*.fits*")))
    files += sorted(glob.glob(str(shared / "lamost/dr1/SampleFits/*.fits")))[:20]
    for f in files:
        prep = preparer(read_lamost(f))
        row = prep.spectra[0]
        assert row["status"] == "ok", (f, row["reason"])
        _check_masks(prep)
        if row["snr"] > 30:  # noisy spectra scatter the line-free median more than 3 %
            assert abs(_line_free_median(prep)[0] - 1) < 0.03, f


def test_lamost_passthrough_keeps_lines(shared, preparer):
    """A LAMOST spectrum through prepare == its own normalised original (0.2 % rms)."""
    for f in [shared / "lamost/dr6_dr7/spec-58397-EG014118N254444M01_sp03-031.fits",
              sorted(glob.glob(str(shared / "lamost/dr1/SampleFits/*.fits")))[0]]:
        s = read_lamost(f)
        prep = preparer(s)
        n = s.n_pix
        assert np.allclose(s.wave, preparer.wave[:n], rtol=1e-12)
        iv = np.where(s.bad[0], 0.0, 1.0 / s.variance[0])
        orig = np.full(preparer.wave.size, np.nan)
        orig_iv = np.zeros(preparer.wave.size)
        orig[:n], orig_iv[:n] = s.flux[0], iv
        fn, ivn, _, _ = preparer.normalize(orig[None], orig_iv[None],
                                           input_range=(s.wave[0], s.wave[-1]))
        use = (prep.ivar[0] > 0) & (ivn[0] > 0)
        ratio = prep.flux[0][use] / fn[0][use]
        assert use.sum() > 1500  # 4750-8750 A minus masks (continuum range is MUSE-matched)
        assert np.sqrt(np.mean((ratio - 1) ** 2)) < 0.002


def _muse_version(s: SpectrumSet) -> SpectrumSet:
    """A library spectrum observed as MUSE: MUSE LSF, 1.25 A air sampling (noise-free)."""
    mg = muse_grid()
    op = build_operator(s.wave, s.frame, s.lsf, mg, MUSE_LSF, frame_out="air")
    ok = op.coverage > 0.999
    f = op.apply(s.flux)
    v = op.apply_variance(s.variance)
    return SpectrumSet(mg, np.where(ok, f, np.nan), np.where(ok, v, np.inf), "air", MUSE_LSF, s.meta)


@pytest.mark.parametrize("star", ["m0001", "m0292", "m0777", "m0583"])
def test_resolution_consistency_miles(shared, preparer, star):
    """MILES star -> MUSE -> prepare agrees with MILES -> LAMOST directly (rms < 0.005)."""
    s = read_miles(shared / f"libraries/miles/MILES_res2.50_star_{star}V.fits")
    direct = preparer(s)
    via = preparer(_muse_version(s))
    w = preparer.wave
    use = (direct.ivar[0] > 0) & (via.ivar[0] > 0) & (w > 4750) & (w < 8750)
    assert use.sum() > 1000
    matched = use & ((via.mask[0] & flag_value("RES_COARSE")) == 0)
    d = via.flux[0] - direct.flux[0]
    assert np.sqrt(np.mean(d[matched] ** 2)) < 0.005
    # below ~5150 A the MUSE data are broader than LAMOST; forward-modelling the recorded
    # excess onto the direct (model-like) spectrum brings all used pixels into agreement
    B = broadening_matrix(w, via.lsf_excess[0])
    d2 = via.flux[0] - B @ np.nan_to_num(direct.flux[0], nan=1.0)
    assert np.sqrt(np.mean(d2[use] ** 2)) < 0.005
    assert np.sqrt(np.mean(d2[use] ** 2)) < np.sqrt(np.mean(d[use] ** 2))


def test_resolution_consistency_stelib(shared, preparer):
    s = read_stelib(shared / "libraries/stelib/STELIB_v3.2_HD102224.fits")
    direct = preparer(s)
    via = preparer(_muse_version(s))
    w = preparer.wave
    use = (direct.ivar[0] > 0) & (via.ivar[0] > 0) & (w > 4750) & (w < 8750)
    matched = use & ((via.mask[0] & flag_value("RES_COARSE")) == 0) & ((direct.mask[0] & flag_value("RES_COARSE")) == 0)
    d = via.flux[0] - direct.flux[0]
    assert matched.sum() > 1000
    assert np.sqrt(np.mean(d[matched] ** 2)) < 0.005


def test_error_propagation_noise_realisations(shared, preparer):
    """Scatter of each prepared pixel over 400 noise realisations matches 1/sqrt(ivar)."""
    s = read_muse_spectra(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits")
    rng = np.random.default_rng(42)
    n = 400
    # degrade to S/N ~ 50 so the continuum is not noise-free
    sig = np.sqrt(s.variance[0]) * 8.0
    flux = s.flux[0] + rng.normal(size=(n, s.n_pix)) * sig
    batch = SpectrumSet(s.wave, flux, np.broadcast_to(sig**2, flux.shape), "air", s.lsf,
                        s.meta[[0] * n])
    prep = preparer(batch)
    used = np.all(prep.ivar > 0, axis=0)
    scatter = np.std(prep.flux[:, used], axis=0, ddof=1)
    predicted = np.median(1.0 / np.sqrt(prep.ivar[:, used]), axis=0)
    ratio = scatter / predicted
    assert used.sum() > 1500
    assert abs(np.median(ratio) - 1) < 0.05
    # 400 realisations measure a std to 3.5 %: nearly all pixels must be within 10 %
    assert np.mean(np.abs(ratio - 1) < 0.10) > 0.97


def test_bulge_mode_and_sky_cleaning(shared):
    s = read_muse_spectra(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits")
    flux = s.flux.copy()
    k = np.argmin(np.abs(s.wave - 6300.3))  # [O I] 6300 sky line residual
    flux[0, k - 1:k + 2] += 40 * np.sqrt(s.variance[0, k])
    dirty = SpectrumSet(s.wave, flux, s.variance, "air", s.lsf, s.meta)
    bulge = Preparer(PrepareConfig(mode="bulge"))
    prep = bulge(dirty)
    clean = bulge(s)
    w = prep.wave
    assert np.all(prep.ivar[0, w < 5991] == 0)
    near = (w > 6295) & (w < 6310)
    assert np.any(prep.mask[0, near] & flag_value("SKY_RESIDUAL"))
    # after replacement the spectrum near the line agrees with the clean one
    assert np.nanmax(np.abs(prep.flux[0, near] - clean.flux[0, near])) < 0.01
    assert prep.spectra["snr"][0] == pytest.approx(clean.spectra["snr"][0], rel=0.02)
    # the standard mode would not have masked the blue part
    assert Preparer()(s).spectra["n_used"][0] > prep.spectra["n_used"][0]


def test_ao_notch_masked(shared):
    s = read_muse_spectra(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits")
    prep = Preparer(PrepareConfig(mode="bulge", ao_notch="WFM-AO-E"))(s)
    w = prep.wave
    assert np.all(prep.mask[0, (w > 5760) & (w < 6000)] & flag_value("AO_NOTCH"))


@pytest.mark.shared
def test_shared_preparer_in_two_threads_equals_serial(shared):
    """One Preparer (its operator cache filled concurrently) used from 2 threads gives, spectrum for
    spectrum, the arrays of serial use: the documented thread-safety of a shared Preparer."""
    from concurrent.futures import ThreadPoolExecutor

    files = [shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits", shared / "muse/spectra/westerlund2_musepack_star.fits"]
    files += sorted(glob.glob(str(shared / "lamost/dr1/SampleFits/*.fits")))[:6]
    files += [shared / "libraries/stelib/STELIB_v3.2_HD102224.fits"]
    sets = [read_spectra(f) for f in files]
    serial = [Preparer()(s) for s in sets]                 # a fresh Preparer per spectrum: no shared cache
    shared_prep = Preparer()                               # one instance, empty cache, used by both threads
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(shared_prep, sets * 2))   # every grid requested by both threads
    grids = {(np.asarray(s.wave, np.float64).tobytes(), s.frame, s.lsf.describe()) for s in sets}
    assert len(grids) >= 3 and len(shared_prep._ops) == len(grids)  # one cached operator per input grid
    for k, got in enumerate(threaded):
        ref = serial[k % len(sets)]
        assert list(got.spectra["status"]) == list(ref.spectra["status"])
        assert np.all(ref.ivar.sum(axis=1) > 0)                 # real prepared spectra, not failure rows
        for name in ("flux", "ivar", "mask", "cont", "lsf_excess"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=f"{files[k % len(sets)]}: {name}")
