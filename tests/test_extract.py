"""Extraction (PSF fitting, apertures), PSF model and cube simulator: tests with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from musepayne.extract.extractor import ExtractConfig, Extractor, circle_overlap, read_source_catalogue
from musepayne.extract.psf import MoffatPSF, psf_design_matrix
from musepayne.io.cube import open_cube
from musepayne.io.readers import read_muse_spectra
from musepayne.io.spectra import ReaderError
from musepayne.simulate.simulator import SimulateConfig, Simulator


# --------------------------------------------------------------------------- building blocks
def test_circle_overlap_is_exact():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[-6:7, -6:7]
    n = 300
    o = (np.arange(n) + 0.5) / n - 0.5
    for _ in range(4):
        xc, yc, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.3, 4.5)
        a = circle_overlap(xc, yc, r, xx, yy)
        assert a.sum() == pytest.approx(np.pi * r * r, rel=1e-10)
        inside = ((xx[..., None, None] + o[:, None] - xc) ** 2 + (yy[..., None, None] + o[None, :] - yc) ** 2) < r * r
        assert np.abs(a - inside.mean(axis=(2, 3))).max() < 2e-3  # brute-force sampling error


def test_moffat_normalisation_and_header_roundtrip():
    psf = MoffatPSF(fwhm=(3.6, -0.2, 0.04), beta=(2.6, -0.1), ellip=(0.1,), angle=(25.0,))
    img = psf.image((121, 121), 60.3, 59.8, 6000.0, oversample=5)
    # total flux inside a 60 px radius: 1 minus the analytic wing beyond it (round formula, e small)
    assert img.sum() == pytest.approx(psf.enclosed(60.0, 6000.0), abs=2e-3)
    back = MoffatPSF.from_header(psf.to_header())
    assert back.fwhm == pytest.approx(psf.fwhm, rel=1e-14) and back.angle == psf.angle
    # FWHM really is the FWHM along the geometric mean: a round profile at half maximum
    rnd = MoffatPSF(fwhm=(4.0,), beta=(3.0,))
    from musepayne.extract.psf import moffat_profile

    assert moffat_profile(2.0, 0.0, 4.0, 3.0) / moffat_profile(0.0, 0.0, 4.0, 3.0) == pytest.approx(0.5)
    assert rnd.fwhm_at(5000) == 4.0


# --------------------------------------------------------------------------- simulated crowded field
def _crowded(tmp_path_factory, nx, nl, ns, seed):
    d = tmp_path_factory.mktemp(f"crowd{nx}")
    cfg = SimulateConfig(nx=nx, ny=nx, nlayers=nl, nstars=ns, king_rc=nx / 3.0, seed=seed, bad_layers=(7,))
    out = Simulator(cfg).write(d / "cube.fits")
    res = {m: Extractor(ExtractConfig(method=m))(out["cube"], out["sources"]) for m in ("psf", "aperture")}
    return cfg, out, res


def _noise_limited_sigma(cfg, out, x, y, idx):
    """Cramer-Rao flux error of each star alone in each layer: 1/sqrt(sum P^2 / STAT), true PSF."""
    with open_cube(out["cube"]) as c:
        stat = c.stat_block(0, c.shape[0]).reshape(c.shape[0], -1)
        wave = c.wave
    sig = np.full((idx.size, wave.size), np.nan)
    for i0 in range(0, wave.size, 50):
        i1 = min(wave.size, i0 + 50)
        P = psf_design_matrix(cfg.psf, x[idx], y[idx], float(np.mean(wave[i0:i1])), (cfg.ny, cfg.nx), 25, 4)
        P2 = P.multiply(P).tocsc()
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.asarray(P2.T @ np.where(np.isfinite(stat[i0:i1]), 1.0 / stat[i0:i1], 0.0).T)
            sig[:, i0:i1] = 1.0 / np.sqrt(inv)
    return sig


def _check_recovery(cfg, out, res):
    tr = Table.read(out["truth"], "TRUTH")
    tf = fits.getdata(out["truth"], "TRUE_FLUX").astype(float)
    psf, ap = res["psf"], res["aperture"]
    x, y = np.asarray(tr["x"]), np.asarray(tr["y"])
    nn = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), 2)[0][:, 1]
    fw = psf.psf.fwhm_at(float(np.median(psf.wave)))
    ok = np.asarray(psf.sources["status"]) == "ok"
    mag = np.asarray(tr["mag"])
    bright = mag < np.percentile(mag[np.asarray(tr["in_field"])], 90)
    iso = np.nonzero(ok & bright & (nn >= fw))[0]
    assert iso.size >= 15
    good = np.isfinite(psf.flux).any(axis=0)
    assert not good[7] and good.sum() == cfg.nlayers - 1  # the NaN layer is flagged, not fitted
    assert psf.layer_flag[7] & 1
    f, e, t = psf.flux[:, good], psf.err[:, good], tf[:, good]
    rel = (f.sum(1) - t.sum(1)) / t.sum(1)
    # (1) true spectra recovered to <= 2 % median flux error (per-layer relative error, median over layers)
    per_layer = np.nanmedian(np.abs(f - t) / t, axis=1)
    sig = _noise_limited_sigma(cfg, out, x, y, iso)[:, good]
    noise_rel = np.nanmedian(sig / t[iso], axis=1)
    print("isolated bright:", iso.size, "median |integrated err|", np.median(np.abs(rel[iso])),
          "median per-layer |err|", np.median(per_layer[iso]), "noise-limited per-layer", np.median(noise_rel))
    assert np.median(np.abs(rel[iso])) <= 0.02
    assert np.median(per_layer[iso] / (0.6745 * noise_rel)) < 1.2 or np.median(per_layer[iso]) <= 0.02
    # (2) S/N within 20 % of the noise-limited expectation; reported errors match the scatter
    excess = np.nanstd((f[iso] - t[iso]) / sig, axis=1)
    pull = np.nanstd((f[iso] - t[iso]) / e[iso], axis=1)
    print("empirical / noise-limited scatter", np.median(excess), "pull", np.median(pull))
    assert 0.8 <= np.median(excess) <= 1.2
    assert 0.85 <= np.median(pull) <= 1.15
    snr_emp = np.nanmedian(t[iso] / sig, axis=1) / excess
    assert np.median(np.asarray(psf.sources["snr"])[iso] / snr_emp) == pytest.approx(1.0, abs=0.2)
    # (3) PSF fitting beats aperture extraction on blended stars (nearest neighbour < 1 FWHM)
    blend = np.nonzero(ok & (nn < fw) & (np.asarray(ap.sources["status"]) != "off_field"))[0]
    rel_ap = (np.nansum(ap.flux[:, good], 1) - t.sum(1)) / t.sum(1)
    e_psf, e_ap = np.median(np.abs(rel[blend])), np.median(np.abs(rel_ap[blend]))
    print("blended", blend.size, "PSF", e_psf, "aperture", e_ap)
    assert blend.size >= 10 and e_psf < 0.5 * e_ap
    # (4) coordinate transformation and PSF recovered
    tt = psf.transform
    assert tt.offset[0] == pytest.approx(cfg.cat_offset[0], abs=0.05)
    assert tt.offset[1] == pytest.approx(cfg.cat_offset[1], abs=0.05)
    assert tt.rotation == pytest.approx(cfg.cat_rotation, abs=0.05)
    assert tt.scale == pytest.approx(cfg.cat_scale, abs=1e-3)
    assert tt.rms < 0.1
    w = float(np.median(psf.wave))
    assert psf.psf.fwhm_at(w) == pytest.approx(cfg.psf.fwhm_at(w), rel=0.03)
    # (5) every catalogue star reported; stars off the field have a status, not silently dropped
    assert len(psf.sources) == cfg.nstars
    st = np.asarray(psf.sources["status"])
    assert np.all(st[~np.asarray(tr["in_field"])] == "off_field")
    assert np.all(np.isnan(psf.flux[st == "off_field"]))


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    return _crowded(tmp_path_factory, 70, 300, 180, seed=5)


def test_crowded_field_recovery_small(small_field):
    _check_recovery(*small_field)


@pytest.mark.slow
def test_crowded_field_recovery_full_size(tmp_path_factory):
    """The issue's case: 500 stars, 150 x 150 spaxels, 1000 layers."""
    _check_recovery(*_crowded(tmp_path_factory, 150, 1000, 500, seed=2))


