"""Precision forecasts: the paper's Eq. 11-13 numbers and the Cramér-Rao bound."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from musepayne.cli import main
from musepayne.science import forecast as fc

# Paper §5.1: S/N at which sigma = 0.1 dex.
PAPER_SNR_01 = {"mg_fe": 29.44, "c_fe": 39.00, "fe_h": 42.02, "si_fe": 59.54, "ca_fe": 79.35,
                "ti_fe": 74.62, "ni_fe": 76.24, "cr_fe": 65.39}
# Issue 7: limiting V for sigma = 0.1 dex in one hour.
PAPER_VLIM_1H = {"ca_fe": 18.58, "fe_h": 19.82, "mg_fe": 20.45}


@pytest.mark.parametrize("label,snr", sorted(PAPER_SNR_01.items()))
def test_required_snr_matches_paper(label, snr):
    assert fc.snr_for_sigma(label, 0.1) == pytest.approx(snr, rel=0.01)
    # and Eq. 11 forward gives back 0.1 dex there
    assert fc.sigma_from_snr(label, fc.snr_for_sigma(label, 0.1)) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("label,vlim", sorted(PAPER_VLIM_1H.items()))
def test_limiting_magnitude_matches_paper(label, vlim):
    assert abs(float(fc.limiting_vmag(label, 0.1, 3600.0)) - vlim) <= 0.02


def test_paper_statements_about_magnitudes():
    # "all chemical abundances ... till V = 18.5"; Mg, C, Fe "even till V = 19.7"
    abund = [k for k in fc.TABLE3 if k not in ("teff", "logg")]
    assert min(float(fc.limiting_vmag(k, 0.1)) for k in abund) > 18.5
    assert min(float(fc.limiting_vmag(k, 0.1)) for k in ("mg_fe", "c_fe", "fe_h")) > 19.7


def test_teff_is_in_100K_units_inside_table3():
    # Chem-I-Calc convention (method brief): SNR 100 -> 0.475 (x 100 K) = 47.5 K
    assert fc.sigma_from_snr("teff", 100.0) == pytest.approx(47.5, abs=0.1)
    assert fc.snr_for_sigma("Teff", 47.5) == pytest.approx(100.0, rel=0.005)


def test_eq12_13_and_inverses_round_trip():
    v = np.linspace(13.0, 22.0, 37)
    for t in (600.0, 3600.0, 5 * 3600.0):
        s = fc.snr_from_vmag(v, t)
        np.testing.assert_allclose(fc.vmag_for_snr(s, t), v, atol=1e-9)
        np.testing.assert_allclose(fc.exptime_for_snr(s, v), t, rtol=1e-12)
    # Eq. 12: S/N grows as sqrt(T)
    assert fc.snr_from_vmag(18.0, 4 * 3600) == pytest.approx(2 * fc.snr_1hr(18.0))
    # sigma at the limiting magnitude is the target
    vl = fc.limiting_vmag("si_fe", 0.07, 1800.0)
    assert fc.sigma_at("si_fe", vl, 1800.0) == pytest.approx(0.07, rel=1e-9)
    t = fc.required_exptime("mg_fe", 0.05, 19.0)
    assert fc.sigma_at("mg_fe", 19.0, t) == pytest.approx(0.05, rel=1e-9)


def test_label_names_and_errors():
    assert fc.canonical_label("[Fe/H]") == "fe_h"
    assert fc.canonical_label("[Mg/Fe]") == "mg_fe"
    with pytest.raises(KeyError, match="no Table 3"):
        fc.snr_for_sigma("zn_fe", 0.1)
    with pytest.raises(ValueError):
        fc.snr_for_sigma("fe_h", 0.0)


@pytest.mark.parametrize("args,key,expected,tol", [
    (["--label", "fe_h", "--sigma", "0.1"], "required_snr", 42.02, 0.01 * 42.02),
    (["--label", "ca_fe", "--sigma", "0.1", "--exptime", "3600"], "limiting_vmag", 18.58, 0.02),
    (["--label", "mg_fe", "--vmag", "19", "--sigma", "0.05"], "exptime_s", None, None),
])
def test_cli_examples(args, key, expected, tol):
    r = CliRunner().invoke(main, ["forecast", *args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    if expected is None:  # required exposure time: consistent with the forward relation
        assert fc.sigma_at("mg_fe", 19.0, out[key]) == pytest.approx(0.05, rel=1e-6)
        assert 1000 < out[key] < 10000
    else:
        assert abs(out[key] - expected) <= tol
    human = CliRunner().invoke(main, ["forecast", *args])
    assert human.exit_code == 0 and human.output.strip()


def test_cli_bad_label_is_a_clear_error():
    r = CliRunner().invoke(main, ["forecast", "--label", "xx_fe", "--sigma", "0.1", "--json"])
    assert r.exit_code == 2
    assert "no Table 3 relation" in json.loads(r.output)["error"]


def test_plots_carry_the_numbers(tmp_path):
    lims = fc.plot_snr_vs_vmag(tmp_path / "fig14.png", sigma=0.1)
    assert (tmp_path / "fig14.png").stat().st_size > 5000
    assert len(lims) == len(fc.TABLE3)
    assert lims["ca_fe"] == pytest.approx(18.58, abs=0.02)
    assert lims["teff"] == pytest.approx(float(fc.limiting_vmag("teff", 10.0)), abs=1e-9)  # 0.1 x 100 K
    drawn = fc.plot_sigma_vs_snr(tmp_path / "fig13.pdf", ["fe_h", "mg_fe"])
    assert drawn == ["fe_h", "mg_fe"]
    assert (tmp_path / "fig13.pdf").read_bytes()[:4] == b"%PDF"


# --------------------------------------------------------------------------- Cramér-Rao


class LinearModel:
    """flux = 1 + A @ labels: the Fisher matrix is snr^2 A^T A exactly."""

    label_names = ("teff", "logg", "fe_h")

    def __init__(self, a):
        self.a = a

    def predict_with_jacobian(self, labels):
        lab = np.atleast_2d(labels)
        flux = 1.0 + lab @ self.a.T
        jac = np.broadcast_to(self.a, (lab.shape[0],) + self.a.shape).copy()
        return flux, jac


def test_crlb_exact_for_linear_model_with_mask_and_correction():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(400, 3)) * np.array([1e-4, 0.05, 0.1])
    model = LinearModel(a)
    mask = np.zeros(400, bool)
    mask[:100] = True
    res = fc.cramer_rao(model, [5000.0, 3.0, 0.0], snr=80.0, mask=mask, correction={"fe_h": 1.5})
    use = ~mask
    cov = np.linalg.inv(80.0 ** 2 * a[use].T @ a[use])
    np.testing.assert_allclose(res.sigma_theory[0], np.sqrt(np.diag(cov)), rtol=1e-10)
    assert res.sigma[0, 2] == pytest.approx(1.5 * res.sigma_theory[0, 2])
    assert res.n_used[0] == 300
    # an integer pixel-flag mask: only excluding bits remove pixels
    from musepayne.flags import flag_value

    imask = np.where(mask, flag_value("TELLURIC"), flag_value("RES_COARSE"))
    res2 = fc.cramer_rao(model, [5000.0, 3.0, 0.0], snr=80.0, mask=imask)
    np.testing.assert_allclose(res2.sigma_theory, res.sigma_theory, rtol=1e-10)
    # per-pixel S/N: halving S/N everywhere doubles the bound
    res3 = fc.cramer_rao(model, [5000.0, 3.0, 0.0], snr=np.full(400, 40.0), mask=mask)
    np.testing.assert_allclose(res3.sigma_theory, 2 * res.sigma_theory, rtol=1e-10)
    t = res.to_table()
    assert t["fe_h_crlb"][0] == pytest.approx(res.sigma[0, 2])


class LineModel:
    """Analytic stand-in: absorption lines whose depths and widths depend on 3 labels."""

    label_names = ("teff", "logg", "fe_h")

    def __init__(self, n_pix=1500, n_lines=60, seed=0):
        rng = np.random.default_rng(seed)
        self.x = np.linspace(0.0, 1.0, n_pix)
        self.c = rng.uniform(0.02, 0.98, n_lines)
        self.k = rng.normal(size=(n_lines, 3)) * np.array([1.0 / 1000.0, 0.3, 1.0])
        self.d0 = rng.uniform(0.05, 0.4, n_lines)
        self.w = 0.002

    def predict_with_jacobian(self, labels):
        lab = np.atleast_2d(np.asarray(labels, float))
        u = (lab - np.array([5000.0, 3.0, 0.0])) @ self.k.T  # (n, lines)
        depth = self.d0 * np.exp(u)  # (n, lines)
        prof = np.exp(-0.5 * ((self.x[:, None] - self.c[None, :]) / self.w) ** 2)  # (pix, lines)
        flux = 1.0 - depth @ prof.T
        jac = -np.einsum("pl,nl,lj->npj", prof, depth, self.k)
        return flux, jac


def gauss_newton(model, y, ivar, start, n_iter=8):
    """Per-spectrum weighted least squares, the check's own small fitter."""
    theta = np.array(start, float)
    for _ in range(n_iter):
        f, j = model.predict_with_jacobian(theta)
        f, j = f[0], j[0]
        a = j.T @ (j * ivar[:, None])
        b = j.T @ ((y - f) * ivar)
        theta = theta + np.linalg.solve(a, b)
    return theta


