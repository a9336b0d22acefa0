"""Seed members: networks of the model's recipe trained with other seeds, stored in the model
file, whose disagreement the fit propagates to the labels (``X_err_seed``).

Known truth: a member whose first-layer bias is moved by ``W0 @ delta`` predicts
``M(s + delta)`` exactly, so fitted with it the labels of any spectrum move by ``-delta``.  Two
members moved by ``+delta`` and ``-delta`` give label shifts {0, -delta, +delta}: a spread of
exactly ``|delta|`` (ddof 1), in physical units ``|delta| * (x_max - x_min)``."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fit_helpers import as_prepared, toy_stellar_model
from musepayne.fit import FitConfig, Fitter
from musepayne.models.files import load_model
from musepayne.models.model import ModelError

DELTA = np.array([0.004, -0.003, 0.005])  # scaled labels: 12 K, -0.0135 dex, 0.015 dex


def _shifted(model, delta):
    """A copy of ``model`` with ``predict_scaled(s) == model.predict_scaled(s + delta)``."""
    m = copy.copy(model)
    m.biases = [model.biases[0] + model.weights[0] @ delta] + list(model.biases[1:])
    m.weights = list(model.weights)
    m._cache = {}
    return m


@pytest.fixture(scope="module")
def toy():
    return toy_stellar_model()


def _spectra(model, n=12, snr=80.0, seed=3):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.3, 0.3, (n, model.n_labels))
    f = model.predict_scaled(s)
    ivar = np.full(f.shape, snr ** 2)
    return s, as_prepared(model.wave, f + rng.standard_normal(f.shape) / snr, ivar)


def test_member_shift_is_exact(toy):
    s = np.array([[0.1, -0.2, 0.05]])
    np.testing.assert_allclose(_shifted(toy, DELTA).predict_scaled(s), toy.predict_scaled(s + DELTA), atol=1e-10)


def test_seed_spread_recovers_known_label_shift(toy):
    """Labels' spread over {model, +delta, -delta} members is |delta| within 5 % (linearisation
    and float32), for RV fitted; and fitting with a member itself moves the labels by -delta."""
    _, prep = _spectra(toy)
    m = toy.with_seed_members([_shifted(toy, DELTA), _shifted(toy, -DELTA)])
    cfg = FitConfig(fit_rv=True, rv_range=200.0)
    cat = Fitter(m, cfg)(prep)
    ok = np.asarray(cat["status"]) == "converged"
    assert ok.sum() >= 10
    want = np.abs(DELTA) * toy.scale_width
    for k, n in enumerate(toy.label_names):
        got = np.asarray(cat[f"{n}_err_seed"])[ok]
        np.testing.assert_allclose(got, want[k], rtol=0.05, err_msg=n)
        assert cat[f"{n}_err_seed"].unit == cat[n].unit
    # the members do not change the labels or their statistical errors
    ref = Fitter(toy, cfg)(prep)
    for n in toy.label_names:
        np.testing.assert_array_equal(np.asarray(cat[n]), np.asarray(ref[n]))
        np.testing.assert_array_equal(np.asarray(cat[f"{n}_err"]), np.asarray(ref[f"{n}_err"]))
        assert f"{n}_err_seed" not in ref.colnames
    # a nonlinear refit with the +delta member lands delta away (the linearisation's truth; single
    # rows within the fit's convergence tolerance, ~0.2 sigma)
    plus = Fitter(_shifted(toy, DELTA), cfg)(prep)
    for k, n in enumerate(toy.label_names):
        d = (np.asarray(plus[n]) - np.asarray(ref[n]))[ok]
        assert np.median(d) == pytest.approx(-DELTA[k] * toy.scale_width[k], rel=0.02), n
        assert np.all(np.abs(d + DELTA[k] * toy.scale_width[k]) < 0.3 * np.asarray(ref[f"{n}_err"])[ok]), n
    # switched off: no column
    off = Fitter(m, FitConfig(fit_rv=True, rv_range=200.0, seed_errors=False))(prep)
    assert "teff_err_seed" not in off.colnames


def test_seed_members_round_trip_and_validation(toy, tmp_path):
    m = toy.with_seed_members([_shifted(toy, DELTA)])
    m.seed_members[0].meta = {"seed": 7, "command": "musepayne train x --seed 7", "secret": "not kept"}
    path = tmp_path / "m.fits"
    m.save(path)
    back = load_model(path)
    assert len(back.seed_members) == 1
    s = np.array([[0.0, 0.1, -0.1]])
    np.testing.assert_array_equal(back.seed_members[0].predict_scaled(s), m.seed_members[0].predict_scaled(s))
    np.testing.assert_array_equal(back.predict_scaled(s), toy.predict_scaled(s))
    assert back.seed_members[0].meta == {"seed": 7, "command": "musepayne train x --seed 7"}
    assert not toy.seed_members  # the original is unchanged
    # members must match the model
    from fit_helpers import toy_stellar_model as other

    wrong = other()
    wrong.wave = wrong.wave * 1.001
    with pytest.raises(ModelError, match="seed member 1"):
        toy.with_seed_members([wrong])


HOLDOUT = __import__("pathlib").Path(__file__).parent / "data" / "benchcal_holdout.fits"


def test_linearised_spread_predicts_refits_with_other_seeds():
    """Real spectra (the shipped hold-out fits: 108 benchmark-star library spectra observed as MUSE and
    LAMOST at S/N 20, 50, 100, each fitted by three models of the default recipe trained with seeds
    0, 1, 2 on the same noisy spectrum).  Each row's ``X_err_seed`` (linearised, the other two
    models as members) predicts the spread of the three full fits: the median ratio of the
    actual spread to the predicted one is 0.85-1.35 (measured 1.05 / 1.26 / 1.06; log g's
    response to the network is the least linear) and they rank the spectra alike (Spearman > 0.5,
    measured 0.61 / 0.62 / 0.65)."""
    from astropy.table import Table
    from scipy.stats import spearmanr

    t = Table.read(HOLDOUT)
    assert sorted(set(int(s) for s in t["seed"])) == [0, 1, 2]
    key = [f"{i}|{s}|{sid}" for i, s, sid in zip(t["instrument"], t["snr"], t["stellar_id"])]
    _, inv = np.unique(key, return_inverse=True)
    assert np.all(np.bincount(inv) == 3)
    order = np.argsort(inv, kind="stable")
    for n in ("teff", "logg", "fe_h"):
        x = np.asarray(t[n], float)[order].reshape(-1, 3)
        e = np.asarray(t[f"{n}_err_seed"], float)[order].reshape(-1, 3)
        actual = x.std(axis=1, ddof=1)
        predicted = np.sqrt(np.mean(e ** 2, axis=1))
        assert np.all(predicted > 0), n
        ratio = np.median(actual / predicted)
        assert 0.85 <= ratio <= 1.35, (n, ratio)
        assert spearmanr(actual, predicted)[0] > 0.5, n


@pytest.mark.shared
def test_seed_term_enlarges_errors_where_they_were_too_small(shared):
    """The 5 metal-poor giants among the benchmark stars are the sparsest part of the training set;
    without the seed term their errors are far too small.  Cross-validated pulls (MUSE, S/N 20, 50,
    100, out of fold) with and without the ``X_err_seed`` columns of the same hold-out fits: the
    metal-poor giants' Teff and log g pulls drop by >= 0.05 in every S/N bin (measured Teff
    1.57/1.61/1.46 -> 1.38/1.37/1.40), and the overall pulls stay within 0.85-1.2."""
    from astropy.table import Table

    from musepayne.models.benchcal import DEFAULT_BENCHMARK_FILE, attach_benchmark_labels, read_benchmarks
    from musepayne.train.benchcal import BenchCalConfig, pull_bins

    tab = attach_benchmark_labels(Table.read(HOLDOUT), read_benchmarks(shared / DEFAULT_BENCHMARK_FILE))
    plain = tab.copy()
    plain.remove_columns([f"{n}_err_seed" for n in ("teff", "logg", "fe_h")])
    cfg = BenchCalConfig()
    with_seed, without = pull_bins(tab, tab, cfg)["muse"], pull_bins(plain, plain, cfg)["muse"]
    for sn in (20.0, 50.0, 100.0):
        for n in ("teff", "logg"):
            assert with_seed[sn]["mp_giant"][n] <= without[sn]["mp_giant"][n] - 0.05, (sn, n)
        for n in ("teff", "logg", "fe_h"):
            assert 0.85 <= with_seed[sn]["all"][n] <= 1.2, (sn, n)


def test_cli_add_members_checks_the_recipe(toy, tmp_path):
    """``musepayne model add-members``: members of the same recipe and training set with other
    seeds are stored (and recorded); another training set, another recipe or the model's own seed
    is refused with the reason, exit 2, nothing written."""
    from click.testing import CliRunner

    from musepayne.cli import main

    recipe = {"arch": "mlp", "hidden": [300, 300], "seed": 0, "epochs": 10}

    def save(model, name, seed, trainset="a" * 64, **cfg):
        m = copy.copy(model)
        m.meta = {"seed": seed, "train_config": {**recipe, **cfg, "seed": seed}}
        if trainset:
            m.meta["trainset_sha256"] = trainset
        m.save(tmp_path / name)
        return str(tmp_path / name)

    base = save(toy, "m.fits", 0)
    good = [save(_shifted(toy, DELTA), "s1.fits", 1), save(_shifted(toy, -DELTA), "s2.fits", 2)]
    out = tmp_path / "out.fits"
    r = CliRunner().invoke(main, ["model", "add-members", base, *good, "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = load_model(out)
    assert [mm.meta["seed"] for mm in m.seed_members] == [1, 2]
    assert [x["seed"] for x in m.meta["seed_members"]] == [1, 2] and all(len(x["sha256"]) == 64 for x in m.meta["seed_members"])
    assert m.meta["seed_members_command"].startswith("musepayne model")
    bad = {"another training set": save(toy, "b1.fits", 3, trainset="b" * 64),
           "another recipe (hidden differ)": save(toy, "b2.fits", 4, hidden=[100, 100]),
           "model's own seed": save(toy, "b3.fits", 0),
           "does not record its training set": save(toy, "b4.fits", 5, trainset=None)}
    for why, path in bad.items():
        out2 = tmp_path / "no.fits"
        r = CliRunner().invoke(main, ["model", "add-members", base, path, "-o", str(out2)])
        assert r.exit_code == 2 and why in r.output, (why, r.output)
        assert not out2.exists()


def test_predict_scaled_columns_is_the_slice(toy):
    s = np.random.default_rng(1).uniform(-0.5, 0.5, (7, 3))
    for dt in (np.float32, np.float64):
        full = toy.predict_scaled(s, dt)
        for c0, c1 in ((0, toy.n_pix), (64, 1000), (3000, toy.n_pix)):
            np.testing.assert_array_equal(toy.predict_scaled_columns(s, c0, c1, dt), full[:, c0:c1])


def test_seed_spread_of_a_singular_row_is_nan_not_a_failed_chunk(toy):
    """One spectrum whose normal matrix is singular (all weight on a single pixel) gets NaN
    X_err_seed; the other spectra of its chunk keep theirs."""
    _, prep = _spectra(toy, n=6)
    prep.ivar[2, :] = 0.0
    prep.ivar[2, 1000:1060] = 1e4  # a few pixels: fitted, but the labels are barely constrained
    m = toy.with_seed_members([_shifted(toy, DELTA), _shifted(toy, -DELTA)])
    fitter = Fitter(m, FitConfig(fit_rv=False, min_pixels=10))
    st = {"theta": np.zeros((2, 3)), "A": np.stack([np.eye(3), np.zeros((3, 3))]),
          "J": np.ones((2, 3, toy.n_pix), np.float32), "ww": np.ones((2, toy.n_pix)),
          "f": toy.predict_scaled(np.zeros((2, 3)), np.float32)}
    from musepayne.fit.operators import _RowOps

    out = fitter._seed_spread(st, _RowOps(np.full(2, -1), ()), st["J"].astype(np.float64))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
    cat = fitter(prep)
    ok = np.asarray(cat["status"]) == "converged"
    assert ok.sum() >= 5 and np.all(np.isfinite(np.asarray(cat["teff_err_seed"])[ok]))


def test_damaged_member_hdus_are_a_clear_error(toy, tmp_path):
    """A model file that declares members it does not hold (or whose member arrays are cut) is
    refused with a ModelError naming the problem, not a traceback."""
    from astropy.io import fits

    path = tmp_path / "m.fits"
    toy.with_seed_members([_shifted(toy, DELTA)]).save(path)
    with fits.open(path) as h:
        keep = [x for x in h if not str(x.name).startswith("M1_")]
        fits.HDUList([x.copy() for x in keep]).writeto(tmp_path / "cut.fits")
        h2 = fits.HDUList([x.copy() for x in h if str(x.name) != "M1_W2"])
        h2.writeto(tmp_path / "half.fits")
    with pytest.raises(ModelError, match="seed members"):
        load_model(tmp_path / "cut.fits")
    with pytest.raises(ModelError, match="cannot read model"):
        load_model(tmp_path / "half.fits")


def test_a_nonfinite_singular_normal_matrix_does_not_fail_its_chunk(toy):
    """Covariance fallback: a row whose normal matrix is singular *and* non-finite (pinv cannot
    take it) gets NaN errors; the other rows of the chunk keep theirs (before: LinAlgError, and the
    whole chunk became failed:numerical)."""
    from musepayne.fit.operators import _RowOps

    m = toy.with_seed_members([_shifted(toy, DELTA)])
    fitter = Fitter(m, FitConfig(fit_rv=False))
    bad = np.full((3, 3), np.nan)
    bad[0] = 0.0
    n = toy.n_pix
    st = {"theta": np.zeros((2, 3)), "A": np.stack([np.eye(3) * 1e4, bad]),
          "J": np.ones((2, 3, n), np.float32), "ww": np.ones((2, n)),
          "f": toy.predict_scaled(np.zeros((2, 3)), np.float32)}
    est = fitter._estimates(st, np.ones((2, n)), np.ones((2, n)), _RowOps(np.full(2, -1), ()))
    assert np.all(np.isfinite(est["err"][0])) and np.all(np.isnan(est["err"][1]))
    assert np.all(np.isfinite(est["err_seed"][0])) and np.all(np.isnan(est["err_seed"][1]))
