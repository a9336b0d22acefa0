"""[Mg/Fe]-Teff calibration (paper Appendix A, Table A1) and region offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

from musepayne.cli import main
from musepayne.science import calibration as cal


def _cat():
    return Table({
        "stellar_id": ["g1", "g2", "d1", "d2", "out", "nan"],
        "teff": [4000.0, 5500.0, 6000.0, 4500.0, 5000.0, np.nan],
        "logg": [2.0, 3.49, 4.4, 3.5, 2.5, 2.0],
        "fe_h": [-0.7, 0.0, 0.55, -0.2, -1.2, 0.0],
        "mg_fe": [0.30, 0.10, 0.05, 0.20, 0.35, 0.20],
        "r_gc": [1.0, 3.2, 4.0, 6.0, 8.0, 3.4],
    })


def test_slopes_follow_table_a1():
    s = cal.slope_for([-0.7, 0.0, 0.55, -0.2, -1.2, 0.6], [2.0, 3.49, 4.4, 3.5, 2.5, 4.0])
    # LAMOST-DD-Payne-A: giant (-0.8,-0.6) -0.044; giant [0,0.2) -0.162; dwarf [0.4,0.6) -0.154;
    # dwarf [-0.2,0) -0.093 (logg 3.5 is a dwarf; bins are [lo, hi)); outside -> NaN
    np.testing.assert_allclose(s[:4], [-0.044, -0.162, -0.154, -0.093])
    assert np.isnan(s[4]) and np.isnan(s[5])
    s = cal.slope_for([-1.2, 0.7], [2.5, 4.0], source="apogee_payne", outside="clip")
    np.testing.assert_allclose(s, [-0.025, -0.130])


def test_trend_correction_hand_computed_and_recorded():
    t = _cat()
    out = cal.MgFeTeffCalibration(teff_ref=4500.0)(t)
    # mg_fe - slope * (teff - 4500)/1000
    expect = [0.30 + 0.044 * (-0.5), 0.10 + 0.162 * 1.0, 0.05 + 0.154 * 1.5, 0.20 + 0.0, 0.35, 0.20]
    np.testing.assert_allclose(out["mg_fe"], expect, atol=1e-12)
    assert out["mg_fe_cal_flag"].tolist() == [1, 1, 1, 0, 0, 0]  # d2 at the pivot: zero correction
    np.testing.assert_allclose(out["mg_fe_uncal"], t["mg_fe"])
    rec = json.loads(out.meta["calibration"])
    assert rec[0]["step"] == "mg_fe_teff_trend" and rec[0]["teff_ref"] == 4500.0
    assert rec[0]["giant_definition"] == "logg < 3.5"
    assert t["mg_fe"][1] == 0.10  # input untouched
    # a corrected trend: stars with a Table A1 trend come out flat in Teff
    rng = np.random.default_rng(2)
    teff = rng.uniform(4000, 5200, 500)
    trend = Table({"teff": teff, "logg": np.full(500, 2.5), "fe_h": np.full(500, 0.1),
                   "mg_fe": 0.1 - 0.162 * (teff - 4500) / 1000})
    flat = cal.MgFeTeffCalibration()(trend)
    assert np.ptp(flat["mg_fe"]) < 1e-12


def test_region_offsets_first_match_wins_and_stack_with_trend():
    t = cal.MgFeTeffCalibration()(_cat())
    out = cal.apply_region_offsets(t, cal.PAPER_REGION_OFFSETS)
    # r_gc: 1.0 bulge +0.08, 3.2 bulge (listed first) +0.08, 4.0 3-5 +0.06, 6.0 5-7 +0.08, 8.0 none
    np.testing.assert_allclose(out["mg_fe"] - t["mg_fe"], [0.08, 0.08, 0.06, 0.08, 0.0, 0.08])
    assert out["mg_fe_region"].tolist() == ["bulge", "bulge", "3<R_gc<5 kpc", "5<R_gc<7 kpc", "", "bulge"]
    rec = json.loads(out.meta["calibration"])
    assert [r["step"] for r in rec] == ["mg_fe_teff_trend", "region_offsets"]
    assert [r["n"] for r in rec[1]["regions"]] == [3, 1, 1]
    np.testing.assert_allclose(out["mg_fe_uncal"], _cat()["mg_fe"])  # the original survives both steps


def test_calibrate_cli(tmp_path):
    _cat().write(tmp_path / "cat.fits")
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path / "cat.fits"), "-o", str(tmp_path / "cal.fits"),
                                  "--offset", "r_gc < 3.5=0.08", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["n_trend_corrected"] == 3
    back = Table.read(tmp_path / "cal.fits")
    steps = json.loads(back.meta["calibration"])
    assert [s["step"] for s in steps] == ["mg_fe_teff_trend", "region_offsets"]
    assert back["mg_fe"][0] == pytest.approx(0.30 - 0.022 + 0.08)
    r = CliRunner().invoke(main, ["calibrate", str(tmp_path / "cat.fits"), "-o", str(tmp_path / "x.fits"),
                                  "--no-trend", "--offset", "rgc < 3=0.1", "--json"])
    assert r.exit_code == 2 and "unknown column" in json.loads(r.output)["error"]


def test_units_and_descriptions_survive():
    import astropy.units as u
    from astropy.table import MaskedColumn

    t = _cat()
    t["mg_fe"] = MaskedColumn(t["mg_fe"], mask=[False, False, False, False, False, True], unit=u.dex,
                              description="[Mg/Fe] abundance ratio")
    out = cal.apply_region_offsets(cal.MgFeTeffCalibration()(t), cal.PAPER_REGION_OFFSETS)
    assert out["mg_fe"].unit == u.dex and out["mg_fe"].description == "[Mg/Fe] abundance ratio"
    assert out["mg_fe_uncal"].unit == u.dex
    assert np.isnan(out["mg_fe"][5])  # a masked value stays missing
