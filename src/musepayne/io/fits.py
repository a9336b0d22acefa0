"""Atomic output helpers: write to a temporary file in the target folder, then rename.

A reader never sees a half-written file: either the old file (or none) or the
complete new one.  ``os.replace`` is atomic on POSIX and Windows when source
and target are on the same file system, which a sibling temporary file
guarantees.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from astropy.io import fits

__all__ = ["atomic_path", "atomic_write_fits", "atomic_write_text", "atomic_write_json", "sha256_file"]


@contextmanager
def atomic_path(path, overwrite: bool = True):
    """Context manager yielding a temporary path; renamed to ``path`` on success.

    The temporary file is a sibling of ``path`` (same folder, so the rename is atomic) and is
    deleted if the body raises.  Missing parent folders are created.

    Parameters
    ----------
    path : str or os.PathLike
        The final file.
    overwrite : bool, optional
        If False and ``path`` exists, raise instead of replacing it (default True).

    Yields
    ------
    pathlib.Path
        The temporary file to write (it exists, empty, with mode 0600 until renamed).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (use overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_fits(hdulist, path, overwrite: bool = True):
    """Write an HDU list to ``path`` atomically (``output_verify="silentfix"``).

    Parameters
    ----------
    hdulist : astropy.io.fits.HDUList
        What to write.
    path : str or os.PathLike
        Target file.
    overwrite : bool, optional
        Replace an existing file (default True).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    with atomic_path(path, overwrite) as tmp:
        hdulist.writeto(tmp, overwrite=True, output_verify="silentfix")


def table_hdu(table, name: str):
    """A FITS binary-table HDU of ``table`` that keeps what ``Table.write`` keeps.

    Column units, descriptions and table meta (astropy's serialized-metadata comment cards) are
    kept, unlike a bare ``fits.table_to_hdu``; ``Table.read(hdu)`` restores them.

    Parameters
    ----------
    table : astropy.table.Table
        The table.
    name : str
        EXTNAME of the HDU.

    Returns
    -------
    astropy.io.fits.BinTableHDU
        A copy detached from the in-memory file it was written to.
    """


    buf = io.BytesIO()
    table.write(buf, format="fits")
    buf.seek(0)
    with fits.open(buf) as hl:
        hdu = hl[1].copy()
    hdu.name = name
    return hdu


def atomic_write_text(text: str, path, overwrite: bool = True):
    """Write a text file atomically.

    Parameters
    ----------
    text : str
        File contents.
    path : str or os.PathLike
        Target file.
    overwrite : bool, optional
        Replace an existing file (default True).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    with atomic_path(path, overwrite) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(obj, path, overwrite: bool = True):
    """Write ``obj`` as indented JSON (sorted keys, ``str`` for other types) atomically.

    Parameters
    ----------
    obj : object
        JSON-serialisable object; values json cannot encode are written as ``str(value)``.
    path : str or os.PathLike
        Target file.
    overwrite : bool, optional
        Replace an existing file (default True).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path, overwrite)


def check_format(header, path, name: str, max_version: int, what: str, error=ValueError,
                 version_key: str = "MPVERS", hint: str = "") -> int:
    """Check the primary ``header`` of one of the package's FITS formats and return its version.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Primary header of the file.
    path : str or os.PathLike
        The file (for messages only).
    name : str
        Expected value of the ``MPFORMAT`` card.
    max_version : int
        Newest format version this code reads.
    what : str
        Names the file kind in the messages.
    error : type, optional
        Exception class to raise (the reader's own), default ValueError.
    version_key : str, optional
        Header card holding the version (default ``MPVERS``; missing reads as 0).
    hint : str, optional
        Appended to the not-this-format message.

    Returns
    -------
    int
        The format version.

    Raises
    ------
    error
        Unless ``MPFORMAT == name`` and the version is an integer no newer than ``max_version``.
    """
    found = header.get("MPFORMAT")
    if found != name:
        got = "MPFORMAT missing" if found is None else f"MPFORMAT = {found!r}"
        raise error(f"{path}: not a musepayne {what} file ({got}, expected {name!r}){hint}")
    try:
        version = int(header.get(version_key, 0))
    except (TypeError, ValueError):
        raise error(f"{path}: unreadable {what} format version {version_key} = {header.get(version_key)!r}") from None
    if version > max_version:
        raise error(f"{path}: {what} format version {version} is newer than this musepayne reads "
                    f"({max_version}); upgrade musepayne")
    return version


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    chunk : int, optional
        Read size in bytes (default 1 MiB).

    Returns
    -------
    str
        64-character lower-case hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
