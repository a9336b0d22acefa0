"""Block-wise streaming of a cube for the flux steps: DATA/STAT blocks, usable layers, masks, flags.

Private helpers of :mod:`musepayne.extract` (PSF and aperture flux loops).

May import: :mod:`musepayne.io`.
"""

from __future__ import annotations

import time

import numpy as np

from ..io.spectra import ReaderError


def _read_block(c, i0, i1, valid):
    """DATA/STAT block, usable layers, common spaxel mask and layer flags."""
    d = c.data_block(i0, i1)
    s = c.stat_block(i0, i1)
    if s is None:
        raise ReaderError(f"{c.path}: no STAT extension; weights and errors need the variance")
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0) & valid[None]
    frac = ok.reshape(i1 - i0, -1).sum(axis=1) / max(1, valid.sum())
    good = frac > 0.5
    mask = ok[good].all(axis=0) if good.any() else np.zeros_like(valid)
    lflag = np.where(good, 0, 1).astype(np.int16)
    if good.any() and mask.sum() < valid.sum():
        lflag[good] |= 2
    return d, s, good, mask, lflag


def _accumulators(n, nz):
    """Output arrays of an extraction: flux and error (n_stars x n_layers, NaN until solved)
    and the per-layer flags."""
    return (np.full((n, nz), np.nan, dtype=np.float32), np.full((n, nz), np.nan, dtype=np.float32),
            np.zeros(nz, np.int16))


def _layer_blocks(c, valid, block, layer_flag, timings):
    """Read the cube ``block`` layers at a time; yield ``(i0, i1, data, var, good, mask)`` for
    blocks with a usable layer.  Fills ``layer_flag`` for every block and adds the read time
    to ``timings['read']``."""
    nz = c.shape[0]
    for i0 in range(0, nz, block):
        i1 = min(nz, i0 + block)
        t = time.perf_counter()
        d, s, good, mask, lflag = _read_block(c, i0, i1, valid)
        layer_flag[i0:i1] = lflag
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t
        if good.any():
            yield i0, i1, d, s, good, mask
