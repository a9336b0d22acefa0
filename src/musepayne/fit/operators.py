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
    bit-identical to it while touching a fraction of the pixels."""

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
        self.c0 = int(cols.min()) if cols.size else 0
        self.c1 = int(cols.max()) + 1 if cols.size else 0
        self.cols, self.vals = cols - self.c0, vals
        self.empty = nnz[self.rows] == 0  # all-zero rows of K: output 0

    def apply(self, Y, sel):
        """``Y[sel, :, :] = (K @ Y[sel, q].T).T`` for every plane ``q``."""
        if self.rows.size == 0:
            return
        X = Y if sel.size == Y.shape[0] else Y[sel]  # sel: sorted distinct rows
        X = X[:, :, self.c0:self.c1]  # the columns the taps use
        acc = X[:, :, self.cols[0]] * self.vals[0]
        for k in range(1, self.cols.shape[0]):
            acc += X[:, :, self.cols[k]] * self.vals[k]
        if np.any(self.empty):
            acc[:, :, self.empty] = 0
        if sel.size == Y.shape[0]:
            Y[:, :, self.rows] = acc
        else:
            Y[np.ix_(sel, np.arange(Y.shape[1]), self.rows)] = acc


class _RowOps:
    """LSF-excess operators of the rows of one fit call: ``index[i]`` into ``ops`` (-1: none).
    Indexing selects rows and keeps the operator list."""

    __slots__ = ("index", "ops")

    def __init__(self, index, ops):
        self.index = np.asarray(index)
        self.ops = ops

    def __getitem__(self, rows):
        return _RowOps(self.index[rows], self.ops)


class _RowOpsBuilder:
    """One operator per distinct (rounded to 1e-4 A) non-zero ``LSF_EXCESS`` profile, found
    block by block by the profile's bytes (consecutive equal rows looked up once), without
    sorting the rows; local to one fit call."""

    def __init__(self, fitter, wave):
        self.fitter, self.wave = fitter, wave
        self.ops, self._key = [], {}

    def rows(self, lsf_excess, a, b, idx) -> _RowOps:
        index = np.full(b - a, -1)
        if idx.size == 0:
            return _RowOps(index, self.ops)
        exc = np.asarray(lsf_excess[a + idx], np.float64)
        exc = np.clip(np.nan_to_num(exc, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
        nz = np.flatnonzero(exc.max(1) > 0)
        if nz.size == 0:
            return _RowOps(index, self.ops)
        prof = np.round(exc[nz], 4) + 0.0  # + 0.0: -0.0 -> 0.0, one key per profile
        new = np.r_[True, np.any(prof[1:] != prof[:-1], axis=1)]
        run = np.cumsum(new) - 1
        op_of_run = []
        for k in np.flatnonzero(new):
            key = prof[k].tobytes()
            o = self._key.get(key)
            if o is None:
                o = len(self.ops)
                self.ops.append(_BandedOp(convolution_matrix(self.wave, prof[k] * FWHM_TO_SIGMA)[0],
                                          self.fitter.dtype))
                self._key[key] = o
            op_of_run.append(o)
        index[idx[nz]] = np.asarray(op_of_run)[run]
        return _RowOps(index, self.ops)

