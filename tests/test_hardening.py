"""Regression tests of issue 17 (hostile inputs): never overwrite an input, never delete a
foreign file, one run per folder, no tracebacks.  One test (or more) per reported defect;
the property-based companion is tests/test_fuzz_cli.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from fit_helpers import as_prepared, toy_stellar_model
from musepayne.cli import main
from musepayne.extract.extractor import Extractor, per_star_file_name, read_source_catalogue
from musepayne.fit.fitter import FitConfig
from musepayne.io.cube import open_cube
from musepayne.io.fits import FolderBusy, folder_lock
from musepayne.io.readers import read_spectra
from musepayne.io.spectra import ReaderError
from musepayne.pipeline.runner import Pipeline, RunConfig, _own_part_files
from musepayne.pipeline.survey import Survey, SurveyConfig, read_store_catalogue, sources_resolver
from musepayne.science.selection import SelectionError, select
from musepayne.simulate.simulator import SimulateConfig, Simulator
from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(r, code=2):
    """Exit code ``code``, no traceback, and the error is one 'musepayne: error:' line."""
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    err = [ln for ln in r.output.splitlines() if ln.startswith("musepayne: error:")]
    assert len(err) == 1, r.output
    return err[0]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny toy cube (20x20 spaxels, 300 layers): enough for extract and the CLI checks."""
    d = tmp_path_factory.mktemp("small")
    info = Simulator(SimulateConfig(nx=20, ny=20, nlayers=300, nstars=10, seed=2, king_rc=5.0)).write(d / "s.fits")
    ext = d / "ext.fits"
    Extractor()(info["cube"], info["sources"]).write(ext)
    cat = d / "cat.fits"
    Table({"stellar_id": ["a", "b", "c"], "teff": [4000.0, np.nan, 5000.0], "mg_fe": [0.1, 0.2, 0.3],
           "fe_h": [-0.5, 0.0, 0.1], "logg": [2.0, 2.5, 4.5], "fit_flags": [1, 2, 3],
           "corr_flux": [0.9, 0.95, 0.99]}).write(cat)
    return {"dir": d, "cube": info["cube"], "sources": info["sources"], "ext": str(ext), "cat": str(cat)}


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A small field on the LAMOST range and a finished reference run of it."""
    d = tmp_path_factory.mktemp("hfield")
    model = toy_stellar_model()
    model.save(d / "model.fits")
    cfg = SimulateConfig(nx=24, ny=24, nlayers=3681, nstars=12, mag_bright=15, mag_faint=18, king_rc=8, seed=5)
    info = Simulator(cfg, ModelSpectra(model, globular_cluster_sampler())).write(d / "cube.fits")
    run_cfg = RunConfig(model=str(d / "model.fits"), cube_lsf="lamost", fit_chunk=4, report=False)
    ref = d / "reference"
    Pipeline(ref, run_cfg).run([info["cube"]], info["sources"])
    return {"dir": d, "cube": info["cube"], "sources": info["sources"], "model": str(d / "model.fits"),
            "config": run_cfg, "ref": ref}


@pytest.fixture
def unwritable(tmp_path):
    """A folder path that cannot be created or written (also as root: /sys is read-only)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        yield ro / "out"
    else:
        probe = Path("/sys/musepayne-test-unwritable")
        try:
            probe.mkdir()
        except OSError:
            yield probe / "out"
        else:
            probe.rmdir()
            pytest.skip("no unwritable folder available")
    ro.chmod(0o755)


def _same_catalogue(a, b):
    ta, tb = Table.read(a), Table.read(b)
    assert ta.colnames == tb.colnames and len(ta) == len(tb)
    for c in ta.colnames:
        x, y = np.asarray(ta[c]), np.asarray(tb[c])
        assert np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y), c


