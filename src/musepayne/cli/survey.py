"""``musepayne survey``: many cubes -> one store, on Dask (or in process)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import Progress

from ..pipeline.runner import read_config_file
from ..pipeline.survey import Survey, SurveyConfig, sources_resolver
from ._common import check_output_not_input, emit, exc_text, fail, json_option


@click.command(name="survey")
@click.argument("cubes", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--manifest", "cube_list", type=click.Path(exists=True, dir_okay=False),
              help="Text file with one cube path per line (instead of CUBE arguments).")
@click.option("-o", "--store", required=True, type=click.Path(file_okay=False), help="Output store folder.")
@click.option("--sources-dir", type=click.Path(exists=True, file_okay=False),
              help="Folder with one source catalogue per cube (<cube stem>.csv/.fits/.vot).")
@click.option("--sources-from", type=click.Path(exists=True, dir_okay=False),
              help="One source catalogue for all cubes (each cube reports stars off its field).")
@click.option("--scheduler", default="local", show_default=True,
              help="'local' (a Dask LocalCluster), 'process' (no Dask), or a scheduler address tcp://...")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local workers (default: number of cores).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML/JSON file with run options applied to every cube (see 'musepayne run').")
@click.option("--model", default=None, help="Model file or 'default'.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="Retries of a failing cube.")
@click.option("--merged-fits", is_flag=True, help="Also write STORE/catalogue.fits.")
@click.option("--progress/--no-progress", default=True)
@json_option
def survey(cubes, cube_list, store, sources_dir, sources_from, scheduler, workers, config_file, model, retries,
           merged_fits, progress, as_json):
    """Run extract -> prepare -> fit for every cube; merge into a partitioned catalogue.

    Re-running skips cubes already done with the same inputs and configuration,
    redoes changed ones and retries failures (up to --retries).  A worker that
    dies mid-cube leaves nothing half-written in STORE.
    """

    paths = list(cubes)
    if cube_list:
        paths += [ln.strip() for ln in Path(cube_list).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not paths:
        fail("no cubes given (CUBE arguments or --manifest FILE)", as_json)
    check_output_not_input(store, [*paths, cube_list, sources_from, config_file], as_json, what="store")
    try:
        resolve = sources_resolver(sources_dir, sources_from)
    except ValueError as exc:
        fail(exc_text(exc), as_json)
    try:
        opts = read_config_file(config_file) if config_file else {}
    except ValueError as exc:
        fail(f"bad configuration: {exc}", as_json)
    if model:
        opts["model"] = model
    try:
        cfg = SurveyConfig(run_options=opts, retries=retries, scheduler=scheduler, workers=workers,
                           merged_fits=merged_fits)
        cfg.run_config()  # a bad run option is refused before any cube is touched
    except ValueError as exc:
        fail(f"bad configuration: {exc}", as_json)
    Path(store).mkdir(parents=True, exist_ok=True)  # an unwritable store fails here, before any work
    prog, bar = None, None
    if progress and not as_json:
        prog = Progress()
        prog.start()
        task = prog.add_task("cubes", total=len(paths))

        def _update(done, total):
            prog.update(task, completed=done, total=total)

        bar = _update
    try:
        summary = Survey(store, cfg, progress=bar, log=(lambda *_: None) if as_json else click.echo).run(paths, resolve)
    finally:
        if prog is not None:
            prog.stop()
    emit(summary, as_json, [
        f"survey: {summary['n_cubes']} cube(s): {summary['processed']} processed, {summary['skipped']} skipped, "
        f"{len(summary['failed'])} failed; {summary['n_observations']} observations in {store}/catalogue/",
        *(f"  failed: {c}" for c in summary["failed"]),
    ])
    if summary["failed"]:
        sys.exit(1)  # finished, but not every cube
