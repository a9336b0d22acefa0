"""The README's Python examples run as written (in a folder holding the files they name)."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

ROOT = Path(__file__).resolve().parents[1]


def _blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_the_two_examples():
    blocks = _blocks()
    assert len(blocks) >= 2 and 'read_spectra("star.fits")' in blocks[0] and "Pipeline(" in blocks[1]
    assert all(len([ln for ln in b.splitlines() if ln.strip()]) <= 6 for b in blocks[:2])


def test_spectrum_example_on_the_real_ngc6397_giant(shared, tmp_path, monkeypatch):
    shutil.copy(shared / "muse" / "spectra" / "ngc6397_id10554_pampelmuse.fits", tmp_path / "star.fits")
    monkeypatch.chdir(tmp_path)
    exec(_blocks()[0], {})
    cat = Table.read(tmp_path / "labels.fits")
    # NGC 6397: a metal-poor red giant ([Fe/H] = -2.0, RV +18.8 km/s); the default model's values are in the README
    assert len(cat) == 1 and cat["status"][0] == "converged"
    assert 4600 < cat["teff"][0] < 5300 and cat["logg"][0] < 3.5 and abs(cat["fe_h"][0] + 2.0) < 0.3
    assert abs(cat["rv"][0] - 18.8) < 10
    assert cat["teff"].unit == "K" and cat["rv"].unit == "km / s"


@pytest.mark.slow
def test_cube_example_on_a_simulated_field(tmp_path, monkeypatch, capsys):
    from musepayne import SimulateConfig, Simulator, load_model
    from musepayne.simulate import ModelSpectra, globular_cluster_sampler

    cfg = SimulateConfig(nx=30, ny=30, nlayers=3681, nstars=12, king_rc=8.0, mag_bright=15.0, mag_faint=17.0, seed=4)
    info = Simulator(cfg, ModelSpectra(load_model("default"), globular_cluster_sampler())).write(tmp_path / "sim.fits")
    shutil.move(info["cube"], tmp_path / "cube.fits")
    shutil.move(info["sources"], tmp_path / "sources.csv")
    truth = Table.read(info["truth"], "TRUTH")
    monkeypatch.chdir(tmp_path)
    exec(_blocks()[1], {})
    assert "teff" in capsys.readouterr().out
    cat = Table.read(tmp_path / "out" / "catalogue.fits")
    assert len(cat) == len(truth)
    m = {str(s): i for i, s in enumerate(truth["stellar_id"])}
    idx = np.array([m[str(s)] for s in cat["stellar_id"]])
    ok = np.asarray(cat["status"]).astype(str) == "converged"
    assert ok.sum() >= len(cat) // 2
    dt = np.asarray(cat["teff"], float)[ok] - np.asarray(truth["teff"])[idx[ok]]
    df = np.asarray(cat["fe_h"], float)[ok] - np.asarray(truth["fe_h"])[idx[ok]]
    assert abs(np.median(dt)) < 250 and abs(np.median(df)) < 0.3


def test_help_lists_the_entry_points():
    import pydoc

    import musepayne

    text = pydoc.render_doc(musepayne, renderer=pydoc.plaintext)
    for name in ("read_spectra", "Preparer", "Extractor", "load_model", "Fitter", "write_catalogue", "Pipeline",
                 "RunConfig", "Survey", "Simulator", "select"):
        assert name in text
    assert set(musepayne.__all__) <= set(dir(musepayne))
