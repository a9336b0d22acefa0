"""Stars from the cube alone (extract/detect.py), real-world catalogues, transform guards, coverage messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.table import Table
from click.testing import CliRunner

from musepayne.cli import main as cli
from musepayne.extract.detect import DetectConfig, Detector
from musepayne.extract.extractor import CoordinateTransform, ExtractConfig, Extractor, read_source_catalogue
from musepayne.io.spectra import ReaderError
from musepayne.models.files import load_model
from musepayne.models.model import coverage_note
from musepayne.simulate.simulator import SimulateConfig, Simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("detect")
    cfg = SimulateConfig(nx=32, ny=32, nlayers=200, nstars=40, seed=11, king_rc=10.0, mag_bright=16.0,
                         mag_faint=20.0)
    info = Simulator(cfg).write(d / "cube.fits")
    return info, Table.read(info["truth"], "TRUTH")


@pytest.fixture(scope="module")
def detected(sim):
    info, _ = sim
    return Detector()(info["cube"])


def _match(det, truth, r):
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    d = np.hypot(np.asarray(det["x"])[:, None] - tx[None, :], np.asarray(det["y"])[:, None] - ty[None, :])
    return d.min(axis=1) < r, d.min(axis=0) < r, d


def test_detector_finds_isolated_stars_without_false_detections(sim, detected):
    _, truth = sim
    det = detected
    fwhm = det.meta["FWHM_PX"]
    assert 3.0 < fwhm < 4.5  # simulated PSF ~3.85 px at these wavelengths
    ny = nx = 32
    t = truth[(truth["x"] > 0) & (truth["x"] < nx - 1) & (truth["y"] > 0) & (truth["y"] < ny - 1)]
    flux = 10 ** (-0.4 * np.asarray(t["mag"]))
    dist = np.hypot(t["x"][:, None] - t["x"][None, :], t["y"][:, None] - t["y"][None, :])
    isolated = ~np.any((dist < fwhm) & (flux[None, :] > flux[:, None]), axis=1)
    det_ok, found, d = _match(det, t, 0.5 * fwhm)
    # every star here is far above 5 sigma: completeness of the isolated ones, and false detections (no true star,
    # in the field or just outside it, within 1 FWHM); detections of blends (a true star within 1 FWHM but none
    # within 0.5: the extraction-residual passes place a few faint ones between stars) stay few
    assert found[isolated].mean() >= 0.8, (found[isolated].sum(), isolated.sum())
    assert (~_match(det, truth, fwhm)[0]).sum() <= max(1, int(0.05 * len(det)))
    assert (~_match(det, truth, 0.5 * fwhm)[0]).sum() <= max(1, int(0.1 * len(det)))
    # positions and magnitudes of the bright matched stars
    j = np.argmin(d, axis=1)
    bright = det_ok & (np.asarray(det["snr"]) > 200)
    assert np.median(d[np.arange(len(det)), j][bright]) < 0.4
    assert abs(np.median(np.asarray(det["mag"])[bright] - np.asarray(t["mag"])[j[bright]])) < 0.4
    assert det["detected"].min() == 1 and det["detected"].max() <= 3 * DetectConfig().n_iter
    assert str(det["ra"].unit) == "deg" and det["x"].description


def test_detected_list_is_a_catalogue_and_extracts(sim, detected):
    info, _ = sim
    res = Extractor(ExtractConfig(fit_transform=False, block=100))(info["cube"], detected)
    assert len(res.sources) == len(detected)
    assert np.allclose(res.sources["x"], detected["x"], atol=1e-6)
    assert (res.sources["status"] != "off_field").all()


def test_catalogue_column_names_and_formats(tmp_path):
    t = Table({"ID": ["a", "b"], "RA": ["03:32:38.0", "03h32m39.1s"], "DEC": ["-27:47:00", "-27d46m50s"],
               "F606W": [20.1, 21.0], "F606W_err": [0.1, 0.1]})
    out = read_source_catalogue(t)
    assert out.meta["mag_column"] == "F606W"
    assert out["ra"][0] == pytest.approx(15 * (3 + 32 / 60 + 38 / 3600))
    assert out["dec"][1] == pytest.approx(-(27 + 46 / 60 + 50 / 3600))
    g = Table({"source_id": [1, 2], "ra": [1.0, 2.0], "dec": [3.0, 4.0], "phot_g_mean_mag": [15.0, 16.0]})
    for ext, fmt in ((".ecsv", "ascii.ecsv"), (".vot", "votable"), (".fits", "fits"), (".csv", "ascii.csv")):
        g.write(tmp_path / f"g{ext}", format=fmt)
        assert read_source_catalogue(tmp_path / f"g{ext}").meta["mag_column"] == "phot_g_mean_mag"
    h = Table({"x": [1.0, 2.0], "y": [3.0, 4.0], "mag_F814W_vega": [15.0, 16.0], "e_mag_F814W": [0.1, 0.1]})
    assert read_source_catalogue(h).meta["mag_column"] == "mag_F814W_vega"
    o = Table({"x": [1.0], "y": [3.0], "brightness": [15.0]})
    with pytest.raises(ReaderError, match="--mag-column"):
        read_source_catalogue(o)
    assert read_source_catalogue(o, mag_column="BRIGHTNESS")["mag"][0] == 15.0
    with pytest.raises(ReaderError, match="no column 'Vmag'"):
        read_source_catalogue(o, mag_column="Vmag")


def test_transform_needs_enough_stars():
    rng = np.random.default_rng(1)
    xc, yc = rng.uniform(0, 30, 2), rng.uniform(0, 30, 2)
    xm, ym = xc + 1.0 + rng.normal(0, 0.3, 2), yc - 0.5 + rng.normal(0, 0.3, 2)
    t = CoordinateTransform.fit(xc, yc, xm, ym, (15.0, 15.0))
    assert t.rotation == 0.0 and t.scale == 1.0 and t.offset_only
    assert t.offset[0] == pytest.approx(1.0, abs=0.5)
    xc, yc = rng.uniform(0, 30, 10), rng.uniform(0, 30, 10)
    t = CoordinateTransform.fit(xc, yc, xc * 1.01 + 0.3, yc * 1.01, (15.0, 15.0))
    assert t.scale == pytest.approx(1.01, abs=1e-6)


def test_few_catalogue_stars_give_an_offset_only_transform_with_a_warning(sim):
    info, truth = sim
    cat = truth[np.argsort(truth["mag"])][:2]
    src = Table({"stellar_id": cat["stellar_id"], "x": cat["x"] - 0.4, "y": cat["y"] + 0.3, "mag": cat["mag"]})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = Extractor(ExtractConfig(block=100))(info["cube"], src)
    assert res.transform.rotation == 0.0 and res.transform.scale == 1.0
    assert any("transformation" in str(x.message) for x in w)
    assert res.sources.meta["warnings"]
    assert np.all(res.sources["status"] != "off_field")


def test_model_usable_ranges_and_coverage_note():
    m = load_model("default")
    d = m.describe()
    assert d["n_pix_usable"] == int((~m.pixel_mask).sum()) and 0 < d["n_pix_usable"] < m.n_pix
    r = m.usable_ranges()
    assert r[0][0] == pytest.approx(4750, abs=5) and r[-1][1] == pytest.approx(7150, abs=5)
    data_ok = (m.wave > 7300) & (m.wave < 9000)
    note = coverage_note(m.wave, data_ok, ~m.pixel_mask)
    assert "overlap none = 0 px" in note and "7150" in note and "7301" in note
    res = CliRunner().invoke(cli, ["model", "info", "default"])
    assert res.exit_code == 0 and f"usable pixels: {d['n_pix_usable']} of {m.n_pix}" in res.output


def test_cli_errors_are_one_line(tmp_path, sim):
    from astropy.io import fits

    info, _ = sim
    with fits.open(info["cube"]) as h:
        del h["STAT"]
        h.writeto(tmp_path / "nostat.fits")
    for args in (["run", str(tmp_path / "nostat.fits"), "-o", str(tmp_path / "r"), "--no-progress"],
                 ["demo", "--cube", str(tmp_path / "nostat.fits"), "-o", str(tmp_path / "d"), "--no-progress"],
                 ["extract", str(tmp_path / "nostat.fits"), "-o", str(tmp_path / "e.fits")]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, res.output
        assert "no STAT" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_extract_cli_without_sources(tmp_path, sim):
    info, _ = sim
    out = tmp_path / "ext.fits"
    res = CliRunner().invoke(cli, ["extract", info["cube"], "-o", str(out), "--block", "100"])
    assert res.exit_code == 0, res.output
    det = Table.read(tmp_path / "ext_sources.ecsv", format="ascii.ecsv")
    assert len(det) >= 10 and "detected" in det.colnames
    assert f"detected {len(det)} stars" in res.output


@pytest.mark.parametrize("name", ["udf_subcube_mosaic.fits", "mpdaf_CUBE.fits"])
def test_real_cubes_from_the_cube_alone(shared, tmp_path, name):
    cube = shared / "muse" / "cubes" / name
    res = CliRunner().invoke(cli, ["run", str(cube), "-o", str(tmp_path / "o"), "--no-progress", "--no-report",
                                   "--json"])
    assert res.exit_code == 0, res.output
    import json

    rec = json.loads(res.output.strip().splitlines()[-1])
    det = Table.read(next((tmp_path / "o" / "cubes").glob("*/sources_detected.ecsv")), format="ascii.ecsv")
    assert len(det) >= 3 and np.all(det["snr"] >= 5)
    cat = Table.read(tmp_path / "o" / "catalogue.fits")
    assert len(cat) == len(det) and "n_pix_used" in cat.colnames
    (warn,) = rec["warnings"]  # both cubes cover the model poorly: named ranges and overlap
    # the run record says where the source list came from, and what a detected list means for the clean rows
    srec = json.loads((tmp_path / "o" / "run.json").read_text())["cubes"][0]["sources"]
    assert srec["detected_in_cube"] is True and srec["path"].endswith("sources_detected.ecsv")
    assert "blends with an undetected companion" in srec["note"]
    assert "usable pixels are 4750-6269" in warn
    if name.startswith("udf"):  # 4750-5374 A: about a quarter of the model's pixels
        assert "4750-5374 A" in warn and 20 <= float(warn.split("% of the model")[0].split("(")[-1]) <= 35
        fitted = cat["n_pix_used"] > 0
        assert np.all(cat["n_pix_used"][fitted] <= 0.35 * 1641)
        # UDF sources are faint galaxies: rows are kept, fitted or failed with a reason (S/N, coverage)
        assert all(str(s) != "failed" or str(r) for s, r in zip(cat["status"], cat["reason"]))
    else:  # 7300-9293 A: no overlap, every fit fails with the coverage sentence
        assert "7300-9292 A" in warn and "no star can be fitted" in warn
        cov = [str(r) for s, r in zip(cat["status"], cat["reason"]) if str(s) != "failed:low_snr"]
        assert cov and all("overlap none = 0 px" in r for r in cov)


# --------------------------------------------------------------------------- [detect] configuration
def test_detect_section_of_the_run_configuration(tmp_path):
    from musepayne.config import ConfigError
    from musepayne.pipeline.runner import RunConfig, load_config_file

    rc = RunConfig.from_dict({"detect": {"threshold": 4.5, "n_iter": 3, "n_bands": 2}})
    assert isinstance(rc.detect, DetectConfig) and rc.detect.threshold == 4.5 and rc.detect.n_bands == 2
    assert RunConfig.from_dict(rc.to_dict()) == rc
    base = RunConfig()
    # a detection option changes the detect stage's hash only
    assert rc.stage_digest("detect") != base.stage_digest("detect")
    assert rc.stage_digest("extract") == base.stage_digest("extract")
    for bad, words in (({"treshold": 4.0}, ("detect", "treshold", "threshold")),
                       ({"n_bands": "four"}, ("detect", "n_bands", "integer")),
                       ({"n_iter": 0}, ("detect", "n_iter", ">= 1")),
                       ({"threshold": -1.0}, ("detect", "threshold", "> 0")),
                       ({"sky_order": 3}, ("detect", "sky_order"))):
        with pytest.raises(ConfigError) as exc:
            RunConfig.from_dict({"detect": bad})
        assert all(w in str(exc.value) for w in words), str(exc.value)
    f = tmp_path / "run.toml"
    f.write_text("[run.detect]\nthreshold = 6.0\nmax_sources = 300\n")
    assert load_config_file(f).detect == DetectConfig(threshold=6.0, max_sources=300)
    f.write_text("[run.detect]\nthreshhold = 6.0\n")
    with pytest.raises(ConfigError, match="threshhold"):
        load_config_file(f)
    res = CliRunner().invoke(cli, ["run", str(f), "-o", str(tmp_path / "o"), "--detect-passes", "0"])
    assert res.exit_code == 2 and "n_iter" in res.output and len(res.output.strip().splitlines()) == 1


def test_detection_options_reach_the_detector(tmp_path, sim):
    info, _ = sim
    out = tmp_path / "ext.fits"
    res = CliRunner().invoke(cli, ["extract", info["cube"], "-o", str(out), "--block", "100",
                                   "--detect-threshold", "50", "--detect-passes", "2", "--detect-bands", "1"])
    assert res.exit_code == 0, res.output
    det = Table.read(tmp_path / "ext_sources.ecsv", format="ascii.ecsv")
    assert det.meta["THRESH"] == 50.0 and det.meta["NBANDS"] == 1 and np.all(det["snr"] > 50)
    # 2 white-light passes, then the extraction-residual passes (numbered after them)
    assert det["detected"].max() <= 2 + DetectConfig().residual_passes and len(det) < len(Table.read(info["sources"]))


# --------------------------------------------------------------------------- transform guard
def test_sub_pixel_edge_crossings_of_a_good_transform_are_not_reported():
    from musepayne.extract.transform_guard import moved_off_field

    before = np.array([0.05, 0.2, 3.0, 0.1, 2.0])
    after = np.array([-0.02, -0.5, 2.5, 0.3, -1.5])  # stars 0, 1, 4 cross the edge
    dx = np.array([0.07, 0.6, 0.5, 0.1, 3.5])
    dy = np.zeros(5)
    # good transformation (0.04 px rms, FWHM 3.8 px): only the 3.5 px move is reported
    assert moved_off_field(before, after, dx, dy, 0.04, 3.8).tolist() == [False, False, False, False, True]
    # poor transformation (rms > 0.5 FWHM) or unmeasured: every star moved off is reported
    for rms in (2.5, np.nan):
        assert moved_off_field(before, after, dx, dy, rms, 3.8).tolist() == [True, True, False, False, True]


# --------------------------------------------------------------------------- bounded memory and work
def test_hostile_cube_detection_is_bounded_in_memory_and_candidates(tmp_path):
    """Pure noise with a STAT 10^4 times too small: every noise bump is a '100 sigma star'."""
    import tracemalloc

    from astropy.io import fits

    info = Simulator(SimulateConfig(nx=40, ny=40, nlayers=6, nstars=1, seed=1)).write(tmp_path / "s.fits")
    rng = np.random.default_rng(0)
    with fits.open(info["cube"]) as h:
        h["DATA"].data = rng.normal(0.0, 1.0, h["DATA"].data.shape).astype(np.float32)
        h["DATA"].data[:, :5, :] = np.nan  # a dead strip
        h["STAT"].data = np.full(h["STAT"].data.shape, 1e-4, np.float32)
        h.writeto(tmp_path / "hostile.fits")
    cfg = DetectConfig(max_sources=20, psf_stars=3, n_bands=1)
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            det = Detector(cfg)(str(tmp_path / "hostile.fits"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(det) <= 20 and det.meta["TRUNC"] is True
    assert any("max_sources = 20" in str(x.message) for x in w) and "max_sources" in det.meta["warnings"][0]
    assert peak < 60 * 2**20, peak / 2**20  # MB: images and one bounded joint fit, not a growing candidate list
    # the block of layers read at once shrinks with the field so its arrays stay below memory_mb
    small = Detector(DetectConfig(memory_mb=0.05, n_bands=1, psf_stars=3, max_sources=20))(str(tmp_path / "hostile.fits"))
    assert len(small) == len(det)


def test_run_records_a_capped_detection(tmp_path, sim):
    from musepayne.pipeline.runner import Pipeline, RunConfig

    info, _ = sim
    rc = RunConfig(report=False, detect={"max_sources": 5, "n_bands": 1})
    rec = Pipeline(tmp_path / "o", rc).run([info["cube"]], None)
    det = Table.read(next((tmp_path / "o" / "cubes").glob("*/sources_detected.ecsv")), format="ascii.ecsv")
    assert len(det) <= 5 and det.meta["TRUNC"]
    assert any("max_sources = 5" in w for w in rec["warnings"])
    # resumed: the detect stage is skipped and its warning still reported
    rec2 = Pipeline(tmp_path / "o", rc).run([info["cube"]], None)
    assert any("max_sources = 5" in w for w in rec2["warnings"])
