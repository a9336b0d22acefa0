"""Gradient templates: finite differences vs analytic derivatives, Eq. 4, gradcorr."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from musepayne.instrument.lsf import LAMOST_LSF, ConstantFWHM
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.io.readers import library_variance
from musepayne.models.gradients import (
    CannonEmulator,
    GradientTemplates,
    build_templates,
    eq4_distance,
    pearson_rows,
    reference_grid,
)
from musepayne.prepare.normalize import ContinuumNormalizer
from musepayne.prepare.resample import build_operator

EMU = "synthetic/doppler_cannon_coolstars_norm.npz"


def toy_emulator(seed=0):
    """A cubic Cannon emulator with absorption-line-like theta on a 4500-5500 A air grid."""
    rng = np.random.default_rng(seed)
    wave = np.arange(4500.0, 5500.0, 0.1)
    exps = np.array([[i, j, k] for i in range(4) for j in range(4) for k in range(4) if i + j + k <= 3])
    theta = np.zeros((wave.size, len(exps)))
    theta[:, 0] = 1.0
    centres = rng.uniform(4520, 5480, 80)
    prof = np.exp(-0.5 * ((wave[:, None] - centres[None]) / 0.3) ** 2)  # (npix, nlines)
    for t in range(1, len(exps)):
        theta[:, t] = prof @ rng.normal(0, 0.05, centres.size)
    return CannonEmulator(wave, theta, exps, np.array([5000.0, 3.0, -1.0]), np.array([1000.0, 2.0, 1.0]),
                          ("teff", "logg", "fe_h"), "air", None, "toy")


def test_emulator_jacobian_matches_finite_differences():
    emu = toy_emulator()
    lab = np.array([[4800.0, 2.2, -0.7], [6100.0, 4.4, 0.2]])
    jac = emu.jacobian(lab)
    for k, h in enumerate((1.0, 1e-3, 1e-3)):
        step = np.zeros(3)
        step[k] = h
        fd = (emu.flux(lab + step) - emu.flux(lab - step)) / (2 * h)
        scale = np.abs(jac[:, k]).max()
        assert scale > 0
        np.testing.assert_allclose(fd, jac[:, k], atol=1e-6 * scale)


def test_template_gradients_match_analytic_chain():
    """Finite differences of the normalised, convolved, vacuum-rebinned spectra equal the
    analytic derivative N' = (M J)/c - (M f) c'/c^2 with c' = S(ivar M J)/S(ivar)."""
    emu = toy_emulator(1)
    w_out = lamost_wavelength()
    ref = Table({"teff": [4700.0, 5600.0], "logg": [2.0, 4.5], "fe_h": [-1.5, 0.0]})
    tpl = build_templates(emu, ref, wave=w_out)
    op = build_operator(emu.wave, "air", ConstantFWHM(0.0), w_out, LAMOST_LSF, "vacuum")
    nz = ContinuumNormalizer(w_out)
    lab = np.stack([ref[n] for n in emu.label_names], 1).astype(float)
    f0 = op.apply(emu.flux(lab))
    var = op.apply_variance(library_variance(emu.flux(lab)))
    covered = (op.coverage >= 0.999) & (op.edge_loss <= 0.01)
    ivar = np.where(covered & (var > 0) & np.isfinite(var), 1 / np.where(var > 0, var, 1), 0.0)
    c, defined = nz.continuum(f0, ivar)
    den = nz._smooth(ivar)
    jac = emu.jacobian(lab)
    for k in range(3):
        mj = op.apply(jac[:, k])
        cprime = nz._smooth(ivar * mj) / den
        analytic = mj / c - f0 * cprime / c**2
        got = tpl.grad[:, k].astype(float)
        ok = defined & np.isfinite(got)
        assert ok.sum() > 500
        scale = np.abs(analytic[ok]).max()
        # cubic polynomial: central differences are accurate to O(delta^2)
        assert np.max(np.abs(got[ok] - analytic[ok])) < 2e-3 * scale
        assert pearson_rows(got, np.where(ok, analytic, np.nan)).min() > 0.99999


