"""``musepayne demo``: the main job on an embedded default."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ._common import Timer, emit, json_option


@click.command(name="demo")
@click.option("-o", "--outdir", default="musepayne-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's inputs and outputs.")
@click.option("--snr", default=100.0, show_default=True, help="S/N per pixel of the simulated spectrum.")
@click.option("--seed", default=1, show_default=True, help="Random seed of the noise.")
@json_option
def demo(outdir, snr, seed, as_json):
    """Make a MUSE-like spectrum with the package's own toy model, prepare it, report.

    Needs no arguments, no data and no network.  Writes a PampelMUSE-style
    input spectrum and the prepared file into OUTDIR and prints where.
    """
    from astropy.io import fits

    from ..flags import decode_mask
    from ..io import atomic_write_fits
    from ..prepare import Preparer
    from ..readers import read_spectra
    from ..toyspec import muse_grid, toy_spectrum

    timer = Timer()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with timer("simulate"):
        wave = muse_grid()
        flux = 1e4 * toy_spectrum(wave, rv_kms=18.8)
        sigma = flux / snr
        noisy = flux + rng.normal(0.0, 1.0, flux.size) * sigma
        ph = fits.PrimaryHDU(noisy.astype(np.float32))
        for k, v in (("CRVAL1", wave[0]), ("CDELT1", 1.25), ("CRPIX1", 1.0), ("CTYPE1", "AWAV"),
                     ("CUNIT1", "Angstrom"), ("OBJNAME", "musepayne-demo-toy")):
            ph.header[k] = v
        spec_path = out / "demo_muse_spectrum.fits"
        atomic_write_fits(fits.HDUList([ph, fits.ImageHDU(sigma.astype(np.float32), name="SIGMA")]), spec_path)
    with timer("prepare"):
        prepared = Preparer()(read_spectra(spec_path))
        prep_path = out / "demo_prepared.fits"
        prepared.write(prep_path)
    row = prepared.spectra[0]
    used = prepared.ivar[0] > 0
    info = {
        "outdir": str(out),
        "input": str(spec_path),
        "prepared": str(prep_path),
        "status": str(row["status"]),
        "snr": float(row["snr"]),
        "snr_prepared": float(row["snr_prepared"]),
        "n_used": int(row["n_used"]),
        "timings": timer.timings,
    }
    flags = {}
    for m in np.unique(prepared.mask[0]):
        for name in decode_mask(m):
            flags[name] = flags.get(name, 0) + int(np.count_nonzero(prepared.mask[0] == m))
    lines = [
        f"demo: simulated a MUSE-like spectrum (S/N {snr:g}) -> {spec_path}",
        f"prepared onto the LAMOST grid ({prepared.wave.size} px, vacuum) -> {prep_path}",
        f"status {row['status']}, {int(row['n_used'])} pixels used, S/N per pixel {row['snr']:.1f} "
        f"(native) / {row['snr_prepared']:.1f} (prepared)",
        f"median normalised flux over used pixels: {np.nanmedian(prepared.flux[0][used]):.3f}",
        "pixel flags: " + ", ".join(f"{k}={v}" for k, v in sorted(flags.items())),
        f"outputs are in {out.resolve()}",
    ]
    emit(info, as_json, lines)
