"""Catalogue columns, units, export formats, the A / A-mp rule (Eq. 2) and gradcorr merging."""

import numpy as np
import pytest
from astropy.table import Table

from fit_helpers import as_prepared
from musepayne.fit.catalogue import (
    apply_gradcorr,
    combine_metal_poor,
    merge_by_gradcorr,
    read_catalogue,
    write_catalogue,
)
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.testing import toy_mlp_model


@pytest.fixture(scope="module")
def toy():
    return toy_mlp_model(lamost_wavelength(), hidden=(32, 32), n_lines=300, seed=4,
                         label_names=("teff", "logg", "fe_h", "mg_fe"))


@pytest.fixture(scope="module")
def cat(toy):
    rng = np.random.default_rng(0)
    truth = toy.unscale(rng.uniform(-0.3, 0.3, (4, 4)))
    f = toy.predict(truth)
    flux = f + rng.normal(size=f.shape) * 0.01
    return Fitter(toy, FitConfig(keep_model=True))(as_prepared(toy.wave, flux, np.full(f.shape, 1e4)))


def test_table2_columns_units_descriptions(cat):
    for n in ("teff", "logg", "fe_h", "mg_fe"):
        for c in (n, f"{n}_err", f"{n}_flag", f"{n}_gradcorr"):
            assert c in cat.colnames
        assert np.all(np.isnan(cat[f"{n}_gradcorr"])) and np.all(cat[f"{n}_flag"] == -1)
    order = ["stellar_id", "ra", "dec", "snr_muse", "teff", "teff_err", "teff_flag", "teff_gradcorr", "logg"]
    assert cat.colnames[:9] == order
    for c in ("rv", "rv_err", "red_chi2", "corr_flux", "model", "status"):
        assert c in cat.colnames
    assert all(cat[c].description for c in cat.colnames)
    assert str(cat["teff"].unit) == "K" and str(cat["rv"].unit) == "km / s"
    assert cat["model_flux"].shape == (4, 3909)
    # the kept model spectrum reproduces the data: residual rms ~ noise (0.01)
    assert np.all(cat["red_chi2"] < 1.3) and np.all(cat["corr_flux"] > 0.9)


def test_write_fits_csv_parquet(cat, tmp_path):
    p = write_catalogue(cat, tmp_path / "labels.fits")
    back = read_catalogue(p)
    assert back.colnames == cat.colnames and str(back["teff"].unit) == "K"
    assert np.allclose(back["teff"], cat["teff"])
    c = read_catalogue(write_catalogue(cat, tmp_path / "labels.csv"))
    assert "model_flux" not in c.colnames and np.allclose(c["logg"], cat["logg"])
    pytest.importorskip("pyarrow")
    q = read_catalogue(write_catalogue(cat, tmp_path / "labels.parquet"))
    assert np.allclose(q["rv"], cat["rv"]) and list(q["status"]) == list(cat["status"])


class _Templates:
    def gradcorr(self, model, labels):
        return np.tile(np.linspace(0.2, 0.9, model.n_labels), (len(labels), 1))


def test_apply_gradcorr_sets_flags(cat, toy):
    c = cat.copy()
    apply_gradcorr(c, toy, _Templates(), threshold=0.5)
    assert np.allclose(c["teff_gradcorr"], 0.2) and np.all(c["teff_flag"] == 0)
    assert np.all(c["mg_fe_flag"] == 1)


def _mini(feh, vals, model):
    n = len(feh)
    t = Table()
    t["stellar_id"] = [f"s{i}" for i in range(n)]
    for name, v in (("fe_h", feh), ("mg_fe", vals)):
        t[name] = np.asarray(v, float)
        t[name + "_err"] = np.full(n, 0.1)
        t[name + "_flag"] = np.full(n, -1)
        t[name + "_gradcorr"] = np.full(n, np.nan)
    t["rv"] = np.zeros(n)
    t["model"] = [model] * n
    t["status"] = ["converged"] * n
    return t


def test_combine_metal_poor_eq2():
    feh_mr = [0.0, -0.6, -0.8, -0.9, -1.0, -1.5]
    a = _mini(feh_mr, [0.1] * 6, "A")
    b = _mini([-2.0] * 6, [0.4] * 6, "A-mp")
    c = combine_metal_poor(a, b)
    w_mp = np.array([0, 0, 0.5, 0.75, 1, 1])  # ([Fe/H]+0.6)/(-0.4), clipped
    assert np.allclose(c["w_mp"], w_mp)
    assert np.allclose(c["fe_h"], (1 - w_mp) * np.array(feh_mr) + w_mp * -2.0)
    assert np.allclose(c["mg_fe"], 0.1 * (1 - w_mp) + 0.4 * w_mp)
    assert list(c["model"]) == ["A", "A", "A+A-mp", "A+A-mp", "A-mp", "A-mp"]


def test_merge_by_gradcorr():
    a = _mini([0.0, 0.0, 0.0], [0.1, 0.1, 0.1], "A")
    b = _mini([0.5, 0.5, 0.5], [0.3, 0.3, 0.3], "G")
    a.meta["MODEL"], b.meta["MODEL"] = "A", "G"
    a["mg_fe_gradcorr"] = [0.8, 0.3, np.nan]
    b["mg_fe_gradcorr"] = [0.6, 0.7, 0.2]
    m = merge_by_gradcorr(a, b)
    assert np.allclose(m["mg_fe"], [0.1, 0.3, 0.3])
    assert list(m["mg_fe_source"]) == ["A", "G", "G"]
    assert np.allclose(m["fe_h"], 0.0)  # both NaN gradcorr: keep the first catalogue
    # a label's companion columns (calibration, seed spread) come from the same catalogue as its value
    for cat, v in ((a, 1.0), (b, 2.0)):
        for sfx in ("_uncal", "_err_stat", "_err_sys", "_err_seed"):
            cat["mg_fe" + sfx] = np.full(3, v)
    m = merge_by_gradcorr(a, b)
    for sfx in ("_uncal", "_err_stat", "_err_sys", "_err_seed"):
        assert list(m["mg_fe" + sfx]) == [1.0, 2.0, 2.0], sfx


def test_quality_flags_low_snr_blended_large_errors():
    from musepayne.fit.catalogue import apply_quality_flags
    from musepayne.flags import FIT_FLAGS, FlagThresholds, decode_fit_flags

    cat = Table({"snr_muse": [100.0, 10.0, 100.0, 100.0, np.nan], "neighbour_frac": [0.1, 0.1, 0.8, 0.1, 0.1],
                 "teff_err": [50.0, 50.0, 50.0, 400.0, 50.0], "logg_err": [0.1] * 5,
                 "fit_flags": np.array([0, 0, 0, 0, FIT_FLAGS["FAILED"].value], np.int32)})
    apply_quality_flags(cat)
    got = [decode_fit_flags(int(v)) for v in cat["fit_flags"]]
    assert got == [[], ["LOW_SNR"], ["BLENDED"], ["LARGE_ERRORS"], ["FAILED"]]
    # thresholds are configurable; a catalogue without extraction columns gets no BLENDED bit
    strict = Table({"snr_muse": [30.0], "teff_err": [50.0], "fit_flags": np.zeros(1, np.int32)})
    apply_quality_flags(strict, FlagThresholds(min_snr=50.0))
    assert decode_fit_flags(int(strict["fit_flags"][0])) == ["LOW_SNR"]
