"""Property-based fuzzing of the source-catalogue reader and of the fitter's input handling."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.table import Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fit_helpers import as_prepared, toy_stellar_model
from musepayne.extract.extractor import read_source_catalogue
from musepayne.fit.fitter import FitConfig, Fitter
from musepayne.io.spectra import ReaderError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                 derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"))  # reproducible CI runs
COLS = ["stellar_id", "id", "ra", "dec", "x", "y", "mag", "Vmag", "other"]


@FUZZ
@given(cols=st.lists(st.sampled_from(COLS), unique=True, max_size=7), n=st.integers(0, 30),
       dup=st.booleans(), nan_frac=st.floats(0, 1), seed=st.integers(0, 999),
       fmt=st.sampled_from(["csv", "fits", "votable"]))
def test_fuzz_source_catalogues(tmp_path_factory, cols, n, dup, nan_frac, seed, fmt):
    rng = np.random.default_rng(seed)
    t = Table()
    for c in cols:
        if c in ("stellar_id", "id", "other"):
            vals = [f"s{rng.integers(0, 3 if dup else 10**9)}" for _ in range(n)]
            t[c] = np.array(vals, dtype="U16")
        else:
            v = rng.uniform(0, 30, n)
            v[rng.random(n) < nan_frac] = np.nan
            t[c] = v
    p = tmp_path_factory.mktemp("cat") / f"c.{ {'csv': 'csv', 'fits': 'fits', 'votable': 'vot'}[fmt] }".replace(" ", "")
    try:
        t.write(p, format={"csv": "ascii.csv", "fits": "fits", "votable": "votable"}[fmt])
    except Exception:
        return  # astropy cannot write this table in that format: nothing to read
    try:
        out = read_source_catalogue(p)
    except ReaderError as exc:
        assert str(exc)
        return
    assert len(out) == n
    assert len(set(out["stellar_id"])) == len(out)  # ids unique, or a clear error above
    assert "mag" in out.colnames and (("ra" in out.colnames) or ("x_cat" in out.colnames))


MODEL = toy_stellar_model()
# float64: the test is about isolation of rows, not about float32 summation order (which depends on
# the batch size inside BLAS and can move a float32 fit by a fraction of its error)
FITTER = Fitter(MODEL, FitConfig(n_grid=64, precision="float64"))
TRUE = MODEL.predict(np.array([[5200.0, 2.5, -1.0]]))[0]


@FUZZ
@given(kinds=st.lists(st.sampled_from(["ok", "nan", "inf", "zero_ivar", "neg_ivar", "huge", "all_masked",
                                        "few_pixels"]), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_fuzz_fitter_bad_rows(kinds, seed):
    rng = np.random.default_rng(seed)
    n = len(kinds) + 1
    f = np.tile(TRUE, (n, 1)) + rng.normal(0, 0.01, (n, TRUE.size))
    iv = np.full(f.shape, 1e4)
    for i, k in enumerate(kinds, start=1):
        sel = rng.random(TRUE.size) < rng.random()
        if k == "nan":
            f[i, sel] = np.nan
        elif k == "inf":
            f[i, sel] = np.inf
        elif k == "zero_ivar":
            iv[i, sel] = 0
        elif k == "neg_ivar":
            iv[i, sel] = -1
        elif k == "huge":
            f[i, sel] = 1e30
        elif k == "all_masked":
            iv[i] = 0
        elif k == "few_pixels":
            iv[i, 10:] = 0
    cat = FITTER(as_prepared(MODEL.wave, f, iv))
    assert len(cat) == n
    assert all(str(s).split(":")[0] in ("converged", "edge", "not_converged", "failed") for s in cat["status"])
    # row 0 is clean and unaffected by its neighbours
    alone = FITTER(as_prepared(MODEL.wave, f[:1], iv[:1]))
    for k in ("teff", "logg", "fe_h", "rv"):
        assert cat[k][0] == pytest.approx(alone[k][0], abs=0.01 * float(alone[k + "_err"][0]))
    for i, k in enumerate(kinds, start=1):
        if k in ("all_masked", "few_pixels"):
            assert str(cat["status"][i]).startswith("failed") and cat["reason"][i]
