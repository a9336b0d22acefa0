"""LSF-excess operators of a fit: which rows of a block are convolved, and by what.

Where the prepared data are broader than the model's LSF (``LSF_EXCESS`` > 0), the fitter
convolves the model by a Gaussian of that extra FWHM (paper-independent forward modelling,
:attr:`musepayne.fit.fitter.FitConfig.lsf_excess`).  This module owns:

* :class:`_BandedOp` -- one sparse convolution matrix applied to model planes, bit-identical
  to ``K @ x`` while computing only the rows that are not the identity;
* :class:`_RowOps` -- the operator index of each row of a call (``-1``: none);
* :class:`_RowOpsBuilder` -- one operator per distinct (rounded) excess profile, found
  without sorting the rows (rows of one profile share its operator).

May import: numpy, :mod:`musepayne.instrument`, :mod:`musepayne.prepare.resample`.
"""

from __future__ import annotations

import numpy as np

from ..instrument.lsf import FWHM_TO_SIGMA
from ..prepare.resample import convolution_matrix


class _BandedOp:
    """A sparse LSF-excess operator applied to the last axis of planes, in place.

    Only rows of the matrix that are not the identity are computed (the excess is zero over
    most of the grid), each as the sum of its taps in the matrix's own (CSR) order: the same
    float operations, in the same order, as the sparse product ``K @ x``, so the results are
    bit-identical to it while touching a fraction of the pixels.

    When every row's taps are consecutive columns (a band: the Gaussian kernels of
    :func:`~musepayne.prepare.resample.convolution_matrix`), all rows get the same taps
    relative to their own column, ``lo .. lo + T - 1``, with weight 0 on the taps a row
    does not have; tap ``k`` of consecutive rows is then a slice of the planes, not a gather.
    The sums stay bit-identical: a row's leading zero-weight taps leave ``+-0`` before its
    first real tap, and ``+-0 + y == y``; trailing ones add ``+-0`` (planes are finite)."""

    def __init__(self, K, dtype):
        K = K.tocsr().astype(dtype)
        nnz = np.diff(K.indptr)
        r = np.arange(K.shape[0])
        ident = nnz == 1
        if K.nnz:
            first = np.where(ident, K.indptr[:-1], 0)
            ident &= (K.indices[first] == r) & (K.data[first] == 1)
        self.rows = np.flatnonzero(~ident)
        t = max(int(nnz[self.rows].max()) if self.rows.size else 0, 1)
        cols = np.empty((t, self.rows.size), np.int64)
        vals = np.zeros((t, self.rows.size), dtype)
        for j, i in enumerate(self.rows):
            a, b = K.indptr[i], K.indptr[i + 1]
            c = K.indices[a:b]
            cols[:b - a, j] = c
            cols[b - a:, j] = c[-1] if c.size else i  # padding: weight 0 on a tap already used
            vals[:b - a, j] = K.data[a:b]
        self.lo = None  # first tap relative to the row, when the operator is a band
        n_j = nnz[self.rows]
        if self.rows.size and n_j.min() >= 1:
            off = cols[0] - self.rows
            k = np.arange(t)[:, None]
            lo, T = int(off.min()), int((off + n_j).max() - off.min())
            inside = self.rows[0] + lo >= 0 and self.rows[-1] + lo + T <= K.shape[1]  # (no taps off the grid)
            if inside and np.all((cols == self.rows + off + k) | (k >= n_j)):
                cols = self.rows[None, :] + lo + np.arange(T)[:, None]
                uvals = np.zeros((T, self.rows.size), dtype)
                for j in range(self.rows.size):
                    uvals[off[j] - lo:off[j] - lo + n_j[j], j] = vals[:n_j[j], j]
                vals, self.lo = uvals, lo
        self.c0 = int(cols.min()) if cols.size else 0
        self.c1 = int(cols.max()) + 1 if cols.size else 0
        self.cols, self.vals = cols - self.c0, vals
        self.empty = nnz[self.rows] == 0  # all-zero rows of K: output 0

    def window(self, c0, c1):
        """The operator's rows in columns ``c0 .. c1 - 1`` only: ``(op, t0, t1)``, ``op`` a
        copy that computes just those rows (each with the same taps, in the same order) and
        ``t0 .. t1 - 1`` the columns its taps read (``t0 <= c0``, ``t1 >= c1``)."""
        keep = (self.rows >= c0) & (self.rows < c1)
        op = object.__new__(_BandedOp)
        op.rows, op.empty, op.lo = self.rows[keep], self.empty[keep], self.lo
        cols = self.cols[:, keep] + self.c0
        op.c0 = int(cols.min()) if cols.size else 0
        op.c1 = int(cols.max()) + 1 if cols.size else 0
        op.cols, op.vals = cols - op.c0, self.vals[:, keep]
        return op, min(c0, op.c0) if cols.size else c0, max(c1, op.c1)

    def shifted(self, x0):
        """The same operator on planes whose column 0 is column ``x0`` of the grid."""
        op = object.__new__(_BandedOp)
        op.rows, op.empty, op.cols, op.vals, op.lo = self.rows - x0, self.empty, self.cols, self.vals, self.lo
        op.c0, op.c1 = self.c0 - x0, self.c1 - x0
        return op

    def apply(self, Y, sel):
        """``Y[sel, :, :] = (K @ Y[sel, q].T).T`` for every plane ``q``."""
        if self.rows.size == 0:
            return
        X = Y if sel.size == Y.shape[0] else Y[sel]  # sel: sorted distinct rows
        r0, n = int(self.rows[0]), self.rows.size
        band = self.lo is not None and int(self.rows[-1]) - r0 + 1 == n  # consecutive rows of a band
        if band:  # tap k of every row: one slice
            b0 = r0 + self.lo
            acc = X[:, :, b0:b0 + n] * self.vals[0]
            for k in range(1, self.cols.shape[0]):
                acc += X[:, :, b0 + k:b0 + k + n] * self.vals[k]
        else:
            X = X[:, :, self.c0:self.c1]  # the columns the taps use
            acc = X[:, :, self.cols[0]] * self.vals[0]
            for k in range(1, self.cols.shape[0]):
                acc += X[:, :, self.cols[k]] * self.vals[k]
        if np.any(self.empty):
            acc[:, :, self.empty] = 0
        if sel.size == Y.shape[0]:
            if band:
                Y[:, :, r0:r0 + n] = acc
            else:
                Y[:, :, self.rows] = acc
        else:
            Y[np.ix_(sel, np.arange(Y.shape[1]), self.rows)] = acc


