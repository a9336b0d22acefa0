"""Block-wise streaming of a cube for the flux steps: DATA/STAT blocks, usable layers, masks, flags;
one block's solve and residual diagnostics (:func:`_solve_block`).

Private helpers of :mod:`musepayne.extract` (PSF and aperture flux loops).

May import: :mod:`musepayne.io`, numpy and scipy.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

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


def _solve_block(A, AW, w, ns, solve, ninv_diag, d, s, mask):
    """Fluxes of one block of layers from its factorised normal matrix, their errors and the residual
    diagnostics.

    ``A`` / ``AW``: design (star columns first, ``ns`` of them, then sky) without / with the pixel
    weights ``w``; ``d``, ``s``: the block's data and variance layers ``(L, ny, nx)``; ``mask``: usable
    pixels.  Returns ``(X, var, core, chi_pix, sums)``: the solution ``(n_unknowns, L)``, the flux
    variances of the stars ``(ns, L)`` (``diag(N^-1)`` scaled per layer by the variance against the
    weights), the stars' core pixels (:func:`_core_pixels`), chi^2 of the residual summed over the
    layers per pixel (core pixels only; zero elsewhere), and the residual, variance and stars' model
    summed over the layers per pixel.
    """
    npix, nl = A.shape[0], d.shape[0]
    mr = mask.ravel()
    # data and variance as (npix, L) float64, pixels outside the mask zero (C order: the sparse
    # products read them without a copy)
    D = np.zeros((npix, nl))
    D[mr] = d.reshape(nl, -1)[:, mr].T
    V = np.zeros_like(D)
    V[mr] = s.reshape(nl, -1)[:, mr].T
    X = solve(np.asarray(AW.T @ D))
    As = A[:, :ns]
    A2 = sp.csc_matrix((As.data * As.data, As.indices, As.indptr), shape=As.shape)
    num = A2.T @ (V * (w**2)[:, None])
    den = A2.T @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        var = ninv_diag[:ns, None] * num / den[:, None]
    core = _core_pixels(A2)
    # the residual per layer is needed only on the stars' core pixels (chi^2); its sum over the
    # layers is linear in X: the data summed minus the model of the summed solution
    rows = _core_rows(core)
    # (A @ X)[rows] and A's restriction to the rows times X sum the same terms in the same order:
    # restrict A only when that saves work (sparse fields; in crowded ones the cores cover most pixels)
    R = D[rows] - (_restrict_rows(A, rows) @ X if rows.size < 0.5 * npix else (A @ X)[rows])
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = np.where(V[rows] > 0, R**2 / V[rows], 0.0)
    chi_pix = np.zeros(npix)
    chi_pix[rows] = chi.sum(axis=1)
    xsum = X.sum(axis=1)
    sums = (D.sum(axis=1) - A @ xsum, V.sum(axis=1), As @ xsum[:ns])
    return X, var, core, chi_pix, sums


def _core_rows(core):
    """The pixels (sorted row indices) in any star's core; ``core`` as :func:`_core_pixels` returns it."""
    keep = np.zeros(core.shape[0], bool)
    keep[core.indices[core.data > 0]] = True
    return np.flatnonzero(keep)


def _restrict_rows(A, rows):
    """``A`` (csc) restricted to the sorted ``rows``: same column order and, per column, the same entry
    order, so products with it sum exactly as ``A``'s do on those rows."""
    keep = np.zeros(A.shape[0], bool)
    keep[rows] = True
    pos = np.cumsum(keep) - 1  # position of each kept row among ``rows``
    k = keep[A.indices]
    kept_before = np.zeros(k.size + 1, dtype=np.int64)  # kept entries before each entry of A
    np.cumsum(k, out=kept_before[1:])
    return sp.csc_matrix((A.data[k], pos[A.indices[k]], kept_before[A.indptr]), shape=(rows.size, A.shape[1]))


def _core_pixels(A2):
    """Pixels of each star's core (~ within 1 FWHM): ``A2 >= 0.25`` of its column maximum, as a
    0/1 matrix of ``A2``'s pattern (``A2``: csc, squared PSF values)."""
    nnz = np.diff(A2.indptr)
    cmax = np.zeros(A2.shape[1])
    has = nnz > 0
    cmax[has] = np.maximum.reduceat(A2.data, A2.indptr[:-1][has])
    inv = 1.0 / np.maximum(cmax, 1e-300)
    keep = A2.data * np.repeat(inv, nnz) >= 0.25
    return sp.csc_matrix((keep.astype(float), A2.indices, A2.indptr), shape=A2.shape)
