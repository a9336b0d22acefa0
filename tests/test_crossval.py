"""K-fold cross-validation helpers and a small end-to-end run on real library stars."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from musepayne.models.cannon import CannonConfig
from musepayne.train.crossval import CVConfig, assign_folds, cross_validate, cv_summary, dispersion


def test_folds_keep_groups_together_and_balance():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "g", "h", "h"])
    f = assign_folds(groups, 3, 0)
    for g in np.unique(groups):
        assert np.unique(f[groups == g]).size == 1
    counts = np.bincount(f, minlength=3)
    assert counts.max() - counts.min() <= 2
    np.testing.assert_array_equal(f, assign_folds(groups, 3, 0))


def test_dispersion_of_a_gaussian_is_sigma():
    x = np.random.default_rng(0).normal(5.0, 2.0, (20000, 2))
    np.testing.assert_allclose(dispersion(x), 2.0, rtol=0.03)


@pytest.mark.shared
@pytest.mark.slow
def test_cross_validation_end_to_end(shared):
    pytest.importorskip("torch")
    from musepayne.train.trainer import TrainConfig
    from musepayne.train.trainset import build_trainset

    lib = shared / "libraries" / "miles"
    files = [("miles", p) for p in sorted(lib.glob("MILES_res2.50_star_m0*V.fits"))[:40]]
    ts = build_trainset(files=files)
    cfg = CVConfig(k=2, train=TrainConfig(hidden=(32, 32), epochs=300, patience=100), baseline=CannonConfig())
    tab, summ = cross_validate(ts, None, cfg)
    assert summ["n_stars"] == len(tab) > 5
    lab = ts.labels
    box = (lab[:, 0] > 4000) & (lab[:, 0] < 7000) & (lab[:, 2] > -2)
    assert len(tab) == box.sum()  # every star in the validation box is predicted exactly once
    # each star is fitted by the model of its own fold (trained without it), as MUSE and as LAMOST
    assert set(tab["fold"]) <= {0, 1}
    for inst in ("muse", "lamost"):
        assert np.all(np.isfinite(tab[f"teff_{inst}"]))
        # a 32-32 network on ~20 stars is crude, but real spectra still give Teff to a few hundred K
        assert summ[f"{inst}_minus_lit"]["teff"]["dispersion"] < 700
        assert np.all(np.abs(tab[f"rv_{inst}"]) < 30)  # simulated stars are at rest
        # the quadratic-Cannon baseline fitted the same stars (same folds, same prepared spectra)
        assert np.all(np.isfinite(tab[f"teff_{inst}_cannon"]))
        assert summ["baseline"][f"{inst}_minus_lit"]["teff"]["dispersion"] < 700
        assert np.all(np.abs(tab[f"rv_{inst}_cannon"]) < 30)
    assert "muse_minus_lamost" in summ["baseline"] and summ["seconds"]["baseline_fit"] > 0


def test_cv_checks_apply_the_issue_thresholds():
    from musepayne.train.crossval import cv_checks

    def comp(t, g, f, bias=0.0):
        return {"teff": {"dispersion": t, "bias": bias}, "logg": {"dispersion": g, "bias": 0.0},
                "fe_h": {"dispersion": f, "bias": 0.0}}

    reg = {"muse_minus_lit": comp(90, 0.15, 0.08, bias=20.0), "muse_minus_lamost": comp(60, 0.05, 0.04),
           "muse_gradcorr_median": {"teff": 0.9, "logg": 0.8, "fe_h": 0.65}}
    plain = {"muse_gradcorr_median": {"teff": 0.8, "logg": 0.85, "fe_h": 0.6}}
    c = cv_checks(reg, plain)
    assert c["muse_minus_lit_teff_dispersion"] and c["muse_minus_lit_teff_bias"]  # 20 <= 90/3
    assert not c["muse_minus_lamost_teff_dispersion"] and c["muse_minus_lamost_fe_h_dispersion"]
    assert c["gradcorr_teff_ge_0.7"] and not c["gradcorr_fe_h_ge_0.7"]
    assert not c["gradcorr_logg_above_weight0"] and c["gradcorr_teff_above_weight0"]


def test_cv_summary_reads_the_baseline_columns():
    from astropy.table import Table

    rng = np.random.default_rng(0)
    n = 400
    lit = rng.normal(5500, 500, n)
    t = Table({"teff_lit": lit, "teff_muse": lit + rng.normal(10, 50, n), "teff_lamost": lit + rng.normal(0, 50, n),
               "teff_muse_cannon": lit + rng.normal(-30, 120, n), "teff_lamost_cannon": lit + rng.normal(0, 120, n)})
    ours = cv_summary(t, ("teff",))
    base = cv_summary(t, ("teff",), suffix="_cannon")
    assert ours["muse_minus_lit"]["teff"]["dispersion"] == pytest.approx(50, rel=0.15)
    assert base["muse_minus_lit"]["teff"]["dispersion"] == pytest.approx(120, rel=0.15)
    assert base["muse_minus_lit"]["teff"]["bias"] == pytest.approx(-30, abs=20)
    assert base["muse_minus_lamost"]["teff"]["dispersion"] == pytest.approx(120 * np.sqrt(2), rel=0.15)


def test_validate_cv_passes_the_baseline_switch(monkeypatch):
    """``validate --cv [--no-baseline] --json`` hands the switch to the CV hook and prints its result."""
    import json
    import sys
    import types

    from click.testing import CliRunner

    from musepayne.cli import validate as vmod

    seen = {}

    def fake(options):
        seen.update(options)
        return {"baseline": options["baseline"]}, ["ok"]

    mod = types.ModuleType("_fake_cv_hook")
    mod.run_cv = fake
    monkeypatch.setitem(sys.modules, "_fake_cv_hook", mod)
    monkeypatch.setattr(vmod, "CV_HOOK", "_fake_cv_hook:run_cv")
    for args, want in ((["--cv", "--json"], True), (["--cv", "--no-baseline", "--json"], False)):
        res = CliRunner().invoke(vmod.validate, args)
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["baseline"] is want and seen["baseline"] is want
        assert seen["trainset"] is None and seen["templates"] is None
    # --trainset / --templates hand files to the hook (the default model is trained from such files)
    with CliRunner().isolated_filesystem():
        open("ts.fits", "w").close()
        open("tpl.fits", "w").close()
        res = CliRunner().invoke(vmod.validate, ["--cv", "--trainset", "ts.fits", "--templates", "tpl.fits", "--json"])
        assert res.exit_code == 0, res.output
        assert seen["trainset"] == "ts.fits" and seen["templates"] == "tpl.fits"


def test_run_cv_reports_the_baseline_beside_the_regularised_run(monkeypatch, tmp_path):
    """run_cv trains the baseline once (with the regularised run, whose folds and test spectra are
    those of the weight-0 run too), reports it in info['baseline'] and in the human summary."""
    from astropy.table import Table

    import musepayne.models.gradients as gr
    import musepayne.train.crossval as cv
    import musepayne.train.trainset as tsm

    def comp(t, g, f, b=0.0):
        return {"teff": {"dispersion": t, "bias": b}, "logg": {"dispersion": g, "bias": 0.0},
                "fe_h": {"dispersion": f, "bias": 0.0}}

    calls = []

    def fake_cv(ts, tpl, cfg):
        calls.append(cfg)
        s = {"n_stars": 3, "muse_minus_lit": comp(120, 0.3, 0.15), "muse_minus_lamost": comp(28, 0.08, 0.03),
             "muse_gradcorr_median": {"teff": 0.95, "logg": 0.95, "fe_h": 0.95}}
        if cfg.baseline is not None:
            s["baseline"] = {"method": cv.BASELINE_METHOD, "muse_minus_lit": comp(124, 0.31, 0.18, 61.0)}
        return Table({"x": [1, 2, 3]}), s

    class FakeTS:
        label_names = ("teff", "logg", "fe_h")

    monkeypatch.setattr(cv, "cross_validate", fake_cv)
    monkeypatch.setattr(tsm.TrainingSet, "read", classmethod(lambda cls, p: FakeTS()))
    monkeypatch.setattr(gr.GradientTemplates, "load", classmethod(lambda cls, p: object()))
    opts = {"trainset": "ts.fits", "templates": "tpl.fits", "plot_dir": str(tmp_path)}
    info, lines = cv.run_cv(opts)
    assert [c.baseline is not None for c in calls] == [True, False]
    assert calls[0].baseline.min_pixel_coverage == calls[0].train.min_pixel_coverage
    # the default model's recipe (architecture, scatter, ...) for both runs; weight 0 for the second
    recipe = cv.default_recipe()
    assert calls[0].train == recipe and calls[1].train == replace(recipe, gradient_weight={})
    assert info["baseline"]["muse_minus_lit"]["teff"]["dispersion"] == 124
    assert "baseline" not in info["regularised"]
    assert any("Cannon baseline" in ln for ln in lines) and any("disp 124 bias +61" in ln for ln in lines)
    assert (tmp_path / "cv_regularised.fits").exists()
    calls.clear()
    info, lines = cv.run_cv({**opts, "baseline": False})
    assert [c.baseline for c in calls] == [None, None] and "baseline" not in info


def test_default_recipe_is_the_shipped_models_training_config():
    from musepayne.models.files import load_model
    from musepayne.train.crossval import default_recipe

    tc = load_model("default").meta["train_config"]
    r = default_recipe()
    assert r.hidden == tuple(tc["hidden"]) and r.gradient_weight == tc["gradient_weight"]
    assert r.model_scatter == tc["model_scatter"] and r.min_pixel_coverage == tc["min_pixel_coverage"]
    assert r.seed == 0  # seeds are per fold, not part of the recipe
