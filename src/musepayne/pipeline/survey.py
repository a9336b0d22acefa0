"""``musepayne survey``: the pipeline over many cubes, on Dask or in process.

Each cube is one task (extract -> prepare -> fit -> catalogue, i.e. a
:class:`~musepayne.pipeline.runner.Pipeline` run for that cube).  Tasks run on a
``dask.distributed`` cluster -- a local one by default (one worker per core,
no setup), or any scheduler address -- or, with one worker or without Dask,
in this process with the same code.

The store (``STORE``)::

    manifest.json             one record per cube: input checksum, configuration
                              hash, software and model versions, status, attempts,
                              reason, timings, counts.  Written only by the driver,
                              atomically, after each finished task.
    cubes/<cube_id>/          the complete per-cube run directory (catalogue.fits, run.json, ...)
    catalogue/cube_id=<id>/part-0.parquet   the merged catalogue, a Parquet dataset
                                            partitioned by cube (hive layout)
    catalogue.fits            merged FITS table (``--merged-fits``)
    tmp/                      work directories of running tasks

A task works in ``tmp/<cube_id>-<random>/`` and commits by renaming that
directory to ``cubes/<cube_id>/`` (a directory rename is atomic on POSIX), so a
worker that dies mid-cube leaves nothing half-written under ``cubes/``; its
work directory is swept at the next start.  Re-running skips cubes whose
manifest record has status ``done`` with the same input checksum and
configuration hash, redoes those whose inputs or configuration changed, and
retries failed cubes up to ``retries`` times; a cube that keeps failing is
recorded with its reason.

HPC queues: start a cluster with ``dask-jobqueue`` (e.g. ``SLURMCluster(cores=16,
memory='64GB').scale(jobs=10)``) and pass its ``scheduler_address`` to
``--scheduler``; nothing else changes.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from astropy.table import Table, vstack

from .. import __version__
from ..fit.catalogue import read_catalogue, write_catalogue
from ..io.fits import atomic_write_json, folder_lock, sha256_file
from .runner import Pipeline, RunConfig, cube_id_for

__all__ = ["SurveyConfig", "Survey", "process_cube", "read_store_catalogue", "sources_resolver"]


@dataclass(frozen=True)
class SurveyConfig:
    """Options of a survey run.

    run_options : dict of :class:`~musepayne.pipeline.runner.RunConfig` options for every cube
    retries : attempts after the first failure (per cube, across invocations)
    scheduler : 'local' (a LocalCluster), 'process' (no Dask), or a scheduler address
    workers : number of local workers (default: number of cores)
    merged_fits : also write one merged FITS catalogue

    Attributes
    ----------
    run_options : dict or None
        :class:`~musepayne.pipeline.runner.RunConfig` options applied to every cube.
    retries : int
        Attempts after the first failure, per cube and across invocations.
    scheduler : str
        'local', 'process' or a Dask scheduler address.
    workers : int or None
        Local Dask workers (None: one per core).
    merged_fits : bool
        Also write one merged FITS catalogue.
    """

    run_options: dict = None
    retries: int = 2
    scheduler: str = "local"
    workers: int | None = None
    merged_fits: bool = False

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"workers must be a positive integer, got {self.workers!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.scheduler, str) or not (self.scheduler in ("local", "process")
                                                       or "://" in self.scheduler):
            raise ValueError(f"scheduler must be 'local', 'process' or an address like tcp://host:8786, "
                             f"got {self.scheduler!r}")

    def run_config(self):
        """The validated per-cube :class:`~musepayne.pipeline.runner.RunConfig` (report off unless asked).

        Returns
        -------
        RunConfig
            The configuration every cube runs with.

        Raises
        ------
        ConfigError
            For an invalid run option.
        """
        opts = dict(self.run_options or {})
        opts.setdefault("report", False)
        return RunConfig.from_dict(opts)


def _relax_malloc_trim():
    """Undo Dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for this process (glibc only).

    Dask nannies start workers with that variable, which also disables glibc's
    dynamic mmap threshold: every large temporary array is then mmap'ed and
    unmapped again, and the page faults made a cube 3-4x slower in a worker
    than in a plain process (measured: 7.4 s system time instead of 1.1 s).
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)


