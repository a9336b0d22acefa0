"""Survey scale: many cubes on Dask, killed workers and killed runs, skips, retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from astropy.table import Table

from fit_helpers import toy_stellar_model
from musepayne.pipeline.survey import Survey, SurveyConfig, read_store_catalogue, sources_resolver
from musepayne.simulate.simulator import SimulateConfig, Simulator
from musepayne.simulate.synthesis import ModelSpectra, globular_cluster_sampler

N_CUBES = 4


@pytest.fixture(scope="module")
def cubes(tmp_path_factory):
    d = tmp_path_factory.mktemp("survey")
    model = toy_stellar_model()
    model.save(d / "model.fits")
    src = ModelSpectra(model, globular_cluster_sampler())
    (d / "sources").mkdir()
    paths = []
    for i in range(N_CUBES):
        cfg = SimulateConfig(nx=30, ny=30, nlayers=3681, nstars=20, mag_bright=15, mag_faint=18.5, king_rc=12,
                             seed=10 + i)
        info = Simulator(cfg, src).write(d / f"field{i}.fits")
        os.replace(info["sources"], d / "sources" / f"field{i}.csv")
        paths.append(str(d / f"field{i}.fits"))
    opts = {"model": str(d / "model.fits"), "cube_lsf": "lamost", "fit_chunk": 10}
    return {"dir": d, "paths": paths, "sources": sources_resolver(d / "sources"), "opts": opts}


def _merged(store) -> Table:
    t = read_store_catalogue(store)
    t.sort("obs_id")
    return t


def _assert_same(a: Table, b: Table):
    assert list(a["obs_id"]) == list(b["obs_id"])  # the same stars, each exactly once
    assert len(set(a["obs_id"])) == len(a)
    for c in ("teff", "logg", "fe_h", "rv", "red_chi2"):
        # equal up to BLAS summation order (worker processes run with 1 BLAS thread)
        assert np.allclose(np.asarray(a[c], float), np.asarray(b[c], float), rtol=1e-6, atol=1e-9,
                           equal_nan=True), c
    assert list(a["status"]) == list(b["status"])


@pytest.fixture(scope="module")
def reference(cubes):
    store = cubes["dir"] / "ref"
    s = Survey(store, SurveyConfig(run_options=cubes["opts"], scheduler="process"), log=lambda *a: None)
    summary = s.run(cubes["paths"], cubes["sources"])
    return store, summary


def test_reference_store(cubes, reference):
    store, summary = reference
    assert summary["processed"] == N_CUBES and not summary["failed"]
    t = _merged(store)
    assert len(t) == N_CUBES * 20 and len(set(t["obs_id"])) == len(t)
    man = Survey(store).load_manifest()
    assert len(man) == N_CUBES
    for rec in man.values():
        assert rec["status"] == "done" and rec["attempts"] == 1 and len(rec["checksum"]) == 64
        assert rec["timings"]["fit"] > 0 and sum(rec["counts"].values()) == 20
    assert not any((store / "tmp").iterdir()) if (store / "tmp").exists() else True


def test_rerun_skips_then_config_change_redoes(cubes, reference):
    store = cubes["dir"] / "rerun"
    one = cubes["paths"][:1]
    Survey(store, SurveyConfig(run_options=cubes["opts"], scheduler="process"), log=lambda *a: None).run(
        one, cubes["sources"])
    s2 = Survey(store, SurveyConfig(run_options=cubes["opts"], scheduler="process"), log=lambda *a: None)
    assert s2.run(one, cubes["sources"])["processed"] == 0
    changed = {**cubes["opts"], "rv_range": 500.0}
    s3 = Survey(store, SurveyConfig(run_options=changed, scheduler="process"), log=lambda *a: None)
    assert s3.run(one, cubes["sources"])["processed"] == 1


def test_failing_cube_is_recorded_with_reason(cubes, tmp_path):
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 3000)
    (cubes["dir"] / "sources" / "broken.csv").write_text("stellar_id,ra,dec,mag\n")
    store = tmp_path / "store"
    cfg = SurveyConfig(run_options=cubes["opts"], scheduler="process", retries=1)
    summary = Survey(store, cfg, log=lambda *a: None).run([str(bad)], cubes["sources"])
    rec = Survey(store).load_manifest()
    (cid, r), = rec.items()
    assert r["status"] == "failed" and r["attempts"] == 2 and r["reason"]
    assert summary["failed"] == [cid]
    # given up: a further run does not try again
    assert Survey(store, cfg, log=lambda *a: None).run([str(bad)], cubes["sources"])["processed"] == 0


@pytest.mark.slow
def test_dask_two_workers_one_killed(cubes, reference):
    from dask.distributed import Client, LocalCluster

    store = cubes["dir"] / "dask"
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    pids = list(client.run(os.getpid).values())
    killed = []

    def killer():
        time.sleep(4.0)
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    th = threading.Thread(target=killer)
    th.start()
    try:
        cfg = SurveyConfig(run_options=cubes["opts"], scheduler=cluster.scheduler_address)
        summary = Survey(store, cfg, log=lambda *a: None).run(cubes["paths"], cubes["sources"])
    finally:
        th.join()
        client.close()
        cluster.close()
    assert killed and not summary["failed"]
    _assert_same(_merged(store), _merged(reference[0]))


@pytest.mark.slow
def test_kill_whole_run_and_restart(cubes, reference):
    store = cubes["dir"] / "killed"
    cmd = [sys.executable, "-m", "musepayne.cli", "survey", *cubes["paths"], "-o", str(store),
           "--sources-dir", str(cubes["dir"] / "sources"), "--scheduler", "process", "--model",
           cubes["opts"]["model"], "--config", str(cubes["dir"] / "run.json"), "--no-progress"]
    import json

    (cubes["dir"] / "run.json").write_text(json.dumps({"cube_lsf": "lamost", "fit_chunk": 10}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # kill at a fixed point (one cube committed, the others not yet), not at a clock time
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while p.poll() is None and not list((store / "cubes").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list((store / "cubes").glob("*"))) < len(cubes["paths"]), "the kill came after the whole survey"
    r = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list((store / "cubes").glob("*/*.part"))
    _assert_same(_merged(store), _merged(reference[0]))
