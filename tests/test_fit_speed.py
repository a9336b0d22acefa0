"""The fitter's fast paths give the results of the plain ones, bit for bit, and recover labels.

* LSF-excess operators applied as slices of a band equal the sparse product ``K @ x``;
* the LM on the window of pixels with weight (MUSE data leave half of a LAMOST-grid model's
  pixels unused), with the MLP evaluated on the rest-frame pixels that window reads, gives
  the same results as on the whole grid (``keep_model=True`` fits the whole grid, so the two
  paths run on the same input);
* labels of noiseless and noisy model spectra come back within their errors;
* the sandwich covariance from the Jacobian planes the LM kept equals that of planes evaluated
  again at the solution (to float32 rounding);
* the gradient correlations of an MLP computed in its last hidden layer equal the Pearson
  correlations over the pixels of its Jacobian.
"""

import numpy as np
import pytest

from fit_helpers import as_prepared, reference_shift
from musepayne.fit import FitConfig, Fitter
from musepayne.fit.operators import _BandedOp, _RowOps
from musepayne.instrument.lsf import FWHM_TO_SIGMA
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.models.files import load_model
from musepayne.models.gradients import GradientTemplates
from musepayne.prepare.resample import convolution_matrix
from musepayne.testing import toy_mlp_model
from musepayne.threads import blas_threads

FIELDS = ("labels", "labels_err", "rv", "rv_err", "chi2", "red_chi2", "red_chi2_model", "corr_flux", "n_pix_used",
          "n_iter", "status", "reason", "edge_labels", "error_scale", "cov")


@pytest.fixture(scope="module")
def toy():
    return toy_mlp_model(lamost_wavelength(), hidden=(64, 64), n_lines=400, seed=1)


def _excess(w):
    """MUSE-like LSF excess (FWHM, A): 1.7 A at 4750 A falling to 0 at 5400 A, none elsewhere."""
    return np.where((w > 4750) & (w < 5400), 1.7 * (5400 - w) / 650, 0.0)


def _muse_like(model, labels, v, snr, rng):
    """Model spectra shifted by ``v``, broadened by the excess, observed only over MUSE's range."""
    w = model.wave
    exc = _excess(w)
    K = convolution_matrix(w, exc * FWHM_TO_SIGMA)[0]
    obs = reference_shift(w, model.predict(labels), v)
    good = np.isfinite(obs) & (w > 4760) & (w < 8800)
    obs = (K @ np.where(np.isfinite(obs), obs, 1.0).T).T
    noise = rng.normal(size=obs.shape) / snr if snr else 0.0
    flux = np.where(good, obs + noise, 0.0)
    ivar = np.where(good, (snr or 1000.0) ** 2, 0.0)
    return as_prepared(w, flux, ivar, lsf_excess=np.tile(exc, (len(v), 1)))


def test_band_operator_is_the_sparse_product_and_windows_agree():
    w = lamost_wavelength()
    K = convolution_matrix(w, _excess(w) * FWHM_TO_SIGMA)[0].astype(np.float32)
    op = _BandedOp(K, np.float32)
    assert op.lo is not None and op.rows.size > 100  # the slice path
    assert np.all(np.diff(op.rows) == 1)
    rng = np.random.default_rng(4)
    Y = rng.normal(size=(6, 5, w.size)).astype(np.float32)
    for sel in (np.arange(6), np.array([0, 2, 5])):
        out = Y.copy()
        op.apply(out, sel)
        want = Y.copy()
        want[sel] = (K @ Y[sel].reshape(sel.size * 5, -1).T).T.reshape(sel.size, 5, -1)
        assert np.array_equal(out, want)
    # a window of output columns starting inside the band: same values on those columns
    c0, c1 = int(op.rows[0]) + 37, w.size - 100
    win, x0, x1 = op.window(c0, c1)
    assert x0 < c0 and x1 >= c1
    part = Y[:, :, x0:x1].copy()
    win.shifted(x0).apply(part, np.arange(6))
    full = Y.copy()
    op.apply(full, np.arange(6))
    assert np.array_equal(part[:, :, c0 - x0:c1 - x0], full[:, :, c0:c1])
    ops = _RowOps(np.zeros(6, int), [op]).windowed(c0, c1)
    assert ops.window == (x0, x1, c0, c1, None, None)


def test_window_fit_is_bit_identical_to_whole_grid(toy):
    rng = np.random.default_rng(11)
    n = 24
    truth = toy.unscale(rng.uniform(-0.35, 0.35, (n, 5)))
    prep = _muse_like(toy, truth, rng.uniform(-250, 250, n), 60, rng)
    fitter = Fitter(toy, FitConfig(chunk_size=8))
    c0, c1 = fitter._window(prep.ivar[:8])
    assert c0 > 500 and c1 < toy.n_pix - 100 and c0 % 64 == 0  # the window is really narrower
    r0, sub = fitter._rest_model(c0, c1)
    assert sub is not None and 0 < r0 < c0 and sub.n_pix < 0.8 * toy.n_pix  # and so is the model's
    with blas_threads(1, scipy=False):
        fast = fitter.fit_arrays(prep)
        whole = fitter.with_config(keep_model=True).fit_arrays(prep)  # the whole grid
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(whole, name)
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    assert set(fast.status) == {"converged"}


