"""``musepayne run``: cube(s) + source list -> labelled catalogue, resumable.

Layout of ``OUTDIR``::

    config.json                 the effective configuration (file + CLI overrides)
    run.json                    run record: versions, configuration, input checksums,
                                per-stage timings, counts by status
    musepayne.log               log file
    cubes/<cube_id>/extracted.fits   extracted spectra (extract stage)
    cubes/<cube_id>/prepared.fits    prepared spectra (prepare stage)
    cubes/<cube_id>/fit/part-NNNNN.fits  fitted chunks (labels + best-fit models)
    cubes/<cube_id>/<stage>.done.json    completion markers (input + config hashes)
    catalogue.fits / .csv / .parquet     every observation (one row per star and cube)
    catalogue_stars.fits / .csv          per-star summary: the observation with the
                                         highest corr_flux (paper Eq. 6 rule)
    models.fits                 best-fit model spectra, aligned with catalogue.fits
    report/index.html           the report (PNG figures beside it)

Every file is written atomically (temporary file, then rename).  A stage is
skipped when its marker exists and records the same input checksums and
configuration hash; fitting is checkpointed per chunk of stars, so a killed
run loses at most one chunk of work and the final catalogue has every star
exactly once (checked when merging).

Length: the module is over 600 lines because :class:`RunConfig` and the resumable stages of
:class:`Pipeline` (which share the completion markers and the run record) are documented in full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tomllib
from astropy.io import fits
from astropy.table import Column, Table, vstack

from .. import __version__
from ..config import ConfigError, from_mapping, to_mapping
from ..extract.detect import DetectConfig, Detector
from ..extract.extractor import ExtractConfig, Extractor
from ..fit.catalogue import combine_metal_poor, write_catalogue
from ..fit.fitter import FitConfig, Fitter
from ..flags import SPECTRUM_STATUS, fit_status_counts
from ..instrument.lsf import lsf_from_spec
from ..instrument.wavelength import air_to_vacuum
from ..io.cube import open_cube
from ..io.fits import atomic_write_fits, atomic_write_json, folder_lock, sha256_file, table_hdu
from ..io.prepared import PreparedSpectra
from ..io.readers import read_muse_spectra
from ..models.files import _default_model_path, load_model
from ..models.model import format_ranges
from ..prepare.preparer import PrepareConfig, Preparer
from ..threads import blas_threads
from .report import make_report

__all__ = ["RunConfig", "Pipeline", "load_config_file", "read_config_file", "cube_id_for"]


#: flat option names of earlier versions -> (section, option); accepted by from_dict/updated
_LEGACY = {"mode": ("prepare", "mode"), "ao_notch": ("prepare", "ao_notch"),
           "extract_method": ("extract", "method"), "rv_range": ("fit", "rv_range")}
_SECTIONS = {"detect": DetectConfig, "extract": ExtractConfig, "prepare": PrepareConfig, "fit": FitConfig}


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``musepayne run``: run-level options plus each stage's own configuration.

    A TOML/JSON file can hold any subset (see :meth:`from_dict`); it is validated completely
    (keys, types, ranges) when loaded, before any stage runs.

    Attributes
    ----------
    model, model_mp : str
        Model file paths or ``'default'``; ``model_mp`` (optional) is the metal-poor model
        combined with ``model`` (paper Sect. 4.2.2).
    cube_lsf : str
        LSF of the cube spectra (``'muse'`` or any :func:`~musepayne.instrument.lsf_from_spec` string).
    fit_chunk : int
        Stars per fit checkpoint (> 0).
    min_snr : float
        Spectra below this native S/N are not fitted (status row kept).
    report : bool
        Write the HTML report.
    blas_threads : int or None
        BLAS threads used by the run (default 1).  Floating-point sums depend on the thread
        count, so fixing it makes a run's numbers identical wherever it runs (a resumed run,
        another worker, another machine); parallelism comes from running cubes side by side
        (``musepayne survey``).  None: leave the BLAS library's own setting.
    detect : DetectConfig
        Source detection when no catalogue is given (``[detect]`` table: thresholds, passes,
        bands, bounds on the number of stars).
    extract : ExtractConfig
        The extract stage (``[extract]`` table in a file).
    prepare : PrepareConfig
        The prepare stage (``[prepare]``).
    fit : FitConfig
        The fit stage (``[fit]``); a run always keeps the best-fit models (``models.fits``).

    Each stage's completion marker hashes that stage's own configuration (:meth:`stage_digest`),
    so changing a fit option refits without extracting again.
    """

    model: str = "default"
    model_mp: str | None = None
    cube_lsf: str = "muse"
    fit_chunk: int = 200
    min_snr: float = 3.0
    report: bool = True
    blas_threads: int | None = 1
    detect: DetectConfig = field(default_factory=DetectConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        for name, cls in _SECTIONS.items():  # tables (from files, or to_dict) become configs
            object.__setattr__(self, name, from_mapping(cls, getattr(self, name), name))
        if not (isinstance(self.fit_chunk, int) and not isinstance(self.fit_chunk, bool) and self.fit_chunk > 0):
            raise ConfigError(f"fit_chunk must be a positive integer, got {self.fit_chunk!r}")
        if self.blas_threads is not None and not (isinstance(self.blas_threads, int) and self.blas_threads >= 1):
            raise ConfigError(f"blas_threads must be a positive integer or null, got {self.blas_threads!r}")
        if not (isinstance(self.min_snr, (int, float)) and not isinstance(self.min_snr, bool)
                and np.isfinite(self.min_snr) and self.min_snr >= 0):
            raise ConfigError(f"min_snr must be a number >= 0, got {self.min_snr!r}")
        try:
            lsf_from_spec(self.cube_lsf)
        except ValueError as exc:
            raise ConfigError(f"cube_lsf: {exc}") from None

    @classmethod
    def from_dict(cls, options: dict) -> RunConfig:
        """Validated configuration from a mapping (a file's content or CLI options).

        Accepts nested tables ``detect``, ``extract``, ``prepare``, ``fit`` and the flat names of earlier
        versions (``mode``, ``ao_notch``, ``extract_method``, ``rv_range``, ``extract_options``,
        ``fit_options``).  Raises :class:`~musepayne.config.ConfigError` on any unknown key,
        wrong type or out-of-range value.

        Parameters
        ----------
        options : dict
            The options (nested stage tables or flat names).

        Returns
        -------
        RunConfig
            The validated configuration.

        Raises
        ------
        ConfigError
            Unknown key, wrong type or out-of-range value.
        """
        if not isinstance(options, dict):
            raise ConfigError(f"expected a table of options, got {type(options).__name__}")
        d = {k: v for k, v in options.items() if k not in _LEGACY and k not in ("extract_options", "fit_options")}
        for sec in _SECTIONS:
            cur = d.get(sec, {})
            if isinstance(cur, _SECTIONS[sec]):
                cur = to_mapping(cur)
            if not isinstance(cur, dict):
                raise ConfigError(f"{sec}: expected a table of options, got {cur!r}")
            d[sec] = dict(cur)
        for old, sec in (("extract_options", "extract"), ("fit_options", "fit")):
            extra = options.get(old)
            if extra is not None:
                if not isinstance(extra, dict):
                    raise ConfigError(f"{old}: expected a table of options, got {extra!r}")
                d[sec].update(extra)
        for old, (sec, key) in _LEGACY.items():
            if old in options and options[old] is not None:
                d[sec][key] = options[old]
        return from_mapping(cls, d)

    def to_dict(self) -> dict:
        """JSON-ready nested mapping; ``RunConfig.from_dict(c.to_dict()) == c``.

        Returns
        -------
        dict
            Every option, the stage configurations as nested tables.
        """
        return to_mapping(self)

    def stage_digest(self, stage: str) -> str:
        """Hash of what one stage's output depends on: its own configuration (plus, for
        prepare, the cube LSF; for fit, the chunking and the S/N threshold).

        Parameters
        ----------
        stage : {'detect', 'extract', 'prepare', 'fit'}
            The stage.

        Returns
        -------
        str
            16 hex digits of a sha256.
        """
        d = {"detect": {"detect": self.to_dict()["detect"]},
             "extract": {"extract": self.to_dict()["extract"]},
             "prepare": {"prepare": self.to_dict()["prepare"], "cube_lsf": self.cube_lsf},
             "fit": {"fit": self.to_dict()["fit"], "fit_chunk": self.fit_chunk, "min_snr": self.min_snr}}[stage]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """Hash of the whole configuration.

        Returns
        -------
        str
            16 hex digits of the sha256 of :meth:`to_dict` as sorted JSON.
        """
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def updated(self, **overrides) -> RunConfig:
        """A copy with options changed; None values are ignored (unset CLI flags).

        Parameters
        ----------
        **overrides
            Options by name (as :meth:`from_dict` accepts them).

        Returns
        -------
        RunConfig
            The validated new configuration.

        Raises
        ------
        ConfigError
            For an invalid option.
        """
        d = self.to_dict()
        for k, v in overrides.items():
            if v is None:
                continue
            if k in _LEGACY:
                sec, key = _LEGACY[k]
                d[sec][key] = v
            elif k in _SECTIONS and isinstance(v, dict):
                d[k].update(v)
            else:
                d[k] = v
        return RunConfig.from_dict(d)


def read_config_file(path) -> dict:
    """The options of a TOML (``[run]`` table or top level) or JSON run-configuration file,
    validated (:meth:`RunConfig.from_dict` accepts them) but kept as the file gives them.

    Parameters
    ----------
    path : str or os.PathLike
        The file (``.toml`` or ``.json``).

    Returns
    -------
    dict
        The options.

    Raises
    ------
    ConfigError
        Unreadable or malformed file, unknown keys, wrong types or out-of-range values.
    """
    p = Path(path)
    try:
        text = p.read_bytes()
        d = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text.decode())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, TOMLDecodeError
        raise ConfigError(f"{p}: cannot read the configuration ({exc})") from None
    if isinstance(d, dict):
        d = d.get("run", d)
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a configuration file holds a table of options")
    try:
        RunConfig.from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return d


