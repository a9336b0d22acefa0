"""Close-pair splitting in detection (musepayne.extract.pairs, Detector.split_pairs): broad-band images with known
truth, no cube."""

from __future__ import annotations

import numpy as np
import pytest

from musepayne.extract.detect import DetectConfig, Detector
from musepayne.extract.pairs import fit_pair
from musepayne.extract.psf import MoffatPSF

WAVES = np.array([5300.0, 6450.0, 7600.0, 8750.0])
PSF = MoffatPSF(fwhm=(3.8, -0.25), beta=(2.8,), ellip=(0.03,), angle=(20.0,))
FWHM = PSF.fwhm_at(float(np.median(WAVES)))
SHAPE = (41, 41)
SIGMA = 2.0  # noise per pixel of each band image (flux units)
# two stars of different colour: a's light falls from blue to red, b's rises (flux per band, flux units)
FA = np.array([60000.0, 52000.0, 45000.0, 39000.0])
FB = np.array([18000.0, 25000.0, 32000.0, 40000.0])


def _bands(stars, seed=1, psf=PSF):
    """Band images of point sources ``[(x, y, fluxes per band), ...]`` with Gaussian noise, and their variances."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((WAVES.size,) + SHAPE)
    for b, w in enumerate(WAVES):
        for x, y, f in stars:
            imgs[b] += f[b] * psf.image(SHAPE, x, y, w, oversample=3)
    imgs += rng.normal(0.0, SIGMA, imgs.shape)
    return imgs, np.full(imgs.shape, SIGMA**2)


def _pair(sep_fwhm, fa=FA, fb=FB, angle=0.6):
    """The pair's true positions (``sep_fwhm`` apart) and its light centroid (where the detector lists one star)."""
    d = 0.5 * sep_fwhm * FWHM * np.array([np.cos(angle), np.sin(angle)])
    pa, pb = np.array([20.3, 20.1]) + d, np.array([20.3, 20.1]) - d
    q = fb.sum() / (fa.sum() + fb.sum())
    return pa, pb, (1 - q) * pa + q * pb


def _split(imgs, vars_, x, y, cfg=DetectConfig()):
    return Detector(cfg).split_pairs(imgs, vars_, WAVES, PSF, np.atleast_1d(x), np.atleast_1d(y),
                                     np.full(np.size(x), 1e4), FWHM)


def test_a_pair_of_different_colours_at_0p4_fwhm_is_split_with_its_positions_and_band_fluxes():
    pa, pb, c = _pair(0.4)
    imgs, vars_ = _bands([(*pa, FA), (*pb, FB)])
    t = _split(imgs, vars_, c[0], c[1])
    assert t["split"][0], dict(zip(t.colnames, t[0]))
    assert t["lr"][0] > DetectConfig().split_chi2
    # each component within 0.1 FWHM of its true position (a: the brighter one)
    assert np.hypot(t["xa"][0] - pa[0], t["ya"][0] - pa[1]) < 0.1 * FWHM
    assert np.hypot(t["xb"][0] - pb[0], t["yb"][0] - pb[1]) < 0.1 * FWHM
    assert t["frac_b"][0] == pytest.approx(FB.sum() / (FA.sum() + FB.sum()), abs=0.02)
    # the band fluxes of both components within a few per cent (the pair fit on the star's stamp, no model error)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    use = np.hypot(xx - c[0], yy - c[1]) <= 1.7 * FWHM
    params = np.column_stack(PSF.params(WAVES))
    r = fit_pair(imgs[:, use], vars_[:, use], xx[use].astype(float), yy[use].astype(float), params, c[0], c[1],
                 FWHM, 0.2, 0.7)
    np.testing.assert_allclose(r["fa"], FA, rtol=0.03)
    np.testing.assert_allclose(r["fb"], FB, rtol=0.03)
    # and the one-source fit of the same stamp is far worse: chi2_1 >> chi2_2 ~ the number of pixels
    assert r["chi2_2"] < 1.3 * r["fa"].size * use.sum() and r["dchi2"] > 10 * r["chi2_2"]


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("fwhm_error", [0.0, 0.04])
def test_a_bright_single_star_is_not_split_even_with_a_wrong_psf(fwhm_error, scale):
    # S/N ~ 1e3-1e4 per band.  With the right PSF the two-source fit gains nothing; with a PSF model 4 % too narrow
    # the residual is far above the noise, the PSF-model error term (split_model_error) makes the improvement
    # independent of the brightness, and the two "sources" that mimic the broader profile sit closer than
    # split_min_separation (both of the same colour): no split either way
    cfg = DetectConfig()
    wrong = MoffatPSF(fwhm=(3.8 * (1 + fwhm_error), -0.25), beta=(2.8,), ellip=(0.03,), angle=(20.0,))
    imgs, vars_ = _bands([(20.3, 20.1, scale * FA)], seed=2, psf=wrong)
    t = _split(imgs, vars_, 20.3, 20.1, cfg)
    assert np.isfinite(t["lr"][0]) and not t["split"][0], dict(zip(t.colnames, t[0]))
    if fwhm_error == 0:
        assert t["lr"][0] < 10
    else:
        assert t["lr"][0] < 150 and t["sep"][0] < cfg.split_min_separation