def process_cube(cube: str, sources: str, store: str, run_options: dict, cube_id: str, checksum: str) -> dict:
    """One survey task: run the pipeline for one cube and commit its directory.

    Runs anywhere (a Dask worker or this process).  Returns a summary dict;
    raises on failure (the driver records the reason and may retry).

    Parameters
    ----------
    cube, sources : str
        The cube and its source catalogue.
    store : str
        The store folder; the result is committed to ``store/cubes/<cube_id>`` by a rename.
    run_options : dict
        :class:`~musepayne.pipeline.runner.RunConfig` options.
    cube_id, checksum : str
        The cube's id and sha256.

    Returns
    -------
    dict
        ``cube_id``, ``checksum``, ``n_observations``, ``counts``, ``timings``, ``wall_s`` (s), ``model``.
    """

    _relax_malloc_trim()
    store = Path(store)
    work = store / "tmp" / f"{cube_id}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        record = Pipeline(work, RunConfig.from_dict(run_options)).run([cube], sources)
        final = store / "cubes" / cube_id
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an older result for changed inputs/config: move aside, then replace
            trash = store / "tmp" / f"old-{cube_id}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"cube_id": cube_id, "checksum": checksum, "n_observations": record.get("n_observations"),
            "counts": record.get("counts"), "timings": record.get("timings"),
            "wall_s": round(time.perf_counter() - t0, 2), "model": record.get("model", {}).get("path")}


