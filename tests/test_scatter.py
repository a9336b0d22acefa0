"""The model's intrinsic per-pixel scatter: estimated from held-out spectra, written to the
model file, and added to the variance by the fitter (error calibration with model error)."""

import numpy as np
import pytest

from fit_helpers import as_prepared
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.models.model import load_model
from musepayne.testing import toy_mlp_model
from musepayne.train.trainer import estimate_scatter

SIG = 0.01  # photon noise
S_TRUE = 0.02  # extra, star-to-star scatter the model cannot predict, on every third pixel


@pytest.fixture(scope="module")
def toy():
    names = ("teff", "logg", "fe_h")
    return toy_mlp_model(lamost_wavelength()[:1500], label_names=names, hidden=(32, 32), n_lines=200, seed=3,
                         x_min=np.array([4000.0, 1.0, -2.0]), x_max=np.array([7000.0, 5.0, 0.5]))


def _stars(model, n, seed):
    """Spectra = model + photon noise + an intrinsic scatter the labels do not predict."""
    rng = np.random.default_rng(seed)
    lab = model.x_min + (0.15 + 0.7 * rng.random((n, model.n_labels))) * model.scale_width
    s_true = np.where(np.arange(model.n_pix) % 3 == 0, S_TRUE, 0.0)
    f = model.predict(lab) + rng.normal(size=(n, model.n_pix)) * np.sqrt(SIG**2 + s_true**2)
    return lab, f, np.full(f.shape, 1 / SIG**2), s_true


def test_estimate_scatter_recovers_injected_scatter(toy):
    lab, f, iv, s_true = _stars(toy, 150, 0)
    f0, iv0 = f.copy(), iv.copy()
    s, n_used = estimate_scatter(toy, f, iv)
    assert n_used >= 140
    np.testing.assert_array_equal(f, f0)  # inputs untouched
    np.testing.assert_array_equal(iv, iv0)
    on = s_true > 0
    # per-pixel ML from ~150 stars: ~6 % error on s; fitting absorbs a few degrees of freedom
    assert np.median(s[on]) == pytest.approx(S_TRUE, rel=0.05)
    assert np.percentile(np.abs(s[on] / S_TRUE - 1), 90) < 0.25
    assert np.median(s[~on]) < 0.15 * SIG


def test_fit_errors_include_model_scatter(toy, tmp_path):
    """Spectra with star-to-star model error: without the scatter the observed-noise errors are
    too small (pulls > 1).  With the estimated scatter stored in the model file:
    'errors' keeps the labels of the observed-error fit (paper Eq. 3) and gives them the right
    covariance (sandwich): unit pulls; 'weights' also weighs the mismatched pixels less, which
    here (independent per-pixel model errors, where it is the maximum-likelihood fit) gives unit
    pulls and labels closer to the truth."""
    _, fv, ivv, _ = _stars(toy, 150, 1)
    s, _ = estimate_scatter(toy, fv, ivv)
    lab, f, iv, _ = _stars(toy, 300, 2)
    path = tmp_path / "m.fits"
    toy.save(path)
    m = load_model(path)  # a copy: the fixture is not modified
    assert not m.scatter.any()
    m = m.with_scatter(s)
    m.save(path)
    m2 = load_model(path)
    np.testing.assert_allclose(m2.scatter, s)  # round trip through the SCATTER HDU
    prep = as_prepared(toy.wave, f, iv)
    res, cats = {}, {}
    for key in ("off", "errors", "weights"):
        cat = Fitter(m2, FitConfig(fit_rv=False, precision="float64", scale_errors=False, model_scatter=key))(prep)
        got = np.stack([np.asarray(cat[n], float) for n in toy.label_names], 1)
        err = np.stack([np.asarray(cat[f"{n}_err"], float) for n in toy.label_names], 1)
        ok = np.asarray(cat["status"]) == "converged"
        res[key] = ((got - lab) / err)[ok], np.abs(got - lab)[ok] / toy.scale_width
        cats[key] = cat
    pull = {k: np.std(v[0], axis=0) for k, v in res.items()}
    rms = {k: np.sqrt(np.mean(v[1] ** 2)) for k, v in res.items()}
    assert np.all(pull["off"] > 1.25), pull
    assert np.all((pull["errors"] > 0.85) & (pull["errors"] < 1.15)), pull
    assert np.all((pull["weights"] > 0.85) & (pull["weights"] < 1.15)), pull
    assert rms["weights"] < 0.9 * rms["errors"], rms
    # 'errors' changes only the errors: same labels and paper chi2 as without the scatter
    for n in toy.label_names:
        np.testing.assert_array_equal(cats["errors"][n], cats["off"][n])
        assert np.all(np.asarray(cats["errors"][f"{n}_err"]) > np.asarray(cats["off"][f"{n}_err"]))
    np.testing.assert_array_equal(cats["errors"]["red_chi2"], cats["off"]["red_chi2"])
    assert np.all(np.isnan(cats["off"]["red_chi2_model"]))
    assert 0.85 < np.median(cats["errors"]["red_chi2_model"]) < 1.15 < np.median(cats["off"]["red_chi2"])


def test_high_chi2_flag_marks_spectra_unlike_the_model(toy):
    """With the model scatter in the variances, stars like the model's validation stars have
    red_chi2_model ~ 1 and a clean fit_flags; a spectrum with absorption lines the model does not
    have (a star unlike the training set) gets HIGH_CHI2; a broken spectrum gets FAILED."""
    from musepayne.flags import FIT_FLAGS, decode_fit_flags

    _, fv, ivv, _ = _stars(toy, 150, 4)
    m = load_model_copy(toy)
    m = m.with_scatter(estimate_scatter(m, fv, ivv)[0])
    lab, f, iv, _ = _stars(toy, 200, 5)
    pix = np.arange(toy.n_pix)
    odd = f[:10].copy()
    rng = np.random.default_rng(6)
    for c in rng.uniform(20, toy.n_pix - 20, 25):  # 25 foreign lines, 15 % deep, 2 px sigma
        odd -= 0.15 * np.exp(-0.5 * ((pix - c) / 2.0) ** 2)
    flux = np.vstack([f, odd, np.full((1, toy.n_pix), np.nan)])
    ivar = np.vstack([iv, iv[:10], iv[:1]])
    cat = Fitter(m, FitConfig(fit_rv=False))(as_prepared(toy.wave, flux, ivar))
    rc = np.asarray(cat["red_chi2_model"], float)
    flags = np.asarray(cat["fit_flags"])
    high = FIT_FLAGS["HIGH_CHI2"].value
    assert 0.85 < np.median(rc[:200]) < 1.15
    assert np.mean(flags[:200] & high != 0) < 0.02
    assert np.all(flags[200:210] & high != 0), rc[200:210]
    assert decode_fit_flags(flags[-1]) == ["FAILED"] and str(cat["status"][-1]).startswith("failed")
    assert cat.meta["MSCATTER"] == "errors"


def load_model_copy(model):
    """An independent copy of ``model`` (through its file format), so fixtures stay untouched."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.fits"
        model.save(p)
        return load_model(p)