def _scatter_vs_crlb(model, truth, snr, n_spec, mask, rng, start_offset):
    """The must-be-true check via the library's scatter_check with the small Gauss-Newton fitter."""
    def fit(flux, ivar):
        return np.array([gauss_newton(model, f, iv, truth + start_offset) for f, iv in zip(flux, ivar)])

    res = fc.scatter_check(model, truth, snr, fit, n_spec=n_spec, mask=mask, seed=int(rng.integers(1 << 30)))
    assert res["n_fitted"] == n_spec
    return res["scatter"], res["crlb"]


def test_crlb_matches_fitted_scatter_stand_in_model():
    rng = np.random.default_rng(11)
    model = LineModel()
    truth = np.array([4800.0, 2.5, -0.3])
    mask = np.zeros(model.x.size, bool)
    mask[200:400] = True
    scatter, bound = _scatter_vs_crlb(model, truth, 50.0, 300, mask, rng, np.array([30.0, 0.1, 0.05]))
    np.testing.assert_allclose(scatter / bound, 1.0, atol=0.15)


class PerPixelPayne:
    """The Payne's per-pixel network (T17/X19 format), evaluated with plain numpy."""

    label_names = ("teff", "logg", "fe_h", "mg_fe", "vmacro")

    def __init__(self, path):
        with np.load(path, allow_pickle=False) as d:
            self.w0, self.w1 = d["w_array_0"].astype(float), d["w_array_1"].astype(float)
            self.b0, self.b1 = d["b_array_0"].astype(float), d["b_array_1"].astype(float)
            self.xmin, self.xmax = d["x_min"], d["x_max"]

    def predict_with_jacobian(self, labels):
        lab = np.atleast_2d(np.asarray(labels, float))
        x = (lab - self.xmin) / (self.xmax - self.xmin) - 0.5
        z = np.einsum("pkl,nl->npk", self.w0, x) + self.b0  # (n, pix, hidden)
        h = 1.0 / (1.0 + np.exp(-z))
        flux = np.einsum("pk,npk->np", self.w1, h) + self.b1
        dfdx = np.einsum("pk,npk,pkl->npl", self.w1, h * (1 - h), self.w0)
        return flux, dfdx / (self.xmax - self.xmin)