def test_eq4_nearest_uses_paper_scales():
    ref = Table({"teff": [5000.0, 5150.0, 5000.0], "logg": [3.0, 3.0, 3.0], "fe_h": [-0.3, 0.0, 0.0]})
    tpl = GradientTemplates(np.arange(10.0), np.zeros((3, 1, 10)), ref, ("teff",))
    # star at (5000, 3.0, 0.0): D to ref0 = 3 (0.3/0.1), to ref1 = 1.5 (150/100), to ref2 = 0
    idx, d = tpl.nearest(np.array([[5000.0, 3.0, 0.0], [5020.0, 3.0, -0.25], [5140.0, 3.1, 0.05]]))
    assert idx.tolist() == [2, 0, 1]
    np.testing.assert_allclose(d, [0.0, np.hypot(0.2, 0.5), np.sqrt(0.01 + 0.25 + 0.25)])
    # dict input and Eq. 4 helper agree
    assert eq4_distance({"teff": 5100.0, "logg": 3.2, "fe_h": 0.1}, {"teff": 5000.0, "logg": 3.0, "fe_h": 0.0}) \
        == pytest.approx(np.sqrt(3.0))


class _EmulatorModel:
    """A spectral model whose Jacobian is the template chain itself (finite differences)."""

    label_names = ("teff", "logg", "fe_h")

    def __init__(self, emu, wave):
        self.emu, self.wave, self.frame = emu, wave, "vacuum"

    def predict_with_jacobian(self, labels):
        ref = Table(np.asarray(labels, float), names=self.label_names)
        tpl = build_templates(self.emu, ref, wave=self.wave)
        return None, np.transpose(tpl.grad.astype(float), (0, 2, 1))


def test_gradcorr_of_model_with_its_own_gradients_is_one():
    emu = toy_emulator(2)
    wave = lamost_wavelength()
    ref = Table({"teff": [4500.0, 5000.0, 5500.0, 6000.0], "logg": [2.0, 3.0, 4.0, 4.5], "fe_h": [-2, -1, -0.5, 0.0]})
    tpl = build_templates(emu, ref, wave=wave)
    model = _EmulatorModel(emu, wave)
    lab = np.stack([ref[n] for n in model.label_names], 1).astype(float)
    gc = tpl.gradcorr(model, lab)
    np.testing.assert_allclose(gc, 1.0, atol=1e-6)
    # near (not at) the reference stars the correlation stays high
    gc2 = tpl.gradcorr(model, lab + [[30.0, 0.05, 0.03]])
    assert np.all(gc2 > 0.9)
    # a model whose Teff gradient is really its [Fe/H] gradient fails the check
    _, jac = model.predict_with_jacobian(lab)
    swapped = jac[:, :, [2, 1, 0]]
    bad = tpl.gradcorr_from_jacobian(swapped, lab, model.label_names)
    assert np.all(bad[:, 0] < 0.9)
    # labels without a template -> NaN
    nan = tpl.gradcorr_from_jacobian(np.concatenate([jac, jac[:, :, :1]], 2),
                                     np.c_[lab, np.zeros(len(lab))], model.label_names + ("mg_fe",))
    assert np.all(np.isnan(nan[:, 3])) and np.all(np.isfinite(nan[:, :3]))


def test_templates_roundtrip(tmp_path):
    emu = toy_emulator(3)
    ref = Table({"teff": [5000.0], "logg": [3.0], "fe_h": [-1.0]})
    tpl = build_templates(emu, ref)
    p = tmp_path / "t.fits"
    tpl.save(p)
    back = GradientTemplates.load(p)
    assert back.label_names == tpl.label_names and back.delta == tpl.delta
    np.testing.assert_array_equal(back.usable, tpl.usable)
    np.testing.assert_allclose(back.grad, tpl.grad, equal_nan=True)
    assert back.meta["contwid"] == 50.0 and back.frame == "vacuum"