def test_a_same_colour_pair_below_the_minimum_separation_is_left_alone():
    cfg = DetectConfig()
    pa, pb, c = _pair(0.5 * cfg.split_min_separation, fb=0.8 * FA)
    imgs, vars_ = _bands([(*pa, FA), (*pb, 0.8 * FA)], seed=3)
    t = _split(imgs, vars_, c[0], c[1], cfg)
    assert not t["split"][0]
    # the same pair at 0.5 FWHM (a pair of one colour, split by its profile alone) is found
    pa, pb, c = _pair(0.5, fb=0.8 * FA)
    imgs, vars_ = _bands([(*pa, FA), (*pb, 0.8 * FA)], seed=3)
    t = _split(imgs, vars_, c[0], c[1], cfg)
    assert t["split"][0] and abs(t["sep"][0] - 0.5) < 0.1


def test_a_companion_below_the_detection_threshold_is_not_split_off():
    # a companion of S/N ~ 3 (band-summed) at 0.5 FWHM: below DetectConfig.threshold, no spurious split
    pa, pb, c = _pair(0.5, fa=FA / 20, fb=np.full(4, 30.0))
    imgs, vars_ = _bands([(*pa, FA / 20), (*pb, np.full(4, 30.0))], seed=4)
    t = _split(imgs, vars_, c[0], c[1])
    assert not t["split"][0]


def test_split_pairs_is_switched_off_and_skips_faint_stars():
    pa, pb, c = _pair(0.4)
    imgs, vars_ = _bands([(*pa, FA), (*pb, FB)])
    t = Detector().split_pairs(imgs, vars_, WAVES, PSF, np.array([c[0]]), np.array([c[1]]), np.array([9.0]), FWHM)
    assert not t["split"][0] and np.isnan(t["lr"][0])  # S/N below 2 x threshold: not tested
    assert DetectConfig(split_pairs=False).split_pairs is False


@pytest.mark.parametrize("kw, word", [
    ({"split_chi2": 0.0}, "split_chi2"), ({"split_chi2": float("nan")}, "split_chi2"),
    ({"split_min_separation": -0.1}, "split_min_separation"),
    ({"split_min_separation": 0.8}, "split_max_separation"),
    ({"split_max_separation": float("inf")}, "split_max_separation"),
    ({"split_radius": 0.5}, "split_radius"), ({"split_model_error": -0.01}, "split_model_error"),
    ({"split_pairs": "yes"}, "split_pairs"), ({"split_pairs": 1}, "split_pairs"),
])
def test_detect_config_refuses_bad_split_settings(kw, word):
    with pytest.raises(ValueError, match=word):
        DetectConfig(**kw)


