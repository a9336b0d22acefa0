"""Lazy, memory-mapped MUSE cubes (``DATA``, ``STAT``, ``DQ``) in the ESO layout.

:func:`open_cube` checks the layout (a 3-D ``DATA`` extension with a wavelength axis
``AWAV``/``WAVE``, a ``STAT`` variance extension of the same shape, a usable
wavelength step) and returns a :class:`MuseCube` that reads layers, blocks and
spectra on demand; malformed files raise :class:`~musepayne.io.spectra.ReaderError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..instrument.wavelength import linear_grid
from ._reading import _check_angstrom, _frame_from_ctype, _hdr_float, _open, _wave_unit_factor
from .spectra import ReaderError

__all__ = ["MuseCube", "open_cube"]

#: |value| above this in DATA or STAT is a blank sentinel, not a flux (MUSE fluxes are
#: ~1e-20 erg/s/cm2/A units, so real values stay many orders of magnitude below it)
_SENTINEL = 1e25


@dataclass(eq=False)
class MuseCube:
    """Lazy, memory-mapped access to a MUSE cube's ``DATA``/``STAT``/``DQ``.

    Nothing is read until a layer, block or spectrum is asked for; blocks come
    back as native-endian float32 (never the whole extension as float64).
    ``wave`` is the air wavelength of each layer (Angstrom); ``wcs`` the
    celestial WCS.  Use as a context manager or call ``close()``.

    Layers that are entirely NaN in DATA are listed in ``nan_layers()``;
    readers of blocks get NaN there and should treat them as flagged.

    Parameters
    ----------
    path : str
        The cube file (FITS, ESO layout: ``DATA`` and ``STAT`` extensions, optional ``DQ``).
    allow_missing_stat : bool, optional
        Accept a cube without ``STAT`` (default False); then ``stat_block`` returns None.

    Attributes
    ----------
    wave : numpy.ndarray
        Shape (n_layers,): wavelength of each layer in Angstrom (FITS unit converted), in ``frame``.
    frame : str
        ``'air'`` (CTYPE3 ``AWAV``, MUSE's) or ``'vacuum'`` (``WAVE``).
    wcs : astropy.wcs.WCS
        Celestial (2-D) WCS of the DATA extension.
    shape : tuple of int
        ``(n_layers, ny, nx)``.
    has_stat, has_dq : bool
        Whether the STAT and DQ extensions exist.
    header, primary_header : astropy.io.fits.Header
        DATA and primary headers.

    Raises
    ------
    ReaderError
        If there is no 3-D DATA extension with the wavelength on axis 3, no STAT (unless allowed),
        STAT and DATA shapes differ, the wavelength step is missing/non-positive, or the
        wavelengths are not in a plausible Angstrom range.
    """

    path: str
    allow_missing_stat: bool = False
    _hdul: fits.HDUList = field(init=False, repr=False)

    def __post_init__(self):
        self._hdul = _open(self.path, memmap=True, do_not_scale_image_data=False, lazy_load_hdus=False)
        names = [x.name.upper() for x in self._hdul]
        try:
            if "DATA" not in names:
                raise ReaderError(f"{self.path}: no DATA extension; not a MUSE cube")
            hd = self._hdul["DATA"].header
            if hd.get("NAXIS", 0) != 3:
                raise ReaderError(f"{self.path}: DATA has {hd.get('NAXIS', 0)} axes; a cube needs 3")
            spec_axes = [i for i in (1, 2, 3) if str(hd.get(f"CTYPE{i}", "")).upper()[:4] in ("AWAV", "WAVE", "LINE")]
            if 3 not in spec_axes:
                if spec_axes:
                    raise ReaderError(
                        f"{self.path}: wavelength is on FITS axis {spec_axes[0]} (CTYPE{spec_axes[0]}); "
                        "MUSE cubes have it on axis 3 (wrong axis order)"
                    )
                raise ReaderError(f"{self.path}: no wavelength axis (CTYPE3 should be AWAV or WAVE)")
            self.has_stat = "STAT" in names
            if not self.has_stat and not self.allow_missing_stat:
                raise ReaderError(f"{self.path}: no STAT (variance) extension; PSF-fit weights need it")
            if self.has_stat and self._hdul["STAT"].header.get("NAXIS3") != hd.get("NAXIS3"):
                raise ReaderError(f"{self.path}: STAT and DATA shapes differ")
            self.has_dq = "DQ" in names
            nz = int(hd["NAXIS3"])
            cd = _hdr_float(hd, "CD3_3", "CDELT3")
            if not np.isfinite(cd) or cd <= 0:
                raise ReaderError(f"{self.path}: no usable wavelength step (CD3_3/CDELT3)")
            factor = _wave_unit_factor(hd, 3, self.path)
            self.wave = linear_grid(float(hd["CRVAL3"]), cd, nz, float(hd.get("CRPIX3", 1.0))) * factor
            _check_angstrom(self.wave, self.path)
            self.frame = _frame_from_ctype(hd.get("CTYPE3", "AWAV"), "air")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                self.wcs = WCS(hd).celestial
            self.shape = (nz, int(hd["NAXIS2"]), int(hd["NAXIS1"]))
            self.header = hd
            self.primary_header = self._hdul[0].header
        except Exception:
            self._hdul.close()
            raise

    # ------------------------------------------------------------------ access
    def _block(self, name, i0, i1):
        if name != "DATA" and name == "STAT" and not self.has_stat:
            return None
        try:
            arr = self._hdul[name].section[i0:i1]
        except Exception as exc:
            raise ReaderError(f"{self.path}: could not read {name} layers {i0}-{i1} ({exc}); truncated file?") from None
        arr = np.asarray(arr, dtype=np.float32)
        # blank sentinels (-1e30, 1e38, ...) are no measurements: NaN, so the layer is flagged
        bad = np.abs(arr) > _SENTINEL
        if bad.any():
            arr = np.where(bad, np.float32(np.nan), arr)
        return arr

    def data_block(self, i0: int, i1: int) -> np.ndarray:
        """DATA layers ``i0:i1`` as float32 ``(n_layers, ny, nx)``.

        Parameters
        ----------
        i0, i1 : int
            First and one-past-last layer (0-based, Python slice semantics).

        Returns
        -------
        numpy.ndarray
            float32, shape (i1 - i0, ny, nx), in the cube's flux unit; NaN where DATA is blank.

        Raises
        ------
        ReaderError
            If the layers cannot be read (e.g. a truncated file).
        """
        return self._block("DATA", i0, i1)

    def stat_block(self, i0: int, i1: int) -> np.ndarray | None:
        """STAT (variance) layers ``i0:i1`` as float32, or None without STAT.

        Parameters
        ----------
        i0, i1 : int
            First and one-past-last layer (0-based).

        Returns
        -------
        numpy.ndarray or None
            float32, shape (i1 - i0, ny, nx), in flux units squared.

        Raises
        ------
        ReaderError
            If the layers cannot be read (e.g. a truncated file).
        """
        return self._block("STAT", i0, i1) if self.has_stat else None

    def dq_block(self, i0: int, i1: int) -> np.ndarray | None:
        """DQ (data-quality bit mask) layers ``i0:i1``, or None without DQ.

        Parameters
        ----------
        i0, i1 : int
            First and one-past-last layer (0-based).

        Returns
        -------
        numpy.ndarray or None
            Shape (i1 - i0, ny, nx), in the DQ extension's integer dtype.
        """
        if not self.has_dq:
            return None
        return np.asarray(self._hdul["DQ"].section[i0:i1])

    def spectrum(self, x: int, y: int):
        """DATA and STAT spectrum of one spaxel (0-based x, y), float32.

        Parameters
        ----------
        x, y : int
            0-based column (FITS axis 1) and row (FITS axis 2) of the spaxel.

        Returns
        -------
        data : numpy.ndarray
            float32, shape (n_layers,).
        stat : numpy.ndarray or None
            float32 variance, shape (n_layers,), None without STAT.
        """
        d = np.asarray(self._hdul["DATA"].section[:, y, x], dtype=np.float32)
        s = np.asarray(self._hdul["STAT"].section[:, y, x], dtype=np.float32) if self.has_stat else None
        return d, s

    def iter_blocks(self, block: int = 64):
        """Yield ``(i0, i1, data, stat)`` over the cube in blocks of layers.

        Parameters
        ----------
        block : int, optional
            Layers per block (default 64); the last block may be shorter.

        Yields
        ------
        tuple
            ``(i0, i1, data, stat)``: layer range, float32 DATA (i1 - i0, ny, nx) and STAT of the same
            shape or None.
        """
        nz = self.shape[0]
        for i0 in range(0, nz, block):
            i1 = min(nz, i0 + block)
            yield i0, i1, self.data_block(i0, i1), self.stat_block(i0, i1)

    def nan_layers(self, block: int = 64) -> np.ndarray:
        """Boolean per layer: True where DATA is NaN in every spaxel.

        Parameters
        ----------
        block : int, optional
            Layers read at a time (default 64).

        Returns
        -------
        numpy.ndarray
            bool, shape (n_layers,).
        """
        out = np.zeros(self.shape[0], bool)
        for i0, i1, d, _ in self.iter_blocks(block):
            out[i0:i1] = ~np.isfinite(d).reshape(i1 - i0, -1).any(axis=1)
        return out

    def white_light(self, block: int = 64) -> np.ndarray:
        """Mean over layers of finite DATA (a white-light image), streamed.

        Parameters
        ----------
        block : int, optional
            Layers read at a time (default 64).

        Returns
        -------
        numpy.ndarray
            float64, shape (ny, nx), in the cube's flux unit; NaN where no layer is finite.
        """
        ny, nx = self.shape[1:]
        acc = np.zeros((ny, nx))
        cnt = np.zeros((ny, nx))
        for _, _, d, _ in self.iter_blocks(block):
            ok = np.isfinite(d)
            acc += np.where(ok, d, 0.0).sum(axis=0)
            cnt += ok.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, acc / cnt, np.nan)

    def close(self):
        """Close the underlying FITS file (the memory maps become invalid)."""
        self._hdul.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cube(path, allow_missing_stat: bool = False) -> MuseCube:
    """Open a MUSE cube lazily (see :class:`MuseCube`); malformed files raise ReaderError.

    Parameters
    ----------
    path : str or os.PathLike
        The cube file.
    allow_missing_stat : bool, optional
        Accept a cube without a STAT extension (default False).

    Returns
    -------
    MuseCube
        The open cube; close it (or use it as a context manager).

    Raises
    ------
    ReaderError
        If the file is not a readable MUSE cube (any failure to open is turned into one).
    """
    try:
        return MuseCube(str(path), allow_missing_stat=allow_missing_stat)
    except ReaderError:
        raise
    except Exception as exc:
        raise ReaderError(f"{path}: cannot open as a MUSE cube ({type(exc).__name__}: {exc})") from None
