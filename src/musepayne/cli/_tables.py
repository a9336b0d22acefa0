"""Catalogue table I/O for the subcommands: format from the suffix, atomic writes."""

from __future__ import annotations

import warnings
from pathlib import Path

from astropy.io.fits.verify import VerifyWarning
from astropy.table import Table

from ..io.fits import atomic_path

__all__ = ["table_format", "read_table", "write_table"]

_FORMATS = {".fits": "fits", ".fit": "fits", ".fits.gz": "fits", ".ecsv": "ascii.ecsv", ".csv": "ascii.csv",
            ".parquet": "parquet", ".txt": "ascii.basic", ".dat": "ascii.basic", ".vot": "votable",
            ".xml": "votable", ".hdf5": "hdf5"}


def table_format(path) -> str:
    name = Path(path).name.lower()
    for suf in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(suf):
            return _FORMATS[suf]
    raise ValueError(f"cannot tell the table format of {path} from its suffix; use one of {sorted(_FORMATS)}")


def read_table(path):
    """Read a catalogue (FITS, ECSV, CSV, Parquet, ...); a clear error if it cannot."""

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such catalogue: {p}")
    try:
        fmt = table_format(p)
    except ValueError:
        fmt = None
    try:
        return Table.read(p, format=fmt) if fmt else Table.read(p)
    except Exception as exc:  # noqa: BLE001 - report any reader failure clearly
        raise ValueError(f"cannot read catalogue {p}: {exc}") from None


def write_table(table, path):
    """Write ``table`` atomically; the format comes from the suffix of ``path``."""


    fmt = table_format(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)  # long meta keys become HIERARCH cards
        table.write(tmp, format=fmt, overwrite=True)
    return Path(path)