def load_config_file(path) -> RunConfig:
    """The validated :class:`RunConfig` of a TOML or JSON file (see :func:`read_config_file`).

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    RunConfig
        The configuration.

    Raises
    ------
    ConfigError
        Unreadable or malformed file, unknown keys, wrong types or out-of-range values.
    """
    return RunConfig.from_dict(read_config_file(path))


def cube_id_for(path, checksum: str) -> str:
    """The work-folder name of a cube: its file stem and the first 8 digits of its checksum.

    Parameters
    ----------
    path : str or os.PathLike
        The cube.
    checksum : str
        Its sha256 hex digest.

    Returns
    -------
    str
        ``<stem>-<checksum[:8]>``.
    """
    return f"{Path(path).name.split('.fits')[0]}-{checksum[:8]}"


class _StageLog:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def add(self, key, dt):
        self.timings[key] = round(self.timings.get(key, 0.0) + dt, 3)


class Pipeline:
    """Configure once; ``run(cubes, sources)`` does extract -> prepare -> fit -> catalogue.

    ``progress`` is a callable ``(stage, done, total)`` or None; the CLI passes
    a rich progress display.  ``stop_after`` (tests) raises ``KeyboardInterrupt``
    after that many fit chunks, to exercise resuming.

    Parameters
    ----------
    outdir : str or os.PathLike
        Output folder (per-cube work folders, catalogue, report, run record).
    config : RunConfig, optional
        The validated configuration (default ``RunConfig()``).
    progress : callable, optional
        ``progress(stage: str, done: int, total: int)``.
    logger : logging.Logger, optional
        Where the stages log (default a logger of this instance).
    """

    def __init__(self, outdir, config: RunConfig = RunConfig(), progress=None, logger=None):
        self.outdir = Path(outdir)
        self.config = config
        self.progress = progress
        self.log = logger or logging.getLogger(f"musepayne.run.{id(self)}")
        self.times = _StageLog()
        self.detect_warnings: list[str] = []  # of the last detect stage (truncated candidate lists)

    # ------------------------------------------------------------------ helpers
    def _marker(self, cdir: Path, stage: str) -> Path:
        return cdir / f"{stage}.done.json"

    def _is_done(self, cdir, stage, inputs: dict, cfg_hash: str, output: Path) -> bool:
        m = self._marker(cdir, stage)
        if not (m.exists() and output.exists()):
            return False
        try:
            rec = json.loads(m.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(rec, dict) or rec.get("inputs") != inputs or rec.get("config") != cfg_hash:
            return False
        # a damaged (truncated, edited) stage output is redone, not read again on every resume
        if "output_sha256" in rec and rec["output_sha256"] != sha256_file(output):
            self.log.warning("%s: %s changed since its stage finished; redoing it", stage, output)
            return False
        return True

    def _mark(self, cdir, stage, inputs, cfg_hash, extra=None, output=None):
        rec = {"stage": stage, "inputs": inputs, "config": cfg_hash, "version": __version__,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        if output is not None:
            rec["output_sha256"] = sha256_file(output)
        atomic_write_json(rec, self._marker(cdir, stage))

    def _tick(self, stage, done, total):
        if self.progress is not None:
            self.progress(stage, done, total)

    # ------------------------------------------------------------------ stages
    def detect(self, cube_path, cdir: Path, checks: dict) -> Path:
        """No catalogue given: find the stars in the cube itself -> ``cdir/sources_detected.ecsv``.

        Parameters
        ----------
        cube_path : str or os.PathLike
            The MUSE cube.
        cdir : pathlib.Path
            The cube's work folder.
        checks : dict
            Input checksums recorded in the stage marker (a rerun with the same ones is skipped).

        Returns
        -------
        pathlib.Path
            The detected source list.
        """
        out = cdir / "sources_detected.ecsv"
        cfg_hash = self.config.stage_digest("detect")
        if self._is_done(cdir, "detect", checks, cfg_hash, out):
            self.log.info("detect: %s already done, skipped", cube_path)
            self.detect_warnings = list(json.loads(self._marker(cdir, "detect").read_text()).get("warnings", []))
            return out
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            det = Detector(self.config.detect)(str(cube_path))
        self.detect_warnings = [f"{Path(cube_path).name}: {w.message}" for w in caught]
        for w in self.detect_warnings:
            self.log.warning("detect: %s", w)
        if len(det) == 0:
            raise ValueError(f"{cube_path}: no star detected above S/N {det.meta.get('THRESH')}")
        tmp = out.with_name(f".{out.name}.part")
        det.write(tmp, format="ascii.ecsv", overwrite=True)
        tmp.replace(out)
        self.times.add("detect", time.perf_counter() - t0)
        self._mark(cdir, "detect", checks, cfg_hash, {"n_detected": len(det), "warnings": self.detect_warnings})
        self.log.info("detect: %d stars in %s -> %s", len(det), cube_path, out)
        return out

    def extract(self, cube_path, sources_path, cdir: Path, checks: dict, detected: bool = False) -> Path:
        """Extract every source's spectrum -> ``cdir/extracted.fits`` (skipped when already done).

        Parameters
        ----------
        cube_path : str or os.PathLike
            The MUSE cube.
        sources_path : str or os.PathLike
            The source catalogue (or the detected list).
        cdir : pathlib.Path
            The cube's work folder.
        checks : dict
            Input checksums recorded in the stage marker.
        detected : bool, optional
            The sources were detected in the cube itself (no catalogue-to-cube transformation).

        Returns
        -------
        pathlib.Path
            The extracted spectra.
        """
        out = cdir / "extracted.fits"
        cfg_hash = self.config.stage_digest("extract")
        if self._is_done(cdir, "extract", checks, cfg_hash, out):
            self.log.info("extract: %s already done, skipped", cube_path)
            return out
        t0 = time.perf_counter()
        info = _run_extract(cube_path, sources_path, out, self.config, detected=detected)
        self.times.add("extract", time.perf_counter() - t0)
        self._mark(cdir, "extract", checks, cfg_hash, {"summary": info}, output=out)
        self.log.info("extract: %s -> %s (%s)", cube_path, out, info)
        return out

    def prepare(self, extracted: Path, cdir: Path) -> Path:
        """Prepare the extracted spectra -> ``cdir/prepared.fits`` (skipped when already done).

        Parameters
        ----------
        extracted : pathlib.Path
            The extraction file.
        cdir : pathlib.Path
            The cube's work folder.

        Returns
        -------
        pathlib.Path
            The prepared spectra.
        """
        out = cdir / "prepared.fits"
        inputs = {"extracted": sha256_file(extracted)}
        cfg_hash = self.config.stage_digest("prepare")
        if self._is_done(cdir, "prepare", inputs, cfg_hash, out):
            self.log.info("prepare: %s already done, skipped", extracted)
            return out
        t0 = time.perf_counter()
        spectra = read_muse_spectra(extracted, lsf=lsf_from_spec(self.config.cube_lsf))
        prep = Preparer(self.config.prepare)(spectra)
        prep.write(out)
        self.times.add("prepare", time.perf_counter() - t0)
        self._mark(cdir, "prepare", inputs, cfg_hash, {"counts": dict(Counter(prep.spectra["status"].tolist()))},
                   output=out)
        self.log.info("prepare: %d spectra -> %s", prep.n_spectra, out)
        return out

    def fit(self, prepared_path: Path, cdir: Path, model, model_mp=None, stop_after=None) -> tuple[Table, np.ndarray]:
        """Fit the prepared spectra in chunks, each kept as a part file (resumable).

        Parameters
        ----------
        prepared_path : pathlib.Path
            The prepared spectra.
        cdir : pathlib.Path
            The cube's work folder (parts in ``cdir/fit``).
        model : SpectralModel
            The model.
        model_mp : SpectralModel, optional
            The metal-poor model (combined by the A / A-mp rule, paper Eq. 2).
        stop_after : int, optional
            Raise ``KeyboardInterrupt`` after this many chunks (tests of resuming).

        Returns
        -------
        catalogue : astropy.table.Table
            One row per spectrum (labels in K and dex, RV in km/s, errors, status, flags).
        model_flux : numpy.ndarray
            (n, n_pix) best-fit model spectra (normalised flux).
        """
        prep = PreparedSpectra.read(prepared_path)
        fdir = cdir / "fit"
        fdir.mkdir(parents=True, exist_ok=True)
        inputs = {"prepared": sha256_file(prepared_path), "model": _model_id(self.config.model),
                  "model_mp": _model_id(self.config.model_mp) if model_mp is not None else None}
        cfg_hash = self.config.stage_digest("fit")
        manifest = fdir / "manifest.json"
        want = {"inputs": inputs, "config": cfg_hash}
        if manifest.exists():
            try:
                have = json.loads(manifest.read_text())
            except ValueError:
                have = None
            if have != want:  # inputs or options changed: old parts are stale
                for p in fdir.glob("part-*.fits"):
                    p.unlink()
        atomic_write_json(want, manifest)
        n = prep.n_spectra
        chunk = self.config.fit_chunk
        starts = list(range(0, n, chunk))
        done_chunks = 0
        cats, models = [], []
        self._tick("fit", 0, n)  # starts the stage's clock before the first chunk is fitted
        for k, i0 in enumerate(starts):
            part = fdir / f"part-{k:05d}.fits"
            idx = np.arange(i0, min(n, i0 + chunk))
            got = _read_part_checked(part, prep.spectra["stellar_id"][idx]) if part.exists() else None
            if got is None:
                if part.exists():  # damaged or foreign checkpoint: refit the chunk
                    self.log.warning("fit: %s unreadable or not this chunk; refitting it", part)
                    part.unlink()
                t0 = time.perf_counter()
                cat, mod = _run_fit_chunk(prep.take(idx), model, model_mp, self.config)
                _write_part(part, cat, mod)
                self.times.add("fit", time.perf_counter() - t0)
                done_chunks += 1
                if stop_after is not None and done_chunks >= stop_after:
                    raise KeyboardInterrupt(f"stopped after {done_chunks} chunks (test hook)")
                got = _read_part(part)
            cats.append(got[0])
            models.append(got[1])
            self._tick("fit", min(n, i0 + chunk), n)
        cat = vstack(cats, metadata_conflicts="silent") if cats else Table()
        mod = np.vstack(models) if models else np.zeros((0, prep.wave.size))
        if len(cat) != n or len(set(cat["stellar_id"])) != len(cat):
            raise RuntimeError(f"{cdir}: merged fit has {len(cat)} rows for {n} spectra or duplicate ids")
        return cat, mod

    # ------------------------------------------------------------------ driver
    def run(self, cubes, sources=None, truth=None, stop_after=None) -> dict:
        """Process ``cubes`` (with one source catalogue, or one per cube); returns the run record.

        ``sources=None`` (or None for a cube): the stars are detected in the cube itself
        (:class:`~musepayne.extract.detect.Detector`), written to ``cubes/<cube_id>/sources_detected.ecsv``
        and extracted at the detected positions (no catalogue->cube transformation).

        The output folder is locked for the run (:func:`~musepayne.io.fits.folder_lock`): a
        second run on the same folder raises :class:`~musepayne.io.fits.FolderBusy` at once.

        Parameters
        ----------
        cubes : sequence of str or os.PathLike
            MUSE cubes.
        sources : str or os.PathLike or sequence, optional
            One source catalogue for all cubes, one per cube, or None (detect).
        truth : astropy.table.Table, optional
            Simulation truth for the report's recovery figures.
        stop_after : int, optional
            Interrupt after this many fit chunks (tests).

        Returns
        -------
        dict
            The run record (counts by status, timings, outputs, warnings), also written as ``run.json``.

        Raises
        ------
        FolderBusy
            If another run holds the output folder.
        """
        with folder_lock(self.outdir):
            if self.config.blas_threads is None:
                return self._run(cubes, sources, truth, stop_after)
            with blas_threads(self.config.blas_threads):
                return self._run(cubes, sources, truth, stop_after)

    def _run(self, cubes, sources, truth=None, stop_after=None) -> dict:
        self.outdir.mkdir(parents=True, exist_ok=True)
        # temporary files of a killed run are never valid: remove them -- only the run's own (the
        # folder is locked, so none belongs to a live run; files the run does not write are kept)
        for stale in _own_part_files(self.outdir):
            stale.unlink(missing_ok=True)
        atomic_write_json(self.config.to_dict(), self.outdir / "config.json")
        t_start = time.perf_counter()
        model = load_model(self.config.model)
        model_mp = load_model(self.config.model_mp) if self.config.model_mp else None
        record = {"software": {"musepayne": __version__, "numpy": np.__version__},
                  "model": {"path": str(self.config.model), "sha256": _model_id(self.config.model),
                            "meta": getattr(model, "meta", {})},
                  "config": self.config.to_dict(), "inputs": {}, "cubes": []}
        sources = [sources] * len(cubes) if not isinstance(sources, (list, tuple)) else list(sources)
        if len(sources) != len(cubes):
            raise ValueError("give one source catalogue, or one per cube")
        all_cats, all_models = [], []
        prep_wave = None
        for ci, (cube, src) in enumerate(zip(cubes, sources)):
            t0 = time.perf_counter()
            csum = sha256_file(cube)
            cid = cube_id_for(cube, csum)
            cdir = self.outdir / "cubes" / cid
            cdir.mkdir(parents=True, exist_ok=True)
            detected = src is None
            self.times.add("checksums", time.perf_counter() - t0)
            if detected:
                src = self.detect(cube, cdir, {"cube": csum})
                if self.detect_warnings:
                    record.setdefault("warnings", []).extend(self.detect_warnings)
            ssum = sha256_file(src)
            record["inputs"][str(cube)] = csum
            record["inputs"][str(src)] = ssum
            self._tick("cubes", ci, len(cubes))
            extracted = self.extract(cube, src, cdir, {"cube": csum, "sources": ssum}, detected=detected)
            prepared = self.prepare(extracted, cdir)
            cat, models = self.fit(prepared, cdir, model, model_mp, stop_after=stop_after)
            cat["cube_id"] = Column([cid] * len(cat),
                                    description="cube identifier: file name stem and the first 8 hex digits of its sha256")
            cat["obs_id"] = Column([f"{cid}:{s}" for s in cat["stellar_id"]],
                                   description="observation identifier, cube_id:stellar_id (unique per row)")
            all_cats.append(cat)
            all_models.append(models)
            if prep_wave is None:
                prep_wave = fits.getdata(prepared, "WAVE")
            cov = _coverage(cube, cat, model)
            record["cubes"].append({"cube": str(cube), "cube_id": cid, "n_rows": len(cat),
                                    "status": fit_status_counts(cat["status"]), "coverage": cov,
                                    "sources": _source_record(src, detected)})
            if cov.get("warning"):
                record.setdefault("warnings", []).append(cov["warning"])
                self.log.warning(cov["warning"])
            self._tick("cubes", ci + 1, len(cubes))
        catalogue = vstack(all_cats, metadata_conflicts="silent")
        models = np.vstack(all_models)
        stars = _best_per_star(catalogue)
        _write_catalogue(catalogue, self.outdir / "catalogue")
        _write_catalogue(stars, self.outdir / "catalogue_stars")
        hm = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(prep_wave, name="WAVE"),
                           fits.ImageHDU(models.astype(np.float32), name="MODEL")])
        atomic_write_fits(hm, self.outdir / "models.fits")
        record["counts"] = fit_status_counts(catalogue["status"])
        record["n_observations"] = len(catalogue)
        record["n_stars"] = len(stars)
        if self.config.report:
            t0 = time.perf_counter()
            record["report"] = self.write_report(cubes[0], catalogue, models, truth, model.pixel_mask)
            self.times.add("report", time.perf_counter() - t0)
        self.times.add("total", time.perf_counter() - t_start)
        record["timings"] = self.times.timings
        atomic_write_json(record, self.outdir / "run.json")
        return record

    def write_report(self, cube, catalogue, models, truth=None, model_mask=None):
        """Write the HTML report of the first cube of ``catalogue`` (:func:`musepayne.pipeline.report.make_report`).

        Parameters
        ----------
        cube : str or os.PathLike
            The cube (for the white-light image).
        catalogue : astropy.table.Table
            The run's catalogue.
        models : numpy.ndarray
            (n, n_pix) best-fit model spectra, rows as ``catalogue``.
        truth : astropy.table.Table, optional
            Simulation truth.
        model_mask : numpy.ndarray, optional
            (n_pix,) bool, pixels the model does not cover.

        Returns
        -------
        dict
            The report summary.
        """
        first = catalogue["cube_id"][0]
        cdir = self.outdir / "cubes" / first
        prep = PreparedSpectra.read(cdir / "prepared.fits")
        sel = np.array([c == first for c in catalogue["cube_id"]])
        with open_cube(cube) as c:
            wl = c.white_light(block=256)
        with fits.open(cdir / "extracted.fits") as h:
            sources = Table(h["SOURCES"].data) if "SOURCES" in h else None
        return make_report(self.outdir / "report", catalogue[sel], white_light=wl, sources=sources,
                           wave=prep.wave, flux=prep.flux, ivar=prep.ivar, model_flux=models[sel], truth=truth,
                           title=f"musepayne run: {Path(cube).name}", model_mask=model_mask)


