"""Starting points of a fit: coarse radial velocity, starting labels, refined velocity.

Vectorised over the spectra of a chunk (no Python loop per spectrum):

1. *Coarse RV*: chi2 of the data against a few templates (model at the centre of
   the label box, and Teff-like first label at +-0.3) shifted over a velocity grid
   (``+-rv_range``, step two model pixels by default), as matrix products; a parabola
   through the minimum refines it.
2. *Starting labels*: chi2 of the (velocity-corrected) data against a
   quasi-random (Sobol, :func:`scrambled_sobol`) grid of model spectra covering the label
   box; the ``n_starts`` best grid points start the fit.  The RV is then refined with
   each spectrum's best grid template (+-4 single pixels, exact shift).

This module owns :func:`scrambled_sobol` and :class:`_StartSearch`, the part of
:class:`~musepayne.fit.fitter.Fitter` that runs these two steps (``_coarse_rv``,
``_starts``, ``_refine_rv``).

May import: numpy, :mod:`musepayne.instrument`.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..instrument.wavelength import C_KMS

__all__ = ["scrambled_sobol"]


def _parabola_offset(chi, k):
    """Vertex of the parabola through ``chi[i, k-1:k+2]`` for each row, in grid steps from ``k``.

    Rows whose minimum ``k`` sits on the grid edge, or whose three points are not
    convex, get 0; offsets are clipped to one step.
    """
    off = np.zeros(chi.shape[0])
    ii = np.flatnonzero((k > 0) & (k < chi.shape[1] - 1))
    if ii.size:
        cm, c0, cp = chi[ii, k[ii] - 1], chi[ii, k[ii]], chi[ii, k[ii] + 1]
        den = cm - 2 * c0 + cp
        off[ii] = np.clip(np.where(den > 0, 0.5 * (cm - cp) / np.where(den > 0, den, 1), 0.0), -1, 1)
    return off



def scrambled_sobol(d: int, n: int, seed: int, bits: int = 30) -> np.ndarray:
    """``scipy.stats.qmc.Sobol(d, scramble=True, seed=seed).random(n)``, bit for bit, without
    importing ``scipy.stats`` (half a second of a small fit's start-up).

    The same algorithm: Joe & Kuo direction numbers (scipy's own table file), linear matrix
    scramble and digital shift drawn from ``numpy.random.default_rng(seed)`` in scipy's order,
    Gray-code order of points.  Falls back to scipy when its table file is not found; the
    tests compare both.

    Parameters
    ----------
    d : int
        Dimension (number of labels).
    n : int
        Number of points.
    seed : int
        Seed of the scramble.
    bits : int, optional
        Bits per coordinate (scipy's 30).

    Returns
    -------
    ndarray of float, shape (n, d)
        Points in the unit cube ``[0, 1)^d``.
    """
    spec = importlib.util.find_spec("scipy")
    table = (os.path.join(os.path.dirname(spec.origin), "stats", "_sobol_direction_numbers.npz")
             if spec is not None and spec.origin else "")
    if not (d >= 1 and os.path.isfile(table)):
        from scipy.stats import qmc  # noqa: PLC0415 - fallback only; scipy.stats costs 0.5 s of a fit's start-up

        return qmc.Sobol(d=d, scramble=True, seed=seed).random(n)
    with np.load(table) as dns:
        poly = [int(p) for p in dns["poly"][:d]]
        vinit = dns["vinit"][:d].astype(np.uint64)
    # direction numbers (Bratley & Fox 1988), then scaled to ``bits`` bits
    v = np.zeros((d, bits), np.uint64)
    v[0, :] = 1
    for k in range(1, d):
        p = poly[k]
        m = p.bit_length() - 1
        row = [int(x) for x in vinit[k, :m]] + [0] * (bits - m)
        for j in range(m, bits):
            new, pow2 = row[j - m], 1
            for q in range(m):
                pow2 <<= 1
                if (p >> (m - 1 - q)) & 1:
                    new ^= pow2 * row[j - q - 1]
            row[j] = new
        v[k] = row
    v = v * (np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64))[None, :]
    # scramble: digital shift, then lower-triangular (unit diagonal) linear matrix scramble
    rng = np.random.default_rng(seed)
    shift = (rng.integers(2, size=(d, bits), dtype=np.uint32).astype(np.uint64)
             @ (np.uint64(1) << np.arange(bits, dtype=np.uint64)))
    ltm = np.tril(rng.integers(2, size=(d, bits, bits), dtype=np.uint32))
    ltm[:, np.arange(bits), np.arange(bits)] = 1
    sv = np.zeros_like(v)
    for k in range(d):
        rows = [sum(int(ltm[k, p, bits - 1 - i]) << i for i in range(bits)) for p in range(bits)]
        for j in range(bits):
            vdj, t2 = int(v[k, j]), 0
            for p in range(bits):  # row p of the scramble gives bit bits-1-p
                t2 = 2 * t2 + (bin(rows[p] & vdj).count("1") & 1)
            sv[k, j] = t2
    # points in Gray-code order: x_0 = shift, x_{i+1} = x_i XOR sv[:, lowest zero bit of i]
    out = np.empty((n, d))
    quasi = shift.copy()
    if n:
        out[0] = quasi * (1.0 / 2 ** bits)
    for i in range(n - 1):
        low = ((~i) & (i + 1)).bit_length() - 1
        quasi = quasi ^ sv[:, low]
        out[i + 1] = quasi * (1.0 / 2 ** bits)
    return out



class _StartSearch:
    """Start-search part of :class:`~musepayne.fit.fitter.Fitter` (a mixin: uses its ``config``,
    ``dtype``, ``lnw``, ``segments``, ``_uniform``, ``_dv_pix``, ``ccf_flux``, ``_ccf``,
    ``grid_flux``, ``grid_planes`` and ``_shift``)."""

    def _ccf_templates(self):
        """Templates shifted over the coarse velocity grid (fixed for a model and config)."""
        cfg = self.config
        step = float(cfg.rv_step) if cfg.rv_step else 2.0 * self._dv_pix
        nv = int(np.floor(cfg.rv_range / step))
        vgrid = np.arange(-nv, nv + 1) * step
        nt = self.ccf_flux.shape[0]
        tf = np.repeat(self.ccf_flux, vgrid.size, axis=0)
        T, valid = self._shift(tf[:, None, :], np.tile(vgrid, nt))
        T = T[:, 0]
        common = valid.all(0)
        Tc = np.where(common, T, 0).astype(self.dtype)
        return vgrid, step, Tc, (Tc * Tc), common

    def _coarse_rv(self, d, w):
        """Coarse RV: minimum over templates and the velocity grid of chi2, refined by a parabola."""
        cfg = self.config
        if not cfg.fit_rv:
            return np.full(d.shape[0], cfg.rv_fixed)
        vgrid, step, Tc, T2, common = self._ccf
        nt = self.ccf_flux.shape[0]
        wc = (w * common).astype(self.dtype)
        wd = wc * d.astype(self.dtype)
        chi = -2.0 * (wd @ Tc.T) + wc @ T2.T  # (n, nt*nv), up to a constant per spectrum
        chi = chi.astype(np.float64).reshape(-1, nt, vgrid.size)
        best_t = np.argmin(chi.min(2), 1)
        c = chi[np.arange(chi.shape[0]), best_t]
        k = np.argmin(c, 1)
        v0 = vgrid[k].astype(np.float64)
        v0 += _parabola_offset(c, k) * step
        return np.clip(v0, -cfg.rv_range, cfg.rv_range)

    def _refine_rv(self, d, w, g_best, v0, half_width=4):
        """Second RV pass with each spectrum's own best grid template: chi2 at v0 +- ``half_width``
        model pixels (one-pixel steps, exact shift), parabola through the minimum.  The coarse
        search uses generic templates and can miss by a few pixels for broad-lined stars.

        On a single log-linear lattice the template is shifted once, to ``v0``; one more pixel
        of velocity is then one whole pixel of offset, so the other trial velocities are
        windows of that one shifted template (``lnD = lnD0 + k h``, ``v = c tanh(lnD)``).
        Only pixels valid at every trial offset and not crossing a segment gap count."""
        cfg = self.config
        hw = int(half_width)
        blocks = self._uniform
        if blocks is None or len(blocks) != 1 or d.shape[1] <= 2 * hw + 1:
            return self._refine_rv_general(d, w, g_best, v0, hw)
        dt = self.dtype
        m, p = d.shape
        h = blocks[0][2]
        T0, valid = self._shift(self.grid_planes[:, :1], v0, xrows=g_best)  # (the grid's flux planes, in place)
        T0 = T0[:, 0]
        n_c = p - 2 * hw
        win = np.lib.stride_tricks.sliding_window_view
        # window j holds T0[j + t] at centre pixel i = hw + t, i.e. the template at offset k = hw - j
        common = win(valid, n_c, axis=1).all(1) & self._same_segment(hw)[None, :]
        wc = (w[:, hw:p - hw] * common).astype(dt)
        wd = wc * d[:, hw:p - hw].astype(dt)
        chi = (np.einsum("nt,njt->nj", wc, win(T0 * T0, n_c, axis=1))
               - 2.0 * np.einsum("nt,njt->nj", wd, win(T0, n_c, axis=1)))
        chi = chi[:, ::-1].astype(np.float64)  # column q <-> offset k = q - hw
        q = np.argmin(chi, 1)
        b = np.asarray(v0, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b)) + (q - hw + _parabola_offset(chi, q)) * h
        return np.clip(C_KMS * np.tanh(lnD), -cfg.rv_range, cfg.rv_range)

    def _same_segment(self, hw):
        """Pixels ``hw .. n_pix - hw - 1`` whose +-``hw`` neighbours are all in their own segment."""
        seg = self.segments
        n_c = seg.size - 2 * hw
        return (np.lib.stride_tricks.sliding_window_view(seg, n_c) == seg[hw:seg.size - hw]).all(0)

    def _refine_rv_general(self, d, w, g_best, v0, half_width):
        """:meth:`_refine_rv` on general grids: the template shifted to every trial velocity."""
        cfg = self.config
        m = d.shape[0]
        step = self._dv_pix
        k = np.arange(-half_width, half_width + 1)
        vv = np.clip(v0[:, None] + k[None, :] * step, -cfg.rv_range, cfg.rv_range)
        T, valid = self._shift(np.repeat(self.grid_flux[g_best], k.size, axis=0)[:, None, :], vv.ravel())
        T = T[:, 0].reshape(m, k.size, -1)
        common = valid.reshape(m, k.size, -1).all(1)
        wc = (w * common).astype(self.dtype)
        # chi2 up to a per-spectrum constant: sum w T^2 - 2 sum w d T
        chi = (np.einsum("np,nkp->nk", wc, T * T) - 2.0 * np.einsum("np,nkp->nk", wc * d.astype(self.dtype), T))
        chi = chi.astype(np.float64)
        j = np.argmin(chi, 1)
        v1 = vv[np.arange(m), j]
        v1 += _parabola_offset(chi, j) * step
        return np.clip(v1, -cfg.rv_range, cfg.rv_range)

    def _starts(self, d, w, v0):
        """Best ``n_starts`` grid points per spectrum (chi2 in the rest frame, nearest-pixel shift)."""
        cfg = self.config
        Dm, Wm = self._to_rest(d, w, v0)
        G = self.grid_flux
        chi = -2.0 * (Dm @ G.T) + Wm @ self._grid_flux2.T
        k = min(cfg.n_starts, G.shape[0])
        best = np.argsort(chi, axis=1)[:, :k]
        return best

    def _to_rest(self, d, w, v):
        """Data moved to the rest frame at velocities ``v``, to the nearest model pixel:
        per rest pixel the sums of ``w d`` and of ``w`` (float32 ``(m, n_pix)`` each)."""
        m, p = d.shape
        b = np.asarray(v, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
        u = np.interp(self.lnw[None, :] - lnD[:, None], self.lnw, np.arange(p, dtype=np.float64))
        j = np.clip(np.rint(u).astype(np.int64), 0, p - 1)
        flat = (np.arange(m)[:, None] * p + j).ravel()
        Dm = np.bincount(flat, weights=(w * d).ravel(), minlength=m * p).reshape(m, p).astype(self.dtype)
        Wm = np.bincount(flat, weights=w.ravel(), minlength=m * p).reshape(m, p).astype(self.dtype)
        return Dm, Wm
