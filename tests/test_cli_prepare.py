import json

from click.testing import CliRunner

from musepayne.cli import main
from musepayne.io.prepared import PreparedSpectra


def test_help_lists_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "prepare" in r.output


def test_prepare_cli_json_and_read_errors(shared, tmp_path):
    out = tmp_path / "p.fits"
    bad = tmp_path / "broken.fits"
    bad.write_text("garbage")
    args = [str(shared / "muse/spectra/ngc6397_id10554_pampelmuse.fits"),
            str(shared / "lamost/dr6_dr7/spec-58397-EG014118N254444M01_sp03-031.fits"),
            str(shared / "libraries/miles/MILES_res2.50_star_m0001V.fits"), str(bad),
            "-o", str(out), "--json"]
    r = CliRunner().invoke(main, ["prepare", *args])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["n_spectra"] == 4 and info["counts"] == {"ok": 3, "read_error": 1}
    p = PreparedSpectra.read(out)
    assert p.flux.shape == (4, 3909)
    assert set(p.spectra["instrument"]) == {"muse", "lamost", "miles", "unknown"}
    row = p.spectra[p.spectra["status"] == "read_error"][0]
    assert "not a readable FITS" in row["reason"]
    assert p.spectra["teff"][2] == 5305.0
    assert p.meta["mode"] == "standard"


def test_demo_main_job(tmp_path):
    """The README's main job, on a smaller field: simulate, run the pipeline, compare with truth."""
    out = tmp_path / "d"
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "--nstars", "80", "--size", "40", "--no-progress",
                                  "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["n_observations"] == 80
    assert info["counts"].get("converged", 0) + info["counts"].get("edge", 0) >= 30
    assert (out / "report" / "index.html").exists() and (out / "catalogue_stars.fits").exists()
    # RVs of the stars it fitted are recovered (most are faint; bright-star accuracy is tested elsewhere)
    assert abs(info["truth"]["rv"]["bias"]) < 2.0


def test_outputs_are_not_private(tmp_path):
    import os
    import stat

    from musepayne.io.fits import atomic_write_text

    p = tmp_path / "x.txt"
    atomic_write_text("hi", p)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