def test_the_split_statistic_of_a_misfit_star_does_not_grow_with_its_brightness():
    # a PSF model 4 % too narrow: the raw improvement chi2_1 - chi2_2 grows with the square of the S/N (~100x for 10x
    # the flux) and would pass any fixed threshold for bright enough stars; the tested statistic does not, both
    # from the PSF-model error term in the weights and from the scaling by the residual's reduced chi-square
    wrong = MoffatPSF(fwhm=(3.8 * 1.04, -0.25), beta=(2.8,), ellip=(0.03,), angle=(20.0,))
    got = {}
    for eps in (0.0, DetectConfig().split_model_error):
        for scale in (1.0, 10.0):
            imgs, vars_ = _bands([(20.3, 20.1, scale * FA)], seed=5, psf=wrong)
            t = _split(imgs, vars_, 20.3, 20.1, DetectConfig(split_model_error=eps))
            got[eps, scale] = (t["dchi2"][0], t["lr"][0])
    assert got[0.0, 10.0][0] > 30 * got[0.0, 1.0][0]
    for eps in (0.0, DetectConfig().split_model_error):
        assert 0.7 < got[eps, 10.0][1] / got[eps, 1.0][1] < 1.4


def _integrate_reference(dx, dy, fwhm, beta, ellip, angle, oversample):
    """The sub-pixel integration of one PSF as psf._integrate computed it before the band-batched version (one
    PSF per call, scalars broadcast): the values every extraction and detection so far were made with."""
    n = max(1, int(oversample))
    offs = (np.arange(n) + 0.5) / n - 0.5
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    q = np.sqrt(1.0 - ellip)
    a, b = alpha / q, alpha * q
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    u0 = dx * (c / a)
    u0 += dy * (s / a)
    v0 = dy * (c / b)
    v0 -= dx * (s / b)
    acc = np.zeros(np.shape(dx))
    for ox in offs:
        for oy in offs:
            t1 = (u0 + (ox * c + oy * s) / a) ** 2
            t1 += (v0 + (oy * c - ox * s) / b) ** 2
            acc += np.exp(-beta * np.log1p(t1))
    return acc * ((beta - 1.0) / (np.pi * a * b) / (n * n))


def test_band_batched_psf_integration_is_bit_identical_to_one_psf_at_a_time():
    """The pair fits integrate every band's PSF at once (``psf._integrate_bands``): the values must be exactly those
    of the one-PSF integration (``psf._integrate``, which the extraction uses, and the reference loop above), so
    detections and split decisions are those of the band-by-band code; ``psf._integrate`` itself must equal the
    reference for 1-d offsets, 2-d offsets and 1-d offsets longer than its cache piece; the profile integrates
    to ~1."""
    from musepayne.extract.psf import _INTEGRATE_CHUNK, _integrate, _integrate_bands

    rng = np.random.default_rng(3)
    for _ in range(200):
        k, m, ov = int(rng.integers(1, 7)), int(rng.integers(1, 400)), int(rng.integers(1, 4))
        params = np.column_stack([rng.uniform(2, 6, k), rng.uniform(1.2, 4, k), rng.uniform(0, 0.3, k),
                                  rng.uniform(-90, 90, k)])
        dx, dy = rng.uniform(-12, 12, m), rng.uniform(-12, 12, m)
        got = _integrate_bands(dx, dy, params, ov)
        assert got.shape == (k, m)
        assert np.array_equal(got, np.stack([_integrate_reference(dx, dy, *p, ov) for p in params]))
        assert np.array_equal(got[0], _integrate(dx, dy, *params[0], ov))
    for shape in ((7, 33), (_INTEGRATE_CHUNK + 1000,)):
        dx, dy = rng.uniform(-12, 12, shape), rng.uniform(-12, 12, shape)
        assert np.array_equal(_integrate(dx, dy, 3.7, 2.6, 0.05, 12.0, 3), _integrate_reference(dx, dy, 3.7, 2.6, 0.05,
                                                                                                 12.0, 3))
    yy, xx = np.mgrid[-60:61, -60:61].astype(float)
    tot = _integrate_bands(xx.ravel() - 0.3, yy.ravel() + 0.2, np.array([[3.5, 3.0, 0.1, 30.0]]), 3).sum()
    assert tot == pytest.approx(1.0, abs=2e-3)
