"""Validation statistics, cross-matching, Eq. 10 repeat factors, plots and the validate CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

from musepayne.cli import main
from musepayne.science import validation as val


def test_bias_dispersion_hand_computed():
    # 0..100: median 50; linear-interpolated percentiles 15.87 and 84.13 -> (84.13-15.87)/2 = 34.13
    b, d, n = val.bias_dispersion(np.arange(101.0))
    assert (b, n) == (50.0, 101)
    assert d == pytest.approx(34.13, abs=1e-9)
    # five values, NaN ignored: sorted [-2, 0, 1, 3, 10]; P15.87 at rank 0.6348 -> -2 + 0.6348*2,
    # P84.13 at rank 3.3652 -> 3 + 0.3652*7
    b, d, n = val.bias_dispersion([3.0, np.nan, -2.0, 10.0, 0.0, 1.0, np.inf])
    lo, hi = -2 + 0.6348 * 2, 3 + 0.3652 * 7
    assert (b, n) == (1.0, 5)
    assert d == pytest.approx((hi - lo) / 2, abs=1e-9)
    assert np.isnan(val.bias_dispersion([np.nan])[0])
    # a Gaussian: dispersion -> sigma
    rng = np.random.default_rng(0)
    b, d, _ = val.bias_dispersion(rng.normal(0.3, 0.07, 200000))
    assert b == pytest.approx(0.3, abs=0.001) and d == pytest.approx(0.07, rel=0.01)


def _cats():
    cat = Table({"stellar_id": ["s1", "s2", "s3", "s4", "s2"],
                 "ra": [10.0, 10.001, 10.002, 50.0, 10.001],
                 "dec": [-20.0, -20.0, -20.0, 5.0, -20.0],
                 "teff": [5000.0, 5100.0, 4900.0, 6000.0, 5150.0],
                 "fe_h": [0.0, -0.5, -1.0, 0.2, -0.45],
                 "teff_err": [50.0] * 5,
                 "snr_muse": [100.0, 90.0, 50.0, 100.0, 120.0]})
    ref = Table({"id": ["s3", "s2", "s1", "x9"],
                 "ra": [10.002 + 0.3 / 3600 / np.cos(np.radians(20)), 10.001, 10.0, 80.0],
                 "dec": [-20.0, -20.0 + 0.5 / 3600, -20.0, 0.0],
                 "teff": [4950.0, 5000.0, 5020.0, 4000.0],
                 "fe_h": [-1.1, -0.4, 0.05, 0.0],
                 "snr": [40.0, 30.0, 60.0, 50.0]})
    return cat, ref


def test_crossmatch_by_id_and_by_sky():
    cat, ref = _cats()
    i, j, _ = val.crossmatch(cat, ref, "id", id_col="stellar_id", ref_id_col="id")
    assert list(zip(i, j)) == [(0, 2), (1, 1), (2, 0), (4, 1)]
    i, j, sep = val.crossmatch(cat, ref, "sky", tolerance_arcsec=1.0)
    assert list(zip(i, j)) == [(0, 2), (1, 1), (2, 0), (4, 1)]
    np.testing.assert_allclose(sep, [0.0, 0.5, 0.3, 0.5], atol=1e-3)
    i, _, _ = val.crossmatch(cat, ref, "sky", tolerance_arcsec=0.4)
    assert list(i) == [0, 2]


def test_compare_hand_computed():
    cat, ref = _cats()
    comp = val.compare(cat, ref, ["teff", "fe_h"], by="id", ref_id_col="id")
    # teff differences: s1 -20, s2 +100, s3 -50, s2(repeat) +150
    d = np.array([-20.0, 100.0, -50.0, 150.0])
    np.testing.assert_allclose(comp.matched["d_teff"], d)
    st = comp.as_dict()
    assert st["teff"]["n"] == 4
    assert st["teff"]["bias"] == pytest.approx(40.0)
    assert st["teff"]["dispersion"] == pytest.approx(0.5 * (np.percentile(d, 84.13) - np.percentile(d, 15.87)))
    assert st["fe_h"]["bias"] == pytest.approx(np.median([-0.05, -0.1, 0.1, -0.05]))
    with pytest.raises(KeyError, match="missing"):
        val.compare(cat, ref, ["logg"], ref_id_col="id")


def _repeats(n_stars=400, underestimate=3.0, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_stars):
        true_feh = rng.uniform(-1, 0.3)
        n_rep = rng.integers(2, 5)
        for _ in range(n_rep):
            s_true = rng.uniform(0.03, 0.15)  # heteroscedastic true errors
            rows.append((f"star{k}", true_feh + rng.normal(0, s_true), s_true / underestimate,
                         5000 + rng.normal(0, 80.0), 80.0))
    return Table(rows=rows, names=("stellar_id", "fe_h", "fe_h_err", "teff", "teff_err"))


def test_repeat_factor_recovers_injected_underestimate():
    t = _repeats()
    f, n = val.repeat_error_factor(t, "fe_h")
    assert n > 500
    assert f == pytest.approx(3.0, rel=0.10)
    fr, _ = val.repeat_error_factor(t, "fe_h", robust=True)
    assert fr == pytest.approx(3.0, rel=0.10)
    # correct errors give 1
    f_teff, _ = val.repeat_error_factor(t, "teff")
    assert f_teff == pytest.approx(1.0, rel=0.10)
    tab = val.repeat_error_factors(t)
    assert set(tab["label"]) == {"fe_h", "teff"}
    scaled = val.apply_error_factors(t, {"fe_h": f})
    f2, _ = val.repeat_error_factor(scaled, "fe_h")
    assert f2 == pytest.approx(1.0, rel=1e-9)
    assert json.loads(scaled.meta["error_scale"]) == {"fe_h": pytest.approx(f)}
    assert np.all(t["fe_h_err"] < 0.06)  # caller's table untouched
    with pytest.raises(ValueError, match="already scaled"):
        val.apply_error_factors(scaled, {"fe_h": 2.0})


def test_repeat_pairs_counts():
    t = Table({"stellar_id": ["a", "b", "a", "a", "c", "b"]})
    m, n = val.repeat_pairs(t)
    assert sorted(zip(m.tolist(), n.tolist())) == [(0, 2), (0, 3), (1, 5), (2, 3)]


def test_plots_contain_the_points(tmp_path):
    cat, ref = _cats()
    comp = val.compare(cat, ref, ["teff", "fe_h"], ref_id_col="id")
    counts = val.plot_differences(tmp_path / "fig5.png", comp)
    assert counts == {"teff": 4, "fe_h": 4}
    assert (tmp_path / "fig5.png").stat().st_size > 5000
    order = val.plot_bias_precision(tmp_path / "fig6.png", {"A": comp.stats})
    # sorted by precision (dispersion): fe_h (~0.08 dex) before teff (~80 K)
    assert order == ["fe_h", "teff"]
    assert (tmp_path / "fig6.png").stat().st_size > 5000


def test_validate_cli(tmp_path):
    cat, ref = _cats()
    cat.write(tmp_path / "cat.fits")
    ref.write(tmp_path / "ref.ecsv")
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "cat.fits"), str(tmp_path / "ref.ecsv"),
                                  "--match", "sky", "--tolerance", "1", "--plot-dir", str(tmp_path / "plots"),
                                  "--stats", str(tmp_path / "stats.ecsv"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["n_matched"] == 4
    assert out["labels"]["teff"]["bias"] == pytest.approx(40.0)
    assert out["points_per_panel"] == {"teff": 4, "fe_h": 4}
    assert Table.read(tmp_path / "stats.ecsv")["n"].tolist() == [4, 4]
    # MUSE-vs-LAMOST style: the LAMOST S/N comes from the reference, then the Eq. 5 cut
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "cat.fits"), str(tmp_path / "ref.ecsv"),
                                  "--ref-id-col", "id", "--ref-column", "snr=snr_lamost", "--preset", "eq5",
                                  "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["n_matched"] == 1 and out["labels"]["teff"]["bias"] == pytest.approx(-20.0)
    # repeats and error scaling
    t = _repeats(200)
    t.write(tmp_path / "rep.fits")
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "rep.fits"), "--repeats",
                                  "--apply-errors", str(tmp_path / "scaled.fits"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["error_factors"]["fe_h"]["factor"] == pytest.approx(3.0, rel=0.1)
    scaled = Table.read(tmp_path / "scaled.fits")
    assert json.loads(scaled.meta["error_scale"])["fe_h"] == pytest.approx(out["error_factors"]["fe_h"]["factor"])
    # the cross-validation hook fails clearly without the real data (the full CV takes minutes)
    r = CliRunner(env={"MUSEPAYNE_SHARED": str(tmp_path / "missing")}).invoke(main, ["validate", "--cv", "--json"])
    assert r.exit_code == 2 and "cross-validation" in json.loads(r.output)["error"]
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.fits"), "--repeats", "--json"])
    assert r.exit_code == 2 and "no such catalogue" in json.loads(r.output)["error"]


@pytest.mark.shared
def test_real_catalogues_stelib_vs_miles(shared, tmp_path):
    """Two real label catalogues (STELIB headers vs MILES v9.1 parameters), matched by star name."""
    from astropy.io import fits

    from musepayne.io.readers import read_miles_params

    miles = read_miles_params(shared / "libraries" / "miles" / "paramsMILES_v9.1.txt")
    miles.rename_column("name", "stellar_id")

    def num(h, k):
        try:
            return float(h[k])
        except (KeyError, TypeError, ValueError):
            return np.nan

    rows = []
    for f in sorted((shared / "libraries" / "stelib").glob("STELIB_v3.2_*.fits")):
        h = fits.getheader(f)
        rows.append((str(h.get("OBJECT", "")).strip(), num(h, "TEFF"), num(h, "LOG_G"), num(h, "FE_H")))
    stelib = Table(rows=rows, names=("stellar_id", "teff", "logg", "fe_h"))
    comp = val.compare(stelib, miles, ["teff", "logg", "fe_h"], sort_by_dispersion=True)
    st = comp.as_dict()
    assert st["teff"]["n"] >= 60  # the HD stars common to both libraries
    # the same literature stars: small robust dispersion, negligible bias ...
    assert st["teff"]["dispersion"] < 100.0 and abs(st["teff"]["bias"]) < 30.0
    assert st["logg"]["dispersion"] < 0.25 and st["fe_h"]["dispersion"] < 0.12
    # ... although a few gross mismatches exist, which a plain std would not survive
    assert np.nanstd(comp.matched["d_teff"]) > 5 * st["teff"]["dispersion"]
    counts = val.plot_differences(tmp_path / "stelib_vs_miles.png", comp)
    assert counts["teff"] == st["teff"]["n"]
