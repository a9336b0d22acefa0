"""The prepared-spectra interchange format (what ``prepare`` writes, ``fit`` reads).

One FITS file:

========== ===================================================================
HDU        content
========== ===================================================================
primary    header only: ``MPFORMAT='musepayne-prepared'``, ``MPVERS`` (format
           version), ``FRAME='vacuum'``, ``MODE``, ``TGTLSF`` (target LSF),
           ``CONTWID`` (continuum kernel sigma, A), software version
``WAVE``   (n_pix,) float64, vacuum Angstrom, pixel centres
``FLUX``   (n_spectra, n_pix) float32, continuum-normalised flux
``IVAR``   (n_spectra, n_pix) float32, inverse variance of ``FLUX``; 0 where masked
``MASK``   (n_spectra, n_pix) int32 bit mask (:mod:`musepayne.flags`)
``LSF_EXCESS`` (n_spectra, n_pix) float32, FWHM (A) by which the data are
           broader than the target LSF (0 where matched); a fit may convolve
           its model by it
``CONT``   (n_spectra, n_pix) float32, the pseudo-continuum divided out
           (in the input's flux units, after resolution matching)
``SPECTRA`` table, one row per spectrum: stellar_id, ra, dec, snr,
           snr_prepared, status, reason, source, instrument, n_used, plus any
           label columns the input carried (teff, logg, fe_h, ...)
========== ===================================================================

Rows of failed spectra are kept (flux NaN, ivar 0, status says why).

:meth:`PreparedSpectra.read` loads every array (float64); :meth:`PreparedSpectra.open` reads
only the headers and the ``SPECTRA`` table and gives row-readers (:class:`FitsRows`) for the
arrays, which read the requested rows from the file when indexed, so a consumer that works in
chunks (the fitter) holds one chunk in memory, whatever the number of spectra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack

from .. import __version__
from ..flags import PIXEL_FLAGS
from .fits import atomic_write_fits, check_format
from .spectra import ReaderError

__all__ = ["PreparedSpectra", "FitsRows", "FORMAT_NAME", "FORMAT_VERSION", "SPECTRA_COLUMNS"]

FORMAT_NAME = "musepayne-prepared"
FORMAT_VERSION = 1

#: Descriptions (and units) of the standard SPECTRA columns.
SPECTRA_COLUMNS = {
    "stellar_id": ("", "identifier of the star / spectrum"),
    "ra": ("deg", "right ascension (ICRS) if known"),
    "dec": ("deg", "declination (ICRS) if known"),
    "snr": ("", "median S/N per native pixel over used wavelengths (bulge mode: lambda > 5991 A)"),
    "snr_prepared": ("", "median S/N per prepared (model-grid) pixel over used pixels"),
    "n_used": ("", "number of prepared pixels with IVAR > 0"),
    "status": ("", "spectrum status (musepayne.flags.SPECTRUM_STATUS)"),
    "reason": ("", "human-readable reason when status is not 'ok'"),
    "source": ("", "input file"),
    "instrument": ("", "input kind: muse, lamost, miles, stelib"),
    "teff": ("K", "literature effective temperature (libraries, training sets)"),
    "logg": ("", "literature surface gravity log10(g / cm s^-2), dex"),
    "fe_h": ("", "literature [Fe/H], dex"),
}


class FitsRows:
    """Rows of a 2-D FITS image read from the file on demand (read-only, thread-safe).

    ``rows[i]``, ``rows[a:b]`` and ``rows[index_array]`` return new ndarrays in the native
    byte order of the file's type (``float32`` / ``int32``), exactly the values
    :meth:`PreparedSpectra.read` would give before its float64 conversion.  Each access
    reads only the rows' bytes (``os.pread``), so memory does not grow with the image;
    ``np.asarray(rows)`` reads the whole image.  ``close()`` (or :meth:`PreparedSpectra.close`)
    releases the file.
    """

    def __init__(self, path, offset: int, shape: tuple, dtype):
        import os

        self.path = str(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.ndim = 2
        self._file_dtype = np.dtype(dtype)
        self.dtype = self._file_dtype.newbyteorder("=")
        self._offset = int(offset)
        self._row_bytes = self.shape[1] * self._file_dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self):
        return self.shape[0]

    def rows(self, a: int, b: int) -> FitsRows:
        """A reader of rows ``a .. b-1`` only (no data read)."""
        a, b = max(0, min(int(a), self.shape[0])), max(0, min(int(b), self.shape[0]))
        return FitsRows(self.path, self._offset + a * self._row_bytes, (max(b - a, 0), self.shape[1]),
                        self._file_dtype)

    def close(self):
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read(self, a: int, b: int) -> np.ndarray:
        """Rows ``a .. b-1`` (native byte order)."""
        import os

        if self._fd is None:
            raise ValueError(f"{self.path}: rows read after close()")
        n = max(b - a, 0)
        buf = bytearray(n * self._row_bytes)
        view, pos, off = memoryview(buf), 0, self._offset + a * self._row_bytes
        while pos < len(buf):  # pread may return fewer bytes than asked
            got = os.preadv(self._fd, [view[pos:]], off + pos)
            if got <= 0:
                raise OSError(f"{self.path}: file ends inside the data")
            pos += got
        return np.frombuffer(buf, self._file_dtype).reshape(n, self.shape[1]).astype(self.dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            rows, rest = key[0], key[1:]
            return self[rows][(slice(None),) + rest] if not np.isscalar(rows) else self[rows][rest]
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= k < self.shape[0]:
                raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
            return self._read(k, k + 1)[0]
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step == 1:
                return self._read(a, max(a, b))
            idx = np.arange(a, b, step)
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = np.where(idx < 0, idx + self.shape[0], idx).astype(np.int64)
        if idx.size == 0:
            return np.empty((0, self.shape[1]), self.dtype)
        if idx.min() < 0 or idx.max() >= self.shape[0]:
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo <= 4 * idx.size:  # one read of the span (chunks of consecutive rows)
            return self._read(lo, hi)[idx - lo]
        out = np.empty((idx.size, self.shape[1]), self.dtype)
        for j, i in enumerate(idx):
            out[j] = self._read(int(i), int(i) + 1)[0]
        return out

    def __array__(self, dtype=None, copy=None):
        a = self._read(0, self.shape[0])
        return a if dtype is None else a.astype(dtype, copy=False)


def _rows_of(path, hdu):
    """A :class:`FitsRows` for image ``hdu`` when its data are plain (no BSCALE/BZERO), else None."""
    hd = hdu.header
    if hd.get("NAXIS") != 2 or hd.get("BSCALE", 1) != 1 or hd.get("BZERO", 0) != 0:
        return None
    dt = {-32: ">f4", -64: ">f8", 32: ">i4", 16: ">i2"}.get(hd.get("BITPIX"))
    if dt is None:
        return None
    return FitsRows(path, hdu.fileinfo()["datLoc"], (hd["NAXIS2"], hd["NAXIS1"]), dt)


@dataclass(frozen=True, eq=False)
class PreparedSpectra:
    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    lsf_excess: np.ndarray
    cont: np.ndarray
    spectra: Table
    meta: dict = field(default_factory=dict)

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    # ------------------------------------------------------------------ I/O
    def to_hdulist(self) -> fits.HDUList:
        ph = fits.Header()
        ph["MPFORMAT"] = (FORMAT_NAME, "musepayne interchange format")
        ph["MPVERS"] = (FORMAT_VERSION, "format version")
        ph["MPSOFT"] = (__version__, "musepayne version that wrote the file")
        ph["FRAME"] = ("vacuum", "wavelength frame of WAVE")
        for k, v in self.meta.items():
            key = k.upper()[:8]
            ph[key] = v if not isinstance(v, str) else v[:68]
        hw = fits.ImageHDU(np.asarray(self.wave, np.float64), name="WAVE")
        hw.header["BUNIT"] = "Angstrom"
        hw.header["CTYPE1"] = "WAVE"
        hf = fits.ImageHDU(np.asarray(self.flux, np.float32), name="FLUX")
        hf.header["BUNIT"] = ("", "continuum-normalised flux")
        hi = fits.ImageHDU(np.asarray(self.ivar, np.float32), name="IVAR")
        hm = fits.ImageHDU(np.asarray(self.mask, np.int32), name="MASK")

        for f in PIXEL_FLAGS.values():
            hm.header[f"MASKB{f.bit}"] = (f.name, f.description[:47])
        he = fits.ImageHDU(np.asarray(self.lsf_excess, np.float32), name="LSF_EXCESS")
        he.header["BUNIT"] = ("Angstrom", "FWHM of data broadening beyond the target LSF")
        hc = fits.ImageHDU(np.asarray(self.cont, np.float32), name="CONT")
        tab = self.spectra.copy(copy_data=True)
        for name, (unit, desc) in SPECTRA_COLUMNS.items():
            if name in tab.colnames:
                tab[name].description = desc
                if unit:
                    tab[name].unit = unit
        ht = fits.table_to_hdu(tab)
        ht.name = "SPECTRA"
        return fits.HDUList([fits.PrimaryHDU(header=ph), hw, hf, hi, hm, he, hc, ht])

    def write(self, path, overwrite: bool = True):
        """Write atomically (temporary file in the same folder, then rename)."""
        atomic_write_fits(self.to_hdulist(), path, overwrite=overwrite)

    @classmethod
    def read(cls, path) -> PreparedSpectra:
        """Read the whole file: every array in memory (float64; ``MASK`` int32)."""
        return cls._load(path, lazy=False)

    @classmethod
    def open(cls, path) -> PreparedSpectra:
        """Like :meth:`read`, but ``flux``, ``ivar``, ``mask``, ``lsf_excess`` and ``cont`` are
        :class:`FitsRows`: rows are read from the file when indexed (in the file's float32 /
        int32, values identical to :meth:`read`'s), so memory stays ~ the rows in use.
        Arrays stored with scaling keywords are read whole, as :meth:`read` does.  Meant for
        consumers that work in row chunks (:class:`musepayne.fit.Fitter`); call
        :meth:`close` (or let the object go) to release the file."""
        return cls._load(path, lazy=True)

    @classmethod
    def _load(cls, path, lazy: bool) -> PreparedSpectra:

        try:
            with fits.open(path, memmap=False) as h:
                ph = h[0].header
                check_format(ph, path, FORMAT_NAME, FORMAT_VERSION, "prepared-spectra", ReaderError)
                wave = np.array(h["WAVE"].data, np.float64)
                arrays = {}
                for name in ("FLUX", "IVAR", "MASK", "LSF_EXCESS", "CONT"):
                    if name not in h:
                        continue
                    rows = _rows_of(path, h[name]) if lazy else None
                    if rows is None:
                        rows = np.array(h[name].data, np.int32 if name == "MASK" else np.float64, ndmin=2)
                    arrays[name] = rows
                flux, ivar, mask = arrays["FLUX"], arrays["IVAR"], arrays["MASK"]
                shape = tuple(flux.shape)
                spectra = Table.read(h["SPECTRA"])
                meta = {k.lower(): ph[k] for k in ("MODE", "TGTLSF", "CONTWID", "AONOTCH", "MPSOFT") if k in ph}
        except ReaderError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ReaderError(f"{path}: cannot read prepared spectra ({type(exc).__name__}: {exc})") from None
        if not (shape == tuple(ivar.shape) == tuple(mask.shape)) or shape[1] != wave.size:
            raise ReaderError(f"{path}: FLUX/IVAR/MASK/WAVE shapes disagree")
        if len(spectra) != shape[0]:
            raise ReaderError(f"{path}: SPECTRA has {len(spectra)} rows for {shape[0]} spectra")
        exc, cont = arrays.get("LSF_EXCESS"), arrays.get("CONT")
        for a in (exc, cont):
            if a is not None and tuple(a.shape) != shape:
                raise ReaderError(f"{path}: LSF_EXCESS/CONT shapes disagree with FLUX")
        if exc is None:
            exc = np.broadcast_to(np.zeros(1, np.float32), shape) if lazy else np.zeros_like(flux)
        if cont is None:
            cont = np.broadcast_to(np.ones(1, np.float32), shape) if lazy else np.ones_like(flux)
        return cls(wave, flux, ivar, mask, exc, cont, spectra, meta)

    def rows(self, a: int, b: int) -> PreparedSpectra:
        """Rows ``a .. b-1`` without reading or copying them (views of in-memory arrays,
        :meth:`FitsRows.rows` readers of opened files)."""
        def sub(x):
            return x.rows(a, b) if isinstance(x, FitsRows) else x[a:b]

        return PreparedSpectra(self.wave, sub(self.flux), sub(self.ivar), sub(self.mask), sub(self.lsf_excess),
                               sub(self.cont), self.spectra[a:b], dict(self.meta))

    def close(self):
        """Release the files of arrays opened by :meth:`open` (nothing for in-memory arrays)."""
        for a in (self.flux, self.ivar, self.mask, self.lsf_excess, self.cont):
            if isinstance(a, FitsRows):
                a.close()

    def take(self, index) -> PreparedSpectra:
        """A new object with the rows at ``index`` (in that order)."""
        idx = np.asarray(index)
        return PreparedSpectra(self.wave.copy(), self.flux[idx], self.ivar[idx], self.mask[idx],
                               self.lsf_excess[idx], self.cont[idx], self.spectra[idx], dict(self.meta))

    @staticmethod
    def concatenate(parts) -> PreparedSpectra:
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        w = parts[0].wave
        for p in parts[1:]:
            if p.wave.shape != w.shape or not np.allclose(p.wave, w, rtol=1e-10, atol=0):
                raise ValueError("prepared spectra on different grids cannot be concatenated")
        return PreparedSpectra(
            w.copy(),
            np.vstack([p.flux for p in parts]),
            np.vstack([p.ivar for p in parts]),
            np.vstack([p.mask for p in parts]),
            np.vstack([p.lsf_excess for p in parts]),
            np.vstack([p.cont for p in parts]),
            vstack([p.spectra for p in parts], metadata_conflicts="silent"),
            dict(parts[0].meta),
        )
