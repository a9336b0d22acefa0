import numpy as np
import pytest

from musepayne.instrument.lsf import FWHM_TO_SIGMA, LAMOST_LSF, MUSE_LSF, ConstantFWHM
from musepayne.instrument.wavelength import air_to_vacuum, bin_edges, lamost_wavelength, linear_grid
from musepayne.prepare.normalize import ContinuumNormalizer
from musepayne.prepare.resample import build_operator, convolution_matrix, rebin_matrix


def test_rebin_conserves_flux_integral():
    rng = np.random.default_rng(0)
    w_in = linear_grid(5000.0, 0.9, 3000)
    w_out = lamost_wavelength()
    ei, eo = bin_edges(w_in), bin_edges(w_out)
    R, cov = rebin_matrix(ei, eo)
    f = rng.uniform(0.5, 2.0, w_in.size)
    full = cov > 0.999999
    # integral over fully covered output bins equals the integral over the same wavelength span
    lo, hi = eo[:-1][full][0], eo[1:][full][-1]
    out_int = np.sum((R @ f)[full] * np.diff(eo)[full])
    cum = np.concatenate([[0], np.cumsum(f * np.diff(ei))])
    in_int = np.interp(hi, ei, cum) - np.interp(lo, ei, cum)  # exact for piecewise-constant input
    assert out_int == pytest.approx(in_int, rel=1e-12)


def test_rebin_same_grid_is_identity():
    w = lamost_wavelength()
    R, cov = rebin_matrix(bin_edges(w), bin_edges(w))
    assert np.allclose(R.toarray(), np.eye(w.size))


def test_convolution_kernel_width_matches_request():
    w = linear_grid(6000.0, 0.1, 4001)
    sig = np.full(w.size, 1.5)
    K, loss = convolution_matrix(w, sig)
    delta = np.zeros(w.size)
    delta[2000] = 1.0
    row = K.T @ delta  # response of the centre pixel spread over neighbours
    x = w - w[2000]
    var = np.sum(row * x**2) / np.sum(row)
    assert np.sqrt(var) == pytest.approx(1.5, rel=0.01)
    assert np.allclose(K.sum(axis=1), 1.0)
    assert loss[2000] < 1e-6 and loss[0] > 0.4


def test_operator_output_resolution_is_target():
    """A narrow line taken MUSE-like -> LAMOST has the LAMOST FWHM (incl. pixel box-cars)."""
    w_in = linear_grid(6400.0, 0.05, 8000)  # nearly unresolved input
    lsf_in = ConstantFWHM(0.3)
    line = 6600.0
    sig_in = 0.3 * FWHM_TO_SIGMA
    f = 1.0 - 0.5 * np.exp(-0.5 * ((w_in - line) / sig_in) ** 2)
    w_out = lamost_wavelength()
    op = build_operator(w_in, "vacuum", lsf_in, w_out, LAMOST_LSF)
    out = op.apply(f)[0]
    sel = (w_out > 6570) & (w_out < 6630)
    depth = 1.0 - out[sel]
    x = w_out[sel]
    mu = np.sum(depth * x) / np.sum(depth)
    var = np.sum(depth * (x - mu) ** 2) / np.sum(depth)
    # measured second moment includes the output pixel box-car (the LSF is an effective one)
    want = LAMOST_LSF.sigma(line) ** 2
    assert np.sqrt(var) == pytest.approx(np.sqrt(want), rel=0.05)
    # the line's equivalent width is conserved
    ew_in = np.sum(1 - f) * 0.05
    ew_out = np.sum(depth * np.diff(bin_edges(w_out))[sel])
    assert ew_out == pytest.approx(ew_in, rel=1e-3)


def test_operator_flags_coarse_input_and_records_excess():
    w_in = linear_grid(4749.75, 1.25, 3681)
    op = build_operator(w_in, "air", MUSE_LSF, lamost_wavelength(), LAMOST_LSF)
    w = lamost_wavelength()
    blue = (w > 4800) & (w < 5000)
    red = (w > 6000) & (w < 8000)
    assert np.all(op.excess_fwhm[blue] > 0.5)
    assert np.all(op.excess_fwhm[red] == 0)


def test_continuum_fast_matches_exact():
    rng = np.random.default_rng(3)
    w = lamost_wavelength()
    f = (1 + 0.3 * np.sin(w / 700)) * (1 - 0.3 * (rng.random(w.size) < 0.05))
    iv = rng.uniform(50, 150, (2, w.size))
    iv[1, 1200:1300] = 0  # a gap
    fast = ContinuumNormalizer(w)
    exact = ContinuumNormalizer(w, exact=True)
    c1, d1 = fast.continuum(np.vstack([f, f]), iv)
    c2, d2 = exact.continuum(np.vstack([f, f]), iv)
    ok = d1 & d2
    assert ok.sum() > 0.95 * ok.size
    assert np.max(np.abs(c1[ok] / c2[ok] - 1)) < 1e-5


def test_continuum_of_flat_spectrum_is_flat_and_ivar_scales():
    w = lamost_wavelength()
    f = np.full((1, w.size), 7.0)
    iv = np.full((1, w.size), 4.0)
    fn, ivn, cont, defined = ContinuumNormalizer(w)(f, iv)
    assert np.allclose(fn[defined], 1.0, atol=1e-6)
    assert np.allclose(ivn[defined], 4.0 * 49.0, rtol=1e-5)


