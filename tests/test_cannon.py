"""The quadratic Cannon baseline: training and test steps recover known truth."""

from __future__ import annotations

import numpy as np
import pytest

from fit_helpers import as_prepared
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.instrument.wavelength import log_linear_grid
from musepayne.models.cannon import (
    CannonConfig,
    design_jacobian,
    design_matrix,
    fit_coefficients,
    ml_scatter,
    n_terms,
    train_cannon,
)

NAMES = ("teff", "logg", "fe_h")
LO = np.array([4000.0, 1.0, -2.0])
HI = np.array([7000.0, 5.0, 0.5])


def _truth_theta(wave, seed=0):
    """Quadratic coefficients that make absorption lines whose depths depend on the labels."""
    rng = np.random.default_rng(seed)
    p, K = wave.size, n_terms(3)
    centres = rng.uniform(wave[0] + 5, wave[-1] - 5, 40)
    theta = np.zeros((p, K))
    theta[:, 0] = 1.0
    for c in centres:
        prof = np.exp(-0.5 * ((wave - c) / 1.2) ** 2)
        coef = rng.normal(0, 0.08, K)
        coef[0] = -0.25
        theta += prof[:, None] * coef[None, :]
    return theta


def _labels(n, seed):
    rng = np.random.default_rng(seed)
    return LO + rng.uniform(0.05, 0.95, (n, 3)) * (HI - LO)


def _scaled(lab):
    return (lab - LO) / (HI - LO) - 0.5


def test_design_jacobian_matches_finite_differences():
    s = np.random.default_rng(1).uniform(-0.5, 0.5, (5, 3))
    J = design_jacobian(s)
    h = 1e-6
    for k in range(3):
        d = np.zeros(3)
        d[k] = h
        num = (design_matrix(s + d) - design_matrix(s - d)) / (2 * h)
        np.testing.assert_allclose(J[:, :, k], num, atol=1e-8)
    assert design_matrix(s).shape == (5, n_terms(3)) == (5, 10)


def test_training_recovers_coefficients_and_scatter():
    wave = log_linear_grid(np.log10(5000.0), 1e-4, 500)
    theta = _truth_theta(wave)
    lab = _labels(400, 2)
    rng = np.random.default_rng(3)
    sig = 0.01
    s_true = np.where(np.arange(wave.size) % 2 == 0, 0.0, 0.02)  # intrinsic scatter on odd pixels
    f = design_matrix(_scaled(lab)) @ theta.T
    f = f + rng.normal(0, 1, f.shape) * np.sqrt(sig**2 + s_true**2)
    ivar = np.full(f.shape, 1 / sig**2)
    ivar[:5, :30] = 0.0  # a few masked pixels are ignored
    m = train_cannon(f, ivar, lab, NAMES, wave, x_min=LO, x_max=HI)
    # coefficients: errors of a 400-star least-squares fit are ~ sigma_eff * few / sqrt(400)
    pred = m.predict(lab)
    clean = design_matrix(_scaled(lab)) @ theta.T
    assert np.std(pred - clean) < 0.004
    s = m.scatter
    assert np.median(s[1::2]) == pytest.approx(0.02, rel=0.1)
    assert np.median(s[0::2]) < 0.004
    assert not m.pixel_mask.any()
    # and the weights: 1 / (sigma^2 + s^2)
    w = m.inflate_ivar(ivar[:1])
    np.testing.assert_allclose(w[0, 100:102], 1 / (sig**2 + s[100:102] ** 2), rtol=1e-12)
    assert w[0, 0] == 0.0 and ivar[0, 0] == 0.0  # masked stays masked, input untouched


def test_ml_scatter_is_zero_when_errors_explain_the_residuals():
    rng = np.random.default_rng(4)
    r = rng.normal(0, 1, (2000, 3)) * np.array([1.0, 1.0, 3.0])
    s2 = ml_scatter(r, np.ones_like(r), np.ones(r.shape, bool), s2_max=100.0)
    assert s2[0] < 0.01 and s2[1] < 0.01
    assert s2[2] == pytest.approx(8.0, rel=0.1)


def test_weighted_least_squares_is_exact_without_noise():
    rng = np.random.default_rng(5)
    X = design_matrix(rng.uniform(-0.5, 0.5, (60, 3)))
    theta = rng.normal(0, 1, (7, X.shape[1]))
    w = rng.uniform(0.5, 2, (60, 7))
    w[:10, 3] = 0.0
    np.testing.assert_allclose(fit_coefficients(X, X @ theta.T, w), theta, atol=1e-8)