@pytest.mark.shared
def test_crlb_matches_fitted_scatter_real_payne_network(shared):
    path = shared / "payne_apogee" / "NN_normalized_spectra.npz"
    model = PerPixelPayne(path)
    assert model.w0.shape == (7214, 5, 5) and model.w1.shape == (7214, 5)
    with np.load(shared / "payne_apogee" / "apogee_mask.npz", allow_pickle=False) as d:
        mask = d["apogee_mask"].astype(bool)  # True = masked (The Payne's convention)
    # Jacobian against finite differences
    truth = np.array([5500.0, 4.4, -0.2, 0.1, 8.0])
    f0, jac = model.predict_with_jacobian(truth)
    assert f0.shape == (1, 7214) and jac.shape == (1, 7214, 5)
    step = np.array([1.0, 1e-3, 1e-3, 1e-3, 1e-2])
    for j in range(5):
        e = np.zeros(5)
        e[j] = step[j]
        fd = (model.predict_with_jacobian(truth + e)[0] - model.predict_with_jacobian(truth - e)[0]) / (2 * step[j])
        np.testing.assert_allclose(jac[0, :, j], fd[0], rtol=1e-3, atol=1e-6)
    rng = np.random.default_rng(5)
    scatter, bound = _scatter_vs_crlb(model, truth, 50.0, 300, mask, rng, np.array([20.0, 0.03, 0.02, 0.02, 0.3]))
    np.testing.assert_allclose(scatter / bound, 1.0, atol=0.15)
    # physically sensible: S/N 50 over ~6300 APOGEE pixels gives a Teff bound of order 10 K
    assert 1.0 < bound[0] < 50.0


