"""Spectral models: predictions, analytic Jacobians, file format, importer."""

import numpy as np
import pytest

from musepayne.instrument.wavelength import lamost_wavelength
from musepayne.models.model import MLPPayne, ModelError, PerPixelPayne, import_payne_npz, load_model
from musepayne.testing import toy_mlp_model


def _fd_jacobian(model, x, h):
    cols = []
    for k in range(model.n_labels):
        e = np.zeros(model.n_labels)
        e[k] = h[k]
        cols.append((model.predict(x + e) - model.predict(x - e)) / (2 * h[k]))
    return np.stack(cols, -1)


def test_mlp_jacobian_matches_finite_differences():
    m = toy_mlp_model(lamost_wavelength()[:400], hidden=(40, 30), n_lines=40)
    rng = np.random.default_rng(3)
    x = m.unscale(rng.uniform(-0.45, 0.45, (4, m.n_labels)))
    f, J = m.predict_with_jacobian(x)
    assert f.shape == (4, 400) and J.shape == (4, 400, 5)
    Jfd = _fd_jacobian(m, x, 1e-6 * m.scale_width)
    assert np.max(np.abs(J - Jfd)) < 1e-6 * np.max(np.abs(J))
    # float32 kernel agrees with float64 to float32 precision
    f32, J32 = m.predict_scaled_with_jacobian(m.scale(x), dtype=np.float32)
    assert np.max(np.abs(f32 - f)) < 1e-5


def test_perpixel_jacobian_and_formula():
    rng = np.random.default_rng(0)
    p, h, L = 50, 4, 3
    w0, b0 = rng.normal(size=(p, h, L)), rng.normal(size=(p, h))
    w1, b1 = rng.normal(size=(p, h)), rng.normal(size=p)
    m = PerPixelPayne(w0, b0, w1, b1, ["teff", "logg", "fe_h"], [4000, 1, -2], [6000, 5, 0.5],
                      np.linspace(5000, 5100, p))
    x = np.array([[4500.0, 2.5, -0.3], [5900, 4.9, 0.4]])
    s = (x - m.x_min) / (m.x_max - m.x_min) - 0.5
    z = np.einsum("ijk,nk->nij", w0, s) + b0
    ref = np.einsum("ij,nij->ni", w1, 1 / (1 + np.exp(-z))) + b1  # The Payne's formula
    f, J = m.predict_with_jacobian(x)
    assert np.allclose(f, ref, rtol=0, atol=1e-12)
    assert np.allclose(J, _fd_jacobian(m, x, 1e-6 * m.scale_width), rtol=1e-5, atol=1e-8)
    assert m.label_units == ("K", "dex", "dex")


def test_model_file_round_trip_exact(tmp_path):
    m = toy_mlp_model(lamost_wavelength()[:300], hidden=(20, 10), n_lines=20)
    m.meta["training_set_hash"] = "abc123"
    path = tmp_path / "toy.fits"
    m.save(path)
    m2 = load_model(path)
    assert isinstance(m2, MLPPayne) and m2.label_names == m.label_names
    for a, b in zip(m.weights + m.biases, m2.weights + m2.biases):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(m2.wave, m.wave) and m2.frame == "vacuum"
    assert np.array_equal(m2.x_min, m.x_min) and np.array_equal(m2.x_max, m.x_max)
    assert m2.meta == m.meta
    x = m.unscale(np.zeros((1, 5)))
    assert np.array_equal(m2.predict(x), m.predict(x))


def test_load_model_errors(tmp_path):
    # the shipped default: trained on MILES+STELIB, LAMOST grid, provenance inside
    d = load_model("default")
    assert d.label_names == ("teff", "logg", "fe_h") and d.n_pix == 3909 and d.frame == "vacuum"
    assert d.meta["regularisation"]["gradient_weight"]["teff"] > 0 and d.meta["trainset_source"] == "miles,stelib"
    assert d.meta["command"].startswith("musepayne train ")
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.fits")
    bad = tmp_path / "bad.npz"
    np.savez(bad, w_array_0=np.zeros((3, 2)), b_array_0=np.zeros(3), x_min=np.zeros(2), x_max=np.ones(2))
    with pytest.raises(ModelError, match="payne-mlp"):
        import_payne_npz(bad, "payne-perpixel", ["a", "b"], np.arange(3.0) + 5000)


