"""CLI: musepayne model import / info and musepayne fit on real APOGEE data."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fit_helpers import APOGEE_LABELS, as_prepared, load_apogee
from musepayne.cli import main
from musepayne.fit.catalogue import read_catalogue


def test_fit_default_model_on_a_wrong_grid_is_a_failed_row(tmp_path):
    """Without --model the shipped default (LAMOST grid) is used; spectra on another grid
    become failed rows with a reason, not a crash; the catalogue is written and the exit code
    is 1 (no spectrum could be fitted)."""
    from astropy.table import Table

    from musepayne.testing import toy_mlp_model

    m = toy_mlp_model(np.linspace(5000, 5100, 200), hidden=(8, 8), n_lines=10)
    prep = tmp_path / "p.fits"
    as_prepared(m.wave, np.ones((1, 200)), np.ones(200)).write(prep)
    r = CliRunner().invoke(main, ["fit", str(prep), "-o", str(tmp_path / "o.fits"), "--json"])
    assert r.exit_code == 1, r.output
    assert json.loads(r.output)["counts"] == {"failed": 1}
    t = Table.read(tmp_path / "o.fits")
    assert t["status"][0] == "failed:bad_wavelength" and t["model"][0] == "musepayne-default-miles-stelib"


@pytest.mark.shared
def test_cli_import_info_fit_apogee(shared, tmp_path):
    d = shared / "payne_apogee"
    model_path = tmp_path / "apogee.fits"
    runner = CliRunner()
    r = runner.invoke(main, ["model", "import", str(d / "NN_normalized_spectra.npz"), "--format", "payne-perpixel",
                             "--labels", ",".join(APOGEE_LABELS), "--wavelength", str(d / "apogee_wavelength.npz"),
                             "--vacuum", "-o", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_pix"] == 7214
    r = runner.invoke(main, ["model", "info", str(model_path), "--json"])
    info = json.loads(r.output)
    assert [x["name"] for x in info["labels"]] == APOGEE_LABELS and info["frame"] == "vacuum"
    assert info["meta"]["imported_from"] == "NN_normalized_spectra.npz"

    model, mask, flux, err = load_apogee(shared)
    ivar = np.where(mask, 0.0, 1.0 / err**2)
    flux2 = np.vstack([flux, flux, np.full_like(flux, np.nan)])
    prep = tmp_path / "apogee_prepared.fits"
    as_prepared(model.wave, flux2, np.vstack([ivar, ivar, ivar])).write(prep)
    out = tmp_path / "labels.fits"
    r = runner.invoke(main, ["fit", str(prep), "--model", str(model_path), "-o", str(out),
                             "--also", str(tmp_path / "labels.csv"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["n_spectra"] == 3 and res["counts"] == {"converged": 2, "failed": 1}
    cat = read_catalogue(out)
    assert list(cat["status"]) == ["converged", "converged", "failed:no_valid_pixels"]
    assert 4500 < cat["teff"][0] < 5500 and cat["teff"][0] == cat["teff"][1]
    assert (tmp_path / "labels.csv").exists()
    r = runner.invoke(main, ["fit", str(prep), "--model", str(model_path), "-o", str(out)])
    assert r.exit_code == 0 and "fitted 3 spectra" in r.output


def test_fit_streams_file_rows_and_catalogue(tmp_path):
    """PreparedSpectra.open reads the same values as read(); 'musepayne fit' (rows read in
    blocks, catalogue written as blocks finish) writes the file write_catalogue writes for the
    library's catalogue, byte for byte, and the CSV export has the same rows."""
    from astropy.table import Table

    from musepayne.fit import FitConfig, Fitter
    from musepayne.fit.catalogue import CatalogueStream, write_catalogue
    from musepayne.instrument.wavelength import lamost_wavelength
    from musepayne.io.prepared import FitsRows, PreparedSpectra
    from musepayne.testing import toy_mlp_model

    m = toy_mlp_model(lamost_wavelength(), hidden=(16, 16), n_lines=100, seed=4)
    rng = np.random.default_rng(5)
    n = 40
    s = rng.uniform(-0.3, 0.3, (n, m.n_labels))
    flux = m.predict_scaled(s) + rng.normal(size=(n, m.n_pix)) / 100
    ivar = np.full(flux.shape, 1e4)
    ivar[3] = 0  # failed row
    exc = np.tile(np.where(m.wave < 5000, 2.0, 0.0), (n, 1))
    as_prepared(m.wave, flux, ivar, lsf_excess=exc).write(tmp_path / "p.fits")
    a, b = PreparedSpectra.read(tmp_path / "p.fits"), PreparedSpectra.open(tmp_path / "p.fits")
    assert isinstance(b.flux, FitsRows) and b.flux.dtype == np.float32
    for name in ("flux", "ivar", "mask", "lsf_excess", "cont"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x, np.asarray(y, x.dtype))
        assert np.array_equal(x[[2, 5, 39]], y[[2, 5, 39]]) and np.array_equal(x[7:19], y[7:19])
    b.close()
    from musepayne.models.files import load_model

    m.save(tmp_path / "m.fits")
    m = load_model(tmp_path / "m.fits")
    from musepayne.threads import blas_threads

    with blas_threads(1):  # as the CLI (floating-point sums may depend on BLAS threads)
        cat = Fitter(m, FitConfig())(a)
    write_catalogue(cat, tmp_path / "lib.fits")
    r = CliRunner().invoke(main, ["fit", str(tmp_path / "p.fits"), "--model", str(tmp_path / "m.fits"),
                                  "-o", str(tmp_path / "cli.fits"), "--also", str(tmp_path / "cli.csv"),
                                  "--threads", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_spectra"] == n
    assert (tmp_path / "cli.fits").read_bytes() == (tmp_path / "lib.fits").read_bytes()
    assert np.array_equal(Table.read(tmp_path / "cli.csv")["teff"], np.asarray(cat["teff"]), equal_nan=True)
    # blocks of 8 spectra fitted in two processes: the same file
    r = CliRunner().invoke(main, ["fit", str(tmp_path / "p.fits"), "--model", str(tmp_path / "m.fits"),
                                  "-o", str(tmp_path / "proc.fits"), "--processes", "2", "--block-size", "8",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["processes"] == 2
    assert (tmp_path / "proc.fits").read_bytes() == (tmp_path / "lib.fits").read_bytes()
    assert not list(tmp_path.glob(".proc.fits*"))  # no part files or spool left
    # the stream re-pads string columns that a later block has wider (reason of the failed row)
    with CatalogueStream(tmp_path / "stream.fits") as out:
        for k in range(0, n, 7):
            out.add(cat[k:k + 7])
    assert (tmp_path / "stream.fits").read_bytes() == (tmp_path / "lib.fits").read_bytes()
    assert Table.read(tmp_path / "stream.fits")["status"][3].startswith("failed")


class _StubFitter:
    """Blocks of one row each; a worker process dies on the first block >= ``die`` it draws (None: never)."""

    def __init__(self, n, die=None):
        import os

        self.n, self.die, self.parent = n, die, os.getpid()

    def plan_blocks(self, data):
        from musepayne.fit.fitter import BlockPlan

        z = np.full(self.n, "", dtype=object)
        return BlockPlan(1, z, z.copy(), np.ones(self.n, bool), [(i, i + 1) for i in range(self.n)])

    def fit_blocks(self, data, plan=None, take=None):
        import os
        import time
        from types import SimpleNamespace

        for j in take:
            time.sleep(0.005)
            if self.die is not None and j >= self.die and os.getpid() != self.parent:
                os._exit(3)
            a, b = plan.bounds[j]
            yield a, b, SimpleNamespace(status=["ok"], pid=os.getpid())

    def catalogue(self, spectra, res):
        from astropy.table import Table

        return Table({"row": np.asarray(spectra)})


def test_fit_processes_draw_blocks_and_write_them_in_row_order(tmp_path):
    """Blocks go to whichever process is free (a shared counter); they come back in row order,
    each exactly once; a worker that dies is a clear error, not a hang or a short catalogue."""
    from types import SimpleNamespace

    from musepayne.cli.fit import _decode_part, _fit_in_processes

    data = SimpleNamespace(spectra=np.arange(60))
    got = list(_fit_in_processes(_StubFitter(60), data, 3, tmp_path / "c.fits"))
    assert [a for a, _, _ in got] == list(range(60))
    here = [r for _, _, r in got if not isinstance(r, bytes)]
    there = [r for _, _, r in got if isinstance(r, bytes)]
    assert here and there and len(here) + len(there) == 60  # every process took blocks
    from astropy.io import fits

    rows = [int(fits.HDUList.fromstring(_decode_part(r)[1])[1].data["row"][0]) for r in there]
    assert set(rows) == {a for a, _, r in got if isinstance(r, bytes)}
    assert not list(tmp_path.glob(".c.fits*"))
    with pytest.raises(RuntimeError, match="fitting process failed"):
        list(_fit_in_processes(_StubFitter(60, die=40), data, 2, tmp_path / "d.fits"))
    assert not list(tmp_path.glob(".d.fits*"))