class GridLineModel(LineModel):
    """The stand-in on the LAMOST grid (with ``wave``, ``x_min``, ``x_max``) for the CLI."""

    def __init__(self):
        from musepayne.instrument.wavelength import lamost_wavelength

        self.wave = lamost_wavelength()
        super().__init__(n_pix=self.wave.size)
        self.x_min = np.array([4000.0, 1.0, -1.5])
        self.x_max = np.array([6000.0, 5.0, 0.5])


def test_cli_cramer_rao_mode(tmp_path, monkeypatch):
    from musepayne.cli import forecast as cmd

    model = GridLineModel()
    monkeypatch.setattr(cmd, "load_model", lambda path: model)
    args = ["forecast", "--model", "stand-in", "--at", "teff=4800,logg=2.5", "--snr", "50",
            "--correction", "fe_h=1.5", "--plot-snr", str(tmp_path / "fig13.png"), "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    truth = np.array([4800.0, 2.5, -0.5])  # fe_h not given: middle of the model's range
    expect = fc.cramer_rao(model, truth, snr=50.0, mask=fc.fit_mask(model.wave, "standard"),
                           correction={"fe_h": 1.5}, fit_rv=True).sigma[0][:3]
    got = {row["label"]: row for row in out["results"]}
    np.testing.assert_allclose([got[k]["crlb"] for k in ("teff", "logg", "fe_h")], expect, rtol=1e-10)
    assert got["fe_h"]["value"] == -0.5 and got["fe_h"]["crlb"] == pytest.approx(1.5 * got["fe_h"]["crlb_theory"])
    assert out["n_used"] == 1928  # LAMOST-grid pixels inside MUSE coverage minus the standard masks
    assert out["fit_rv"] and got["rv"]["crlb"] > 0  # RV fitted and marginalised by default
    assert (tmp_path / "fig13.png").stat().st_size > 5000
    # bulge mode loses the blue: fewer pixels and a larger bound
    r2 = CliRunner().invoke(main, args[:-3] + ["--mode", "bulge", "--json"])
    out2 = json.loads(r2.output)
    assert out2["n_used"] < out["n_used"]
    assert all(b["crlb"] > a["crlb"] for a, b in zip(out["results"], out2["results"]))
    bad = CliRunner().invoke(main, ["forecast", "--model", "x", "--at", "vsini=3", "--snr", "50", "--json"])
    assert bad.exit_code == 2 and "not in the model" in json.loads(bad.output)["error"]


def test_cli_teff_targets_are_in_kelvin():
    r = CliRunner().invoke(main, ["forecast", "--label", "teff", "--sigma", "50", "--json"])
    assert json.loads(r.output)["required_snr"] == pytest.approx(float(fc.snr_for_sigma("teff", 50.0)))
    assert 90 < json.loads(r.output)["required_snr"] < 100  # 47.5 K at S/N 100
    r = CliRunner().invoke(main, ["forecast", "--label", "teff", "--label", "fe_h", "--sigma", "0.1", "--json"])
    assert r.exit_code == 2 and "--sigma-teff" in json.loads(r.output)["error"]
    r = CliRunner().invoke(main, ["forecast", "--label", "teff", "--label", "fe_h", "--sigma", "0.1",
                                  "--sigma-teff", "10", "--exptime", "3600", "--json"])
    rows = {x["label"]: x for x in json.loads(r.output)["results"]}
    assert rows["teff"]["sigma"] == 10.0 and rows["fe_h"]["limiting_vmag"] == pytest.approx(19.82, abs=0.02)


def test_cli_cramer_rao_correction_from_repeats(tmp_path, monkeypatch):
    from astropy.table import Table

    from musepayne.cli import forecast as cmd

    model = GridLineModel()
    monkeypatch.setattr(cmd, "load_model", lambda path: model)
    rng = np.random.default_rng(4)
    ids = np.repeat([f"s{k}" for k in range(300)], 3)
    err = rng.uniform(0.02, 0.1, ids.size)
    Table({"stellar_id": ids, "fe_h": rng.normal(0, err), "fe_h_err": err / 2.0}).write(tmp_path / "rep.fits")
    r = CliRunner().invoke(main, ["forecast", "--model", "m", "--at", "teff=4800,logg=2.5,fe_h=0", "--snr", "50",
                                  "--repeats-from", str(tmp_path / "rep.fits"), "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["label"]: x for x in json.loads(r.output)["results"]}
    assert rows["fe_h"]["correction"] == pytest.approx(2.0, rel=0.1)  # errors were underestimated 2x
    assert rows["teff"]["correction"] == 1.0  # no repeats of Teff in that catalogue
    assert rows["fe_h"]["crlb"] == pytest.approx(rows["fe_h"]["correction"] * rows["fe_h"]["crlb_theory"])


class CannonOnLamostGrid:
    """Real physics-based emulator (Doppler's cubic Cannon, synthetic grid) through the pipeline's own
    resolution matching (R=1800), LAMOST-grid rebinning and 50 A pseudo-continuum; central-difference
    Jacobian of the normalised spectrum."""

    label_names = ("teff", "logg", "fe_h")

    def __init__(self, path, mode):
        from musepayne.instrument.lsf import LAMOST_LSF, ConstantFWHM
        from musepayne.instrument.wavelength import lamost_wavelength
        from musepayne.prepare.normalize import ContinuumNormalizer
        from musepayne.prepare.resample import build_operator

        with np.load(path, allow_pickle=False) as d:
            self.theta, self.exps = d["theta"], d["exponents"]
            self.fid, self.sc = d["fiducials"].astype(float), d["scales"].astype(float)
            wave_air = d["wavelength_air"]
        self.wave = lamost_wavelength()
        self.op = build_operator(wave_air, "air", ConstantFWHM(0.1), self.wave, LAMOST_LSF)
        self.excl = fc.fit_mask(self.wave, mode) | (self.op.coverage < 0.999)
        self.norm = ContinuumNormalizer(self.wave)

    def predict(self, labels):
        x = (np.atleast_2d(labels) - self.fid) / self.sc
        f = self.op.apply(np.prod(x[:, None, :] ** self.exps[None], axis=2) @ self.theta.T)
        return self.norm(f, np.where(self.excl, 0.0, 1.0) * np.ones_like(f))[0]

    def predict_with_jacobian(self, labels):
        lab = np.atleast_2d(np.asarray(labels, float))
        step = np.array([2.0, 0.005, 0.005])
        f0 = self.predict(lab)
        jac = np.zeros(f0.shape + (3,))
        for j in range(3):
            e = np.zeros(3)
            e[j] = step[j]
            jac[..., j] = (self.predict(lab + e) - self.predict(lab - e)) / (2 * step[j])
        return f0, np.nan_to_num(jac)


@pytest.mark.shared
def test_crlb_kgiant_bulge_mask_costs_about_twice(shared):
    """Paper Fig. 8: losing 4750-5991 A (bulge mode) worsens the precision by ~2.16 on average."""
    path = shared / "synthetic" / "doppler_cannon_coolstars_norm.npz"
    kgiant = np.array([4500.0, 2.5, 0.0])
    sig = {}
    for mode in ("standard", "bulge"):
        m = CannonOnLamostGrid(path, mode)
        res = fc.cramer_rao(m, kgiant, snr=50.0, mask=m.excl)
        sig[mode] = res.sigma[0]
        assert res.n_used[0] == (1928 if mode == "standard" else 1283)
    ratio = sig["bulge"] / sig["standard"]
    assert np.all((ratio > 1.5) & (ratio < 3.0))
    assert np.mean(ratio) == pytest.approx(2.16, rel=0.2)
    # a bound: the paper's empirical Eq. 11 precision (real data, many labels) is never better
    paper = np.array([fc.sigma_from_snr(k, 50.0) for k in ("teff", "logg", "fe_h")])
    assert np.all(sig["standard"] < paper)
    assert 5.0 < sig["standard"][0] < 60.0  # Teff bound of order tens of K at S/N 50


class LnLineModel:
    """Gaussian lines in ln(lambda) on the LAMOST grid; with_rv adds an explicit 'rv' label (analytic)."""

    def __init__(self, with_rv, seed=2):
        from musepayne.instrument.wavelength import lamost_wavelength

        rng = np.random.default_rng(seed)
        self.wave = lamost_wavelength()
        self.lnw = np.log(self.wave)
        self.c = np.log(rng.uniform(4800, 8700, 80))
        self.k = rng.normal(size=(80, 2)) * np.array([1.0 / 1000.0, 1.0])
        self.d0 = rng.uniform(0.05, 0.4, 80)
        self.w = 3.0 * 2.302585e-4  # 3 pixels of the LAMOST grid (1e-4 in log10) in ln(lambda)
        self.with_rv = with_rv
        self.label_names = ("teff", "fe_h", "rv") if with_rv else ("teff", "fe_h")

    def predict_with_jacobian(self, labels):
        from musepayne.instrument.wavelength import C_KMS

        lab = np.atleast_2d(np.asarray(labels, float))
        v = lab[:, 2] if self.with_rv else np.zeros(len(lab))
        depth = self.d0 * np.exp((lab[:, :2] - np.array([5000.0, 0.0])) @ self.k.T)  # (n, lines)
        u = (self.lnw[None, :, None] - self.c[None, None, :] - (v / C_KMS)[:, None, None]) / self.w
        prof = np.exp(-0.5 * u ** 2)  # (n, pix, lines)
        flux = 1.0 - np.einsum("npl,nl->np", prof, depth)
        jac = -np.einsum("npl,nl,lj->npj", prof, depth, self.k)
        if self.with_rv:
            dv = -np.einsum("npl,nl->np", prof * u / self.w / C_KMS, depth)
            jac = np.concatenate([jac, dv[:, :, None]], axis=2)
        return flux, jac


def test_crlb_marginalised_over_rv_matches_explicit_rv_label():
    explicit = fc.cramer_rao(LnLineModel(True), [4800.0, -0.2, 0.0], snr=50.0)
    implicit = fc.cramer_rao(LnLineModel(False), [4800.0, -0.2], snr=50.0, fit_rv=True)
    assert implicit.label_names == ("teff", "fe_h", "rv")
    np.testing.assert_allclose(implicit.sigma, explicit.sigma, rtol=0.005)
    fixed_rv = fc.cramer_rao(LnLineModel(False), [4800.0, -0.2], snr=50.0)
    assert np.all(implicit.sigma[0, :2] >= fixed_rv.sigma[0, :2] * (1 - 1e-12))  # marginalising never helps
    assert implicit.to_table()["rv_crlb"][0] == pytest.approx(implicit.sigma[0, 2])


def test_forecast_modes_are_library_functions():
    """The CLI's forecast modes are callable from Python with the same numbers."""
    mode, rows, labs = fc.forecast_table3(["[Fe/H]"], snr=50.0)
    assert mode == "sigma_at_snr" and labs == ["fe_h"] and rows[0]["sigma"] == pytest.approx(fc.sigma_from_snr("fe_h", 50))
    mode, rows, _ = fc.forecast_table3(["fe_h"], sigma=0.1, vmag=17.0)
    need = fc.snr_for_sigma("fe_h", 0.1)
    assert mode == "required_exptime" and rows[0]["exptime_s"] == pytest.approx(fc.exptime_for_snr(need, 17.0))
    with pytest.raises(ValueError, match="exclusive"):
        fc.forecast_table3(["fe_h"], sigma=0.1, snr=30)
    res, snr = fc.crlb_forecast(GridLineModel(), {"teff": 4800, "logg": 2.5}, snr=50.0)
    direct = fc.cramer_rao(GridLineModel(), np.array([4800.0, 2.5, -0.5]), snr=50.0,
                           mask=fc.fit_mask(GridLineModel().wave, "standard"), fit_rv=True)
    assert snr == 50.0 and np.allclose(res.sigma, direct.sigma)