def test_inputs_not_mutated():
    w = lamost_wavelength()
    f = np.ones((2, w.size))
    iv = np.ones((2, w.size))
    iv[:, :10] = 0
    f0, iv0 = f.copy(), iv.copy()
    ContinuumNormalizer(w)(f, iv)
    assert np.array_equal(f, f0) and np.array_equal(iv, iv0)


def test_air_grid_converted_before_rebin():
    """A line at a known air wavelength lands at its vacuum wavelength on the LAMOST grid."""
    w_in = linear_grid(4749.75, 1.25, 3681)
    line_air = 6562.80
    f = 1 - 0.5 * np.exp(-0.5 * ((w_in - line_air) / 1.2) ** 2)
    op = build_operator(w_in, "air", MUSE_LSF, lamost_wavelength(), LAMOST_LSF)
    out = op.apply(f)[0]
    w = lamost_wavelength()
    sel = (w > 6540) & (w < 6590)
    d = 1 - out[sel]
    centre = np.sum(d * w[sel]) / np.sum(d)
    assert centre == pytest.approx(float(air_to_vacuum(line_air)), abs=0.05)


def _line_spectrum(wave, lsf, centres, frame_shift=None):
    """Unresolved absorption lines (equivalent width 0.8 A) seen through the instrument's LSF,
    sampled at the pixel centres (``centres`` vacuum; ``frame_shift``: vacuum -> the grid's frame)."""
    c = centres if frame_shift is None else frame_shift(centres)
    f = np.ones(wave.size)
    for cc in c:
        s = lsf.sigma(cc)
        f -= 0.8 / (np.sqrt(2 * np.pi) * s) * np.exp(-0.5 * ((wave - cc) / s) ** 2)
    return f


def test_same_grid_same_lsf_is_identity_without_excess():
    """A LAMOST spectrum onto the LAMOST grid at the LAMOST LSF is unchanged and carries no
    LSF excess (the phase-averaged rebinning term once recorded ~1.1-1.5 A everywhere, and the
    fit then broadened the model for every LAMOST spectrum)."""
    w = lamost_wavelength()
    op = build_operator(w, "vacuum", LAMOST_LSF, w, LAMOST_LSF)
    f = _line_spectrum(w, LAMOST_LSF, np.arange(4000.0, 8800.0, 17.3))
    np.testing.assert_allclose(op.apply(f)[0], f, atol=1e-12)
    assert np.all(op.excess_fwhm == 0.0)
    # half a pixel off the grid: the two-point mix adds t(1-t) dl^2 = dl^2/4 of variance, i.e. an
    # excess of FWHM sqrt(dl^2/4)/FWHM_TO_SIGMA where the input already has the target LSF
    w_half = w * 10 ** (0.5e-4)
    op2 = build_operator(w_half, "vacuum", LAMOST_LSF, w, LAMOST_LSF)
    dl = np.diff(bin_edges(w))
    inner = slice(100, -100)
    np.testing.assert_allclose(op2.excess_fwhm[inner], 0.5 * dl[inner] / FWHM_TO_SIGMA, rtol=0.02)


def test_recorded_muse_excess_matches_the_broadening_measured_on_lines():
    """MUSE and LAMOST observations of the same lines, both prepared to the LAMOST grid: broadening
    the LAMOST version by the MUSE LSF_EXCESS reproduces the MUSE version (the forward model of
    the fit); the LAMOST version itself records no excess."""
    from astropy.table import Table

    from musepayne.instrument.wavelength import vacuum_to_air
    from musepayne.io.spectra import SpectrumSet
    from musepayne.prepare.preparer import PrepareConfig, Preparer
    from musepayne.prepare.resample import broadening_matrix

    rng = np.random.default_rng(0)
    centres = np.arange(4780.0, 7000.0, 16.0) + rng.uniform(-3, 3, np.arange(4780.0, 7000.0, 16.0).size)
    w_l = lamost_wavelength()
    w_m = linear_grid(4749.75, 1.25, 3681)

    def sset(w, f, frame, lsf):
        meta = Table({"stellar_id": ["a"], "ra": [0.0], "dec": [0.0], "source": ["x"], "instrument": ["t"]})
        return SpectrumSet(w, f[None], np.full((1, w.size), 1e-8), frame, lsf, meta)

    prep = Preparer(PrepareConfig())
    pl = prep(sset(w_l, _line_spectrum(w_l, LAMOST_LSF, centres), "vacuum", LAMOST_LSF))
    pm = prep(sset(w_m, _line_spectrum(w_m, MUSE_LSF, centres, vacuum_to_air), "air", MUSE_LSF))
    assert np.all(pl.lsf_excess == 0)
    blue = (w_l > 4790) & (w_l < 5100) & (pm.ivar[0] > 0) & (pl.ivar[0] > 0)
    assert np.all(pm.lsf_excess[0, blue] > 1.0)
    broad = (broadening_matrix(w_l, pm.lsf_excess[0]) @ pl.flux[0])
    rms_raw = np.sqrt(np.mean((pl.flux[0, blue] - pm.flux[0, blue]) ** 2))
    rms_fm = np.sqrt(np.mean((broad[blue] - pm.flux[0, blue]) ** 2))
    assert rms_fm < 0.5 * rms_raw
