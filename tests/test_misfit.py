"""The catastrophic-misfit test (fit flag MISFIT, catalogue column ``misfit``)."""

import numpy as np
import pytest
from astropy.table import Table

from fit_helpers import as_prepared
from musepayne.fit.catalogue import apply_quality_flags, misfit_reference, model_misfit
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.flags import FIT_FLAGS, FlagThresholds, decode_fit_flags
from musepayne.models.files import load_model

MISFIT = FIT_FLAGS["MISFIT"].value


def test_model_misfit_recovers_the_excess_and_its_noise():
    """Residuals with noise e and an extra model mismatch of k^2 s^2: misfit = k^2, whatever e / s."""
    rng = np.random.default_rng(3)
    n = 1400
    s = 0.008
    for e, k2 in ((0.01, 1.0), (0.01, 2.5), (0.002, 2.5), (0.04, 4.0)):
        got = []
        for _ in range(200):
            r = rng.normal(0, np.sqrt(e ** 2 + k2 * s ** 2), n)
            x = np.mean(r ** 2 / e ** 2)
            y = np.mean(r ** 2 / (e ** 2 + s ** 2))
            m, me = model_misfit([x], [y], [n])
            got.append((m[0], me[0]))
        got = np.array(got)
        assert abs(np.mean(got[:, 0]) - k2) < 0.05 * k2 + 3 * np.std(got[:, 0]) / np.sqrt(len(got))
        # the quoted noise is the scatter over noise realisations (within 15 %)
        assert 0.85 < np.std(got[:, 0]) / np.median(got[:, 1]) < 1.15
    # undefined without a model scatter (red_chi2_model NaN) or for failed fits
    m, me = model_misfit([2.0, np.nan, 1.5], [np.nan, np.nan, 1.5], [100, 0, 100])
    assert np.all(np.isnan(m)) and np.all(np.isnan(me))


def test_misfit_flag_thresholds_and_reflagging():
    cat = Table({"misfit": [1.0, 3.5, 3.5, np.nan], "misfit_err": [0.05, 0.05, 0.5, np.nan],
                 "fit_flags": np.array([0, 0, 0, FIT_FLAGS["FAILED"].value], np.int32)})
    apply_quality_flags(cat)  # default: (misfit - 2 misfit_err) / misfit_ref > 3, misfit_ref 1 when absent
    assert [decode_fit_flags(int(v)) for v in cat["fit_flags"]] == [[], ["MISFIT"], [], ["FAILED"]]
    # the quality bits are recomputed: a looser threshold clears MISFIT, the fit's own bits stay
    apply_quality_flags(cat, FlagThresholds(max_misfit=3.5))
    assert [decode_fit_flags(int(v)) for v in cat["fit_flags"]] == [[], [], [], ["FAILED"]]
    apply_quality_flags(cat, FlagThresholds(misfit_sigma=0.0))
    assert [decode_fit_flags(int(v)) for v in cat["fit_flags"]] == [[], ["MISFIT"], ["MISFIT"], ["FAILED"]]
    # relative to the model's reference at the fitted labels (floor 0.5); SPARSE_LABELS from ref_dist
    rel = Table({"misfit": [3.5, 2.0, 1.4], "misfit_err": [0.05] * 3, "misfit_ref": [2.0, 0.6, 0.1],
                 "ref_dist": [2.0, 7.0, np.nan], "fit_flags": np.zeros(3, np.int32)})
    apply_quality_flags(rel)
    assert [decode_fit_flags(int(v)) for v in rel["fit_flags"]] == [[], ["MISFIT", "SPARSE_LABELS"], []]
    # an older catalogue without the columns: misfit from red_chi2 / red_chi2_model (here 11 x 4 / 8 = 5.5)
    old = Table({"red_chi2": [12.0], "red_chi2_model": [4.0], "n_pix_used": [1390], "fit_flags": np.zeros(1, np.int32)})
    apply_quality_flags(old)
    assert decode_fit_flags(int(old["fit_flags"][0])) == ["MISFIT"]
    with pytest.raises(ValueError):
        FlagThresholds(max_misfit="high")


def test_misfit_reference_is_the_local_median():
    """misfit_ref: median misfit of the 25 nearest reference stars (Eq. 4 metric); ref_dist: 5th nearest."""
    rng = np.random.default_rng(2)
    n = 400
    ref = Table({"teff": rng.uniform(4000, 7000, n), "logg": rng.uniform(1, 5, n), "fe_h": rng.uniform(-2, 0.5, n)})
    ref["misfit"] = np.where(ref["teff"] < 4500, 3.0, 0.6)  # cool stars: the model does worse everywhere
    lab = np.array([[4100.0, 2.0, -0.5], [6000.0, 4.0, -0.5], [np.nan, 4.0, 0.0], [5500.0, 4.0, 3.0]])
    mref, dist = misfit_reference(ref, lab, ["teff", "logg", "fe_h"])
    assert mref[0] == pytest.approx(3.0) and mref[1] == pytest.approx(0.6) and np.isnan(mref[2])
    d = np.sqrt((((np.column_stack([ref["teff"], ref["logg"], ref["fe_h"]]) - lab[3]) / [100, 0.2, 0.1]) ** 2).sum(1))
    assert dist[3] == pytest.approx(np.sort(d)[4]) and dist[3] > 25  # [Fe/H] +3: far from every reference star
    m0, d0 = misfit_reference(None, lab, ["teff", "logg", "fe_h"])
    assert np.array_equal(m0[:2], [1.0, 1.0]) and np.all(np.isnan(d0))


