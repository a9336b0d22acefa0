"""Benchmark-scale calibration (musepayne.models.benchcal): map, systematic errors, storage, application."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musepayne.models.benchcal import (
    BENCH_LABELS,
    DEFAULT_BENCHMARK_FILE,
    BenchmarkCalibration,
    _robust_disp,
    hd_number,
    match_benchmarks,
    read_benchmarks,
)
from musepayne.train.benchcal import (
    MIN_PULL_STARS,
    BenchCalConfig,
    checks,
    cross_validate_calibration,
    ensemble_mlp,
    evaluate,
    fit_calibration,
    pull_bins,
    select_maps,
)

HOLDOUT = Path(__file__).parent / "data" / "benchcal_holdout.fits"


def _mock(n=300, seed=1):
    """Mock 'fitted' labels with a known quadratic distortion of the benchmark scale, known
    statistical errors, benchmark errors and a known extra (systematic) scatter."""
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.uniform(4200, 6600, n), rng.uniform(1.0, 4.7, n), rng.uniform(-2.0, 0.4, n)])
    x = y.copy()
    x[:, 0] += -40 + 30 * (y[:, 1] - 3) / 1.5                       # fit - bench: Teff offset depends on log g
    x[:, 1] += 0.15 * ((y[:, 2] + 0.5) ** 2) - 0.1                  # log g biased for metal-poor stars
    x[:, 2] += -0.08 + 0.03 * (y[:, 0] - 5000) / 1000
    sys_true = np.array([80.0, 0.12, 0.06])
    stat = np.column_stack([np.full(n, 30.0), np.full(n, 0.05), np.full(n, 0.02)]) * rng.uniform(0.5, 1.5, (n, 3))
    be = np.column_stack([np.full(n, 60.0), np.full(n, 0.08), np.full(n, 0.05)])
    x += rng.standard_normal((n, 3)) * np.sqrt(stat**2 + sys_true**2 + be**2)
    return x, y, stat, be, sys_true


def test_map_and_sys_recover_known_distortion():
    x, y, stat, be, sys_true = _mock()
    groups = np.arange(len(x))
    xc, err, sys = cross_validate_calibration(x, y, stat, be, groups, k=5, degree=2, ridge=1.0)
    for k, n in enumerate(BENCH_LABELS):
        d_before = x[:, k] - y[:, k]
        d_after = xc[:, k] - y[:, k]
        total = np.sqrt(sys_true[k] ** 2 + be[:, k] ** 2 + stat[:, k] ** 2).mean()
        # the distortion is removed: no bias, and the dispersion is back to the injected noise
        assert abs(np.median(d_after)) < 0.15 * total, n
        assert _robust_disp(d_after) < 1.12 * total, n
        assert _robust_disp(d_after) < _robust_disp(d_before) or abs(np.median(d_before)) > abs(np.median(d_after))
        # the systematic error is recovered and the pulls are calibrated out of fold
        assert np.median(sys[:, k]) == pytest.approx(sys_true[k], rel=0.3), n
        assert 0.85 <= _robust_disp(d_after / np.sqrt(err[:, k] ** 2 + be[:, k] ** 2)) <= 1.15, n


def test_calibration_roundtrip_and_fit_applies_it(tmp_path):
    from fit_helpers import as_prepared, toy_stellar_model
    from musepayne.fit import FitConfig, Fitter
    from musepayne.models.files import load_model

    x, y, stat, be, _ = _mock()
    cal = fit_calibration(x, y, stat, be, meta={"id": "mock", "command": "test"})
    model = toy_stellar_model()
    assert load_model  # model files without BENCHCAL load (the toy model has none)
    model.benchmark_calibration = cal
    p = tmp_path / "m.fits"
    model.save(p)
    back = load_model(p)
    c2 = back.benchmark_calibration
    assert c2.degree == cal.degree and c2.meta == cal.meta and c2.sys_err == cal.sys_err
    assert np.array_equal(c2.apply(x), cal.apply(x))

    truth = np.array([[5200.0, 3.9, -0.4], [4700.0, 2.2, -1.5]])
    flux = back.predict(truth)
    ivar = np.full(flux.shape, 1e4)
    prep = as_prepared(back.wave, flux, ivar)
    cat = Fitter(back, FitConfig(fit_rv=False))(prep)
    raw = Fitter(back, FitConfig(fit_rv=False, benchmark_calibration=False))(prep)
    assert "teff_uncal" not in raw.colnames and "teff_err_sys" not in raw.colnames
    lab = np.column_stack([raw[n] for n in BENCH_LABELS])
    expect = cal.apply(lab)
    sys = cal.sys(expect)
    for k, n in enumerate(BENCH_LABELS):
        assert np.allclose(cat[f"{n}_uncal"], raw[n])
        assert np.allclose(cat[n], expect[:, k])
        assert np.allclose(cat[f"{n}_err_stat"], raw[f"{n}_err"])
        assert np.allclose(cat[f"{n}_err_sys"], sys[:, k])
        assert np.allclose(cat[f"{n}_err"], np.hypot(raw[f"{n}_err"], sys[:, k]))
        for c in (n, f"{n}_uncal", f"{n}_err", f"{n}_err_stat", f"{n}_err_sys"):
            assert cat[c].description, c
        assert str(cat[f"{n}_err_sys"].unit or "") == str(cat[n].unit or "")
    # the calibration changes the labels (the mock distortion is tens of K / ~0.1 dex)
    assert np.all(np.abs(cat["teff"] - cat["teff_uncal"]) > 5)


def test_bad_calibration_hdu_version_is_a_clear_error():
    x, y, stat, be, _ = _mock(60)
    h = fit_calibration(x, y, stat, be).to_hdu()
    h.header["BCVERS"] = 99
    with pytest.raises(ValueError, match="newer"):
        BenchmarkCalibration.from_hdu(h)


def test_hd_numbers():
    assert hd_number("HD 16765A") == "16765"
    assert hd_number("hde 000123") == "123"
    assert hd_number("BD+13 13") is None


@pytest.mark.shared
def test_benchmark_match(shared):
    b = read_benchmarks(shared / "benchmarks" / "gbs_v3_gdr3_tmass.csv")
    assert len(b) > 150 and np.all(b["e_fe_h"] == 0.05)
    m = match_benchmarks(["HD 195564", "HD13468", "HD 1", "Sun"], b)
    assert m[0] >= 0 and m[1] >= 0 and m[2] == -1 and m[3] == -1
    assert b["teff"][m[0]] == 5514


def test_map_selection_finds_the_inputs_that_matter():
    """CV over the stars picks, per label, a map with the inputs the distortion depends on and
    leaves a label with a pure offset at (nearly) an offset."""
    x, y, stat, be, _ = _mock(400, seed=3)
    x[:, 2] = y[:, 2] - 0.08 + 0.05 * np.random.default_rng(5).standard_normal(len(y))  # [Fe/H]: offset only
    ch = select_maps(x, y, np.arange(len(x)))
    assert "g" in ch["teff"]["name"], ch["teff"]["name"]          # Teff offset depends on log g
    assert "f" in ch["logg"]["name"] and "quad" in ch["logg"]["name"], ch["logg"]["name"]  # quadratic in [Fe/H]
    cal = fit_calibration(x, y, stat, be, groups=np.arange(len(x)), select=True)
    # the [Fe/H] correction is ~the offset everywhere (whatever was chosen)
    corr = cal.correction(x)[:, 2]
    assert np.median(corr) == pytest.approx(0.08, abs=0.01) and np.std(corr) < 0.02
    assert set(cal.meta["map"]) == set(BENCH_LABELS)


def test_ensemble_mlp_is_the_mean_of_its_members():
    from musepayne.models.model import MLPPayne

    rng = np.random.default_rng(0)
    wave = np.linspace(5000, 6000, 50)
    members = []
    for _ in range(3):
        w = [rng.standard_normal((8, 3)), rng.standard_normal((8, 8)), rng.standard_normal((50, 8))]
        b = [rng.standard_normal(8), rng.standard_normal(8), rng.standard_normal(50)]
        members.append(MLPPayne(w, b, ["teff", "logg", "fe_h"], [4000, 0, -2.5], [7000, 5, 0.5], wave,
                                meta={"name": "m"}).with_scatter(np.full(50, 0.01)))
    ens = ensemble_mlp(members)
    x = np.array([[5000.0, 3.0, -0.5], [4300.0, 1.2, -2.0]])
    assert np.allclose(ens.predict(x), np.mean([m.predict(x) for m in members], 0), atol=1e-5)
    assert [w.shape for w in ens.weights] == [(24, 3), (24, 24), (50, 24)]
    assert np.allclose(ens.scatter, 0.01)


@pytest.fixture(scope="module")
def holdout_figures(shared):
    """The shipped hold-out fits (our fits only) with the benchmark labels re-attached by HD from
    the benchmark table in the shared data (third-party labels are not shipped)."""
    from astropy.table import Table

    from musepayne.models.benchcal import attach_benchmark_labels

    tab = attach_benchmark_labels(Table.read(HOLDOUT), read_benchmarks(shared / DEFAULT_BENCHMARK_FILE))
    return tab, evaluate(tab, BenchCalConfig())


def test_shipped_holdout_table_has_no_benchmark_labels():
    """Third-party data stays out of the repository: the hold-out table ships our fits only."""
    from astropy.table import Table

    from musepayne.models.benchcal import BENCH_COLUMNS

    tab = Table.read(HOLDOUT)
    assert not set(BENCH_COLUMNS) & set(tab.colnames)
    assert {"hd", "teff", "teff_err", "snr"} <= set(tab.colnames)


@pytest.mark.shared
def test_error_calibration_cross_validated(holdout_figures):
    """The shipped hold-out fits (benchmark stars observed as MUSE and LAMOST at S/N 100, fitted by
    the default recipe trained without them, three seeds): cross-validated over the stars, the
    calibrated labels meet the issue's limits and (fit - bench) / sqrt(err^2 + e_bench^2) has a
    dispersion within 0.85-1.2 for every label, seed and instrument."""
    from musepayne.models.files import load_model

    tab, fig = holdout_figures
    for key, per in fig["per_seed"].items():
        for n in BENCH_LABELS:
            pull = per["cal"]["all"][n]["pull_dispersion"]
            assert 0.85 <= pull <= 1.2, (key, n, pull)
            # without the systematic term (statistical error and seed members' spread only) the
            # errors are too small
            assert per["uncal"]["all"][n]["pull_dispersion"] > 1.2, (key, n)
    # the issue's bias and pull limits on the seed-mean MUSE figures (the dispersion limits are
    # not reached by the shipped model: test_dispersion_limits_of_the_issue below)
    chk = checks(fig, "muse")
    assert all(v for k, v in chk.items() if not k.endswith("_dispersion")), chk
    s = fig["summary"]["muse"]
    # the map removes a quarter of the log g scatter (0.213 -> 0.158 dex for the shipped model, ratio 0.74)
    assert s["cal"]["all"]["logg"]["dispersion"]["mean"] < 0.85 * s["uncal"]["all"]["logg"]["dispersion"]["mean"]
    # instrument independence: one map for both; LAMOST meets the bias limits too
    lam = fig["summary"]["lamost"]["cal"]["all"]
    assert abs(lam["teff"]["bias"]["mean"]) <= 30 and abs(lam["logg"]["bias"]["mean"]) <= 0.03
    assert abs(lam["fe_h"]["bias"]["mean"]) <= 0.02
    # the shipped default model carries the calibration fitted on these rows
    cal = load_model("default").benchmark_calibration
    assert cal is not None
    from musepayne.train.benchcal import fit_final

    c = cal.meta["config"]
    ref = fit_final(tab, BenchCalConfig(k=c["k"], degree=c["degree"], ridge=c["ridge"], sys_bins=c["sys_bins"],
                                        seed=c["seed"], map_instruments=tuple(c["map_instruments"]),
                                        select=c.get("select", False)))
    for n in BENCH_LABELS:
        assert np.allclose(ref.coef[n], cal.coef[n], rtol=1e-6, atol=1e-9)
        assert ref.sys_err[n] == pytest.approx(cal.sys_err[n], rel=1e-6)


@pytest.fixture(scope="module")
def muse_pull_bins(holdout_figures):
    return pull_bins(holdout_figures[0], holdout_figures[0], BenchCalConfig())["muse"]


@pytest.mark.shared
def test_errors_calibrated_by_snr_and_star_type(holdout_figures, muse_pull_bins):
    """Issue 14 / 19: in CV (calibration learnt at S/N 100 from the other folds' stars, applied to
    the held-out stars observed as MUSE at S/N 20, 50 and 100; hold-out seeds pooled), the
    dispersion of (fit - bench) / sqrt(X_err^2 + e_bench^2) is within 0.85-1.2 for every label in
    every S/N bin, overall and for dwarfs (log g > 3.5), and for the giants' [Fe/H] (their Teff and
    log g within 0.85-1.3).  Bins need MIN_PULL_STARS (10) distinct stars (all 94, dwarfs 56,
    giants 38).  The giants' Teff and log g and the metal-poor giants (5 stars) miss the range:
    test_error_targets_not_reached."""
    tab, _ = holdout_figures
    assert set(np.unique(np.asarray(tab["snr"], float))) >= {20.0, 50.0, 100.0}
    for sn in (20.0, 50.0, 100.0):
        for grp in ("all", "dwarf", "giant"):
            b = muse_pull_bins[sn][grp]
            assert b["n_stars"] >= MIN_PULL_STARS, (sn, grp)
            for n in BENCH_LABELS:
                if grp == "giant" and n in ("teff", "logg"):
                    assert 0.85 <= b[n] <= 1.3, (sn, grp, n, b[n])
                    continue
                assert 0.85 <= b[n] <= 1.2, (sn, grp, n, b[n])
            # without the systematic term the errors are far too small at S/N >= 50
            if sn >= 50 and grp == "all":
                assert all(b[n] < 1.2 for n in BENCH_LABELS)


@pytest.mark.shared
@pytest.mark.xfail(strict=True, reason="issue 14 target not reached with the shipped fold assignment: giants' "
                   "Teff pull 1.23 at S/N 50 and log g 1.21 at S/N 20 (in range on average over ten assignments: "
                   "1.04-1.10 / 0.94-1.15) and the 5 metal-poor giants (Teff 1.37-1.40, log g 1.09-1.40 with the "
                   "seed term; 1.46-1.61 / 1.26-1.49 without: their errors are too small)")
def test_error_targets_not_reached(muse_pull_bins):
    for sn in (20.0, 50.0, 100.0):
        assert 0.85 <= muse_pull_bins[sn]["giant"]["teff"] <= 1.2
        assert 0.85 <= muse_pull_bins[sn]["giant"]["logg"] <= 1.2
        for n in BENCH_LABELS:
            assert 0.85 <= muse_pull_bins[sn]["mp_giant"][n] <= 1.2


@pytest.mark.shared
@pytest.mark.xfail(strict=True, reason="issue 19 target not reached: cross-validated MUSE Teff dispersion of the "
                   "shipped model is 133 K (124-140 over seeds), above 130 K")
def test_dispersion_limits_of_the_issue(holdout_figures):
    chk = checks(holdout_figures[1], "muse")
    assert chk["teff_dispersion"] and chk["logg_dispersion"] and chk["fe_h_dispersion"], chk


def test_reproducible_command_has_no_machine_paths(tmp_path):
    from musepayne.cli._common import reproducible_command

    inside = tmp_path / "build" / "trainset.fits"
    cmd = reproducible_command("musepayne train", [str(inside), "-o", "/scratch/x/default.fits",
                                                   "--gradient-templates=/scratch/t.fits", "--seed", "0"],
                               cwd=tmp_path)
    assert cmd == ("musepayne train build/trainset.fits -o '<DIR>/default.fits' "
                   "'--gradient-templates=<DIR>/t.fits' --seed 0")


def test_default_model_provenance_is_portable():
    """Issue 19: the shipped model's recorded commands carry no machine paths; inputs by sha256."""
    import json

    from musepayne.models.files import load_model

    m = load_model("default")
    text = json.dumps({**m.meta, "benchcal": m.benchmark_calibration.meta}, default=str)
    for bad in ("/tmp/", "/work/", "/home/", "/root/"):
        assert bad not in text, bad
    sha = m.benchmark_calibration.meta["inputs_sha256"]
    assert any(k.startswith("holdout_seed") for k in sha) and all(len(v) == 64 for v in sha.values())