# ---------------------------------------------------------------- 1. inputs never overwritten
def test_output_equal_to_input_is_refused(small, tmp_path):
    for f in ("cube", "sources", "ext", "cat"):
        shutil.copy(small[f], tmp_path / Path(small[f]).name)
    cube, src, ext, cat = (str(tmp_path / Path(small[f]).name) for f in ("cube", "sources", "ext", "cat"))
    sums = {p: _sha(p) for p in (cube, src, ext, cat)}
    same_via_other_spelling = str(tmp_path / "nothere" / ".." / Path(cube).name)
    for args in (["extract", cube, "--sources", src, "-o", cube],
                 ["extract", cube, "--sources", src, "-o", same_via_other_spelling],
                 ["extract", cube, "--sources", src, "-o", src],
                 ["prepare", ext, "-o", ext],
                 ["fit", ext, "-o", ext],
                 ["fit", ext, "-o", tmp_path / "ok.fits", "--also", ext],
                 ["select", cat, "--where", "teff > 0", "-o", cat],
                 ["calibrate", cat, "-o", cat]):
        r = _cli(args)
        assert "input" in _one_line_error(r) or "is the input" in r.output
    assert sums == {p: _sha(p) for p in sums}
    # a run whose catalogue.fits would replace the source catalogue
    shutil.copy(small["sources"], tmp_path / "catalogue.csv")
    r = _cli(["run", cube, "--sources", tmp_path / "catalogue.csv", "-o", tmp_path])
    _one_line_error(r)
    assert _sha(tmp_path / "catalogue.csv") == _sha(small["sources"])


# ---------------------------------------------------------------- 2. foreign .part files are kept
def test_run_removes_only_its_own_temporary_files(field, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(field["ref"], out)
    (out / "sub").mkdir()
    foreign = [out / "sub" / ".download.iso.part", out / ".notes.txt.part", out / ".catalogue.fits.part"]
    own = [out / ".catalogue.fits.abcd_123.part", out / ".run.json.x1y2z3w4.part",
           next((out / "cubes").iterdir()) / ".extracted.fits.q1w2e3r4.part"]
    for p in foreign + own:
        p.write_text("x")
    assert sorted(_own_part_files(out)) == sorted(own)
    Pipeline(out, field["config"]).run([field["cube"]], field["sources"])  # every stage skipped
    assert all(p.exists() for p in foreign) and not any(p.exists() for p in own)
    _same_catalogue(out / "catalogue.fits", field["ref"] / "catalogue.fits")


# ---------------------------------------------------------------- 3. survey: changed cube, stale failures, exit code
def _survey_store(field, tmp_path):
    d = tmp_path / "in"
    (d / "sources").mkdir(parents=True)
    shutil.copy(field["cube"], d / "c1.fits")
    shutil.copy(field["sources"], d / "sources" / "c1.csv")
    return d, tmp_path / "store"


def test_survey_changed_cube_replaces_its_old_result(field, tmp_path):
    d, store = _survey_store(field, tmp_path)
    opts = {"model": field["model"], "cube_lsf": "lamost", "fit_chunk": 6}
    cfg = SurveyConfig(run_options=opts, scheduler="process", retries=0)
    res = sources_resolver(d / "sources")
    assert not Survey(store, cfg, log=lambda *a: None).run([str(d / "c1.fits")], res)["failed"]
    n_stars = len(read_store_catalogue(store))
    with fits.open(d / "c1.fits", mode="update") as h:  # edit only the header
        h[0].header["OBSERVER"] = "someone"
    # and a cube without a source catalogue: a failed record, not a crashed batch
    shutil.copy(field["cube"], d / "nosrc.fits")
    r = _cli(["survey", d / "c1.fits", d / "nosrc.fits", "-o", store, "--sources-dir", d / "sources",
              "--scheduler", "process", "--model", field["model"], "--retries", "0", "--no-progress", "--json",
              "--config", _write_json(tmp_path / "c.json", {"cube_lsf": "lamost", "fit_chunk": 6})])
    assert r.exit_code == 1, r.output  # finished, but one cube failed
    summary = json.loads(r.output)
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith("nosrc")
    t = read_store_catalogue(store)
    assert len(t) == n_stars and len(set(t["cube_id"])) == 1  # only under the new id
    man = Survey(store).load_manifest()
    assert sorted(v["status"] for v in man.values()) == ["done", "failed"]
    # the source catalogue appears: the stale failure is gone from the next summary
    shutil.copy(field["sources"], d / "sources" / "nosrc.csv")
    os.remove(d / "c1.fits")
    summary = Survey(store, SurveyConfig(run_options=opts, scheduler="process"), log=lambda *a: None).run(
        [str(d / "nosrc.fits")], res)
    assert summary["failed"] == [] and summary["processed"] == 1


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj))
    return path


