"""The shipped default model on real data (issue 4 checks that need no training)."""

import numpy as np
import pytest

from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.io.readers import read_spectra
from musepayne.models.files import load_model
from musepayne.prepare.preparer import Preparer


@pytest.fixture(scope="module")
def model():
    return load_model("default")


def test_default_model_provenance(model):
    m = model.meta
    assert model.label_names == ("teff", "logg", "fe_h")
    assert "musepayne train" in m["command"] and m["regularisation"]["gradient_weight"]
    assert m["n_train"] > 500 and "pixel_mask" in m
    # the model is not used where most training spectra have no data (MILES ends at 7410 A)
    w = model.wave
    assert model.pixel_mask[(w > 7500) & (w < 7550)].all()
    assert not model.pixel_mask[(w > 6100) & (w < 6250)].any()
    # the intrinsic scatter, from the held-out validation stars: ~1 % of the continuum
    sc = m["scatter"]
    assert sc["n_stars"] >= 50 and 0.003 < sc["median"] < 0.03
    assert np.all(model.scatter[model.pixel_mask] == 0) and np.median(model.scatter[~model.pixel_mask]) > 0.003


def test_ngc6397_giant(shared, model):
    """Real MUSE spectrum of an NGC 6397 giant: cluster [Fe/H] = -2.0, RV = +18.8 km/s."""
    s = read_spectra(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits")
    cat = Fitter(model, FitConfig())(Preparer()(s))
    row = cat[0]
    assert row["status"] == "converged"
    assert abs(row["fe_h"] + 2.0) < 0.3
    assert row["logg"] < 3.5
    assert 4500 < row["teff"] < 5800
    assert abs(row["rv"] - 18.8) < 15  # an air/vacuum mistake would show as ~80 km/s
    assert np.isfinite(row["teff_err"]) and row["teff_err"] > 0
    # with the model's scatter in the variances the giant is fitted about as well as the
    # model's validation stars (red_chi2 ~13 with the PampelMUSE errors alone): no HIGH_CHI2
    assert row["red_chi2"] > 5 and row["red_chi2_model"] < 1.5 and row["fit_flags"] == 0
    # the per-label flags (paper Eq. 4) come with the default model, no extra file needed
    for n in ("teff", "logg", "fe_h"):
        assert np.isfinite(row[f"{n}_gradcorr"]) and row[f"{n}_flag"] in (0, 1)
        assert row[f"{n}_gradcorr"] > 0.8 and row[f"{n}_flag"] == 1


def test_default_model_ships_its_gradient_templates(model):
    """The templates beside the default model cover only its usable pixels, are small, and name it."""
    from musepayne.models.files import templates_path

    tpl = model.templates
    assert tpl is not None and templates_path(model.path).stat().st_size < 8e6
    assert not np.any(tpl.usable & model.pixel_mask) and tpl.usable.sum() > 1000
    assert tpl.meta["formodel"] == model.meta["name"]
    labels = np.array([[5000.0, 2.5, -1.0]])
    gc = tpl.gradcorr(model, labels)
    assert gc.shape == (1, 3) and np.all(np.isfinite(gc))


def test_cli_gradient_templates_option(shared, tmp_path):
    from click.testing import CliRunner

    from musepayne.cli import main
    from musepayne.fit.catalogue import read_catalogue

    r = CliRunner().invoke(main, ["prepare", str(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits"),
                                  "-o", str(tmp_path / "p.fits")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["fit", str(tmp_path / "p.fits"), "-o", str(tmp_path / "c.fits")])
    assert r.exit_code == 0, r.output
    cat = read_catalogue(tmp_path / "c.fits")
    assert cat["fe_h_flag"][0] == 1 and np.isfinite(cat["fe_h_gradcorr"][0])
    r = CliRunner().invoke(main, ["fit", str(tmp_path / "p.fits"), "-o", str(tmp_path / "c2.fits"),
                                  "--gradient-templates", str(tmp_path / "missing.fits")])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_default_model_seed_members(model):
    """The shipped model carries two seed members: its recipe and training set with seeds 1, 2
    (recorded with their sha256 and the command), and the installed package stays <= 20 MB."""
    from pathlib import Path

    import musepayne

    assert len(model.seed_members) == 2
    assert sorted(m.meta["seed"] for m in model.seed_members) == [1, 2]
    for mem in model.seed_members:
        assert mem.meta["trainset_sha256"] == model.meta["trainset_sha256"]
        assert [w.shape for w in mem.weights] == [w.shape for w in model.weights]
    assert "musepayne model add-members" in model.meta["seed_members_command"]
    assert all(len(r["sha256"]) == 64 for r in model.meta["seed_members"])
    # the calibration was solved beside the seed spread
    assert model.benchmark_calibration.meta["seed_members"]["n"] == 2
    pkg = Path(musepayne.__file__).parent
    assert sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts) < 20e6
