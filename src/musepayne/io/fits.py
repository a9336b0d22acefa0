"""Atomic output helpers: write to a temporary file in the target folder, then rename.

A reader never sees a half-written file: either the old file (or none) or the
complete new one.  ``os.replace`` is atomic on POSIX and Windows when source
and target are on the same file system, which a sibling temporary file
guarantees.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["atomic_path", "atomic_write_fits", "atomic_write_text", "atomic_write_json", "sha256_file",
           "folder_lock", "FolderBusy", "preallocate", "check_claimed_sizes", "scan_fits_headers", "fits_ascii"]


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


def fits_ascii(table):
    """``table`` with every non-ASCII string escaped (``\\xe9``): FITS stores ASCII only.

    Returns ``table`` itself when nothing needs escaping (the common case), so
    ASCII data are written exactly as before; a path such as ``rés/x.fits`` in a
    ``file`` column no longer makes the whole write fail.

    Parameters
    ----------
    table : astropy.table.Table
        The table to write.

    Returns
    -------
    astropy.table.Table
        ``table`` itself, or a copy with escaped string columns (the caller's table is not changed).
    """
    out = table
    for c in table.colnames:
        col = table[c]
        if getattr(col, "dtype", None) is None or col.dtype.kind not in "UO":
            continue
        vals = np.asarray(col).astype(str) if col.dtype.kind == "O" else np.asarray(col)
        if all(str(v).isascii() for v in vals.ravel()):
            continue
        if out is table:
            out = table.copy(copy_data=False)
        fixed = np.array([str(v).encode("ascii", "backslashreplace").decode("ascii") for v in vals.ravel()])
        out[c] = type(col)(fixed.reshape(vals.shape), name=c, unit=getattr(col, "unit", None),
                           description=getattr(col, "description", None))
    return out


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
    fits_ascii(table).write(buf, format="fits")
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


class FolderBusy(RuntimeError):
    """Another process holds the lock of an output folder.

    Attributes
    ----------
    args : tuple of str
        The message, naming the folder and its lock file.
    """


LOCK_NAME = ".musepayne.lock"


@contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on ``folder`` (``folder/.musepayne.lock``, ``fcntl.flock``).

    The lock belongs to the open file, so the kernel releases it when the
    process dies however it dies (SIGKILL included); the lock file itself is
    left in place (removing it would race with a waiting process).  A second
    holder is refused at once with :class:`FolderBusy` naming the folder.

    Parameters
    ----------
    folder : str or path-like
        The output folder (created when missing).

    Yields
    ------
    pathlib.Path
        The lock file, held until the block ends.

    Raises
    ------
    FolderBusy
        Another process holds the lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(f"{folder} is in use by another musepayne process "
                                 f"(lock {folder / LOCK_NAME}); wait for it to finish") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # releases the lock


def preallocate(fh, nbytes: int, path=None):
    """Reserve ``nbytes`` of disk for the open file ``fh`` (``os.posix_fallocate``).

    A sparse file that is later filled through a memory map dies with SIGBUS
    when the disk runs full; reserving the blocks first turns that into an
    ``OSError(ENOSPC)`` here, before anything is written.

    Parameters
    ----------
    fh : file object
        An open, writable file (its ``fileno()`` is used).
    nbytes : int
        Bytes to reserve; nothing happens for 0 or less.
    path : str or path-like, optional
        Named in the error message.

    Returns
    -------
    None

    Raises
    ------
    OSError
        The disk cannot hold ``nbytes`` (ENOSPC) or the file system refuses.
    """
    if nbytes <= 0:
        return
    fh.flush()
    try:
        os.posix_fallocate(fh.fileno(), 0, int(nbytes))
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return  # the file system cannot preallocate: keep the sparse file
        raise OSError(exc.errno, f"cannot reserve {nbytes / 1e6:.1f} MB on disk ({exc.strerror})",
                      str(path) if path is not None else None) from None



def check_claimed_sizes(hdul, path, error=ValueError):
    """Raise ``error`` when a header of ``hdul`` claims more data than the file ``path`` holds.

    Readers call this right after opening, before any data is read: a 16 KB file whose
    header claims 10^8 layers is refused here instead of allocating gigabytes first.
    Compressed files (gzip etc., tile-compressed HDUs) are not checked.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The opened file.
    path : str or path-like
        Its path (for the file size and the message).
    error : type
        Exception class raised.

    Returns
    -------
    None

    Raises
    ------
    error
        A header claims data beyond the end of the file.
    """
    p = str(path)
    if p.lower().endswith((".gz", ".bz2", ".xz", ".zip")):
        return
    try:
        size = os.path.getsize(p)
    except (OSError, TypeError):
        return
    for k, hdu in enumerate(hdul):
        if isinstance(hdu, fits.CompImageHDU):
            continue
        h = hdu.header
        try:
            naxis = int(h.get("NAXIS", 0))
            n = 1 if naxis > 0 else 0
            for i in range(1, naxis + 1):
                n *= int(h.get(f"NAXIS{i}", 0))
            nbytes = abs(int(h.get("BITPIX", 8))) // 8 * int(h.get("GCOUNT", 1)) * (int(h.get("PCOUNT", 0)) + n)
            info = hdu.fileinfo()
            start = int(info["datLoc"]) if info else None
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
        if start is not None and nbytes > 0 and start + nbytes > size:
            name = hdu.name or f"HDU {k}"
            raise error(f"{path}: {name} header claims {nbytes / 1e6:.1f} MB of data but the file holds "
                        f"{max(0, size - start) / 1e6:.1f} MB (truncated file or corrupt header)")


def scan_fits_headers(path, error=ValueError, max_hdus: int = 1000):
    """Walk the raw headers of the FITS file ``path`` before astropy opens it.

    Raises ``error`` for a negative axis length or a header whose data run past
    the end of the file: astropy would otherwise compute HDU offsets from them
    (a 200 KB cube with ``NAXIS2 = -1`` grew to gigabytes inside ``fits.open``).
    Anything it cannot parse is left to astropy; compressed files are skipped.

    Parameters
    ----------
    path : str or path-like
        The FITS file.
    error : type
        Exception class raised.
    max_hdus : int
        Headers walked at most.

    Returns
    -------
    None

    Raises
    ------
    error
        A negative axis length, or data past the end of the file.
    """
    p = str(path)
    if p.lower().endswith((".gz", ".bz2", ".xz", ".zip")):
        return
    try:
        size = os.path.getsize(p)
        fh = open(p, "rb")
    except (OSError, TypeError):
        return
    with fh:
        pos = 0
        for k in range(max_hdus):
            cards, end = {}, False
            for _ in range(1000):  # header blocks of this HDU
                fh.seek(pos)
                block = fh.read(2880)
                if len(block) < 2880:
                    return
                pos += 2880
                for i in range(0, 2880, 80):
                    card = block[i:i + 80]
                    key = card[:8].strip()
                    if key == b"END":
                        end = True
                        break
                    if card[8:10] == b"= ":
                        cards[key] = card[10:].split(b"/")[0].strip()
                if end:
                    break
            if not end:
                return
            try:
                naxis = int(cards.get(b"NAXIS", b"0"))
                axes = [int(cards.get(b"NAXIS%d" % i, b"0")) for i in range(1, naxis + 1)]
                bitpix = abs(int(cards.get(b"BITPIX", b"8")))
                pcount, gcount = int(cards.get(b"PCOUNT", b"0")), int(cards.get(b"GCOUNT", b"1"))
            except ValueError:
                return
            name = cards.get(b"EXTNAME", b"").strip(b"' ").decode("ascii", "replace") or f"HDU {k}"
            bad = [i + 1 for i, n in enumerate(axes) if n < 0]
            if bad or naxis < 0 or pcount < 0 or gcount < 0:
                raise error(f"{path}: {name} has a negative size in its header (NAXIS{bad[0] if bad else ''}, "
                            "PCOUNT or GCOUNT); corrupt file")
            if cards.get(b"GROUPS", b"") == b"T" and axes:
                axes = axes[1:]
            n = int(np.prod(axes, dtype=object)) if axes else 0
            nbytes = bitpix // 8 * gcount * (pcount + n) if naxis else 0
            if pos + nbytes > size:
                raise error(f"{path}: {name} header claims {nbytes / 1e6:.1f} MB of data but the file holds "
                            f"{max(0, size - pos) / 1e6:.1f} MB (truncated file or corrupt header)")
            pos += -(-nbytes // 2880) * 2880
            if pos >= size:
                return
