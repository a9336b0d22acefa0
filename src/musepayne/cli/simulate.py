"""``musepayne simulate``: a mock MUSE cube with truth table and source catalogue."""

from __future__ import annotations

import click

from ..simulate.simulator import SimulateConfig, Simulator
from ._common import Timer, emit, exc_text, fail, json_option


@click.command(name="simulate")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Cube file; <stem>_truth.fits and <stem>_sources.csv are written next to it.")
@click.option("--nstars", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=150, show_default=True, help="Spaxels per side.")
@click.option("--nlayers", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Layers from 4749.75 A in 1.25 A steps.")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--mag-range", nargs=2, type=float, default=(16.0, 21.0), show_default=True,
              help="Brightest and faintest magnitude of the luminosity function.")
@json_option
def simulate(output, nstars, size, nlayers, seed, mag_range, as_json):
    """Simulate a crowded MUSE field (King cluster + field stars, Moffat PSF, sky, noise).

    Spectra are the package's toy spectra (no physical labels); use
    musepayne.simulate.simulator.Simulator with CallableSpectra or LibrarySpectra from
    Python to plug in a model or real library spectra.
    """

    timer = Timer()
    try:
        cfg = SimulateConfig(nx=size, ny=size, nlayers=nlayers, nstars=nstars, seed=seed,
                             mag_bright=mag_range[0], mag_faint=mag_range[1], king_rc=max(5.0, size / 4.0))
        with timer("simulate"):
            out = Simulator(cfg).write(output)
    except (ValueError, OSError) as exc:
        fail(exc_text(exc), as_json)
    info = {**out, "shape": [nlayers, size, size], "timings": timer.timings}
    lines = [f"simulated {nstars} stars ({out['n_in_field']} in the field), {size}x{size} spaxels x {nlayers} layers",
             f"cube: {out['cube']}", f"truth: {out['truth']}", f"sources: {out['sources']}",
             f"time: {timer.timings['simulate']:.1f}s"]
    emit(info, as_json, lines)
