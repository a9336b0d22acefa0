"""CLI: gradients build / train error handling and a tiny end-to-end train run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

from musepayne.cli import main
from musepayne.io.prepared import PreparedSpectra
from musepayne.train.trainset import TrainingSet


def test_gradients_build_missing_emulator_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSEPAYNE_EMULATOR", raising=False)
    r = CliRunner().invoke(main, ["gradients", "build", "--emulator", str(tmp_path / "nope.npz"),
                                  "-o", str(tmp_path / "t.fits"), "--json"])
    assert r.exit_code == 2
    assert "not found" in json.loads(r.output)["error"]


def _toy_trainset(path, n=60, npix=120):
    rng = np.random.default_rng(0)
    wave = np.linspace(5000, 5120, npix)
    lab = np.c_[rng.uniform(4500, 6500, n), rng.uniform(1, 5, n), rng.uniform(-2, 0.3, n)]
    line = np.exp(-0.5 * ((wave - 5060) / 1.5) ** 2)
    flux = 1 - (0.3 + 0.1 * (lab[:, :1] - 5500) / 1000 + 0.05 * lab[:, 2:]) * line
    ivar = np.full(flux.shape, 1e4)
    t = Table({"stellar_id": [f"s{i}" for i in range(n)], "teff": lab[:, 0], "logg": lab[:, 1], "fe_h": lab[:, 2],
               "status": ["ok"] * n, "star_key": [f"s{i}" for i in range(n)]})
    p = PreparedSpectra(wave, flux, ivar, np.zeros(flux.shape, np.int32), np.zeros(flux.shape), np.ones(flux.shape), t,
                        {"mode": "standard"})
    TrainingSet(p, ("teff", "logg", "fe_h"), {"tscuts": "toy"}).write(path)
    return lab, flux


def test_train_cli_writes_a_model_with_provenance(tmp_path):
    pytest.importorskip("torch")
    from musepayne.io.fits import sha256_file
    from musepayne.models.files import load_model

    ts = tmp_path / "ts.fits"
    lab, flux = _toy_trainset(ts)
    out = tmp_path / "m.fits"
    r = CliRunner().invoke(main, ["train", str(ts), "-o", str(out), "--hidden", "16,16", "--epochs", "300",
                                  "--seed", "1", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["n_train"] + info["n_val"] == 60
    m = load_model(out)
    assert m.meta["trainset_sha256"] == sha256_file(ts)
    assert m.meta["regularisation"]["method"].startswith("none") and m.meta["seed"] == 1
    # the toy line depth is learnt: residuals well below the line-depth variation (~0.2)
    assert np.sqrt(np.mean((m.predict(lab) - flux) ** 2)) < 0.02
    # gradient weight without templates is refused with a clear message
    r2 = CliRunner().invoke(main, ["train", str(ts), "-o", str(out), "--gradient-weight", "0.1", "--json"])
    assert r2.exit_code == 2 and "templates" in json.loads(r2.output)["error"]
