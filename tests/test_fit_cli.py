"""CLI: musepayne model import / info and musepayne fit on real APOGEE data."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fit_helpers import APOGEE_LABELS, as_prepared, load_apogee
from musepayne.cli import main
from musepayne.fit.catalogue import read_catalogue


def test_fit_default_model_on_a_wrong_grid_is_a_failed_row(tmp_path):
    """Without --model the shipped default (LAMOST grid) is used; spectra on another grid
    become failed rows with a reason, not a crash; the catalogue is written and the exit code
    is 1 (no spectrum could be fitted)."""
    from astropy.table import Table

    from musepayne.testing import toy_mlp_model

    m = toy_mlp_model(np.linspace(5000, 5100, 200), hidden=(8, 8), n_lines=10)
    prep = tmp_path / "p.fits"
    as_prepared(m.wave, np.ones((1, 200)), np.ones(200)).write(prep)
    r = CliRunner().invoke(main, ["fit", str(prep), "-o", str(tmp_path / "o.fits"), "--json"])
    assert r.exit_code == 1, r.output
    assert json.loads(r.output)["counts"] == {"failed": 1}
    t = Table.read(tmp_path / "o.fits")
    assert t["status"][0] == "failed:bad_wavelength" and t["model"][0] == "musepayne-default-miles-stelib"


@pytest.mark.shared
def test_cli_import_info_fit_apogee(shared, tmp_path):
    d = shared / "payne_apogee"
    model_path = tmp_path / "apogee.fits"
    runner = CliRunner()
    r = runner.invoke(main, ["model", "import", str(d / "NN_normalized_spectra.npz"), "--format", "payne-perpixel",
                             "--labels", ",".join(APOGEE_LABELS), "--wavelength", str(d / "apogee_wavelength.npz"),
                             "--vacuum", "-o", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_pix"] == 7214
    r = runner.invoke(main, ["model", "info", str(model_path), "--json"])
    info = json.loads(r.output)
    assert [x["name"] for x in info["labels"]] == APOGEE_LABELS and info["frame"] == "vacuum"
    assert info["meta"]["imported_from"] == "NN_normalized_spectra.npz"

    model, mask, flux, err = load_apogee(shared)
    ivar = np.where(mask, 0.0, 1.0 / err**2)
    flux2 = np.vstack([flux, flux, np.full_like(flux, np.nan)])
    prep = tmp_path / "apogee_prepared.fits"
    as_prepared(model.wave, flux2, np.vstack([ivar, ivar, ivar])).write(prep)
    out = tmp_path / "labels.fits"
    r = runner.invoke(main, ["fit", str(prep), "--model", str(model_path), "-o", str(out),
                             "--also", str(tmp_path / "labels.csv"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["n_spectra"] == 3 and res["counts"] == {"converged": 2, "failed": 1}
    cat = read_catalogue(out)
    assert list(cat["status"]) == ["converged", "converged", "failed:no_valid_pixels"]
    assert 4500 < cat["teff"][0] < 5500 and cat["teff"][0] == cat["teff"][1]
    assert (tmp_path / "labels.csv").exists()
    r = runner.invoke(main, ["fit", str(prep), "--model", str(model_path), "-o", str(out)])
    assert r.exit_code == 0 and "fitted 3 spectra" in r.output