def test_output_roundtrip_and_prepare(small_field, tmp_path):
    cfg, out, res = small_field
    r = res["psf"]
    path = tmp_path / "spectra.fits"
    r.write(path)
    with fits.open(path) as h:
        back = MoffatPSF.from_header(h[0].header)
        np.testing.assert_allclose(np.concatenate(back.params(r.wave)), np.concatenate(r.psf.params(r.wave)),
                                   rtol=1e-12)
        assert h["FLUX"].data.shape == (cfg.nstars, cfg.nlayers)
        assert h["LAYER_FLAG"].data[7] & 1
    s = read_muse_spectra(path)
    assert s.frame == "air" and s.n_spectra == cfg.nstars
    np.testing.assert_allclose(s.flux, r.flux.astype(np.float32), rtol=1e-6, equal_nan=True)
    assert list(s.meta["stellar_id"]) == list(r.sources["stellar_id"])
    from musepayne.prepare.preparer import PrepareConfig, Preparer

    prepared = Preparer(PrepareConfig())(s.select(np.nonzero(np.asarray(r.sources["status"]) == "ok")[0][:5]))
    assert prepared.n_spectra == 5
    # the short test cube covers 4750-5124 A only: low_coverage on the LAMOST grid, but pixels are used
    assert set(prepared.spectra["status"]) <= {"ok", "low_coverage"}
    assert np.all(prepared.spectra["n_used"] > 100)
    # PampelMUSE-style per-star files read back by the MUSE reader
    paths = r.write_per_star(tmp_path / "stars", statuses=("ok",))
    assert len(paths) == int(np.sum(np.asarray(r.sources["status"]) == "ok"))
    one = read_muse_spectra(paths[0])
    k = list(r.sources["stellar_id"]).index(one.meta["stellar_id"][0])
    np.testing.assert_allclose(one.wave, r.wave, rtol=1e-9)
    np.testing.assert_allclose(one.flux[0], r.flux[k], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(one.variance[0], r.err[k].astype(np.float64) ** 2, rtol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------- corrupt input
@pytest.fixture
def tiny_cube(tmp_path):
    cfg = SimulateConfig(nx=30, ny=30, nlayers=60, nstars=20, king_rc=10.0, seed=3)
    return Simulator(cfg).write(tmp_path / "tiny.fits")


def test_missing_stat_is_a_clear_error_and_no_output(tiny_cube, tmp_path):
    with fits.open(tiny_cube["cube"]) as h:
        fits.HDUList([h[0].copy(), h["DATA"].copy()]).writeto(tmp_path / "nostat.fits")
    with pytest.raises(ReaderError, match="STAT"):
        Extractor()(tmp_path / "nostat.fits", tiny_cube["sources"])
    from click.testing import CliRunner

    from musepayne.cli import main

    out = tmp_path / "x.fits"
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "nostat.fits"), "--sources", tiny_cube["sources"],
                                  "-o", str(out), "--json"])
    assert r.exit_code == 2 and "STAT" in r.output and not out.exists()