# ---------------------------------------------------------------------- adapters
def _model_id(spec) -> str:
    """sha256 of the model file a run uses ('default' resolves to the shipped file)."""

    path = _default_model_path() if str(spec) == "default" else spec
    return sha256_file(path) if path is not None and Path(path).is_file() else str(spec)


def _coverage(cube, cat: Table, model, warn_below: float = 0.5) -> dict:
    """How much of the model's usable pixels the cube's wavelength range covers (and the fits used)."""
    mok = ~np.asarray(getattr(model, "pixel_mask", np.zeros(model.n_pix, bool)), bool)
    n_model = int(mok.sum())
    with open_cube(cube, allow_missing_stat=True) as c:
        w0, w1 = float(np.min(c.wave)), float(np.max(c.wave))
    mw = model.wave if getattr(model, "frame", "vacuum") == "vacuum" else air_to_vacuum(model.wave)
    v0, v1 = (float(v) for v in air_to_vacuum(np.array([w0, w1])))
    n_in = int((mok & (mw >= v0) & (mw <= v1)).sum())
    used = np.asarray(cat["n_pix_used"], float) if "n_pix_used" in cat.colnames else np.zeros(len(cat))
    med = float(np.median(used[used > 0])) if (used > 0).any() else 0.0
    out = {"cube_range_air": [round(w0, 1), round(w1, 1)], "model_usable_ranges": model.usable_ranges()
           if hasattr(model, "usable_ranges") else [], "model_usable_px": n_model, "model_px_in_cube": n_in,
           "fraction": round(n_in / max(n_model, 1), 3), "median_px_used": med}
    if out["fraction"] < warn_below:
        out["warning"] = (f"{Path(cube).name}: the cube covers {w0:.0f}-{w1:.0f} A (air); the model's usable pixels "
                          f"are {format_ranges(out['model_usable_ranges'])} (vacuum, {n_model} px); overlap "
                          f"{n_in} px ({100 * out['fraction']:.0f}% of the model's)"
                          + (": no star can be fitted" if n_in == 0 else
                             "; labels rest on this part of the model"
                             + (f" (fits used a median of {med:.0f} px)" if med > 0 else "")))
    return out