def test_compressed_restricted_templates_give_the_same_correlations(tmp_path):
    """The shipped form (pixels of one model only, int16 + scales, Rice-compressed): correlations
    equal the full float templates' to 1e-4, and the file is several times smaller."""
    emu = toy_emulator(2)
    wave = lamost_wavelength()
    ref = Table({"teff": [4500.0, 5000.0, 5500.0, 6000.0], "logg": [2.0, 3.0, 4.0, 4.5], "fe_h": [-2, -1, -0.5, 0.0]})
    tpl = build_templates(emu, ref, wave=wave)
    use = (wave > 4750) & (wave < 7150)
    small = tpl.restricted(use)
    assert not np.any(small.usable & ~use) and np.all(small.grad[:, :, ~use] == 0)
    full_p, comp_p = tmp_path / "full.fits", tmp_path / "comp.fits"
    tpl.save(full_p)
    small.save(comp_p, compress=True)
    back = GradientTemplates.load(comp_p)
    assert comp_p.stat().st_size < full_p.stat().st_size / 3
    model = _EmulatorModel(emu, wave)
    lab = np.stack([ref[n] for n in model.label_names], 1).astype(float) + [[40.0, 0.1, 0.05]]
    _, jac = model.predict_with_jacobian(lab)
    a = small.gradcorr_from_jacobian(jac, lab, model.label_names)
    b = back.gradcorr_from_jacobian(jac, lab, model.label_names)
    np.testing.assert_allclose(b, a, atol=1e-4)
    np.testing.assert_array_equal(back.usable, small.usable)


@pytest.mark.shared
def test_real_emulator_templates(shared):
    emu = CannonEmulator.load(shared / EMU)
    assert emu.label_names == ("teff", "logg", "fe_h") and emu.frame == "air"
    ref = reference_grid(emu)
    # 4000-7000 K, logg 1-5, [Fe/H] -2.5..0.5, minus hot giants outside the synthetic grid
    assert ref["teff"].min() == 4000 and ref["teff"].max() == 7000
    assert not np.any((ref["teff"] >= 6500) & (ref["logg"] < 2.9))
    sel = ref[(ref["teff"] == 5000) & (ref["logg"] == 4.5) & (ref["fe_h"] == 0.0)]
    tpl = build_templates(emu, sel)
    w = tpl.wave
    g_t, g_fe = tpl.grad[0, 0].astype(float), tpl.grad[0, 2].astype(float)
    # metal lines deepen with [Fe/H]: the normalised Mg b / Fe region loses flux
    mgb = (w > 5160) & (w < 5190)
    assert np.nanmean(g_fe[mgb]) < 0
    # warmer -> weaker metal lines: Teff and [Fe/H] gradients anticorrelate
    assert pearson_rows(g_t, g_fe, tpl.usable)[0] < -0.3
    # nothing defined blueward of the emulator (4500 A air)
    assert np.all(np.isnan(g_t[w < 4490]))


def test_gradcorr_of_a_payne_model_against_its_own_jacobian():
    """The SpectralModel path: templates made from an MLPPayne's own analytic Jacobian."""
    from musepayne.models.model import MLPPayne

    rng = np.random.default_rng(4)
    wave = np.linspace(5000.0, 5500.0, 300)
    ws = [rng.normal(0, 1, (20, 3)), rng.normal(0, 0.3, (20, 20)), rng.normal(0, 0.05, (300, 20))]
    bs = [rng.normal(0, 0.1, 20), rng.normal(0, 0.1, 20), np.ones(300)]
    model = MLPPayne(ws, bs, ("teff", "logg", "fe_h"), [4000, 1, -2.5], [7000, 5, 0.5], wave)
    ref_lab = np.array([[4500.0, 2.0, -1.0], [5500.0, 4.0, 0.0], [6500.0, 4.5, -2.0]])
    _, jac = model.predict_with_jacobian(ref_lab)
    tpl = GradientTemplates(wave, np.transpose(jac, (0, 2, 1)), Table(ref_lab, names=("teff", "logg", "fe_h")),
                            ("teff", "logg", "fe_h"))
    np.testing.assert_allclose(tpl.gradcorr(model, ref_lab), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="different wavelength grids"):
        GradientTemplates(wave + 1, tpl.grad, tpl.ref_labels, tpl.label_names).gradcorr(model, ref_lab)
