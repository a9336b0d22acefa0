"""``musepayne select``: the paper's selection cuts and custom expressions on a catalogue."""

from __future__ import annotations

import click

from ..science import selection as sel
from ._common import Timer, emit, fail, json_option
from ._tables import read_table, write_table


@click.command(name="select")
@click.argument("catalogue", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the selected rows here (format from the suffix: .fits, .ecsv, .csv, .parquet).")
@click.option("--preset", help="reliable (labels to trust: S/N > 80, red_chi2 < 20, Teff > 4300 K, fit_flags == 0, "
                               "every X_flag == 1, extraction status ok), eq5 (cross-validation, Eq. 5), eq6 "
                               "(bulge, Eq. 6, best corr_flux per star), eq8 (abundance analysis, Eq. 8). "
                               "--list-presets shows each in full.")
@click.option("--where", "where", help="Custom cut, e.g. \"teff > 4300 and abs(rv) < 300 and fe_h_flag == 1\".")
@click.option("--best-per-star/--all-repeats", "best", default=None,
              help="Keep only the highest --by row per --id-col (default: the preset's own rule).")
@click.option("--by", default="corr_flux", show_default=True, help="Column ranking repeats for --best-per-star.")
@click.option("--id-col", default="stellar_id", show_default=True, help="Star identifier column.")
@click.option("--list-presets", is_flag=True, help="List the presets and exit.")
@json_option
def select_cmd(catalogue, output, preset, where, best, by, id_col, list_presets, as_json):
    """Select rows of CATALOGUE with a preset and/or a safe expression (both: AND).

    Expressions may use column names, numbers, quoted strings, comparisons,
    and/or/not, & | ~, + - * / ** %, and abs, isfinite, isnan, sqrt, log10,
    exp, minimum, maximum, bit(col, k).  Nothing else is evaluated.
    """

    if list_presets:
        seen = {}
        for k, p in sel.PRESETS.items():
            seen.setdefault(p.name, []).append(k)
        info = {"presets": {p: {"aliases": ks, "equation": sel.PRESETS[p].equation,
                                "expression": sel.PRESETS[p].expression,
                                "best_per_star": sel.PRESETS[p].best_per_star,
                                "description": sel.PRESETS[p].description} for p, ks in seen.items()}}
        lines = [f"{p} ({', '.join(ks[1:])}) {sel.PRESETS[p].equation}: {sel.PRESETS[p].expression}"
                 + (" + best corr_flux per star" if sel.PRESETS[p].best_per_star else "")
                 for p, ks in seen.items()]
        emit(info, as_json, lines)
        return
    if not catalogue:
        fail("give a CATALOGUE (or --list-presets)", as_json)
    if not preset and not where and not best:
        fail("give --preset and/or --where (or --best-per-star)", as_json)

    timer = Timer()
    try:
        with timer("read"):
            table = read_table(catalogue)
        with timer("select"):
            out = sel.select(table, where, preset, best=best, id_col=id_col, by=by)
        if output:
            with timer("write"):
                write_table(out, output)
    except (sel.SelectionError, KeyError, ValueError, FileNotFoundError) as exc:
        fail(str(exc.args[0]) if exc.args else str(exc), as_json)
        return
    info = {"input": catalogue, "output": output, "n_in": len(table), "n_selected": len(out),
            "selection": out.meta["selection"], "timings": timer.timings}
    lines = [f"{len(out)} of {len(table)} rows pass: {out.meta['selection']}"]
    lines.append(f"written: {output}" if output else "(no --output: nothing written)")
    emit(info, as_json, lines)