@pytest.mark.parametrize("snr", [None, 50])
def test_recovered_labels_of_model_spectra(toy, snr):
    """Noiseless spectra: labels to 2 % of their S/N-1000 errors; S/N 50: |fit - truth| / sigma
    has rms 0.6-1.4 (30 spectra x 6 parameters) and no value beyond 4."""
    rng = np.random.default_rng(5)
    n = 30
    truth = toy.unscale(rng.uniform(-0.35, 0.35, (n, 5)))
    v = rng.uniform(-250, 250, n)
    prep = _muse_like(toy, truth, v, snr, rng)
    with blas_threads(1, scipy=False):
        cat = Fitter(toy, FitConfig(precision="float64" if snr is None else "float32"))(prep)
    names = list(toy.label_names) + ["rv"]
    z = np.column_stack([(cat[k] - t) / cat[k + "_err"] for k, t in zip(names, np.c_[truth, v].T)])
    if snr is None:
        assert np.max(np.abs(z)) < 0.02, np.max(np.abs(z), 0)
    else:
        assert 0.6 < np.sqrt(np.mean(z**2)) < 1.4
        assert np.max(np.abs(z)) < 4


def test_sandwich_errors_from_kept_jacobian_equal_reevaluated(toy):
    """With the model's scatter in the variance ('errors'), the covariance is A^-1 B A^-1 with B from
    the Jacobian at the solution: the planes the LM kept there give the errors of planes evaluated
    again over the whole chunk (the old path) to float32 rounding of the network's products."""
    rng = np.random.default_rng(12)
    n = 16
    model = toy.with_scatter(np.full(toy.n_pix, 0.05))  # 3x the noise: B far from A
    truth = model.unscale(rng.uniform(-0.35, 0.35, (n, 5)))
    prep = _muse_like(model, truth, rng.uniform(-250, 250, n), 60, rng)
    fitter = Fitter(model, FitConfig(chunk_size=n, scale_errors=False))
    assert fitter._keep_jac
    seen = {}
    estimates = fitter._estimates

    def spy(st, d, w_obs, opi):
        seen["J"] = st["J"].copy()
        seen["Y"] = fitter._planes(st["theta"], opi)[0][:, 1:]  # evaluated again at the solution
        return estimates(st, d, w_obs, opi)

    fitter._estimates = spy
    with blas_threads(1, scipy=False):
        res = fitter.fit_arrays(prep)
        plain = fitter.with_config(model_scatter="off").fit_arrays(prep)  # A^-1 only
    J, Y = seen["J"], seen["Y"]
    assert J.shape == Y.shape
    assert np.max(np.abs(J - Y)) <= 1e-6 * np.max(np.abs(Y))
    # the same labels; the sandwich adds the scatter's variance: errors ~sqrt(1 + (0.05 * 60)^2) ~ 3x
    assert np.array_equal(res.labels, plain.labels)
    ratio = res.labels_err / plain.labels_err
    assert np.all((ratio > 2) & (ratio < 4.5)), ratio.min()


def test_gradcorr_in_hidden_space_equals_pixel_pearson():
    """The default model's gradient correlations (its shipped templates) computed in the 100-wide
    last hidden layer equal the Pearson correlations of the (n, 3909) Jacobian over the usable
    pixels to 1e-12; templates with NaN on those pixels take the pixel path."""
    model = load_model("default")
    t = model.templates
    rng = np.random.default_rng(3)
    lab = model.unscale(rng.uniform(-0.55, 0.55, (300, model.n_labels)))
    use = ~np.asarray(model.pixel_mask, bool)
    _, jac = model.predict_with_jacobian(lab)
    want = t.gradcorr_from_jacobian(jac, lab, model.label_names, use)
    fast = t._gradcorr_hidden(model, lab, use)
    assert fast is not None
    assert np.all(np.isfinite(fast)) and np.all(np.isfinite(want))
    assert np.nanmax(np.abs(fast - want)) < 1e-12
    assert np.nanstd(want[:, 0]) > 0.05  # correlations that vary from star to star
    grad = t.grad.copy()
    grad[:, 0, np.flatnonzero(t.usable & use)[:7]] = np.nan
    holes = GradientTemplates(t.wave, grad, t.ref_labels, t.label_names, usable=t.usable)
    assert holes._gradcorr_hidden(model, lab, use) is None
    assert np.array_equal(holes.gradcorr(model, lab), holes.gradcorr_from_jacobian(jac, lab, model.label_names, use),
                          equal_nan=True)


def test_usable_pixel_count_on_unmasked_runs_equals_full_mask(toy):
    """Validation counts usable pixels on the runs of columns the model does not mask: the same
    counts as the full per-pixel test (NaN / inf / <= 0 ivar, NaN flux, excluding mask bits)."""
    rng = np.random.default_rng(8)
    pm = np.zeros(toy.n_pix, bool)
    pm[:40], pm[900:1500], pm[-7:] = True, True, True
    fitter = Fitter(toy.with_pixel_mask(pm), FitConfig())
    shape = (40, toy.n_pix)
    f = rng.normal(size=shape).astype(np.float32)
    iv = rng.normal(size=shape).astype(np.float32)  # half <= 0
    f[rng.random(shape) < 0.1] = np.nan
    iv[rng.random(shape) < 0.05] = np.inf
    iv[rng.random(shape) < 0.05] = np.nan
    mk = rng.integers(0, 2**16, shape).astype(np.int32) * (rng.random(shape) < 0.2)
    want = fitter._usable(f, iv, mk).sum(1)
    assert np.array_equal(fitter._n_usable(f, iv, mk), want)
    assert want.min() > 100 and want.max() < 0.5 * toy.n_pix  # a real mix of usable and not
