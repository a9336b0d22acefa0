"""Linear solves of the extraction's normal equations ``N x = A^T W d``.

Owns :func:`factorise`: one factorisation of a symmetric positive-definite normal matrix
that serves many right-hand sides (every layer of a block), shaped by the structure of
``N``: border unknowns (sky polynomial, global nonlinear parameters) eliminated through
their Schur complement, the star unknowns split into connected components of their
coupling graph, each by dense Cholesky (or sparse LU when too large or not positive
definite).  :func:`normal_matrix` forms ``N`` itself: by a sparse product for small
problems, and for large crowded fields (more than :data:`TILED_MIN` unknowns) densely, image
tile by image tile with one dense matrix product each (the sparse product's cost grows with
the square of the stars per pixel and runs at a few hundred Mflop/s; the tiled one runs at
BLAS speed and gives the same matrix to rounding).

May import: numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sl
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

__all__ = ["factorise", "normal_matrix", "TILED_MIN", "ENVELOPE_MIN"]

#: more unknowns than this: :func:`normal_matrix` forms ``N`` densely tile by tile (below it the
#: sparse product of before, so small fields give bit-identical results)
TILED_MIN = 3000
#: ... and also more than this many unknowns when the design matrix has more than
#: :data:`TILED_ROW_NNZ` nonzeros per image pixel on average (a crowded field: the sparse
#: product's cost grows with the square of that number)
TILED_DENSE_MIN = 1000
TILED_ROW_NNZ = 50
#: image tile side (pixels) of the tiled normal matrix
TILE_PX = 16
#: a connected component with more unknowns than this is factorised by the block envelope
#: Cholesky (:class:`_EnvelopeFactor`) when its profile is narrow enough (see :data:`ENVELOPE_GAIN`)
ENVELOPE_MIN = 1000
#: ... namely when the envelope flop count is below this fraction of the dense one (``n^3 / 3``)
ENVELOPE_GAIN = 0.5
#: unknowns per block column of the envelope Cholesky
ENVELOPE_BLOCK = 256


def normal_matrix(A, w, shape, ridge, AW=None):
    """Weighted normal matrix ``N = A^T diag(w) A`` plus a relative ridge on its diagonal.

    Parameters
    ----------
    A : scipy.sparse matrix, shape (ny*nx, n)
        Design matrix (rows: image pixels in C order; columns: unknowns).
    w : numpy.ndarray, shape (ny*nx,)
        Weight of each pixel (1 / variance; 0 for masked pixels).
    shape : tuple of int
        Image shape ``(ny, nx)``.
    ridge : float
        Relative Tikhonov term added to each positive diagonal element (an empty column gets 1).
    AW : scipy.sparse.csc_matrix, optional
        ``A`` with its rows multiplied by ``w``, when the caller has it already.

    Returns
    -------
    N : scipy.sparse.csc_matrix or numpy.ndarray, shape (n, n)
        The normal matrix: sparse for at most :data:`TILED_MIN` unknowns (and at most
        :data:`TILED_DENSE_MIN` or at most :data:`TILED_ROW_NNZ` nonzeros of ``A`` per pixel),
        else dense.
    dg_ok : numpy.ndarray of bool, shape (n,)
        Columns with a positive diagonal (the others are not constrained by the data).
    """
    n = A.shape[1]
    if n <= TILED_MIN and (n <= TILED_DENSE_MIN or A.nnz <= TILED_ROW_NNZ * A.shape[0]):
        AW = A.multiply(w[:, None]).tocsc() if AW is None else AW
        N = (A.T @ AW).tocsc()
        dg = N.diagonal()
        dg_ok = dg > 0
        return N + sp.diags(np.where(dg_ok, ridge * dg, 1.0)), dg_ok
    ny, nx = shape
    # pixel rows in tile-major order, so that each tile is one contiguous row range of a CSR matrix
    ty, tx = np.divmod(np.arange(ny * nx), nx)
    order = np.lexsort((tx, ty, tx // TILE_PX, ty // TILE_PX))
    order = order[w[order] != 0]
    tile_id = (ty[order] // TILE_PX) * (nx // TILE_PX + 1) + tx[order] // TILE_PX
    bounds = np.flatnonzero(np.diff(tile_id)) + 1
    Ar = sp.csr_matrix(A)[order]
    wr = w[order]
    N = np.zeros((n, n))
    for r0, r1 in zip(np.r_[0, bounds], np.r_[bounds, order.size]):
        p0, p1 = Ar.indptr[r0], Ar.indptr[r1]
        if p1 == p0:
            continue
        cidx = Ar.indices[p0:p1]
        idx = np.unique(cidx)
        Ad = np.zeros((r1 - r0, idx.size))
        Ad[np.repeat(np.arange(r1 - r0), np.diff(Ar.indptr[r0:r1 + 1])), np.searchsorted(idx, cidx)] = Ar.data[p0:p1]
        Ad *= np.sqrt(wr[r0:r1])[:, None]
        # upper triangle only (idx is sorted, so the tile's upper triangle lands in N's)
        N[np.ix_(idx, idx)] += sl.blas.dsyrk(1.0, Ad, trans=1, lower=0)
    for i0 in range(0, n, 512):  # mirror the upper triangle, a band of rows at a time
        i1 = min(n, i0 + 512)
        blk = N[i0:i1, i0:i1]
        N[i0:i1, i0:i1] = np.triu(blk) + np.triu(blk, 1).T
        N[i1:, i0:i1] = N[i0:i1, i1:].T
    dg = np.diag(N).copy()
    dg_ok = dg > 0
    N[np.diag_indices(n)] += np.where(dg_ok, ridge * dg, 1.0)
    return N, dg_ok


def _envelope_order(G):
    """Bandwidth-reducing order of a coupling graph and the envelope of the permuted matrix.

    Returns ``(perm, first)``: ``perm`` (reverse Cuthill-McKee, or the given order when that has
    the smaller envelope, e.g. unknowns the caller put in spatial order) and, per permuted row
    ``i``, the first column of its envelope, made non-decreasing (so the envelope is closed under
    Cholesky fill).
    """
    G = sp.csr_matrix(G)
    Gc = G.tocoo()
    best = None
    for perm in (reverse_cuthill_mckee(G, symmetric_mode=True).astype(np.int64), np.arange(G.shape[0])):
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size)
        r, c = inv[Gc.row], inv[Gc.col]
        first = np.arange(perm.size)
        np.minimum.at(first, np.maximum(r, c), np.minimum(r, c))
        first = np.minimum.accumulate(first[::-1])[::-1]
        if best is None or _envelope_flops(first) < _envelope_flops(best[1]):
            best = (perm, first)
    return best


def _envelope_flops(first):
    """Approximate flop count of the envelope Cholesky (sum of squared row profiles)."""
    b = np.arange(first.size, dtype=np.float64) - first
    return float(np.dot(b, b))


class _EnvelopeFactor:
    """Block envelope (profile) Cholesky ``P N P^T = L L^T`` of one connected component.

    The unknowns are put in a bandwidth-reducing order (reverse Cuthill-McKee of the coupling graph:
    for stars, roughly sorted along the field).  Row ``i`` of the permuted matrix is zero left of
    column ``first[i]`` (non-decreasing); Cholesky fill stays inside that envelope, so ``L`` is stored
    as dense block-column panels (``ENVELOPE_BLOCK`` columns, rows down to the envelope's end) and
    formed left-looking with BLAS-3 calls.  ``diag(N^-1)`` comes from the selected inverse on the
    envelope (Takahashi recursion, block-wise backwards).  Exact: the same factor as a dense Cholesky
    of the permuted matrix (to rounding), at a cost of about ``sum_i (i - first[i])^2`` flops.
    """

    def __init__(self, M, perm, first, block=None):
        block = ENVELOPE_BLOCK if block is None else block
        n = perm.size
        self.n, self.perm = n, perm
        a = np.arange(0, n, block)
        b = np.minimum(a + block, n)
        e = np.maximum(np.searchsorted(first, b, side="left"), b)  # rows i with first[i] < b_K
        self.a, self.b, self.e = a, b, e
        dense_in = isinstance(M, np.ndarray)
        Mc = None if dense_in else sp.csc_matrix(M)
        panels = []
        for K in range(a.size):
            aK, bK, eK = a[K], b[K], e[K]
            rows, cols = perm[aK:eK], perm[aK:bK]
            P = M[np.ix_(rows, cols)] if dense_in else Mc[:, cols][rows, :].toarray()
            for J in range(K):  # left-looking update from earlier panels that reach row aK
                if e[J] <= aK:
                    continue
                LJ = panels[J]
                m = min(bK, e[J]) - aK
                P[: e[J] - aK, :m] -= LJ[aK - a[J]: e[J] - a[J]] @ LJ[aK - a[J]: aK - a[J] + m].T
            c = bK - aK
            try:
                Lkk = sl.cholesky(P[:c], lower=True, check_finite=False)
            except sl.LinAlgError as exc:
                raise np.linalg.LinAlgError("envelope Cholesky: matrix not positive definite") from exc
            P[:c] = np.tril(Lkk)
            if eK > bK:
                P[c:] = sl.blas.dtrsm(1.0, Lkk, P[c:], side=1, lower=1, trans_a=1)
            panels.append(P)
        self.panels = panels

    def solve(self, B):
        """``N^-1 B`` (``B``: ``(n,)`` or ``(n, m)``, original order)."""
        a, b, e, L = self.a, self.b, self.e, self.panels
        Y = np.array(B[self.perm], dtype=np.float64)
        vec = Y.ndim == 1
        if vec:
            Y = Y[:, None]
        for K in range(a.size):  # forward: L y = b
            c = b[K] - a[K]
            Y[a[K]:b[K]] = sl.solve_triangular(L[K][:c], Y[a[K]:b[K]], lower=True, check_finite=False)
            if e[K] > b[K]:
                Y[b[K]:e[K]] -= L[K][c:] @ Y[a[K]:b[K]]
        for K in range(a.size - 1, -1, -1):  # backward: L^T x = y
            c = b[K] - a[K]
            if e[K] > b[K]:
                Y[a[K]:b[K]] -= L[K][c:].T @ Y[b[K]:e[K]]
            Y[a[K]:b[K]] = sl.solve_triangular(L[K][:c], Y[a[K]:b[K]], lower=True, trans=1, check_finite=False)
        X = np.empty_like(Y)
        X[self.perm] = Y
        return X[:, 0] if vec else X

    def diag(self):
        """``diag(N^-1)`` (original order) from the selected inverse on the envelope."""
        a, b, e, L = self.a, self.b, self.e, self.panels
        Z = [None] * a.size
        d = np.empty(self.n)
        for K in range(a.size - 1, -1, -1):
            aK, bK, eK = a[K], b[K], e[K]
            c = bK - aK
            Linv, info = sl.lapack.dtrtri(L[K][:c], lower=1)
            if info != 0:
                raise np.linalg.LinAlgError("triangular inverse failed")
            Linv = np.tril(Linv)
            ZK = np.empty((eK - aK, c))
            if eK > bK:
                Y = L[K][c:] @ Linv  # (r, c): L_RK L_KK^-1
                ZR = np.zeros_like(Y)
                for J in range(K + 1, a.size):  # ZR = Z_RR Y, Z_RR symmetric, from later panels
                    if a[J] >= eK:
                        break
                    cj = min(b[J], eK) - a[J]
                    Zp = Z[J][: eK - a[J], :cj]
                    o = a[J] - bK
                    ZR[o:] += Zp @ Y[o:o + cj]
                    if eK - a[J] > cj:
                        ZR[o:o + cj] += Zp[cj:].T @ Y[o + cj:]
                ZK[c:] = -ZR
                ZKK = Linv.T @ Linv + Y.T @ ZR
            else:
                ZKK = Linv.T @ Linv
            ZK[:c] = 0.5 * (ZKK + ZKK.T)
            Z[K] = ZK
            d[aK:bK] = np.diag(ZK[:c])
            for J in range(K + 1, a.size):  # panels no earlier block reaches any more
                if Z[J] is not None and a[J] >= eK:
                    Z[J] = None
        out = np.empty(self.n)
        out[self.perm] = d
        return out


class _ComponentFactor:
    """Block-diagonal factorisation of the star unknowns: one factor per connected component.

    ``single``/``dsingle``: 1x1 components (index, diagonal); ``blocks``: ``(indices, kind,
    factor)`` with kind ``'chol'`` (upper Cholesky factor), ``'env'`` (:class:`_EnvelopeFactor`)
    or ``'lu'`` (SuperLU object).
    """

    def __init__(self, Nss, dense_max, plan=None):
        dense_in = isinstance(Nss, np.ndarray)
        plan = {} if plan is None else plan
        if "order" not in plan:  # the coupling structure: components, envelope orders (kept in plan)
            G = sp.csr_matrix(Nss != 0) if dense_in else sp.csr_matrix(Nss)
            ncomp, lab = connected_components(G, directed=False)
            order = np.argsort(lab, kind="stable")
            plan.update(G=G, order=order, bounds=np.searchsorted(lab[order], np.arange(ncomp + 1)), env={})
        G, order, bounds = plan["G"], plan["order"], plan["bounds"]
        Nss = Nss if dense_in else Nss.tocsc()
        self.n = Nss.shape[0]
        sizes = np.diff(bounds)
        single = order[bounds[:-1][sizes == 1]]  # 1x1 components: scalars, vectorised
        dsingle = Nss.diagonal()[single] if single.size else np.zeros(0)
        blocks = []  # (indices, kind, factor)
        for k in np.nonzero(sizes > 1)[0]:
            I = order[bounds[k]:bounds[k + 1]]
            whole = dense_in and I.size == self.n and np.array_equal(I, np.arange(self.n))
            sub = Nss if whole else Nss[np.ix_(I, I)] if dense_in else Nss[I][:, I]  # whole: no copy
            fac = None
            if I.size > ENVELOPE_MIN:  # narrow profile in a bandwidth-reducing order: envelope Cholesky
                if k not in plan["env"]:
                    plan["env"][k] = _envelope_order(G if whole else G[I][:, I])
                perm, first = plan["env"][k]
                if _envelope_flops(first) < ENVELOPE_GAIN * I.size**3 / 3.0:
                    try:
                        fac = ("env", _EnvelopeFactor(sub, perm, first))
                    except np.linalg.LinAlgError:
                        fac = None
            if fac is None and I.size <= dense_max:
                try:
                    fac = ("chol", sl.cholesky(sub if dense_in else sub.toarray(), lower=False, check_finite=False))
                except sl.LinAlgError:
                    fac = None
            if fac is None:  # too large for dense memory, or not positive definite
                fac = ("lu", spla.splu(sp.csc_matrix(sub), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                       options={"SymmetricMode": True}))
            blocks.append((I, *fac))
        if np.any(dsingle <= 0):
            bad = single[dsingle <= 0]
            for i in bad:  # a zero pivot: leave it to the LU path (raises like a singular matrix would)
                blocks.append((np.array([i]), "lu", spla.splu(sp.csc_matrix(Nss[np.ix_([i], [i])]))))
            keep = dsingle > 0
            single, dsingle = single[keep], dsingle[keep]
        self.single, self.dsingle, self.blocks = single, dsingle, blocks

    def solve(self, B):
        """``Nss^-1 B`` for the star unknowns (B: (ns,) or (ns, m))."""
        single, dsingle = self.single, self.dsingle
        X = np.empty_like(B, dtype=np.float64)
        if single.size:
            X[single] = B[single] / (dsingle if B.ndim == 1 else dsingle[:, None])
        for I, kind, f in self.blocks:
            X[I] = sl.cho_solve((f, False), B[I], check_finite=False) if kind == "chol" else f.solve(B[I])
        return X

    def diag(self):
        """``diag(Nss^-1)``: row sums of squares of ``U^-1`` (Cholesky) or unit-vector solves (LU)."""
        d = np.empty(self.n)
        if self.single.size:
            d[self.single] = 1.0 / self.dsingle
        for I, kind, f in self.blocks:
            if kind == "chol":
                ui, info = sl.lapack.dtrtri(f, lower=0)
                if info != 0:
                    raise np.linalg.LinAlgError("triangular inverse failed")
                d[I] = np.einsum("ij,ij->i", ui, ui)
            elif kind == "env":
                d[I] = f.diag()
            else:
                for j0 in range(0, I.size, 512):
                    j1 = min(I.size, j0 + 512)
                    E = np.zeros((I.size, j1 - j0))
                    E[np.arange(j0, j1), np.arange(j1 - j0)] = 1.0
                    d[I[j0:j1]] = f.solve(E)[np.arange(j0, j1), np.arange(j1 - j0)]
        return d


def _small_spd_solver(S):
    """Solver of a small dense symmetric matrix: Cholesky, or LU when rounding made it indefinite."""
    try:
        Sc = sl.cho_factor(S, lower=False, check_finite=False)

        def solve_b(R):
            return sl.cho_solve(Sc, R, check_finite=False)
    except sl.LinAlgError:  # rounding made the small Schur complement indefinite: LU
        Sl = sl.lu_factor(S, check_finite=False)

        def solve_b(R):
            return sl.lu_solve(Sl, R, check_finite=False)
    return solve_b


def factorise(N, dense_max: int = 10000, border=(), need_diag: bool = True, plan=None):
    """Factorise a symmetric positive-definite normal matrix once; return ``(solve, diag(N^-1))``.

    The factorisation follows the structure of ``N``.  The ``border`` unknowns
    (sky polynomial, global nonlinear parameters: columns coupled to every
    star) are eliminated last through their Schur complement; the remaining
    (star) unknowns split into the connected components of their coupling
    graph (stars whose stamps share no pixel are independent), each
    factorised by a dense Cholesky (LAPACK ``potrf``; ``diag(N_c^-1)`` as the
    row sums of squares of ``U_c^-1`` from ``trtri``), or, when larger than
    :data:`ENVELOPE_MIN` with a narrow profile in a bandwidth-reducing order
    (crowded fields), by a block envelope Cholesky (:class:`_EnvelopeFactor`:
    flops ``~ sum_i profile_i^2`` instead of ``n^3 / 3``; ``diag(N_c^-1)`` by the
    selected inverse on the envelope).  This is exact block
    elimination: the answer is that of one Cholesky of the whole matrix
    (to rounding), and the cost is the sum over components instead of the
    cube of the total.  A component larger than ``dense_max`` unknowns (the
    dense memory limit: ``8 dense_max^2`` bytes per copy) is factorised by
    sparse LU (SuperLU, symmetric mode, minimum-degree ordering), as is a
    component that is not positive definite.

    Parameters
    ----------
    N : scipy.sparse matrix or numpy.ndarray, shape (n, n)
        Symmetric positive-definite normal matrix (sum of weight x model^2 over pixels).  A dense
        array (:func:`normal_matrix` of a large field) is factorised from its dense blocks directly.
    dense_max : int
        Largest connected component factorised by dense Cholesky (unknowns).
    border : array_like of int
        Indices of the unknowns coupled to all others (eliminated last).
    need_diag : bool
        Also compute ``diag(N^-1)`` (the variances of the unknowns up to the noise scale).
    plan : dict, optional
        Holds the coupling structure of ``N`` (connected components, envelope orders): an empty
        dict is filled here; a dict filled by a call on a matrix with the same nonzero pattern and
        border (e.g. the next block of layers with the same design-matrix pattern) is reused, which
        skips the structure analysis.  The caller vouches that the pattern is the same.

    Returns
    -------
    solve : callable
        ``solve(B)`` returns ``N^-1 B`` for ``B`` of shape ``(n,)`` or ``(n, m)``.
    diag : numpy.ndarray of shape (n,) or None
        ``diag(N^-1)``; ``None`` when ``need_diag`` is False.
    """

    dense_in = isinstance(N, np.ndarray)
    N = N if dense_in else sp.csr_matrix(N)
    n = N.shape[0]
    isb = np.zeros(n, bool)
    isb[np.asarray(border, dtype=np.int64)] = True
    bidx, sidx = np.nonzero(isb)[0], np.nonzero(~isb)[0]
    if dense_in:
        Nsb, Nbb = N[np.ix_(sidx, bidx)], N[np.ix_(bidx, bidx)]
        lead = sidx.size and sidx[-1] == sidx.size - 1  # star unknowns first (the extraction's layout): a view
        Nss = N if not bidx.size else N[: sidx.size, : sidx.size] if lead else N[np.ix_(sidx, sidx)]
    else:
        Nss = N[sidx][:, sidx] if bidx.size else N
    comp = _ComponentFactor(Nss, dense_max, plan)
    del Nss
    solve_s = comp.solve
    if bidx.size == 0:
        return solve_s, (comp.diag() if need_diag else None)
    # border unknowns: Schur complement S = Nbb - Nbs Nss^-1 Nsb (small, dense)
    if not dense_in:
        Nsb = N[sidx][:, bidx].toarray()
        Nbb = N[bidx][:, bidx].toarray()
    Z = solve_s(Nsb)  # Nss^-1 Nsb
    S = Nbb - Nsb.T @ Z
    S = 0.5 * (S + S.T)
    solve_b = _small_spd_solver(S)

    def solve(B):
        B = np.asarray(B, dtype=np.float64)
        Ys = solve_s(B[sidx])
        Xb = solve_b(B[bidx] - Nsb.T @ Ys)
        X = np.empty_like(B)
        X[sidx] = Ys - Z @ Xb
        X[bidx] = Xb
        return X

    if not need_diag:
        return solve, None
    Sinv = solve_b(np.eye(bidx.size))
    d = np.empty(n)
    d[sidx] = comp.diag() + np.einsum("ij,ij->i", Z @ Sinv, Z)
    d[bidx] = np.diag(Sinv)
    return solve, d