#: what a cube-only run's record says of its source list (README, *From a cube alone*: measured on simulated
#: crowded fields, detect_vs_catalogue.py --companions)
DETECTED_SOURCES_NOTE = ("source list detected in the cube itself: in crowded fields about a quarter of the "
                         "fit_flags == 0 rows can be blends with an undetected companion within ~0.5 FWHM, which no "
                         "flag can see; with a catalogue of the field (--sources) the companions are fitted too")


def _source_record(src, detected: bool) -> dict:
    """The run record's account of a cube's source list: its path, whether it was detected in the cube, and for a
    detected list :data:`DETECTED_SOURCES_NOTE`."""
    out = {"path": str(src), "detected_in_cube": bool(detected)}
    if detected:
        out["note"] = DETECTED_SOURCES_NOTE
    return out


def _run_extract(cube_path, sources_path, out_path, config: RunConfig, detected: bool = False) -> dict:
    # detected positions are already in the cube frame: no catalogue->cube transformation
    cfg = replace(config.extract, fit_transform=False) if detected else config.extract
    res = Extractor(cfg)(str(cube_path), str(sources_path))
    res.write(out_path)
    status = Counter(str(s) for s in res.sources["status"]) if "status" in res.sources.colnames else {}
    return {"n_sources": len(res.sources), "status": dict(status),
            "timings": {k: round(float(v), 3) for k, v in (res.timings or {}).items()}}