@pytest.mark.shared
def test_import_real_perpixel_network(shared, tmp_path):
    d = shared / "payne_apogee"
    m = import_payne_npz(d / "NN_normalized_spectra.npz", "payne-perpixel",
                         ["teff", "logg", "fe_h", "mg_fe", "vmacro"], d / "apogee_wavelength.npz")
    nn = np.load(d / "NN_normalized_spectra.npz")
    x = np.array([4750.0, 4.6, -0.2, 0.1, 6.0])
    s = (x - nn["x_min"]) / (nn["x_max"] - nn["x_min"]) - 0.5
    z = np.einsum("ijk,k->ij", nn["w_array_0"], s) + nn["b_array_0"]
    ref = np.einsum("ij,ij->i", nn["w_array_1"], 1 / (1 + np.exp(-z))) + nn["b_array_1"]
    assert np.max(np.abs(m.predict(x)[0] - ref)) < 1e-6
    assert m.n_pix == 7214 and m.n_hidden == 5
    assert len(m.meta["imported_sha256"]) == 64
    path = tmp_path / "apogee.fits"
    m.save(path)
    m2 = load_model(path)
    assert isinstance(m2, PerPixelPayne) and np.array_equal(m2.w0, m.w0)
    _, J = m2.predict_with_jacobian(x)
    h = 1e-5 * m.scale_width
    assert np.allclose(J[0], _fd_jacobian(m2, x[None], h)[0], rtol=1e-3, atol=1e-7)


def test_pixel_mask_roundtrip_and_fit_ignores_masked_pixels(tmp_path):
    from fit_helpers import toy_stellar_model
    from musepayne.models.model import load_model

    m = toy_stellar_model()
    mask = np.zeros(m.n_pix, bool)
    mask[2500:2700] = True
    m.with_pixel_mask(mask).save(tmp_path / "m.fits")
    back = load_model(tmp_path / "m.fits")
    assert np.array_equal(back.pixel_mask, mask)
    # a spectrum that is garbage in the masked pixels fits exactly as the clean one
    from fit_helpers import as_prepared as prepared_from_arrays
    from musepayne.fit.fitter import Fitter

    truth = np.array([[5200.0, 2.5, -1.0]])
    f = m.predict(truth)
    bad = f.copy()
    bad[:, 2500:2700] = 5.0
    iv = np.full(f.shape, 1e4)
    clean = Fitter(back)(prepared_from_arrays(m.wave, f, iv))
    dirty = Fitter(back)(prepared_from_arrays(m.wave, bad, iv))
    for k in ("teff", "logg", "fe_h"):
        assert dirty[k][0] == pytest.approx(clean[k][0], rel=1e-9)
        assert clean[k][0] == pytest.approx(truth[0, ["teff", "logg", "fe_h"].index(k)], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("kind", ["model", "prepared", "gradients"])
def test_readers_refuse_foreign_and_newer_files(tmp_path, kind):
    """Each of the package's FITS formats is recognised by MPFORMAT and refuses a newer version,
    with the reader's own error class and the file named in the message."""
    from astropy.io import fits

    from musepayne.io.prepared import PreparedSpectra
    from musepayne.io.spectra import ReaderError
    from musepayne.models.gradients import GradientTemplates

    read, err, name, vkey = {
        "model": (load_model, ModelError, "musepayne-model", "MPMVERS"),
        "prepared": (PreparedSpectra.read, ReaderError, "musepayne-prepared", "MPVERS"),
        "gradients": (GradientTemplates.load, ReaderError, "musepayne-gradients", "MPVERS"),
    }[kind]
    foreign = tmp_path / "foreign.fits"
    fits.PrimaryHDU(np.zeros(3)).writeto(foreign)
    with pytest.raises(err, match=r"foreign.fits: not a musepayne .* file \(MPFORMAT missing"):
        read(foreign)
    newer = tmp_path / "newer.fits"
    h = fits.Header()
    h["MPFORMAT"] = name
    h[vkey] = 99
    fits.PrimaryHDU(header=h).writeto(newer)
    with pytest.raises(err, match="format version 99 is newer than this musepayne reads"):
        read(newer)


def test_model_transforms_return_new_objects():
    from musepayne.instrument.wavelength import lamost_wavelength

    m = toy_mlp_model(lamost_wavelength(), label_names=("teff", "logg", "fe_h"))
    mask = np.zeros(m.wave.size, bool)
    mask[:100] = True
    m2 = m.with_pixel_mask(mask)
    m3 = m2.with_scatter(np.full(m.wave.size, 0.01))
    assert m2 is not m and not m.pixel_mask.any() and m2.pixel_mask[:100].all()
    assert not np.any(m2.scatter) and np.all(m3.scatter == 0.01) and m3.pixel_mask[:100].all()
    mask[:] = False  # the caller's array is copied, not kept
    assert m2.pixel_mask[:100].all()
    lab = np.array([[5000.0, 3.0, -0.5]])
    assert np.array_equal(m.predict(lab), m3.predict(lab))  # same network
