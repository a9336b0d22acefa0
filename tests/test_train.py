"""DD-Payne training on problems with known truth (needs torch)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

torch = pytest.importorskip("torch")

from musepayne.models.gradients import GradientTemplates, pearson_rows  # noqa: E402
from musepayne.train.trainer import TrainConfig, parse_gradient_weights, split_indices, train_model  # noqa: E402

NAMES = ("teff", "logg", "fe_h")
WAVE = np.linspace(5000.0, 5300.0, 240)
CENTRES = np.linspace(5010.0, 5290.0, 24)


def truth(labels):
    """Normalised toy spectra: 24 absorption lines whose depths depend on the labels
    in line-specific ways (some Teff-, some logg-, some [Fe/H]-sensitive)."""
    lab = np.atleast_2d(labels)
    t = (lab[:, 0:1] - 5500.0) / 1000.0
    g = (lab[:, 1:2] - 3.0) / 1.5
    m = lab[:, 2:3]
    k = np.arange(CENTRES.size)[None, :]
    depth = 0.25 + 0.12 * np.sin(k) * t + 0.10 * np.cos(1.7 * k) * g + 0.08 * (1 + (k % 3)) / 3 * m
    depth = np.clip(depth, 0.02, 0.9)
    prof = np.exp(-0.5 * ((WAVE[None, None, :] - CENTRES[None, :, None]) / 2.0) ** 2)
    return 1.0 - (depth[:, :, None] * prof).sum(1)


def truth_jacobian(labels, h=(1.0, 1e-3, 1e-3)):
    lab = np.atleast_2d(labels)
    out = np.empty((lab.shape[0], 3, WAVE.size))
    for j in range(3):
        e = np.zeros(3)
        e[j] = h[j]
        out[:, j] = (truth(lab + e) - truth(lab - e)) / (2 * h[j])
    return out


def draw_labels(rng, n, correlated=False):
    teff = rng.uniform(4500, 6500, n)
    logg = rng.uniform(1.5, 4.5, n) if not correlated else 3.0 + 1.5 * (teff - 5500) / 1000 + rng.normal(0, 0.05, n)
    feh = rng.uniform(-1.5, 0.3, n)
    return np.c_[teff, logg, feh]


def data(rng, n, snr=300.0, correlated=False):
    lab = draw_labels(rng, n, correlated)
    f = truth(lab)
    sig = 1.0 / snr
    return lab, f + rng.normal(0, sig, f.shape), np.full(f.shape, 1.0 / sig**2)


def fd_jacobian(res, labels):
    rng_ = res.x_max - res.x_min
    out = []
    for j in range(3):
        e = np.zeros(3)
        e[j] = 1e-3 * rng_[j]
        out.append((res.predict(labels + e) - res.predict(labels - e)) / (2 * e[j]))
    return np.stack(out, 1)


FAST = dict(epochs=600, eval_every=20, patience=1000, learning_rate=3e-3, val_fraction=0.15)


def test_mlp_reproduces_held_out_spectra():
    rng = np.random.default_rng(1)
    lab, f, iv = data(rng, 400)
    res = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(hidden=(32, 32), seed=3, **FAST))
    test_lab = draw_labels(np.random.default_rng(99), 100)
    err = res.predict(test_lab) - truth(test_lab)
    line_depth = 1 - truth(test_lab).min()
    # held-out spectra reproduced to ~1 % of the line depths (noise 0.33 %)
    assert np.sqrt(np.mean(err**2)) < 0.01 * line_depth
    assert res.meta["n_train"] + res.meta["n_val"] == 400 and res.meta["n_val"] == 60
    assert res.meta["final_val_loss"] < 2.5 * res.meta["final_train_loss"]


def test_perpixel_reproduces_held_out_spectra():
    rng = np.random.default_rng(2)
    lab, f, iv = data(rng, 300)
    res = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(arch="perpixel", hidden=(6,), seed=1,
                                                            **{**FAST, "learning_rate": 2e-2}))
    test_lab = draw_labels(np.random.default_rng(98), 100)
    err = res.predict(test_lab) - truth(test_lab)
    assert np.sqrt(np.mean(err**2)) < 0.02 * (1 - truth(test_lab).min())
    assert res.weights[0].shape == (WAVE.size, 6, 3) and res.biases[1].shape == (WAVE.size,)


def test_masked_pixels_are_ignored():
    rng = np.random.default_rng(3)
    lab, f, iv = data(rng, 120)
    iv = iv.copy()
    iv[:, 50:80] = 0.0
    iv[::3, 150:160] = 0.0
    garbage = f.copy()
    garbage[iv == 0] = 1e6
    cfg = TrainConfig(hidden=(16,), seed=0, **{**FAST, "epochs": 100})
    a = train_model(f, iv, lab, NAMES, WAVE, cfg)
    b = train_model(garbage, iv, lab, NAMES, WAVE, cfg)
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(wa, wb)
    assert a.meta["final_train_loss"] < 1e-3


def test_seed_reproducibility():
    rng = np.random.default_rng(4)
    lab, f, iv = data(rng, 100)
    cfg = TrainConfig(hidden=(16, 16), seed=7, **{**FAST, "epochs": 60})
    a = train_model(f, iv, lab, NAMES, WAVE, cfg)
    b = train_model(f, iv, lab, NAMES, WAVE, cfg)
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(wa, wb)
    assert a.history == b.history
    c = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(hidden=(16, 16), seed=8, **{**FAST, "epochs": 60}))
    assert not np.array_equal(a.weights[0], c.weights[0])
    # the robust validation score is recorded and also reproducible
    d = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(hidden=(16, 16), seed=7, val_metric="median",
                                                          **{**FAST, "epochs": 60}))
    assert d.history[-1]["val_score"] <= d.history[-1]["val_data"] * 1.5
    np.testing.assert_array_equal(d.weights[0], a.weights[0])  # same trajectory; only the stopping rule differs


def test_gradient_regularisation_reduces_mismatch():
    """With Teff and logg degenerate in the training set, a data-driven model cannot
    tell their gradients apart; the DD-Payne term with the true gradients can."""
    rng = np.random.default_rng(5)
    lab, f, iv = data(rng, 300, correlated=True)
    ref_lab = np.array([[t, 3.0 + 1.5 * (t - 5500) / 1000, m] for t in (4800, 5200, 5600, 6000, 6400)
                        for m in (-1.0, -0.3)])
    ref = Table(ref_lab, names=NAMES)
    tpl = GradientTemplates(WAVE, truth_jacobian(ref_lab).astype(np.float32), ref, NAMES)
    base = dict(hidden=(32, 32), seed=2, **FAST)
    plain = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(**base), templates=tpl)
    reg = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(**base, gradient_weight={n: 3e-4 for n in NAMES}),
                      templates=tpl)
    gt = truth_jacobian(ref_lab)
    corr_plain = np.array([pearson_rows(fd_jacobian(plain, ref_lab)[:, j], gt[:, j]) for j in range(3)])
    corr_reg = np.array([pearson_rows(fd_jacobian(reg, ref_lab)[:, j], gt[:, j]) for j in range(3)])
    # logg (degenerate with Teff in the data) is where the regularisation matters
    mismatch_plain = np.mean(1 - corr_plain, axis=1)
    mismatch_reg = np.mean(1 - corr_reg, axis=1)
    assert mismatch_plain[1] > 0.03
    assert mismatch_reg[1] < 0.2 * mismatch_plain[1]
    assert np.all(mismatch_reg <= mismatch_plain + 1e-3)
    assert np.all(np.median(corr_reg, 1) > 0.95)
    # and the data are still fitted
    assert reg.meta["final_val_loss"] < 3 * plain.meta["final_val_loss"] + 1e-5
    assert reg.meta["regularisation"]["gradient_weight"]["teff"] == 3e-4
    assert plain.meta["regularisation"]["method"].startswith("none")


def test_to_model_roundtrip_matches_numpy(tmp_path):
    from musepayne.models.files import load_model

    rng = np.random.default_rng(6)
    lab, f, iv = data(rng, 80)
    for arch, hid in (("mlp", (16, 16)), ("perpixel", (4,))):
        res = train_model(f, iv, lab, NAMES, WAVE, TrainConfig(arch=arch, hidden=hid, seed=0, **{**FAST, "epochs": 40}),
                          provenance={"trainset_sha256": "abc"})
        p = tmp_path / f"{arch}.fits"
        res.to_model().save(p)
        m = load_model(p)
        assert m.label_names == NAMES and m.meta["trainset_sha256"] == "abc" and m.meta["seed"] == 0
        np.testing.assert_allclose(m.predict(lab[:5]), res.predict(lab[:5]), atol=1e-5)
        np.testing.assert_allclose(m.x_min, lab.min(0))
        # the model's analytic Jacobian agrees with finite differences of the trained network
        _, jac = m.predict_with_jacobian(lab[:3])
        fd = fd_jacobian(res, lab[:3])
        np.testing.assert_allclose(np.transpose(jac, (0, 2, 1)), fd, atol=1e-3 * np.abs(fd).max())


def test_config_and_parsing_errors():
    assert parse_gradient_weights("0.1", NAMES) == {n: 0.1 for n in NAMES}
    assert parse_gradient_weights("teff=1,fe_h=0.5", NAMES) == {"teff": 1.0, "fe_h": 0.5}
    with pytest.raises(ValueError, match="unknown label"):
        parse_gradient_weights("mg_fe=1", NAMES)
    with pytest.raises(ValueError):
        TrainConfig(arch="cnn")
    with pytest.raises(ValueError):
        TrainConfig(val_metric="max")
    lab, f, iv = data(np.random.default_rng(0), 20)
    with pytest.raises(ValueError, match="templates"):
        train_model(f, iv, lab, NAMES, WAVE, TrainConfig(gradient_weight={"teff": 1.0}))
    # grouped split keeps groups together
    groups = np.repeat(np.arange(10), 3)
    tr, va = split_indices(30, 0.2, 0, groups)
    assert not set(groups[tr]) & set(groups[va]) and len(va) == 6


def test_outlier_clip_drops_stars_with_wrong_labels():
    rng = np.random.default_rng(11)
    lab, f, iv = data(rng, 200)
    wrong = set(rng.choice(200, 16, replace=False).tolist())
    bad_lab = lab.copy()
    bad_lab[sorted(wrong), 0] += 900.0  # literature Teff off by 900 K
    base = dict(hidden=(32, 32), seed=0, **{**FAST, "epochs": 400})
    res = train_model(f, iv, bad_lab, NAMES, WAVE, TrainConfig(outlier_clip=5.0, **base))
    tr, _ = split_indices(200, FAST["val_fraction"], 0)
    clipped = set(res.meta["clipped"])
    assert res.meta["n_clipped"] == len(clipped) > 0 and clipped <= set(tr.tolist())
    wrong_tr = wrong & set(tr.tolist())
    # most mislabelled training stars are clipped, few good ones (<= 5 % of them)
    assert len(clipped & wrong_tr) >= 0.7 * len(wrong_tr)
    assert len(clipped - wrong) <= 0.05 * (len(tr) - len(wrong_tr))
    # and the model of the true spectra gets better
    plain = train_model(f, iv, bad_lab, NAMES, WAVE, TrainConfig(**base))
    test_lab = draw_labels(np.random.default_rng(97), 100)
    err_clip = np.sqrt(np.mean((res.predict(test_lab) - truth(test_lab)) ** 2))
    err_plain = np.sqrt(np.mean((plain.predict(test_lab) - truth(test_lab)) ** 2))
    assert err_clip < 0.8 * err_plain