def _run_fit_chunk(prep, model, model_mp, config: RunConfig):
    """Fit one chunk; returns (catalogue without the model column, best-fit models)."""

    prep = _mark_low_snr(prep, config.min_snr)
    fit_cfg = replace(config.fit, keep_model=True)
    cat = Fitter(model, fit_cfg)(prep)
    if model_mp is not None:
        cat_mp = Fitter(model_mp, fit_cfg)(prep)
        cat = combine_metal_poor(cat, cat_mp)
    if "model_flux" in cat.colnames:
        models = np.asarray(cat["model_flux"], dtype=np.float64)
        cat.remove_column("model_flux")
    else:
        models = np.full((len(cat), prep.wave.size), np.nan)
    return cat, models


def _mark_low_snr(prep: PreparedSpectra, min_snr: float) -> PreparedSpectra:
    """Prepared spectra whose native S/N is below ``min_snr`` get status ``low_snr`` (a copy):
    the fitter gives them a ``failed:low_snr`` row instead of labels."""
    if "snr" not in prep.spectra.colnames or not min_snr > 0:
        return prep
    snr = np.asarray(prep.spectra["snr"], np.float64)
    status = np.asarray(prep.spectra["status"]).astype(str)
    low = ~(snr >= min_snr) & np.isin(status, [s for s, v in SPECTRUM_STATUS.items() if v.usable])
    if not low.any():
        return prep
    spectra = prep.spectra.copy()
    spectra["status"] = np.where(low, "low_snr", status)
    if "reason" in spectra.colnames:
        reason = np.asarray(spectra["reason"]).astype(object)
        reason[low] = [f"S/N {s:.2f} below min_snr {min_snr:g}" for s in snr[low]]
        spectra["reason"] = reason.astype(str)
    return replace(prep, spectra=spectra)


