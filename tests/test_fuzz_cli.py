"""Property-based fuzzing of the command line (issue 17).

Hypothesis drives ``extract``, ``prepare``, ``fit``, ``select``, ``calibrate``,
``simulate``, ``run`` and ``survey`` with malformed files (truncated, bit-flipped,
random, empty, lying headers), catalogues (odd ids, missing columns, NaN),
configurations, option values and output paths (the input itself, an existing
folder, an unwritable place, odd names).  For every case (:func:`check_case`):

* the exit code is 0, 1 (finished, some inputs failed) or a one-line error
  (``musepayne: error: ...`` or click's usage error) with exit code != 0;
* no Python traceback and no uncaught exception;
* no input file changed (sha256) and no file outside the output folder
  created, changed or removed;
* no temporary ``.part`` file left, and every FITS file in the output folder
  opens completely (no partial final file);
* ``--json`` prints strict JSON (no bare NaN).

The default is a modest number of examples (``MUSEPAYNE_FUZZ_EXAMPLES``, 8 per
command); ``benchmarks/fuzz_cli.py`` runs the same cases in the hundreds and
counts failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musepayne.cli import main
from musepayne.extract.extractor import Extractor
from musepayne.simulate.simulator import SimulateConfig, Simulator

pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning",
                                        "ignore::RuntimeWarning", "ignore::UserWarning")

N_EXAMPLES = int(os.environ.get("MUSEPAYNE_FUZZ_EXAMPLES", "8"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"), database=None)
UNWRITABLE = "/sys/musepayne-fuzz/out"  # read-only even for root


# ---------------------------------------------------------------- assets (built once)
_ASSETS: dict = {}


def assets() -> dict:
    """Small valid inputs that the strategies mutate: cube, sources, extracted and
    prepared spectra, a label catalogue, a configuration."""
    if _ASSETS:
        return _ASSETS
    d = Path(tempfile.mkdtemp(prefix="musepayne-fuzz-assets-"))
    info = Simulator(SimulateConfig(nx=14, ny=14, nlayers=120, nstars=6, seed=4, king_rc=4.0)).write(d / "cube.fits")
    ext = d / "ext.fits"
    Extractor()(info["cube"], info["sources"]).write(ext)
    prep = d / "prep.fits"
    CliRunner().invoke(main, ["prepare", str(ext), "-o", str(prep), "--lsf", "lamost"])
    rng = np.random.default_rng(1)
    n = 12
    cat = Table({"stellar_id": [f"s{i % 8}" for i in range(n)], "teff": rng.uniform(3500, 6500, n),
                 "logg": rng.uniform(0, 5, n), "fe_h": rng.uniform(-2, 0.5, n), "mg_fe": rng.uniform(-0.2, 0.5, n),
                 "fit_flags": rng.integers(0, 64, n), "corr_flux": rng.uniform(0, 1, n),
                 "snr_muse": rng.uniform(5, 200, n), "red_chi2": rng.uniform(0.5, 30, n),
                 "mg_fe_gradcorr": rng.uniform(0, 1, n), "rv": rng.normal(0, 100, n)})
    cat["teff"][3] = np.nan
    cat.write(d / "cat.fits")
    (d / "config.toml").write_text('cube_lsf = "lamost"\nfit_chunk = 4\nreport = false\n')
    _ASSETS.update(dir=d, cube=Path(info["cube"]), sources=Path(info["sources"]), ext=ext, prep=prep,
                   cat=d / "cat.fits", config=d / "config.toml")
    return _ASSETS


# ---------------------------------------------------------------- strategies
def _mutate(data: bytes, kind: str, a: int, b: int) -> bytes:
    n = len(data)
    if kind == "same" or n == 0:
        return data
    if kind == "truncate":
        return data[: a % n]
    if kind == "flip":
        out = bytearray(data)
        for k in range(1 + b % 8):
            i = (a * (k + 1) * 7919) % n
            out[i] ^= 1 << (b % 8)
        return bytes(out)
    if kind == "empty":
        return b""
    if kind == "random":
        return np.random.default_rng(a).integers(0, 256, 1 + b % 5000, dtype=np.uint8).tobytes()
    if kind == "text":
        return b"stellar_id,ra,dec,mag\n" + b"x,,,\n" * (b % 4)
    if kind == "lying_header":  # a header that claims much more data than the file holds
        key = [b"NAXIS1  =", b"NAXIS2  =", b"NAXIS3  =", b"BITPIX  ="][a % 4]
        i = data.find(key)
        if i < 0:
            return data
        value = [10**8, 0, -1, 999999999][b % 4] if key != b"BITPIX  =" else [7, -128, 0, 64][b % 4]
        out = bytearray(data)
        out[i:i + 30] = f"{key.decode()} {value:20d}".encode()
        return bytes(out)
    raise AssertionError(kind)


MUTATION = st.tuples(st.sampled_from(["same"] * 5 + ["truncate", "flip", "empty", "random", "text",
                                                      "lying_header"]),
                     st.integers(0, 10**6), st.integers(0, 10**6))
IDS = st.one_of(st.text(min_size=0, max_size=40), st.sampled_from(["a/b", "a_b", "a?b", ".", "..", "x" * 300,
                                                                     "", " ", "--", "\u00e9", "a\nb"]))
NUM = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1e30, 1e30, 0.0]))
COLUMNS = ["teff", "logg", "fe_h", "mg_fe", "fit_flags", "corr_flux", "snr_muse", "red_chi2", "rv", "stellar_id",
           "nope"]


@st.composite
def expression(draw, depth=0):
    """A selection expression from the documented grammar (valid most of the time)."""
    kind = draw(st.sampled_from(["cmp", "cmp", "bool", "not", "func", "arith", "bit"] if depth < 3 else ["cmp"]))
    col = draw(st.sampled_from(COLUMNS))
    num = draw(st.one_of(st.integers(-10**6, 10**6).map(str), NUM.map(repr), st.sampled_from(["nan", "inf"])))
    if kind == "cmp":
        return f"{col} {draw(st.sampled_from(['<', '<=', '>', '>=', '==', '!=']))} {num}"
    if kind == "bool":
        return f"({draw(expression(depth + 1))}) {draw(st.sampled_from(['and', 'or', '&', '|']))} " \
               f"({draw(expression(depth + 1))})"
    if kind == "not":
        return f"{draw(st.sampled_from(['not ', '~']))}({draw(expression(depth + 1))})"
    if kind == "func":
        f = draw(st.sampled_from(["abs", "isfinite", "isnan", "sqrt", "log10", "exp"]))
        return f"{f}({col}) > {num}"
    if kind == "arith":
        return f"{col} {draw(st.sampled_from(['+', '-', '*', '/', '**', '%']))} {num} > {col}"
    return f"bit(fit_flags, {draw(st.one_of(st.integers(-3, 70).map(str), NUM.map(repr)))})"


@st.composite
def catalogue(draw, kind="sources"):
    """A source or label catalogue: valid, mutated, or generated with odd ids/values/columns."""
    a = assets()
    mode = draw(st.sampled_from(["asset", "asset", "generated"]))
    if mode == "asset":
        return ("bytes", a["sources" if kind == "sources" else "cat"].name,
                _mutate(a["sources" if kind == "sources" else "cat"].read_bytes(), *draw(MUTATION)))
    n = draw(st.integers(0, 6))
    cols = draw(st.lists(st.sampled_from(["stellar_id", "x", "y", "ra", "dec", "mag", "teff", "logg", "fe_h",
                                          "mg_fe", "fit_flags", "corr_flux"]), unique=True, max_size=8))
    t = {}
    for c in cols:
        if c == "stellar_id":
            t[c] = [draw(IDS) for _ in range(n)]
        elif c == "fit_flags":
            t[c] = [draw(st.integers(-2**40, 2**40)) for _ in range(n)]
        else:
            t[c] = [draw(NUM) for _ in range(n)]
    fmt = draw(st.sampled_from(["csv", "fits"]))
    return ("table", f"gen.{fmt}", (t, fmt))


CONFIG = st.one_of(
    st.just(None),
    st.just("asset"),
    st.text(max_size=80).map(lambda s: ("toml", s)),
    st.dictionaries(st.sampled_from(["fit_chunk", "rv_range", "mode", "model", "cube_lsf", "report",
                                     "fit", "extract", "prepare", "extract_method", "blas_threads"]),
                    st.one_of(st.integers(-5, 10**9), NUM, st.text(max_size=10), st.booleans(),
                              st.dictionaries(st.text(max_size=8), st.integers(), max_size=2)),
                    max_size=4).map(lambda m: ("json", m)),
)
OUTPUT = st.sampled_from(["fresh", "fresh", "deep", "input", "existing_dir", "unwritable", "odd_name", "hidden"])


@st.composite
def case(draw, command=None):
    """One command line: (command, spec) -- files are materialised by :func:`check_case`."""
    cmd = command or draw(st.sampled_from(["extract", "prepare", "fit", "select", "calibrate", "simulate",
                                           "run", "survey"]))
    spec = {"cmd": cmd, "output": draw(OUTPUT), "json": draw(st.booleans())}
    if cmd in ("extract", "run", "survey"):
        spec["cube"] = draw(MUTATION)
        spec["sources"] = draw(catalogue("sources"))
    if cmd == "extract":
        spec["opts"] = draw(st.lists(st.sampled_from([
            ["--method", "aperture"], ["--block", str(draw(st.integers(-3, 500)))],
            ["--sky-order", str(draw(st.integers(-2, 3)))], ["--no-transform"], ["--per-star", "@per_star"]]),
            max_size=3))
    if cmd == "prepare":
        spec["inputs"] = draw(st.lists(st.tuples(st.sampled_from(["ext", "cube", "sources", "cat"]), MUTATION),
                                       min_size=1, max_size=3))
        spec["opts"] = draw(st.lists(st.sampled_from([
            ["--mode", "bulge"], ["--lsf", draw(st.sampled_from(["muse", "fwhm=-1", "R=0", "R=abc", "fwhm=2.5",
                                                                  "nonsense", "@cat"]))],
            ["--target-lsf", draw(st.sampled_from(["lamost", "R=-5", ""]))], ["--ao-notch", "NFM"]]), max_size=2))
    if cmd == "fit":
        spec["prepared"] = draw(st.tuples(st.sampled_from(["prep", "prep", "ext", "cat"]), MUTATION))
        spec["opts"] = draw(st.lists(st.sampled_from([
            ["--starts", str(draw(st.integers(-2, 3)))], ["--rv-range", str(draw(NUM))],
            ["--threads", str(draw(st.integers(-3, 2)))], ["--also", "@also"], ["--precision", "float64"],
            ["--model", draw(st.sampled_from(["default", "@cat", "/nonexistent/model.fits"]))]]), max_size=3))
    if cmd in ("select", "calibrate"):
        spec["catalogue"] = draw(catalogue("labels"))
        expr = draw(st.one_of(
            expression(), expression(),
            st.text(max_size=60),
            st.sampled_from(["teff > 4000", "bit(fit_flags, 1e30)", "bit(fit_flags, -1)", "bit(fit_flags, 3)",
                             "-" * 1990 + "teff", "(" * 300 + "teff" + ")" * 300, "__import__('os')",
                             "teff.__class__", "abs(rv) < 300 and fe_h_flag == 1", "1/0 > 0", "teff ** 1e308 > 0",
                             "stellar_id == 's1'", "nan", "isfinite(teff) & (logg < 3)"])))
        spec["expr"] = expr
        if cmd == "select":
            spec["opts"] = draw(st.lists(st.sampled_from([
                ["--preset", draw(st.sampled_from(["eq5", "eq6", "eq8", "nope"]))], ["--best-per-star"],
                ["--by", draw(st.sampled_from(["corr_flux", "nope", "stellar_id"]))],
                ["--id-col", draw(st.sampled_from(["stellar_id", "nope", "teff"]))]]), max_size=2))
        else:
            spec["opts"] = draw(st.lists(st.sampled_from([
                ["--no-trend"], ["--paper-offsets"], ["--teff-ref", str(draw(NUM))],
                ["--outside", "clip"], ["--giant-logg", str(draw(NUM))]]), max_size=2))
    if cmd == "simulate":
        spec["opts"] = [["--nstars", str(draw(st.integers(0, 8)))], ["--size", str(draw(st.integers(6, 14)))],
                        ["--nlayers", str(draw(st.integers(0, 40)))], ["--seed", str(draw(st.integers(-1, 3)))]]
        spec["opts"] += draw(st.one_of(st.just([]), st.just([]), st.just([["--mag-range", "15", "19"]]),
                                       st.tuples(NUM, NUM).map(lambda m: [["--mag-range", str(m[0]), str(m[1])]])))
    if cmd in ("run", "survey"):
        spec["config"] = draw(CONFIG)
        spec["opts"] = draw(st.lists(st.sampled_from([
            ["--fit-chunk", str(draw(st.integers(-2, 5)))] if cmd == "run" else ["--retries", str(draw(
                st.integers(-1, 2)))],
            ["--workers", str(draw(st.integers(-3, 2)))] if cmd == "survey" else ["--rv-range", str(draw(NUM))],
            ["--scheduler", draw(st.sampled_from(["process", "bogus", "tcp://"]))] if cmd == "survey"
            else ["--method", "aperture"],
            ["--model", draw(st.sampled_from(["default", "@cat", "/nonexistent/m.fits"]))]]), max_size=2))
    return spec


# ---------------------------------------------------------------- the property
def _snapshot(root: Path, skip: Path) -> dict:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and skip not in p.parents:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _write_catalogue(path: Path, payload):
    t, fmt = payload
    tab = Table({k: v for k, v in t.items()}) if t else Table()
    if fmt == "csv":
        tab.write(path, format="ascii.csv", overwrite=True)
    else:
        try:
            tab.write(path, format="fits", overwrite=True)
        except Exception:  # noqa: BLE001 - e.g. non-ASCII ids: FITS cannot hold them; write CSV bytes instead
            tab.write(path, format="ascii.csv", overwrite=True)


def _materialise(spec: dict, ws: Path):
    """Write the inputs of ``spec`` under ``ws/in`` and build the argument list."""
    a = assets()
    inp, out = ws / "in", ws / "out"
    inp.mkdir()
    out.mkdir()
    files = {}

    def put(name, mutation, src):
        p = inp / name
        p.write_bytes(_mutate(Path(a[src]).read_bytes(), *mutation))
        files[name] = p
        return p

    def put_cat(name, c):
        kind, fname, payload = c
        p = inp / f"{name}-{fname}"
        if kind == "bytes":
            p.write_bytes(payload)
        else:
            _write_catalogue(p, payload)
        return p

    cmd = spec["cmd"]
    args = [cmd]
    first_input = None
    suffix = ".fits"
    if cmd in ("extract", "run", "survey"):
        first_input = put("cube.fits", spec["cube"], "cube")
        src = put_cat("sources", spec["sources"])
        args += [first_input, "--sources" if cmd != "survey" else "--sources-from", src]
    if cmd == "prepare":
        for k, (what, mut) in enumerate(spec["inputs"]):
            p = put(f"in{k}-{Path(a[what]).name}", mut, what)
            first_input = first_input or p
            args.append(p)
    if cmd == "fit":
        what, mut = spec["prepared"]
        first_input = put(f"prepared-{Path(a[what]).name}", mut, what)
        args.append(first_input)
    if cmd in ("select", "calibrate"):
        first_input = put_cat("catalogue", spec["catalogue"])
        args.append(first_input)
        if cmd == "select":
            args += ["--where", spec["expr"]]
        else:
            args += ["--offset", f"{spec['expr']}=0.05"]
    if cmd in ("run", "survey") and spec["config"] is not None:
        c = spec["config"]
        if c == "asset":
            p = inp / "config.toml"
            p.write_bytes(Path(a["config"]).read_bytes())
        elif c[0] == "toml":
            p = inp / "config.toml"
            p.write_bytes(c[1].encode("utf-8", "surrogatepass"))
        else:
            p = inp / "config.json"
            p.write_text(json.dumps(c[1], allow_nan=True))
        args += ["--config", p]
    # output
    kind = spec["output"]
    folder_cmd = cmd in ("run", "survey")
    if kind == "input" and first_input is not None and not folder_cmd:
        target = first_input
    elif kind == "deep":
        target = out / "a" / "b" / ("o" if folder_cmd else "o.fits")
    elif kind == "existing_dir":
        (out / "taken").mkdir()
        target = out / "taken"
    elif kind == "unwritable":
        target = Path(UNWRITABLE) / ("o" if folder_cmd else "o.fits")
    elif kind == "odd_name":
        target = out / ("r\u00e9s ?*[x]" + ("" if folder_cmd else suffix))
    elif kind == "hidden":
        target = out / (".o" + ("" if folder_cmd else suffix))
    else:
        target = out / ("o" if folder_cmd else "o.fits")
    args += ["-o", target]
    for opt in spec.get("opts", []):
        for tok in opt:
            if tok == "@per_star":
                args.append(out / "stars")
            elif tok == "@also":
                args.append(out / "also.csv")
            elif tok == "@cat":
                args.append(put("labels.fits", ("same", 0, 0), "cat"))
            else:
                args.append(tok)
    if folder_cmd:
        args.append("--no-progress")
        if cmd == "survey" and "--scheduler" not in [str(x) for x in args]:
            args += ["--scheduler", "process"]
    if spec["json"]:
        args.append("--json")
    return [str(x) for x in args]


def check_case(spec: dict):
    """Run one generated command line in a fresh workspace and assert the contract."""
    ws = Path(tempfile.mkdtemp(prefix="musepayne-fuzz-"))
    try:
        args = _materialise(spec, ws)
        before = _snapshot(ws, ws / "out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = CliRunner().invoke(main, args, catch_exceptions=True)
        where = f"musepayne {' '.join(args)}"
        assert r.exception is None or isinstance(r.exception, SystemExit), \
            f"{where}: uncaught {type(r.exception).__name__}: {r.exception}"
        assert "Traceback" not in r.output, f"{where}: traceback\n{r.output}"
        if r.exit_code not in (0, 1):
            usage = r.exit_code == 2 and "Usage:" in r.stderr
            if not usage:
                if spec["json"]:
                    assert "error" in json.loads(r.stdout), f"{where}: {r.stdout}"
                else:
                    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("musepayne: error:")]
                    assert len(lines) == 1, f"{where}: exit {r.exit_code} without one error line:\n{r.output}"
        elif spec["json"]:
            json.loads(r.stdout.strip().splitlines()[-1],
                       parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(f"{where}: bare {c}")))
        after = _snapshot(ws, ws / "out")
        assert before == after, f"{where}: files outside the output folder changed: " \
                                f"{sorted(set(before.items()) ^ set(after.items()))[:4]}"
        assert not Path(UNWRITABLE).exists()
        leftovers = [p for p in ws.rglob("*.part") if p.is_file()]
        assert not leftovers, f"{where}: temporary files left: {leftovers}"
        for p in (ws / "out").rglob("*.fits"):
            if p.is_file():
                with fits.open(p) as h:  # a final file is complete
                    for hdu in h:
                        _ = hdu.data
        return r
    finally:
        shutil.rmtree(ws, ignore_errors=True)


# ---------------------------------------------------------------- tests (one per command)
@pytest.mark.parametrize("command", ["extract", "prepare", "fit", "select", "calibrate", "simulate"])
def test_fuzz_cli_command(command):
    @FUZZ
    @given(case(command))
    def run(spec):
        check_case(spec)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "survey"])
def test_fuzz_cli_run_survey(command):
    @settings(FUZZ, max_examples=max(2, N_EXAMPLES // 2))
    @given(case(command))
    def run(spec):
        check_case(spec)

    run()


def test_check_case_catches_a_changed_input(monkeypatch):
    """The property can fail: an output written over its input is reported."""
    from musepayne.cli import _common

    monkeypatch.setattr(_common, "check_output_not_input", lambda *a, **k: None)
    monkeypatch.setattr("musepayne.cli.select.check_output_not_input", lambda *a, **k: None)
    spec = {"cmd": "select", "output": "input", "json": False, "expr": "teff > 4000", "opts": [],
            "catalogue": ("bytes", "cat.fits", assets()["cat"].read_bytes())}
    with pytest.raises(AssertionError, match="outside the output folder changed"):
        check_case(spec)