def test_wrong_axis_order_is_a_clear_error(tiny_cube, tmp_path):
    with fits.open(tiny_cube["cube"]) as h:
        hd = h["DATA"].header.copy()
        for k in ("CTYPE", "CUNIT", "CRPIX", "CRVAL"):
            hd[f"{k}1"], hd[f"{k}3"] = hd[f"{k}3"], hd[f"{k}1"]
        bad = fits.HDUList([h[0].copy(), fits.ImageHDU(np.swapaxes(h["DATA"].data, 0, 2), hd, name="DATA"),
                            fits.ImageHDU(np.swapaxes(h["STAT"].data, 0, 2), hd, name="STAT")])
        bad.writeto(tmp_path / "swapped.fits")
    with pytest.raises(ReaderError, match="axis"):
        Extractor()(tmp_path / "swapped.fits", tiny_cube["sources"])


def test_all_nan_cube_is_a_clear_error(tiny_cube, tmp_path):
    with fits.open(tiny_cube["cube"]) as h:
        h2 = fits.HDUList([x.copy() for x in h])
        h2["DATA"].data[:] = np.nan
        h2.writeto(tmp_path / "nan.fits")
    with pytest.raises(ReaderError, match="NaN"):
        Extractor()(tmp_path / "nan.fits", tiny_cube["sources"])


def test_catalogue_formats_agree(tiny_cube, tmp_path):
    t = Table.read(tiny_cube["sources"], format="ascii.csv")
    t.write(tmp_path / "c.fits")
    t.write(tmp_path / "c.xml", format="votable")
    a, b, c = (read_source_catalogue(p) for p in (tiny_cube["sources"], tmp_path / "c.fits", tmp_path / "c.xml"))
    np.testing.assert_allclose(a["ra"], b["ra"])
    np.testing.assert_allclose(a["mag"], c["mag"])
    with pytest.raises(ReaderError, match="mag"):
        read_source_catalogue(Table({"ra": [1.0], "dec": [2.0]}))