class Survey:
    """Configure once; ``run(cubes, sources_for)`` processes all cubes into ``store``.

    Parameters
    ----------
    store : str or os.PathLike
        The store folder (manifest, per-cube results, merged catalogue).
    config : SurveyConfig, optional
        The options (default ``SurveyConfig()``).
    progress : callable, optional
        ``progress(done: int, total: int)`` after every cube.
    log : callable, optional
        ``log(message: str)`` (default ``print``).
    """

    def __init__(self, store, config: SurveyConfig = SurveyConfig(), progress=None, log=print):
        self.store = Path(store)
        self.config = config
        self.progress = progress
        self.log = log

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.store / "manifest.json"

    def load_manifest(self) -> dict:
        """The manifest; a damaged one is moved aside (``manifest.json.damaged-<time>``) and
        the store starts afresh -- every cube is then redone, none is merged twice.

        Returns
        -------
        dict
            Per cube id: its checksum, state, attempts and summary (empty for a new store).
        """
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if not isinstance(manifest, dict) or not all(isinstance(v, dict) and "status" in v
                                                         for v in manifest.values()):
                raise ValueError("not a mapping cube_id -> record")
            return manifest
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.manifest_path.with_name(f"manifest.json.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.manifest_path, aside)
            self.log(f"survey: {self.manifest_path} was damaged ({exc}); moved to {aside.name}, "
                     "every cube will be redone")
            return {}

    def _committed_ok(self, cid) -> bool:
        """Whether the committed result of ``cid`` is there and readable."""
        path = self.store / "cubes" / cid / "catalogue.fits"
        try:
            Table.read(path, mask_invalid=False)
        except Exception:  # noqa: BLE001 - any damage means: redo the cube
            return False
        return True

    def _save(self, manifest):
        atomic_write_json(manifest, self.manifest_path)

    # ------------------------------------------------------------------ driver
    def plan(self, cubes, sources_for):
        """(todo, skipped) lists of task dicts for the given cubes.

        Parameters
        ----------
        cubes : sequence of str or os.PathLike
            The cubes.
        sources_for : callable
            ``sources_for(cube) -> source catalogue path`` (:func:`sources_resolver`).

        Returns
        -------
        todo : list of dict
            Tasks to run (cube, sources, cube_id, checksum).
        skipped : list of dict
            Tasks already committed with the same inputs, or out of retries.
        """

        todo, skipped, _ = self._plan(self.load_manifest(), cubes, sources_for)
        return todo, skipped

    def _plan(self, manifest, cubes, sources_for):
        """(todo, skipped, bad): ``bad`` are ``(task, reason)`` of cubes that cannot even start
        (unreadable cube, no source catalogue); ``manifest`` loses the records of earlier
        versions of the given cubes (same path, other content), so a changed cube is never
        merged under both its old and its new id."""
        cfg_hash = self.config.run_config().digest()
        todo, skipped, bad = [], [], []
        for cube in cubes:
            task = {"cube": str(cube), "sources": "", "cube_id": Path(str(cube)).name, "checksum": "",
                    "sources_checksum": "", "config": cfg_hash}
            try:
                csum = sha256_file(cube)
                cid = cube_id_for(cube, csum)
                task.update(cube_id=cid, checksum=csum)
                src = sources_for(cube)
                ssum = sha256_file(src)
                task.update(sources=str(src), sources_checksum=ssum)
            except (OSError, ValueError) as exc:
                bad.append((task, f"{type(exc).__name__}: {exc}"))
                continue
            self._forget_old_versions(manifest, cube, cid)
            rec = manifest.get(cid, {})
            same = rec.get("checksum") == csum and rec.get("sources_checksum") == ssum and rec.get("config") == cfg_hash
            if same and rec.get("status") == "done" and self._committed_ok(cid):
                skipped.append(task)
            elif same and rec.get("status") == "failed" and rec.get("attempts", 0) > self.config.retries:
                skipped.append(task)
            else:
                task["attempts"] = rec.get("attempts", 0) if same and rec.get("status") == "failed" else 0
                todo.append(task)
        return todo, skipped, bad

    def _forget_old_versions(self, manifest, cube, cid):
        """Drop manifest records (and committed results) of ``cube``'s path under another id."""
        here = Path(str(cube)).resolve()
        for old, rec in list(manifest.items()):
            if old == cid or not rec.get("cube"):
                continue
            if Path(rec["cube"]).resolve() == here:
                self.log(f"survey: {cube} changed since it was recorded as {old}; replacing that result")
                del manifest[old]
                shutil.rmtree(self.store / "cubes" / old, ignore_errors=True)
    def run(self, cubes, sources_for) -> dict:
        """Process ``cubes`` into the store; the store is locked for the run
        (:func:`~musepayne.io.fits.folder_lock`, a second survey on it is refused).

        Parameters
        ----------
        cubes : sequence of str or os.PathLike
            The cubes.
        sources_for : callable
            ``sources_for(cube) -> source catalogue path``.

        Returns
        -------
        dict
            Summary: cubes done, skipped and failed (with reasons), rows merged, timings.

        Raises
        ------
        FolderBusy
            If another survey holds the store.
        """
        with folder_lock(self.store):
            return self._run(cubes, sources_for)

    def _run(self, cubes, sources_for) -> dict:
        shutil.rmtree(self.store / "tmp", ignore_errors=True)  # leftovers of dead tasks (the store is locked)
        manifest = self.load_manifest()
        todo, skipped, bad = self._plan(manifest, cubes, sources_for)
        for task, reason in bad:
            manifest[task["cube_id"]] = {k: task[k] for k in ("cube", "sources", "checksum", "sources_checksum",
                                                              "config")}
            manifest[task["cube_id"]].update(status="failed", reason=reason[:500], attempts=1,
                                             software=__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.log(f"survey: {task['cube']}: {reason}")
        self._save(manifest)
        run_opts = self.config.run_config().to_dict()
        self.log(f"survey: {len(todo)} cube(s) to process, {len(skipped)} already done or given up")
        t0 = time.perf_counter()
        pending = list(todo)
        while pending:
            results = self._execute(pending, run_opts)
            retry = []
            for task, (ok, value) in zip(pending, results):
                rec = {k: task[k] for k in ("cube", "sources", "checksum", "sources_checksum", "config")}
                rec["attempts"] = task.get("attempts", 0) + 1
                rec["software"] = __version__
                rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                if ok:
                    rec.update(status="done", reason="", **{k: value[k] for k in ("n_observations", "counts",
                                                                                  "timings", "wall_s", "model")})
                else:
                    rec.update(status="failed", reason=value[:500])
                    if rec["attempts"] <= self.config.retries:
                        retry.append({**task, "attempts": rec["attempts"]})
                manifest[task["cube_id"]] = rec
                self._save(manifest)
            pending = retry
        merged = self.merge(manifest)
        this_run = {t["cube_id"] for t in todo + skipped} | {t["cube_id"] for t, _ in bad}
        summary = {
            "store": str(self.store), "n_cubes": len(cubes), "processed": len(todo), "skipped": len(skipped),
            "failed": sorted(k for k, v in manifest.items() if v["status"] == "failed" and k in this_run),
            "n_observations": merged, "wall_s": round(time.perf_counter() - t0, 2),
        }
        return summary

    def _execute(self, tasks, run_opts):
        """Run tasks; returns ``[(ok, summary_or_reason)]`` in task order."""
        sched = self.config.scheduler
        args = [(t["cube"], t["sources"], str(self.store), run_opts, t["cube_id"], t["checksum"]) for t in tasks]
        if sched == "process" or (self.config.workers == 1 and sched == "local") or not _have_dask():
            out = []
            for i, a in enumerate(args):
                try:
                    out.append((True, process_cube(*a)))
                except Exception as exc:  # recorded, maybe retried
                    out.append((False, f"{type(exc).__name__}: {exc}"))
                if self.progress:
                    self.progress(i + 1, len(args))
            return out
        from dask.distributed import Client, LocalCluster, as_completed  # noqa: PLC0415 - heavy optional dependency, loaded when used

        if sched == "local":
            cluster = LocalCluster(n_workers=self.config.workers or os.cpu_count() or 1, threads_per_worker=1,
                                   processes=True, dashboard_address=":0")
            client = Client(cluster)
        else:
            cluster, client = None, Client(sched)
        try:
            self.log(f"survey: Dask dashboard at {client.dashboard_link}")
            futures = [client.submit(process_cube, *a, key=f"cube-{t['cube_id']}-{t.get('attempts', 0)}", pure=False)
                       for a, t in zip(args, tasks)]
            index = {f.key: i for i, f in enumerate(futures)}
            out = [None] * len(futures)
            for n, f in enumerate(as_completed(futures), 1):
                i = index[f.key]
                try:
                    out[i] = (True, f.result())
                except Exception as exc:
                    out[i] = (False, f"{type(exc).__name__}: {exc}")
                if self.progress:
                    self.progress(n, len(futures))
            return out
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def merge(self, manifest) -> int:
        """Rebuild the partitioned Parquet dataset (and FITS on request) from committed cubes.

        Parameters
        ----------
        manifest : dict
            The store's manifest (:meth:`load_manifest`).

        Returns
        -------
        int
            Number of catalogue rows merged.
        """
        done = sorted(k for k, v in manifest.items() if v["status"] == "done")
        tables, merged_ids = [], []
        pdir = self.store / "catalogue"
        for cid in done:
            path = self.store / "cubes" / cid / "catalogue.fits"
            if not path.exists():
                continue
            try:
                t = Table.read(path, mask_invalid=False)  # NaN stays NaN (no ".mask" columns in Parquet)
            except Exception as exc:  # noqa: BLE001 - a damaged result is redone by the next run
                manifest[cid].update(status="failed", reason=f"committed catalogue unreadable: {exc}"[:500],
                                     attempts=0)
                self._save(manifest)
                continue
            tables.append(t)
            merged_ids.append(cid)
            # the partition key lives in the folder name (hive layout), not in the file
            part = t.copy(copy_data=False)
            if "cube_id" in part.colnames:
                part.remove_column("cube_id")
            try:
                write_catalogue(part, pdir / f"cube_id={cid}" / "part-0.parquet")
            except RuntimeError:  # no pyarrow: the merged FITS table is still available
                pass
        if pdir.exists():  # partitions of cubes no longer done
            for p in pdir.glob("cube_id=*"):
                if p.name.split("=", 1)[1] not in merged_ids:
                    shutil.rmtree(p, ignore_errors=True)
        n = sum(len(t) for t in tables)
        if self.config.merged_fits and tables:
            merged = vstack(tables, metadata_conflicts="silent")
            write_catalogue(merged, self.store / "catalogue.fits")  # atomic; keeps column descriptions
        return n


def _have_dask() -> bool:
    try:
        import dask.distributed  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def sources_resolver(sources_dir=None, sources_from=None, workdir=None):
    """``cube -> sources file``: from a folder (same stem, any of .csv/.fits/.vot) or one catalogue.

    Parameters
    ----------
    sources_dir : str or os.PathLike, optional
        Folder of per-cube catalogues.
    sources_from : str or os.PathLike, optional
        One catalogue for every cube.
    workdir : str or os.PathLike, optional
        Base of relative paths.

    Returns
    -------
    callable
        ``find(cube) -> str``, raising FileNotFoundError when a cube has no catalogue.

    Raises
    ------
    ValueError
        If neither folder nor catalogue is given.
    """
    if sources_from is not None:
        return lambda cube: str(sources_from)
    if sources_dir is None:
        raise ValueError("give --sources-dir or --sources-from")
    d = Path(sources_dir)

    def find(cube):
        stem = Path(cube).name.split(".fits")[0]
        for ext in (".csv", ".fits", ".vot", ".xml", "_sources.csv"):
            for cand in (d / f"{stem}{ext}",):
                if cand.exists():
                    return str(cand)
        raise FileNotFoundError(f"no source catalogue for {cube} in {d} (expected {stem}.csv/.fits/.vot)")

    return find


def read_store_catalogue(store) -> Table:
    """The merged catalogue of a store, read from its Parquet partitions (pyarrow, no pandas).

    Parameters
    ----------
    store : str or os.PathLike
        The store folder.

    Returns
    -------
    astropy.table.Table
        All committed rows (empty when there are none).
    """

    parts = sorted(Path(store, "catalogue").glob("cube_id=*/part-0.parquet"))
    tables = []
    for p in parts:
        t = read_catalogue(p)
        t["cube_id"] = [p.parent.name.split("=", 1)[1]] * len(t)
        tables.append(t)
    return vstack(tables, metadata_conflicts="silent") if tables else Table()