def test_coverage_mask_and_untrained_pixels():
    wave = log_linear_grid(np.log10(5000.0), 1e-4, 200)
    theta = _truth_theta(wave, 6)
    lab = _labels(100, 7)
    f = design_matrix(_scaled(lab)) @ theta.T
    ivar = np.full(f.shape, 1e4)
    ivar[:70, 150:] = 0.0  # only 30 % of the stars cover the red end
    m = train_cannon(f, ivar, lab, NAMES, wave, CannonConfig(min_pixel_coverage=0.5), x_min=LO, x_max=HI)
    assert m.pixel_mask[150:].all() and not m.pixel_mask[:150].any()
    np.testing.assert_allclose(m.predict(lab[:2])[:, 150:], 1.0)  # masked pixels: continuum, no gradient
    m = m.with_pixel_mask(np.zeros(wave.size, bool))
    assert m.pixel_mask[150:].all()  # untrained pixels cannot be unmasked


@pytest.mark.parametrize("fit_rv", [False, True])
def test_test_step_recovers_labels_of_rest_frame_spectra(fit_rv):
    """The test step (the package's Fitter on the Cannon model) recovers the labels of noisy
    spectra drawn from the model, at rest, with and without a free RV."""
    wave = log_linear_grid(np.log10(5000.0), 1e-4, 800)
    theta = _truth_theta(wave, 8)
    train_lab = _labels(300, 9)
    rng = np.random.default_rng(10)
    sig = 0.01
    f_tr = design_matrix(_scaled(train_lab)) @ theta.T + rng.normal(0, sig, (300, wave.size))
    m = train_cannon(f_tr, np.full(f_tr.shape, 1 / sig**2), train_lab, NAMES, wave, x_min=LO, x_max=HI)
    test_lab = _labels(40, 11)
    f = design_matrix(_scaled(test_lab)) @ theta.T + rng.normal(0, sig, (40, wave.size))
    prep = as_prepared(wave, f, 1 / sig**2)  # the Fitter adds the model's scatter
    cat = Fitter(m, FitConfig(fit_rv=fit_rv, rv_range=300.0, precision="float64"))(prep)
    got = np.stack([np.asarray(cat[n], float) for n in NAMES], 1)
    err = np.stack([np.asarray(cat[f"{n}_err"], float) for n in NAMES], 1)
    pull = (got - test_lab) / err
    # labels within a few formal errors, and errors of the right size (pull scatter ~ 1)
    assert np.all(np.abs(pull) < 5)
    assert 0.6 < np.std(pull) < 1.5
    assert np.median(np.abs(got[:, 0] - test_lab[:, 0])) < 2 * np.median(err[:, 0]) < 100
    if fit_rv:
        assert np.all(np.abs(np.asarray(cat["rv"], float)) < 3.0)


def test_model_file_round_trip(tmp_path):
    from musepayne.models.model import load_model

    wave = log_linear_grid(np.log10(5000.0), 1e-4, 120)
    theta = _truth_theta(wave, 12)
    lab = _labels(60, 13)
    f = design_matrix(_scaled(lab)) @ theta.T + np.random.default_rng(14).normal(0, 0.01, (60, wave.size))
    ivar = np.full(f.shape, 1e4)
    ivar[:50, 100:] = 0.0  # untrained red end
    m = train_cannon(f, ivar, lab, NAMES, wave, x_min=LO, x_max=HI)
    m.save(tmp_path / "cannon.fits")
    m2 = load_model(tmp_path / "cannon.fits")
    assert m2.arch == "cannon" and m2.label_names == NAMES
    np.testing.assert_array_equal(m2.predict(lab[:5]), m.predict(lab[:5]))
    np.testing.assert_array_equal(m2.scatter, m.scatter)
    np.testing.assert_array_equal(m2.pixel_mask, m.pixel_mask)
    assert m2.pixel_mask[100:].all()
    m2 = m2.with_pixel_mask(np.zeros(wave.size, bool))
    assert m2.pixel_mask[100:].all()


def test_model_jacobian_matches_finite_differences():
    wave = log_linear_grid(np.log10(5000.0), 1e-4, 80)
    lab = _labels(50, 15)
    f = design_matrix(_scaled(lab)) @ _truth_theta(wave, 16).T
    m = train_cannon(f, np.full(f.shape, 1e4), lab, NAMES, wave, x_min=LO, x_max=HI)
    x = _labels(3, 17)
    flux, jac = m.predict_with_jacobian(x)
    np.testing.assert_allclose(flux, m.predict(x), atol=1e-12)
    for k, h in enumerate((1.0, 1e-3, 1e-3)):
        d = np.zeros(3)
        d[k] = h
        np.testing.assert_allclose(jac[:, :, k], (m.predict(x + d) - m.predict(x - d)) / (2 * h), atol=1e-8)