def test_cli_simulate_extract_json(tmp_path):
    import json

    from click.testing import CliRunner

    from musepayne.cli import main

    r = CliRunner().invoke(main, ["simulate", "-o", str(tmp_path / "s.fits"), "--nstars", "40", "--size", "40",
                                  "--nlayers", "80", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    r = CliRunner().invoke(main, ["extract", info["cube"], "--sources", info["sources"], "-o",
                                  str(tmp_path / "sp.fits"), "--method", "aperture", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["n_stars"] == 40 and sum(res["counts"].values()) == 40
    assert read_muse_spectra(tmp_path / "sp.fits").n_spectra == 40


# --------------------------------------------------------------------------- real cubes
@pytest.mark.shared
@pytest.mark.parametrize("name,xy", [("udf_subcube_mosaic.fits", (14.3, 15.6)), ("mpdaf_CUBE.fits", (9.6, 4.4))])
def test_real_cube_aperture_matches_direct_sum(shared, name, xy):
    path = shared / "muse" / "cubes" / name
    with open_cube(path) as c:
        nz, ny, nx = c.shape
        assert c.frame == "air" and np.all(np.diff(c.wave) > 0) and 4700 < c.wave[0] < 9400
        ra, dec = c.wcs.pixel_to_world_values(*xy)
        data = c.data_block(0, nz).astype(np.float64)
        stat = c.stat_block(0, nz).astype(np.float64)
    assert np.all(stat[np.isfinite(stat)] > 0)
    r = 3.0
    cat = Table({"stellar_id": ["p"], "ra": [ra], "dec": [dec], "mag": [20.0]})
    cfg = ExtractConfig(method="aperture", aperture_radius_px=r, annulus=None, aperture_correction=False,
                        fit_transform=False, psf=MoffatPSF(fwhm=(3.5,)))
    res = Extractor(cfg)(path, cat)
    assert res.sources["x"][0] == pytest.approx(xy[0], abs=1e-6)  # RA/Dec went through the cube WCS
    # direct sum: brute-force sub-sampled circle weights on the spaxels
    n = 200
    o = (np.arange(n) + 0.5) / n - 0.5
    yy, xx = np.mgrid[:ny, :nx]
    w = (((xx[..., None, None] + o[:, None] - xy[0]) ** 2 + (yy[..., None, None] + o[None, :] - xy[1]) ** 2)
         < r * r).mean(axis=(2, 3))
    direct = np.einsum("zyx,yx->z", data, w)
    direct_var = np.einsum("zyx,yx->z", stat, w**2)
    np.testing.assert_allclose(res.flux[0], direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    np.testing.assert_allclose(res.err[0] ** 2, direct_var, rtol=5e-3)
    assert res.wave.size == nz


# --------------------------------------------------------------------------- simulator sources
def test_pluggable_spectrum_source_and_rv_shift(tmp_path):
    from musepayne.simulate.simulator import CallableSpectra

    def fn(labels, wave):  # flat continuum with one Gaussian line whose depth is the label
        return 1.0 - labels["depth"] * np.exp(-0.5 * ((wave - 6000.0) / 3.0) ** 2)

    src = CallableSpectra(fn, lambda rng, n: {"depth": rng.uniform(0.2, 0.6, n)}, ("depth",))
    cfg = SimulateConfig(nx=20, ny=20, nlayers=1200, nstars=6, rv_sigma=80.0, king_rc=5.0, seed=4)
    out = Simulator(cfg, source=src).write(tmp_path / "c.fits")
    tr = Table.read(out["truth"], "TRUTH")
    tf = fits.getdata(out["truth"], "TRUE_FLUX").astype(float)
    wave = fits.getdata(out["truth"], "WAVE")
    near = np.abs(wave - 6000.0) < 15
    for k in range(len(tr)):
        cont = np.median(tf[k, ~near])
        dip = cont - tf[k, near]
        centroid = np.sum(wave[near] * dip) / np.sum(dip)
        assert centroid == pytest.approx(6000.0 * (1 + tr["rv"][k] / 299792.458), abs=0.03)
        # the Doppler rebinning conserves flux: equivalent width = depth * sigma * sqrt(2 pi)
        assert np.sum(dip) * 1.25 / cont == pytest.approx(tr["depth"][k] * 3.0 * np.sqrt(2 * np.pi), rel=2e-3)


@pytest.mark.shared
def test_library_spectra_source(shared, tmp_path):
    from musepayne.io.readers import read_stelib
    from musepayne.simulate.simulator import LibrarySpectra

    files = sorted((shared / "libraries" / "stelib").glob("STELIB_v3.2_HD*.fits"))[:3]
    sets = [read_stelib(f) for f in files]
    cfg = SimulateConfig(nx=20, ny=20, nlayers=400, nstars=5, rv_sigma=0.0, king_rc=5.0, seed=6)
    sim = Simulator(cfg, source=LibrarySpectra(sets, Simulator(cfg).wave))
    out = sim.write(tmp_path / "c.fits")
    tr = Table.read(out["truth"], "TRUTH")
    tf = fits.getdata(out["truth"], "TRUE_FLUX").astype(float)
    lib = sim.source.spectra
    for k in range(len(tr)):
        ref = lib[int(tr["lib_index"][k])]
        np.testing.assert_allclose(tf[k] / tf[k].mean(), ref / ref.mean(), rtol=2e-5)


def test_factorise_dense_and_sparse_paths_agree():
    import scipy.sparse as sp

    from musepayne.extract.extractor import factorise

    rng = np.random.default_rng(0)
    A = sp.random(400, 60, density=0.1, random_state=1, format="csc") + sp.eye(400, 60)
    N = (A.T @ A).tocsc()
    b = rng.normal(size=(60, 3))
    s1, d1 = factorise(N, dense_max=1000)
    s2, d2 = factorise(N, dense_max=0)
    inv = np.linalg.inv(N.toarray())
    np.testing.assert_allclose(d1, np.diag(inv), rtol=1e-9)
    np.testing.assert_allclose(d2, np.diag(inv), rtol=1e-9)
    np.testing.assert_allclose(s1(b), inv @ b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(s2(b), inv @ b, rtol=1e-8, atol=1e-10)


def test_factorise_components_and_border_are_exact():
    """Separated star groups (independent blocks), isolated stars and sky columns coupled to
    everything: block elimination gives the answer and the inverse's diagonal of the whole matrix."""
    import scipy.sparse as sp

    from musepayne.extract.extractor import _sky_columns, factorise

    rng = np.random.default_rng(3)
    shape = (60, 60)
    # three tight groups, a few isolated stars, one star off the usable pixels (empty column)
    xy = np.vstack([rng.normal(c, 2.0, (k, 2)) for c, k in (((12, 12), 15), ((45, 15), 8), ((30, 45), 20))]
                   + [np.array([[5.0, 55.0], [55.0, 55.0], [55.0, 32.0], [-30.0, -30.0]])])
    P = psf_design_matrix(MoffatPSF(fwhm=(3.0,)), xy[:, 0], xy[:, 1], 7000.0, shape, 6.0, 2)
    S = sp.csc_matrix(_sky_columns(shape, 1, np.ones(shape, bool)))
    A = sp.hstack([P, S], format="csc")
    w = rng.uniform(0.5, 2.0, A.shape[0])
    N = (A.T @ A.multiply(w[:, None])).tocsc()
    dg = N.diagonal()
    N = N + sp.diags(np.where(dg > 0, 1e-9 * dg, 1.0))
    ns = len(xy)
    from scipy.sparse.csgraph import connected_components

    assert connected_components(N[:ns, :ns], directed=False)[0] == 3 + 4  # the structure is exercised
    inv = np.linalg.inv(N.toarray())
    B = rng.normal(size=(N.shape[0], 5))
    for dense_max in (1000, 10):  # all dense / the largest group by sparse LU
        solve, d = factorise(N, dense_max, border=np.arange(ns, N.shape[0]))
        np.testing.assert_allclose(d, np.diag(inv), rtol=1e-8)
        np.testing.assert_allclose(solve(B), inv @ B, rtol=1e-7, atol=1e-9 * np.abs(inv @ B).max())
        np.testing.assert_allclose(solve(B[:, 0]), inv @ B[:, 0], rtol=1e-7, atol=1e-9 * np.abs(inv @ B).max())
    solve, d = factorise(N, border=np.arange(ns, N.shape[0]), need_diag=False)
    assert d is None


def test_tiled_normal_matrix_and_dense_factorisation_are_exact(monkeypatch):
    """The large-field path (normal matrix formed densely tile by tile, factorised from its dense
    blocks) gives the sparse product's matrix and the exact solve and inverse diagonal of a crowded
    field whose stars are all coupled (one component), with sky columns and an empty column."""
    import scipy.sparse as sp

    from musepayne.extract import linsolve
    from musepayne.extract.imagefit import _sky_columns

    rng = np.random.default_rng(7)
    shape = (48, 40)
    xy = np.vstack([rng.uniform([-3, -3], [43, 51], (260, 2)), [[-40.0, -40.0]]])  # crowded + one off the field
    valid = np.ones(shape, bool)
    valid[30:34, 5:12] = False
    P = psf_design_matrix(MoffatPSF(fwhm=(3.5,), beta=(2.5,)), xy[:, 0], xy[:, 1], 7000.0, shape, 14.0, 2,
                          valid=valid)
    A = sp.hstack([P, sp.csc_matrix(_sky_columns(shape, 1, valid))], format="csc")
    w = np.where(valid.ravel(), rng.uniform(0.5, 2.0, valid.size), 0.0)
    Ns, ok_s = linsolve.normal_matrix(A, w, shape, 1e-9)
    monkeypatch.setattr(linsolve, "TILED_MIN", 0)
    Nd, ok_d = linsolve.normal_matrix(A, w, shape, 1e-9)
    assert isinstance(Nd, np.ndarray) and sp.issparse(Ns)
    np.testing.assert_array_equal(ok_s, ok_d)
    assert not ok_d[len(xy) - 1]  # the empty column is reported
    np.testing.assert_allclose(Nd, Ns.toarray(), rtol=1e-12, atol=1e-12 * np.abs(Nd).max())
    ns = len(xy)
    from scipy.sparse.csgraph import connected_components

    assert connected_components(Ns[: ns - 1, : ns - 1], directed=False)[0] == 1  # one coupled group
    B = rng.normal(size=(Nd.shape[0], 4))
    s1, d1 = linsolve.factorise(Ns, border=np.arange(ns, Nd.shape[0]))
    s2, d2 = linsolve.factorise(Nd, border=np.arange(ns, Nd.shape[0]))
    Nd_copy = Nd.copy()
    inv = np.linalg.inv(Ns.toarray())
    np.testing.assert_allclose(d2, np.diag(inv), rtol=1e-8)
    np.testing.assert_allclose(d2, d1, rtol=1e-10)
    np.testing.assert_allclose(s2(B), s1(B), rtol=1e-8, atol=1e-10 * np.abs(s1(B)).max())
    np.testing.assert_array_equal(Nd, Nd_copy)  # the caller's matrix is not modified
    # stars in image-tile order (as the extraction orders large fields): the permuted matrix
    o = np.lexsort((np.clip(np.rint(xy[:, 0]), 0, 39) // 16, np.clip(np.rint(xy[:, 1]), 0, 47) // 16))
    At = sp.hstack([P[:, o], sp.csc_matrix(_sky_columns(shape, 1, valid))], format="csc")
    Nt, _ = linsolve.normal_matrix(At, w, shape, 1e-9)
    oo = np.r_[o, np.arange(ns, Nd.shape[0])]
    np.testing.assert_allclose(Nt, Ns.toarray()[np.ix_(oo, oo)], rtol=1e-12, atol=1e-12 * np.abs(Nd).max())


def test_envelope_factorisation_is_exact(monkeypatch):
    """The block envelope Cholesky of a large coupled star group (reverse Cuthill-McKee order,
    left-looking block panels, selected inverse for diag(N^-1)) gives the exact solve and inverse
    diagonal, with sky border columns, from sparse and dense normal matrices; blocks smaller than
    the envelope's width and a last partial block are exercised."""
    import scipy.sparse as sp

    from musepayne.extract import linsolve
    from musepayne.extract.imagefit import _sky_columns

    rng = np.random.default_rng(11)
    shape = (40, 90)  # elongated field: a narrow profile along it
    xy = rng.uniform([-2, -2], [92, 42], (330, 2))
    P = psf_design_matrix(MoffatPSF(fwhm=(3.0,), beta=(2.5,)), xy[:, 0], xy[:, 1], 7000.0, shape, 9.0, 2)
    A = sp.hstack([P, sp.csc_matrix(_sky_columns(shape, 1, np.ones(shape, bool)))], format="csc")
    w = rng.uniform(0.5, 2.0, A.shape[0])
    N, _ = linsolve.normal_matrix(A, w, shape, 1e-9)
    ns = len(xy)
    monkeypatch.setattr(linsolve, "ENVELOPE_MIN", 100)
    monkeypatch.setattr(linsolve, "ENVELOPE_BLOCK", 24)
    comp = linsolve._ComponentFactor(N[:ns, :ns], 10000)
    assert [k for _, k, _ in comp.blocks] == ["env"]  # one coupled group, on the envelope path
    _, f = comp.blocks[0][::2]
    assert f.a.size > 10 and np.any(f.e - f.b > 24) and f.b[-1] - f.a[-1] < 24  # several blocks span a panel
    inv = np.linalg.inv(N.toarray())
    B = rng.normal(size=(N.shape[0], 4))
    ref = inv @ B
    for M in (N, N.toarray()):
        solve, d = linsolve.factorise(M, border=np.arange(ns, N.shape[0]))
        np.testing.assert_allclose(d, np.diag(inv), rtol=1e-9)
        np.testing.assert_allclose(solve(B), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
        np.testing.assert_allclose(solve(B[:, 1]), ref[:, 1], rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    # a plan (coupling structure) made on one matrix serves another of the same pattern: same answer
    plan = {}
    linsolve.factorise(N, border=np.arange(ns, N.shape[0]), plan=plan)
    assert plan["env"]
    D = sp.diags(rng.uniform(0.5, 2.0, N.shape[0]))
    N2 = (D @ N @ D).tocsc()
    s1, d1 = linsolve.factorise(N2, border=np.arange(ns, N.shape[0]), plan=plan)
    s2, d2 = linsolve.factorise(N2, border=np.arange(ns, N.shape[0]))
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(s1(B), s2(B))
    np.testing.assert_allclose(d1, np.diag(np.linalg.inv(N2.toarray())), rtol=1e-9)


@pytest.mark.parametrize("path", ["tiled", "envelope"])
def test_large_field_path_gives_the_same_fluxes(small_field, monkeypatch, path):
    """Extraction through the large-field solver paths (tiled dense normal matrix; envelope Cholesky
    of the coupled star groups) equals the exact sparse/dense path within 1e-6 relative (fluxes and
    errors), and conserves flux: recovered integrated fluxes of isolated bright stars match the
    truth as well as the reference path's do."""
    from musepayne.extract import linsolve

    cfg, out, res = small_field
    ref = res["psf"]
    if path == "tiled":
        monkeypatch.setattr(linsolve, "TILED_MIN", 0)
    else:
        monkeypatch.setattr(linsolve, "ENVELOPE_MIN", 20)
        monkeypatch.setattr(linsolve, "ENVELOPE_GAIN", 10.0)
        monkeypatch.setattr(linsolve, "ENVELOPE_BLOCK", 16)
        made, cls = [], linsolve._EnvelopeFactor
        monkeypatch.setattr(linsolve, "_EnvelopeFactor", lambda *a: made.append(1) or cls(*a))
    new = Extractor(ExtractConfig(method="psf"))(out["cube"], out["sources"])
    assert path == "tiled" or len(made) > 0  # the envelope path was taken
    fin = np.isfinite(ref.flux)
    np.testing.assert_array_equal(fin, np.isfinite(new.flux))
    scale = np.maximum(np.abs(ref.flux[fin]), ref.err[fin])
    assert np.max(np.abs(new.flux[fin] - ref.flux[fin]) / scale) < 1e-6
    assert np.max(np.abs(new.err[fin] / ref.err[fin] - 1)) < 1e-6
    tf = fits.getdata(out["truth"], "TRUE_FLUX").astype(float)
    good = np.isfinite(ref.flux).any(axis=0)
    ok = np.asarray(new.sources["status"]) == "ok"
    bright = ok & (np.asarray(new.sources["mag"]) < np.percentile(np.asarray(new.sources["mag"])[ok], 50))
    rel = np.nansum(new.flux[bright][:, good], 1) / tf[bright][:, good].sum(1) - 1
    assert np.median(np.abs(rel)) < 0.02


def test_bounded_image_fit_and_threads(tiny_cube):
    """image_fit_stars bounds the free fluxes of the transform/PSF image fits (the brightest; the others
    keep catalogue flux ratios): PSF, transform and fluxes stay those of the full fit (modelling only the
    brightest and leaving the rest out biases beta to 1.2-1.9 here and the fluxes by 18 %).  One
    Extractor called from two threads at once gives the sequential answer."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = SimulateConfig(nx=30, ny=30, nlayers=60, nstars=20, king_rc=10.0, seed=3)
    ex = Extractor(ExtractConfig(image_fit_stars=5))
    ref = ex(tiny_cube["cube"], tiny_cube["sources"])
    w = float(np.median(ref.wave))
    full = Extractor()(tiny_cube["cube"], tiny_cube["sources"])
    assert ref.psf.fwhm_at(w) != full.psf.fwhm_at(w)  # the cap really changed the fit
    for r in (ref, full):
        assert r.psf.fwhm_at(w) == pytest.approx(cfg.psf.fwhm_at(w), rel=0.01)
        assert r.psf.params(w)[1] == pytest.approx(cfg.psf.params(w)[1], abs=0.15)  # beta
        assert r.transform.offset[0] == pytest.approx(cfg.cat_offset[0], abs=0.05)
    ok = np.asarray(full.sources["status"]) == "ok"
    rel = np.nansum(ref.flux[ok], 1) / np.nansum(full.flux[ok], 1) - 1
    assert np.median(np.abs(rel)) < 0.003
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: ex(tiny_cube["cube"], tiny_cube["sources"]), range(2)))
    for o in outs:
        np.testing.assert_array_equal(o.flux, ref.flux)
        np.testing.assert_array_equal(o.err, ref.err)
        assert o.psf == ref.psf and o.transform == ref.transform


def test_nan_region_and_bad_catalogue_rows_are_reported(tiny_cube, tmp_path):
    with fits.open(tiny_cube["cube"]) as h:
        h2 = fits.HDUList([x.copy() for x in h])
    h2["DATA"].data[:, :, :6] = np.nan  # unusable strip (like the edges of a MUSE field)
    h2["DATA"].data[10] = np.nan  # one NaN layer
    h2.writeto(tmp_path / "holes.fits")
    cat = Table.read(tiny_cube["sources"], format="ascii.csv")
    cat.add_row(("nanpos", np.nan, np.nan, 18.0))
    cat.add_row(("faraway", cat["ra"][0] + 1.0, cat["dec"][0], 18.0))
    res = Extractor()(tmp_path / "holes.fits", cat)
    st = dict(zip(res.sources["stellar_id"], res.sources["status"]))
    assert len(res.sources) == len(cat)
    assert st["nanpos"] == "off_field" and st["faraway"] == "off_field"
    in_strip = np.asarray(res.sources["x"]) < 5.5
    assert np.all(np.asarray(res.sources["status"])[in_strip] == "off_field")
    assert res.layer_flag[10] & 1 and np.all(np.isnan(res.flux[:, 10]))
    ok = np.asarray(res.sources["status"]) == "ok"
    assert ok.sum() >= 3 and np.all(np.isfinite(res.flux[ok][:, 11:]))


def test_stamp_cache_gives_the_design_matrix():
    """Stamps kept across blocks (same stars) give psf_design_matrix's matrix exactly, and are
    rebuilt when the stamp footprint (radius) or the usable-pixel mask changes."""
    from musepayne.extract.psf import _stamp_matrix, _stamp_pixels

    rng = np.random.default_rng(4)
    shape = (30, 40)
    x, y = rng.uniform(-5, 45, 80), rng.uniform(-5, 35, 80)
    psf = MoffatPSF(fwhm=(3.0,), beta=(2.5,))
    valid = np.ones(shape, bool)
    valid[10:12, 5:30] = False
    cache, prev = {}, None
    for radius, mask, reused in ((8.0, valid, False), (8.01, valid, True), (8.2, valid, False),
                                 (9.6, valid, False), (9.6, np.ones(shape, bool), False)):
        ref = psf_design_matrix(psf, x, y, 7000.0, shape, radius, 2, valid=mask)
        got = _stamp_matrix(_stamp_pixels(x, y, shape, radius, mask, cache=cache), psf.params(7000.0), 2, shape)
        assert (got != ref).nnz == 0 and np.array_equal(got.indptr, ref.indptr)
        assert np.array_equal(cache["valid"], mask) and (cache["stamps"] is prev) == reused
        prev = cache["stamps"]


def test_block_solve_residual_shortcuts_match_the_full_residual():
    """Issue 18: the block solve forms the per-layer residual only on the stars' core pixels and its
    layer sum from the summed solution; both equal the full residual's (chi^2 on the core pixels
    exactly, the sum to rounding), and the fluxes are the weighted least-squares solution."""
    import scipy.sparse as sp

    from musepayne.extract.blocks import _core_pixels, _solve_block
    from musepayne.extract.psf import MoffatPSF, psf_design_matrix

    rng = np.random.default_rng(3)
    ny = nx = 30
    ns, nl = 12, 7
    psf = MoffatPSF(fwhm=(3.0,), beta=(2.5,), ellip=(0.0,), angle=(0.0,), wave_ref=6000.0, wave_scale=1000.0)
    x, y = rng.uniform(3, 27, ns), rng.uniform(3, 27, ns)
    mask = np.ones((ny, nx), bool)
    mask[:2] = False
    A = sp.hstack([psf_design_matrix(psf, x, y, 6000.0, (ny, nx), 10.0, valid=mask),
                   sp.csc_matrix(mask.ravel()[:, None].astype(float))], format="csc")
    s = rng.uniform(0.5, 2.0, (nl, ny, nx)).astype(np.float32)
    d = (A @ rng.uniform(10, 100, (ns + 1, nl))).T.reshape(nl, ny, nx) + rng.normal(size=(nl, ny, nx)) * np.sqrt(s)
    d = d.astype(np.float32)
    d0, s0 = d.copy(), s.copy()
    w = np.where(mask.ravel(), 1.0 / np.median(s.reshape(nl, -1), axis=0), 0.0)
    AW = sp.csc_matrix(A.multiply(w[:, None]))
    N = (A.T @ AW).toarray()
    Ninv = np.linalg.inv(N)
    X, var, core, chi_pix, (r, v, m) = _solve_block(A, AW, w, ns, lambda b: Ninv @ b, np.diag(Ninv), d, s, mask)
    np.testing.assert_array_equal(d, d0)  # inputs untouched
    np.testing.assert_array_equal(s, s0)
    D = np.where(mask.ravel()[:, None], d.reshape(nl, -1).T.astype(float), 0.0)
    V = np.where(mask.ravel()[:, None], s.reshape(nl, -1).T.astype(float), 0.0)
    np.testing.assert_allclose(X, Ninv @ (AW.T @ D), rtol=1e-12)
    R = D - A @ X
    chi_full = np.where(V > 0, R**2 / np.where(V > 0, V, 1.0), 0.0).sum(axis=1)
    in_core = np.zeros(ny * nx, bool)
    core = _core_pixels(sp.csc_matrix(A[:, :ns].multiply(A[:, :ns])))
    in_core[core.indices[core.data > 0]] = True
    assert 0 < in_core.sum() < mask.sum()
    np.testing.assert_allclose(chi_pix[in_core], chi_full[in_core], rtol=1e-12)
    assert np.all(chi_pix[~in_core] == 0)
    np.testing.assert_allclose(r, R.sum(axis=1), atol=1e-9 * np.abs(D).sum(axis=1).max())
    np.testing.assert_allclose(v, V.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(m, A[:, :ns] @ X[:ns].sum(axis=1), rtol=1e-12)
    assert var.shape == (ns, nl) and np.all(var > 0)