def test_survey_recovers_damaged_manifest_and_catalogue(field, tmp_path):
    d, store = _survey_store(field, tmp_path)
    opts = {"model": field["model"], "cube_lsf": "lamost", "fit_chunk": 6}
    s = Survey(store, SurveyConfig(run_options=opts, scheduler="process"), log=lambda *a: None)
    res = sources_resolver(d / "sources")
    s.run([str(d / "c1.fits")], res)
    ref = read_store_catalogue(store)
    (cid,) = Survey(store).load_manifest()
    # a corrupt committed catalogue is redone (it failed on every later run)
    (store / "cubes" / cid / "catalogue.fits").write_bytes(b"SIMPLE  =   T garbage")
    assert s.run([str(d / "c1.fits")], res)["processed"] == 1
    assert len(read_store_catalogue(store)) == len(ref)
    # a corrupt manifest is moved aside, every cube redone once
    (store / "manifest.json").write_text("{not json")
    summary = s.run([str(d / "c1.fits")], res)
    assert summary["processed"] == 1 and not summary["failed"]
    assert list(store.glob("manifest.json.damaged-*"))
    t = read_store_catalogue(store)
    assert len(t) == len(ref) and len(set(t["obs_id"])) == len(t)


# ---------------------------------------------------------------- 4. full disk: no SIGBUS, no .part left
def test_simulate_full_disk_is_a_clean_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    r = _cli(["simulate", "-o", tmp_path / "s.fits", "--nstars", "20", "--size", "30", "--nlayers", "800"])
    assert "No space left" in _one_line_error(r) or "reserve" in r.output
    assert list(tmp_path.iterdir()) == []  # neither the cube nor its temporary file


def test_simulated_cube_is_preallocated(tmp_path):
    out = Simulator(SimulateConfig(nx=10, ny=10, nlayers=50, nstars=3, seed=1)).write(tmp_path / "c.fits")
    st = os.stat(out["cube"])
    assert st.st_blocks * 512 >= st.st_size  # not sparse: the blocks exist


# ---------------------------------------------------------------- 5. one run per folder
def _hold_lock(folder):
    code = ("import sys,time; from musepayne.io.fits import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_and_survey_on_a_locked_folder_are_refused(small, tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        r = _cli(["run", small["cube"], "--sources", small["sources"], "-o", out, "--no-progress"])
        msg = _one_line_error(r, code=3)
        assert str(out) in msg and "in use" in msg
        r = _cli(["survey", small["cube"], "--sources-from", small["sources"], "-o", out, "--no-progress"])
        assert str(out) in _one_line_error(r, code=3)
        with pytest.raises(FolderBusy):
            with folder_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in out.iterdir() if p.name != "musepayne.log") == before
    with folder_lock(out):  # released by the kernel when the holder died
        pass