def _write_part(path, cat: Table, models):
    # the catalogue HDU keeps the column descriptions (every output column is documented)
    h = fits.HDUList([fits.PrimaryHDU(), table_hdu(cat, "CATALOGUE"),
                      fits.ImageHDU(np.asarray(models, np.float32), name="MODEL")])
    atomic_write_fits(h, path)


def _read_part(path):
    with fits.open(path) as h:
        # mask_invalid=False: NaN stays NaN (no MaskedColumns, which Parquet would split into value + ".mask")
        return (Table.read(h["CATALOGUE"], mask_invalid=False),
                np.array(h["MODEL"].data, dtype=np.float64, ndmin=2))


def _read_part_checked(path, ids):
    """A fit checkpoint if it is readable and holds exactly the rows ``ids``; else None."""
    try:
        cat, mod = _read_part(path)
    except Exception:  # noqa: BLE001 - any damage means: fit the chunk again
        return None
    if len(cat) != len(ids) or mod.shape[0] != len(ids) or "stellar_id" not in cat.colnames:
        return None
    if [str(s) for s in cat["stellar_id"]] != [str(s) for s in ids]:
        return None
    return cat, mod


#: temporary files (io.fits.atomic_path: ``.<name>.<random>.part``) of the files a run writes
_TOP_OUTPUTS = ("config.json", "run.json", "models.fits", "catalogue.fits", "catalogue.csv", "catalogue.parquet",
                "catalogue_stars.fits", "catalogue_stars.csv", "catalogue_stars.parquet")
