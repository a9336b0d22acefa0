"""Selection presets (paper Eq. 5, 6, 8) and the safe expression language."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from click.testing import CliRunner

from musepayne.cli import main
from musepayne.science import selection as sel


def _cat():
    return Table({
        "stellar_id": ["a", "a", "b", "c", "c", "d"],
        "snr_muse": [90.0, 120.0, 85.0, 50.0, 200.0, 81.0],
        "snr_lamost": [40.0, 40.0, 30.0, 60.0, 60.0, 36.0],
        "corr_flux": [0.95, 0.90, 0.99, 0.97, 0.86, 0.80],
        "fe_h": [-0.2, -0.1, -1.6, 0.1, 0.0, -1.4],
        "teff": [4500.0, 4600.0, 5000.0, 4200.0, 4310.0, 5200.0],
        "mg_fe_gradcorr": [0.7, 0.9, 0.8, 0.9, 0.66, 0.64],
        "red_chi2": [3.0, 25.0, 1.0, 2.0, 19.9, 2.0],
        "status": ["ok", "ok", "ok", "failed", "ok", "ok"],
        "teff_flag": [1, 1, 0, 1, 1, 1],
        "qual": [0b101, 0b001, 0b100, 0, 0b110, 0b010],
    })


def test_preset_eq5():
    out = sel.select(_cat(), preset="eq5")
    assert out["snr_muse"].tolist() == [90.0, 120.0, 200.0, 81.0]  # snr_lamost > 35 and snr_muse > 80


def test_preset_eq6_keeps_best_corr_flux_per_star():
    out = sel.select(_cat(), preset="eq6")
    # cut: rows 0 (a, .95), 1 (a, .90), 2 (b, .99), 4 (c, .86); row 5 fails corr_flux, row 3 fails snr
    # best per star among those: a -> row 0, b -> row 2, c -> row 4 (row 3 has higher corr_flux but fails S/N)
    assert list(zip(out["stellar_id"], out["corr_flux"])) == [("a", 0.95), ("b", 0.99), ("c", 0.86)]
    assert "best corr_flux per stellar_id" in out.meta["selection"]
    # the same cut without the per-star rule keeps both observations of a
    assert len(sel.select(_cat(), preset="eq6", best=False)) == 4


def test_preset_eq8():
    out = sel.select(_cat(), preset="eq8")
    # fe_h > -1.5, teff > 4300, mg_fe_gradcorr > 0.65, red_chi2 < 20
    assert out["teff"].tolist() == [4500.0, 4310.0]


def test_expressions():
    t = _cat()
    assert sel.evaluate(t, "4400 < teff <= 5000").tolist() == [True, True, True, False, False, False]
    assert sel.evaluate(t, "status == 'ok' and not teff_flag == 0").tolist() == [True, True, False, False, True, True]
    assert sel.evaluate(t, "(teff > 5000) | (abs(fe_h) < 0.05)").tolist() == [False, False, False, False, True, True]
    assert sel.evaluate(t, "bit(qual, 2)").tolist() == [True, False, True, False, True, False]
    assert sel.evaluate(t, "~bit(qual, 0) & isfinite(log10(snr_muse - 60))").tolist() == [
        False, False, True, False, True, True]
    assert sel.evaluate(t, "snr_muse / snr_lamost ** 2 * 100 > 6").tolist() == [False, True, True, False, False, True]
    assert sel.evaluate(t, "teff > 4000").sum() == 6


def test_masked_and_nan_values_never_pass():
    t = Table({"x": MaskedColumn([1.0, 2.0, 3.0], mask=[False, True, False]), "y": [np.nan, 1.0, 1.0]})
    assert sel.evaluate(t, "x > 0").tolist() == [True, False, True]
    assert sel.evaluate(t, "y > 0 or y <= 0").tolist() == [False, True, True]


@pytest.mark.parametrize("expr,msg", [
    ("__import__('os').system('true')", "plain calls"),
    ("teff.mean() > 1", "plain calls"),
    ("open('x')", "not allowed"),
    ("teff[0] > 1", "Subscript"),
    ("[t for t in teff]", "ListComp"),
    ("lambda: 1", "Lambda"),
    ("teff if teff else 1", "IfExp"),
    ("nope > 3", "unknown column"),
    ("teff >", "cannot parse"),
    ("teff + 1", "true/false"),
    ("teff > " + "9" * 400, "too large"),
    ("", "empty"),
])
def test_unsafe_or_wrong_expressions_are_rejected(expr, msg):
    with pytest.raises(sel.SelectionError, match=msg):
        sel.evaluate(_cat(), expr)


def test_select_does_not_touch_input_and_records_meta():
    t = _cat()
    before = t.copy()
    out = sel.select(t, "fe_h > -1", "eq5")
    assert np.all(t == before)
    assert out.meta["selection"].startswith("eq5 (Eq. 5)")
    with pytest.raises(sel.SelectionError, match="unknown preset"):
        sel.select(t, preset="eq99")


def test_select_cli(tmp_path):
    _cat().write(tmp_path / "cat.ecsv")
    _cat().write(tmp_path / "cat.fits")  # string columns come back as bytes from FITS
    r = CliRunner().invoke(main, ["select", str(tmp_path / "cat.fits"), "--where", "status == 'failed'", "--json"])
    assert json.loads(r.output)["n_selected"] == 1
    r = CliRunner().invoke(main, ["select", str(tmp_path / "cat.ecsv"), "--preset", "bulge",
                                  "--where", "status == 'ok'", "-o", str(tmp_path / "sel.fits"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["n_in"], out["n_selected"]) == (6, 3)
    assert Table.read(tmp_path / "sel.fits")["corr_flux"].tolist() == [0.95, 0.99, 0.86]
    r = CliRunner().invoke(main, ["select", str(tmp_path / "cat.ecsv"), "--where", "exec('1')", "--json"])
    assert r.exit_code == 2 and "not allowed" in json.loads(r.output)["error"]
    r = CliRunner().invoke(main, ["select", "--list-presets", "--json"])
    assert set(json.loads(r.output)["presets"]) == {"eq5", "eq6", "eq8", "reliable"}


def test_reliable_preset_uses_flags_and_extraction_where_present():
    from astropy.table import Table

    cat = Table({"stellar_id": ["a", "b", "c", "d", "e"], "snr_muse": [120.0, 120.0, 120.0, 50.0, 120.0],
                 "red_chi2": [1.0, 1.0, 1.0, 1.0, 1.0], "teff": [5000.0] * 5,
                 "fit_flags": np.array([0, 0, 32, 0, 0]), "teff_flag": np.array([1, 1, 1, 1, 0]),
                 "ext_status": ["ok", "edge", "ok", "ok", "ok"]})
    out = sel.select(cat, preset="reliable")
    assert list(out["stellar_id"]) == ["a"]
    assert "ext_status == 'ok'" in out.meta["selection"] and "teff_flag == 1" in out.meta["selection"]
    # a catalogue of 1-D spectra (no extraction, no flags computed) is judged on what it has
    bare = cat["stellar_id", "snr_muse", "red_chi2", "teff", "fit_flags"]
    assert list(sel.select(bare, preset="reliable")["stellar_id"]) == ["a", "b", "e"]