def test_misfit_does_not_flag_stars_the_model_describes():
    """Spectra of the default model at known labels, with a deviation of the model's own
    intrinsic scatter and noise at S/N 20, 50 and 100: ``misfit`` ~1 and (almost) none flagged;
    the same spectra with a mismatch 4x the scatter (16x its variance) are flagged at S/N 50 and 100
    (``misfit`` treats noise and scatter as constant over the pixels; with the default model's
    pixel-to-pixel scatter it reads such a mismatch as less than 16)."""
    model = load_model("default")
    rng = np.random.default_rng(11)
    n = 60
    lab = np.column_stack([rng.uniform(4300, 6800, n), rng.uniform(1.0, 4.7, n), rng.uniform(-1.8, 0.3, n)])
    clean = model.predict(lab)
    s = np.asarray(model.scatter, float)
    fitter = Fitter(model, FitConfig())
    for snr in (20.0, 50.0, 100.0):
        for k, expect in ((1.0, "clean"), (4.0, "misfit")):
            flux = clean + k * s * rng.standard_normal(clean.shape) + rng.standard_normal(clean.shape) / snr
            cat = fitter.catalogue(*_fit(fitter, model.wave, flux, snr))
            flagged = (np.asarray(cat["fit_flags"]) & MISFIT) > 0
            mf = np.asarray(cat["misfit"], float)
            if expect == "clean":
                assert 0.7 < np.median(mf) < 1.3, (snr, np.median(mf))
                assert flagged.mean() <= 0.05, (snr, flagged.mean())
            elif snr >= 50:
                assert 8 < np.median(mf) < 20, (snr, np.median(mf))  # 4^2 = 16
                assert flagged.mean() >= 0.9, (snr, flagged.mean())


def _fit(fitter, wave, flux, snr):
    ps = as_prepared(wave, flux, np.full(flux.shape, snr ** 2))
    ps.spectra["snr"] = np.full(len(flux), snr)
    return ps.spectra, fitter.fit_arrays(ps)


@pytest.mark.shared
def test_arcturus_misfit_is_flagged(shared):
    """The MILES spectrum of Arcturus (HD 124897; Gaia benchmark 4277 K / 1.58 / -0.55) observed as
    MUSE at S/N 100 fits ~450 K too hot and ~1.4 dex too high in log g at red_chi2_model ~2, under
    HIGH_CHI2: MISFIT flags it (and keeps it out of the reliable rows)."""
    from musepayne.io.prepared import PreparedSpectra
    from musepayne.io.readers import read_miles
    from musepayne.prepare.preparer import PrepareConfig, Preparer
    from musepayne.science.selection import select
    from musepayne.train.trainset import simulate_muse_observation

    nat = read_miles(shared / "libraries" / "miles" / "MILES_res2.50_star_m0501V.fits")
    assert "124897" in str(nat.meta["name"])
    prep = Preparer(PrepareConfig())
    rng = np.random.default_rng(5)
    ps = PreparedSpectra.concatenate([prep(simulate_muse_observation(nat, 100.0, rng)) for _ in range(3)])
    fitter = Fitter(load_model("default"), FitConfig())
    cat = fitter.catalogue(ps.spectra, fitter.fit_arrays(ps))
    teff, logg = np.asarray(cat["teff"], float), np.asarray(cat["logg"], float)
    assert np.all(teff - 4277 > 300) and np.all(logg - 1.58 > 0.8)  # the catastrophic misfit
    assert np.all(np.asarray(cat["red_chi2_model"], float) < 3)  # that HIGH_CHI2 misses
    assert np.all(np.asarray(cat["misfit"], float) > 2.2)
    assert np.all((np.asarray(cat["fit_flags"]) & MISFIT) > 0)
    assert len(select(cat, preset="reliable")) == 0


def test_model_reads_its_misfit_reference(tmp_path):
    """load_model attaches ``<model>.misfitref.fits``; a reference without the needed columns is a clear error."""
    from musepayne.models.files import misfit_reference_path
    from musepayne.models.model import ModelError

    model = load_model("default")
    ref = model.misfit_reference
    assert ref is not None and len(ref) > 900 and {"teff", "logg", "fe_h", "misfit"} <= set(ref.colnames)
    # the CV stars' typical misfit is ~1 (the scatter is measured so that validation stars reach ~1)
    assert 0.4 < np.median(ref["misfit"]) < 1.2
    path = tmp_path / "m.fits"
    model.save(path)
    assert load_model(path).misfit_reference is None  # no sidecar: no reference (misfit_ref 1)
    Table({"teff": [5000.0], "misfit": [1.0]}).write(misfit_reference_path(path))
    with pytest.raises(ModelError, match="lacks"):
        load_model(path)