class _RowOps:
    """LSF-excess operators of the rows of one fit call: ``index[i]`` into ``ops`` (-1: none).
    Indexing selects rows and keeps the operator list (and the window).

    ``window``: None (model planes over the whole grid), or ``(x0, x1, c0, c1, r0, model)``:
    planes are computed on grid columns ``x0 .. x1 - 1`` (``ops`` then act on those columns)
    and used on ``c0 .. c1 - 1`` (see :meth:`windowed`); ``model`` (or None: the fitter's)
    gives the rest-frame model on grid columns from ``r0`` on."""

    __slots__ = ("index", "ops", "window")

    def __init__(self, index, ops, window=None):
        self.index = np.asarray(index)
        self.ops = ops
        self.window = window

    def __getitem__(self, rows):
        return _RowOps(self.index[rows], self.ops, self.window)

    def windowed(self, c0, c1, rest=None) -> _RowOps:
        """These rows' operators restricted to output columns ``c0 .. c1 - 1``: the model is then
        shifted on the columns the operators' taps read, ``x0 .. x1 - 1``, and only columns
        ``c0 .. c1 - 1`` are used -- each of them computed by the same operations as over the
        whole grid.  ``rest``: a function ``(x0, x1) -> (r0, model)`` giving the model of the
        rest-frame columns those read (``(None, None)``: the whole model)."""
        used = np.unique(self.index[self.index >= 0])
        ops, x0, x1 = [None] * len(self.ops), c0, c1
        win = {}
        for o in used:
            win[o], t0, t1 = self.ops[o].window(c0, c1)
            x0, x1 = min(x0, t0), max(x1, t1)
        for o in used:
            ops[o] = win[o].shifted(x0)
        r0, model = rest(x0, x1) if rest is not None else (None, None)
        return _RowOps(self.index, ops, (x0, x1, c0, c1, r0, model))


class _RowOpsBuilder:
    """One operator per distinct (rounded to 1e-4 A) non-zero ``LSF_EXCESS`` profile, found
    block by block by the profile's bytes (consecutive equal rows looked up once), without
    sorting the rows; local to one fit call.  Rows equal, as read, to the row before them take
    its operator without being rounded and compared again (prepared MUSE spectra of one cube
    share one profile)."""

    def __init__(self, fitter, wave):
        self.fitter, self.wave = fitter, wave
        self.ops, self._key = [], {}

    def rows(self, lsf_excess, a, b, idx) -> _RowOps:
        index = np.full(b - a, -1)
        if idx.size == 0:
            return _RowOps(index, self.ops)
        raw = np.asarray(lsf_excess[a + idx])
        # runs of rows equal as read (NaN rows each start a run): one profile per run
        starts = np.r_[True, np.any(raw[1:] != raw[:-1], axis=1)]
        first, run = np.flatnonzero(starts), np.cumsum(starts) - 1
        exc = np.asarray(raw[first], np.float64)
        exc = np.clip(np.nan_to_num(exc, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
        nz = np.flatnonzero(exc.max(1) > 0)
        if nz.size == 0:
            return _RowOps(index, self.ops)
        prof = np.round(exc[nz], 4) + 0.0  # + 0.0: -0.0 -> 0.0, one key per profile
        op_of_first = np.full(first.size, -1)
        for k, j in enumerate(nz):
            key = prof[k].tobytes()
            o = self._key.get(key)
            if o is None:
                o = len(self.ops)
                self.ops.append(_BandedOp(convolution_matrix(self.wave, prof[k] * FWHM_TO_SIGMA)[0],
                                          self.fitter.dtype))
                self._key[key] = o
            op_of_first[j] = o
        index[idx] = op_of_first[run]
        return _RowOps(index, self.ops)