_PART_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.part$")


def _own_part_files(outdir: Path):
    """The stale temporary files of the run's own outputs under ``outdir`` (never foreign files)."""
    own = []
    for p in outdir.glob(".*.part"):
        m = _PART_RE.match(p.name)
        if m and m.group("name") in _TOP_OUTPUTS:
            own.append(p)
    for sub in ("cubes", "report"):
        if (outdir / sub).is_dir():
            own += [p for p in (outdir / sub).rglob(".*.part") if _PART_RE.match(p.name) and p.is_file()]
    return own


def _best_per_star(cat: Table) -> Table:
    """One row per stellar_id: the observation with the highest corr_flux (paper Eq. 6)."""
    ids = np.asarray(cat["stellar_id"]).astype(str)
    cf = np.asarray(cat["corr_flux"], dtype=np.float64) if "corr_flux" in cat.colnames else np.zeros(len(cat))
    cf = np.where(np.isfinite(cf), cf, -np.inf)
    order = np.lexsort((-cf, ids))
    first = np.ones(order.size, bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    best = cat[order[first]]
    counts = Counter(ids)
    best["n_obs"] = Column([counts[str(s)] for s in best["stellar_id"]],
                           description="number of observations (cubes) of this star in catalogue.fits")
    return best


def _write_catalogue(cat: Table, stem: Path):
    """``stem``.fits and .csv, and .parquet when pyarrow is installed (all atomic)."""

    write_catalogue(cat, stem.with_suffix(".fits"))
    write_catalogue(cat, stem.with_suffix(".csv"))
    try:
        write_catalogue(cat, stem.with_suffix(".parquet"))
    except RuntimeError:  # no pyarrow: Parquet is optional
        pass