@pytest.mark.slow
def test_two_runs_at_once_never_lose_or_duplicate_a_row(field, tmp_path):
    out = tmp_path / "both"
    cmd = [sys.executable, "-m", "musepayne.cli", "run", field["cube"], "--sources", field["sources"], "-o",
           str(out), "--model", field["model"], "--cube-lsf", "lamost", "--fit-chunk", "4", "--no-progress",
           "--no-report"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while first.poll() is None and not list(out.glob("cubes/*/extracted.fits")) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert first.wait() == 0, first.stderr.read()
    if second.returncode != 0:  # refused while the first held the folder
        assert second.returncode == 3 and "in use" in second.stderr and "Traceback" not in second.stderr
    _same_catalogue(out / "catalogue.fits", field["ref"] / "catalogue.fits")
    cat = Table.read(out / "catalogue.fits")
    assert len(set(cat["stellar_id"])) == len(cat) == 12


# ---------------------------------------------------------------- 6. per-star file names
def test_per_star_file_names_are_injective(small, tmp_path):
    ids = ["a/b", "a_b", "a?b", "a*b", ".", "..", "x" * 300, "ok.1", "a~b", "-x", "CON", "a b"]
    rng = np.random.default_rng(0)
    n = len(ids)
    t = Table({"stellar_id": ids, "x": rng.uniform(4, 15, n), "y": rng.uniform(4, 15, n),
               "mag": np.full(n, 16.0)})
    t.write(tmp_path / "adv.csv")
    names = [per_star_file_name(s) for s in ids]
    assert len(set(names)) == n and not any(nm.startswith(".") for nm in names)
    assert all(len(nm) < 120 and "/" not in nm for nm in names)
    assert per_star_file_name("a_b") == "a_b.fits" and per_star_file_name("ok.1") == "ok.1.fits"
    r = _cli(["extract", small["cube"], "--sources", tmp_path / "adv.csv", "-o", tmp_path / "e.fits",
              "--per-star", tmp_path / "ps", "--no-transform", "--json"])
    assert r.exit_code == 0, r.output
    written = sorted((tmp_path / "ps").iterdir())
    assert len(written) == json.loads(r.output)["per_star_files"]
    objects = [fits.getheader(p)["OBJECT"] for p in written]
    assert len(set(objects)) == len(objects) and set(objects) <= set(ids)
    assert not list((tmp_path / "ps").glob(".*"))


# ---------------------------------------------------------------- 7. no hang on bad worker counts
def test_survey_negative_workers_refused_at_once(small, tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "musepayne.cli", "survey", small["cube"], "--sources-from",
                        small["sources"], "-o", str(tmp_path / "st"), "--workers", "-2"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "workers" in r.stderr and time.monotonic() - t0 < 120
    with pytest.raises(ValueError, match="workers"):
        SurveyConfig(workers=0)


# ---------------------------------------------------------------- 8. memory does not follow the header
def test_header_claiming_huge_cube_is_rejected_before_allocating(small, tmp_path):
    raw = bytearray(Path(small["cube"]).read_bytes())
    i = raw.index(b"NAXIS3  =")
    raw[i:i + 30] = b"NAXIS3  = %20d" % 10**8
    bad = tmp_path / "huge.fits"
    bad.write_bytes(bytes(raw[:16000]))
    tracemalloc.start()
    try:
        with pytest.raises(ReaderError, match="claims"):
            open_cube(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6  # a 10^8-layer wavelength grid alone would be 800 MB
    r = _cli(["extract", bad, "--sources", small["sources"], "-o", tmp_path / "o.fits"])
    assert "claims" in _one_line_error(r)
    # a negative axis length: astropy alone grew to gigabytes inside fits.open (found by the fuzz suite)
    for key in (b"NAXIS1  =", b"NAXIS2  =", b"NAXIS3  ="):
        raw = bytearray(Path(small["cube"]).read_bytes())
        i = raw.index(key, raw.index(b"'DATA"[:5]) - 800)
        raw[i:i + 30] = key + b" %20d" % -1
        (tmp_path / "neg.fits").write_bytes(bytes(raw))
        tracemalloc.start()
        try:
            with pytest.raises(ReaderError, match="negative size"):
                open_cube(tmp_path / "neg.fits")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 50e6
    # the same check guards every FITS reader (here: prepared spectra read without a memory map)
    as_prepared(np.linspace(5000, 6000, 200), np.ones((5, 200)), np.ones(200)).write(tmp_path / "p.fits")
    raw = bytearray((tmp_path / "p.fits").read_bytes())
    i = raw.index(b"NAXIS2  =", raw.index(b"'FLUX"))
    raw[i:i + 30] = b"NAXIS2  = %20d" % 10**7
    (tmp_path / "lying.fits").write_bytes(bytes(raw))
    from musepayne.io.prepared import PreparedSpectra

    with pytest.raises(ReaderError, match="claims"):
        PreparedSpectra.read(tmp_path / "lying.fits")


# ---------------------------------------------------------------- 9. no tracebacks
def test_bad_source_catalogues_are_clean_errors(small, tmp_path):
    src = Table.read(small["sources"])
    src[:0].write(tmp_path / "empty.csv")
    uni = src.copy()
    uni["stellar_id"] = [f"\u00e9toile{i}" for i in range(len(uni))]
    uni.write(tmp_path / "uni.csv")
    (tmp_path / "blank.csv").write_text("stellar_id,ra,dec,mag\n,1.0,2.0,17\nb,1.0,2.0,18\n")
    for name, text in (("empty", "no rows"), ("uni", "non-ASCII"), ("blank", "empty stellar id")):
        with pytest.raises(ReaderError, match=text):
            read_source_catalogue(tmp_path / f"{name}.csv")
        r = _cli(["extract", small["cube"], "--sources", tmp_path / f"{name}.csv", "-o", tmp_path / "o.fits"])
        assert text in _one_line_error(r)
    assert not (tmp_path / "o.fits").exists()


def test_bad_configurations_are_one_line_before_any_stage(small, tmp_path):
    bad = {"chunk.toml": "fit_chunk = 2.5\n", "broken.toml": "fit_chunk = [\n", "broken.json": '{"fit": ',
           "opts.toml": "[fit]\nno_such_option = 1\n", "rv.toml": "[fit]\nrv_range = -5.0\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        r = _cli(["run", small["cube"], "--sources", small["sources"], "-o", out, "--config", tmp_path / name,
                  "--no-progress"])
        assert "bad configuration" in _one_line_error(r)
        assert not (out / "cubes").exists()  # refused before extract and prepare ran
        r = _cli(["survey", small["cube"], "--sources-from", small["sources"], "-o", tmp_path / "st",
                  "--config", tmp_path / name, "--no-progress"])
        assert "bad configuration" in _one_line_error(r)
    r = _cli(["survey", small["cube"], "--sources-from", small["sources"], "-o", tmp_path / "st",
              "--scheduler", "nonsense"])
    assert "scheduler" in _one_line_error(r)


def test_bad_fit_options(small, tmp_path):
    for opt in (["--starts", "0"], ["--threads", "-1"]):
        r = _cli(["fit", small["ext"], "-o", tmp_path / "o.fits", *opt])
        assert r.exit_code == 2 and "Traceback" not in r.output
    assert "rv_range" in _one_line_error(_cli(["fit", small["ext"], "-o", tmp_path / "o.fits", "--rv-range", "-5"]))
    assert not (tmp_path / "o.fits").exists()
    with pytest.raises(ValueError, match="n_threads"):
        FitConfig(n_threads=-2)
    r = _cli(["train", small["cat"], "-o", tmp_path / "m.fits", "--threads", "-4"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_unwritable_outputs_are_one_line(small, unwritable):
    for args in (["run", small["cube"], "--sources", small["sources"], "-o", unwritable, "--no-progress"],
                 ["prepare", small["ext"], "-o", unwritable / "p.fits"],
                 ["select", small["cat"], "--where", "teff > 0", "-o", unwritable / "s.fits"],
                 ["survey", small["cube"], "--sources-from", small["sources"], "-o", unwritable,
                  "--scheduler", "process", "--no-progress"]):
        _one_line_error(_cli(args))


def test_deep_expressions_and_bit_ranges(small, tmp_path):
    deep = "-" * 1990 + "teff > 0"
    for args in (["select", small["cat"], "--where", deep],
                 ["calibrate", small["cat"], "-o", tmp_path / "c.fits", "--no-trend", "--offset", deep + "=0.1"],
                 ["select", small["cat"], "--where", "bit(fit_flags, 1e30)"],
                 ["select", small["cat"], "--where", "bit(fit_flags, -1)"],
                 ["select", small["cat"], "--where", "bit(fit_flags, 1.5)"]):
        _one_line_error(_cli(args))
    t = Table.read(small["cat"])
    with pytest.raises(SelectionError, match="0 to 62"):
        select(t, "bit(fit_flags, -1)")
    assert list(select(t, "bit(fit_flags, 1)")["stellar_id"]) == ["b", "c"]


def test_unexpected_error_is_one_line_traceback_only_with_debug(small, monkeypatch):
    from musepayne.science import selection

    def boom(*a, **k):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(selection, "select", boom)
    r = _cli(["select", small["cat"], "--where", "teff > 0"])
    assert _one_line_error(r) == "musepayne: error: RuntimeError: something unexpected"
    r = CliRunner().invoke(main, ["--debug", "select", small["cat"], "--where", "teff > 0"])
    assert r.exit_code == 2 and "Traceback" in r.output
    r = _cli(["select", small["cat"], "--where", "teff > 0", "--json"])
    assert r.exit_code == 2 and json.loads(r.output) == {"error": "RuntimeError: something unexpected"}


# ---------------------------------------------------------------- 10. smaller defects
def test_blank_sentinel_layers_are_flagged(small, tmp_path):
    with fits.open(small["cube"]) as h:
        h["DATA"].data[100:140] = -1e30
        h.writeto(tmp_path / "sent.fits")
    res = Extractor()(str(tmp_path / "sent.fits"), small["sources"])
    assert (res.layer_flag[100:140] & 1).all() and not (res.layer_flag[:100] & 1).any()
    assert np.isnan(res.flux[:, 100:140]).all()
    snr = np.asarray(res.sources["snr"], float)
    assert np.nanmax(snr) < 1e4  # was ~1e21 with status ok
    clean = Extractor()(small["cube"], small["sources"])
    assert list(res.sources["status"]) == list(clean.sources["status"])


def test_negative_sigma_is_unusable(tmp_path):
    flux = np.ones(500, np.float32)
    sig = np.full(500, 0.01, np.float32)
    sig[:100] = -0.01
    h0 = fits.PrimaryHDU(flux)
    h0.header.update(CRVAL1=5000.0, CDELT1=1.25, CRPIX1=1.0, CTYPE1="AWAV", OBJECT="neg")
    fits.HDUList([h0, fits.ImageHDU(sig, name="SIGMA")]).writeto(tmp_path / "neg.fits")
    s = read_spectra(tmp_path / "neg.fits", kind="muse")
    var = np.asarray(s.variance)[0]
    assert not np.isfinite(var[:100]).any() and np.allclose(var[100:], 1e-4)


def test_fit_and_prepare_exit_1_when_nothing_succeeds(tmp_path):
    from musepayne.testing import toy_mlp_model

    m = toy_mlp_model(np.linspace(5000, 5100, 200), hidden=(8, 8), n_lines=10)
    m.save(tmp_path / "m.fits")
    prep = tmp_path / "p.fits"
    as_prepared(m.wave, np.ones((2, 200)), np.ones(200), status=["no_valid_pixels", "bad_variance"]).write(prep)
    r = _cli(["fit", prep, "-o", tmp_path / "o.fits", "--model", tmp_path / "m.fits", "--json"])
    assert r.exit_code == 1 and (tmp_path / "o.fits").exists(), r.output
    (tmp_path / "junk.fits").write_bytes(b"not a fits file")
    r = _cli(["prepare", tmp_path / "junk.fits", "-o", tmp_path / "pp.fits", "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["counts"] == {"read_error": 1}, r.output


def test_non_ascii_strings_do_not_break_fits_writes(tmp_path):
    """A run into 'rés/' failed: the prepared file's path column is not ASCII (FITS is)."""
    from musepayne.fit.catalogue import write_catalogue
    from musepayne.io.fits import fits_ascii

    t = Table({"stellar_id": ["a", "b"], "file": ["/data/r\u00e9s/c.fits", "/data/c.fits"], "teff": [1.0, 2.0]})
    write_catalogue(t, tmp_path / "c.fits")
    back = Table.read(tmp_path / "c.fits")
    assert list(back["file"]) == ["/data/r\\xe9s/c.fits", "/data/c.fits"] and list(back["teff"]) == [1.0, 2.0]
    plain = Table({"stellar_id": ["a"], "file": ["/data/c.fits"]})
    assert fits_ascii(plain) is plain  # ASCII tables are written exactly as before
    prep = as_prepared(np.linspace(5000, 6000, 50), np.ones((2, 50)), np.ones(50))
    prep.spectra["file"] = ["r\u00e9s/x.fits", "y.fits"]
    prep.write(tmp_path / "p.fits")


def test_json_output_is_strict(small):
    r = _cli(["select", small["cat"], "--where", "teff > 0", "--json"])
    assert r.exit_code == 0
    json.loads(r.output, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    from musepayne.cli._common import json_safe

    assert json.dumps(json_safe({"a": float("nan"), "b": [np.float32("inf"), 1.0]}), allow_nan=False) == \
        '{"a": null, "b": [null, 1.0]}'


def test_damaged_intermediates_are_redone(field, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(field["ref"], out)
    cdir = next((out / "cubes").iterdir())
    ext = cdir / "extracted.fits"
    ext.write_bytes(ext.read_bytes()[:5000])  # truncated
    part = sorted((cdir / "fit").glob("part-*.fits"))[1]
    part.write_bytes(part.read_bytes()[:3000])
    Pipeline(out, field["config"]).run([field["cube"]], field["sources"])
    _same_catalogue(out / "catalogue.fits", field["ref"] / "catalogue.fits")
    # only a damaged checkpoint: refitted, the others reused
    part.write_bytes(b"garbage")
    rec = Pipeline(out, field["config"]).run([field["cube"]], field["sources"])
    assert "extract" not in rec["timings"] and rec["timings"]["fit"] > 0
    _same_catalogue(out / "catalogue.fits", field["ref"] / "catalogue.fits")


def _blas_threads_now():
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"), default=1)


def test_simulated_spectra_use_one_blas_thread(tmp_path):
    """On a busy 2-core machine two spinning OpenBLAS threads made the demo's synthesis of tiny
    products 10x slower (27 s -> 278 s): the simulator holds BLAS to one thread while it draws
    spectra, whatever the caller's limit, and gives the same cube as under a one-thread limit."""
    from threadpoolctl import threadpool_limits

    from musepayne.simulate.sources import CallableSpectra

    seen = []

    def fn(labels, wave):
        seen.append(_blas_threads_now())
        return 1.0 + 0.1 * np.sin(np.asarray(wave) / 50.0)

    src = CallableSpectra(fn, lambda rng, n: {"teff": rng.uniform(4000, 6000, n)}, ("teff",))
    cfg = SimulateConfig(nx=10, ny=10, nlayers=50, nstars=3, seed=1)
    with threadpool_limits(limits=2):
        a = Simulator(cfg, src).write(tmp_path / "a.fits")
    assert seen and set(seen) == {1}
    with threadpool_limits(limits=1):
        b = Simulator(cfg, src).write(tmp_path / "b.fits")
    assert np.array_equal(fits.getdata(a["cube"], "DATA"), fits.getdata(b["cube"], "DATA"), equal_nan=True)
