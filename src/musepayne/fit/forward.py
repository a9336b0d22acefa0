"""The forward model of a fit: a rest-frame emulator spectrum as the data would see it.

The forward model
-----------------
``P(labels, v) = K_exc . S(v) . M(labels)``

* ``M`` -- the emulator (:mod:`musepayne.models.model`), a normalised rest-frame
  spectrum on the model's pixel grid, with its analytic Jacobian.
* ``S(v)`` -- the exact relativistic Doppler shift: a pixel observed at
  ``lambda_obs`` sees the rest wavelength ``lambda_obs / D``,
  ``D = sqrt((1 + v/c) / (1 - v/c))``.  The model is known only at its pixel
  centres, so ``S`` *interpolates* it at ``lambda_obs / D`` with a cubic
  Catmull-Rom (Keys a = -1/2) kernel in ``ln lambda``: four taps,
  C1-continuous, exact for quadratics, linear in the model flux (so the same
  weights shift the Jacobian) and differentiable in ``v`` (the weights'
  derivatives give d P / d v analytically).  Interpolating a *smooth model*
  sampled at >= 2 pixels per resolution element is accurate to well below
  the noise; linear interpolation would broaden lines by a shift-dependent
  amount and pull RVs to whole pixels.  Pixels whose rest wavelength falls
  outside the model grid (minus one pixel at each end) are not used.
* ``K_exc`` -- optional forward modelling of ``LSF_EXCESS``: where the data are
  broader than the model's LSF (MUSE below ~5400 A for LAMOST-grid models),
  the model is convolved by a Gaussian of that extra FWHM (a fixed sparse
  matrix per distinct excess profile, :func:`musepayne.prepare.resample.convolution_matrix`).
  Without it the model's lines are narrower than the data's there.  Measured
  (``benchmarks/lsf_offset_study.py``, 175 MILES stars simulated as MUSE and as
  LAMOST at S/N 1000): both the default model and a quadratic Cannon reach their
  lowest chi2 with the recorded excess (not with 0.5x or 1.5x it), and it moves
  Teff by only +6 K (ours) / -3 K (Cannon).  The MUSE - LAMOST Teff offset of
  +14 to +27 K reported for such comparisons is not a resolution effect: it comes
  from the IVAR-weighted pseudo-continuum, since MUSE pixels rebinned onto the LAMOST
  grid leave a beat pattern in IVAR (see the README).
  Switch: ``FitConfig.lsf_excess``.

This module owns the Doppler shift (:func:`doppler_factor`, :func:`shift_weights`,
:func:`grid_segments`) and :class:`_ForwardModel`, the part of
:class:`~musepayne.fit.fitter.Fitter` that evaluates ``P`` and its Jacobian for many
rows at once (``_shift``, ``_planes``), the quantities the optimiser needs there
(``_chi2``, ``_assess``: chi2, ``J^T W J`` and ``J^T W r`` from one batched product) and the
window of columns a chunk is evaluated on (``_window``, ``_rest_model``).

May import: numpy, :mod:`musepayne.instrument`, :mod:`musepayne.models`, :mod:`musepayne.fit.operators`.
"""

from __future__ import annotations

import numpy as np

from ..instrument.wavelength import C_KMS
from ..models.model import MLPPayne
from .operators import _RowOps

__all__ = ["doppler_factor", "shift_weights", "grid_segments"]


def doppler_factor(v_kms):
    """Relativistic Doppler factor ``D = lambda_obs / lambda_rest = sqrt((1+b)/(1-b))``, ``b = v/c``.

    Parameters
    ----------
    v_kms : float or array_like of float
        Radial velocity, km/s (positive: receding).

    Returns
    -------
    float or ndarray of float
        ``D`` (dimensionless), the shape of ``v_kms``.
    """
    b = np.asarray(v_kms, np.float64) / C_KMS
    return np.sqrt((1.0 + b) / (1.0 - b))


def _catmull_rom(t):
    """Cubic convolution weights (4 taps at j-1, j, j+1, j+2) and their t-derivatives."""
    t2 = t * t
    t3 = t2 * t
    c = np.stack([(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], -1)
    dc = np.stack([(-3 * t2 + 4 * t - 1) / 2, (9 * t2 - 10 * t) / 2, (-9 * t2 + 8 * t + 1) / 2, (3 * t2 - 2 * t) / 2], -1)
    return c, dc


def grid_segments(lnw):
    """Segment number of each pixel: a new segment starts after a gap (a step in ln lambda
    more than 1.5 times its neighbour's, e.g. between detector chips).

    Parameters
    ----------
    lnw : ndarray of float, shape (n_pix,)
        Natural log of the pixel wavelengths (ln Angstrom), increasing.

    Returns
    -------
    ndarray of int, shape (n_pix,)
        Segment number of each pixel, 0 for the first.
    """
    d = np.diff(lnw)
    brk = np.zeros(d.size, bool)
    brk[1:] |= d[1:] > 1.5 * d[:-1]
    brk[:-1] |= d[:-1] > 1.5 * d[1:]
    if d.size == 1:
        brk[:] = False
    return np.r_[0, np.cumsum(brk)]


def shift_weights(lnw_model, lnw_data, v_kms, segments=None):
    """Interpolation taps for evaluating a rest-frame model at ``lambda_data / D(v)``.

    Returns ``(j0, c, dc_dv, valid)``: first tap index ``(m, n_data)`` (taps
    ``j0 .. j0+3``), weights ``c (m, n_data, 4)``, their derivatives with respect to
    ``v`` (km/s) and the pixels whose rest wavelength lies inside the model grid
    (one pixel margin each side) with all four taps in one grid segment
    (``segments``: :func:`grid_segments`; no interpolation across chip gaps).

    Parameters
    ----------
    lnw_model : ndarray of float, shape (n_model,)
        ln of the model's rest-frame pixel wavelengths (ln Angstrom).
    lnw_data : ndarray of float, shape (n_data,)
        ln of the observed pixel wavelengths (ln Angstrom).
    v_kms : float or array_like of float, shape (m,)
        Radial velocities, km/s.
    segments : ndarray of int, shape (n_model,), optional
        Segment number of each model pixel.

    Returns
    -------
    j0 : ndarray of int, shape (m, n_data)
        Index of the first of the four taps in the model grid.
    c : ndarray of float, shape (m, n_data, 4)
        Interpolation weights.
    dc_dv : ndarray of float, shape (m, n_data, 4)
        Derivatives of the weights with respect to ``v``, per km/s.
    valid : ndarray of bool, shape (m, n_data)
        Pixels the model can be evaluated at.
    """
    v = np.atleast_1d(np.asarray(v_kms, np.float64))
    b = v / C_KMS
    lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
    x = lnw_data[None, :] - lnD[:, None]
    p = lnw_model.size
    u = np.interp(x, lnw_model, np.arange(p, dtype=np.float64))
    valid = (x >= lnw_model[1]) & (x <= lnw_model[-2])
    j = np.clip(np.floor(u).astype(np.int64), 1, p - 3)
    if segments is not None:
        valid &= segments[j - 1] == segments[j + 2]
    t = u - j
    c, dc = _catmull_rom(t)
    dudx = 1.0 / (lnw_model[j + 1] - lnw_model[j])
    # d lnD / dv = 1 / (c (1 - b^2)) ; x = ln(lambda) - lnD  => du/dv = -du/dx * dlnD/dv
    dudv = -dudx / (C_KMS * (1.0 - b * b))[:, None]
    return j - 1, c, dc * dudv[:, :, None], valid



class _ForwardModel:
    """Forward-model part of :class:`~musepayne.fit.fitter.Fitter` (a mixin: uses its ``model``,
    ``config``, ``dtype``, ``lnw``, ``segments`` and ``_uniform``)."""

    def _uniform_segments(self):
        """Blocks on which the shift is one constant number of pixels, or None (general path).

        Every grid segment must be uniform in ln lambda (log-linear grids: LAMOST, APOGEE
        chips) to 1e-4 pixel.  When all segments also lie on one common lattice (same step,
        starts a whole number of steps apart: the APOGEE chips), they form one block, so the
        shift runs once over the whole spectrum.  Returns ``[(start, stop, step, s0, s1)]``
        where ``s0``/``s1`` give, per pixel of the block, the bounds of its own segment.
        """
        segs = []
        for sg in np.unique(self.segments):
            idx = np.flatnonzero(self.segments == sg)
            if idx.size < 5:
                return None
            x = self.lnw[idx]
            i = np.arange(idx.size, dtype=np.float64)
            h, a = np.polyfit(i, x, 1)
            if np.max(np.abs(x - (a + h * i))) > 1e-4 * h:
                return None
            segs.append((int(idx[0]), int(idx[-1]) + 1, float(h)))
        h0 = segs[0][2]
        k = (self.lnw[[a for a, _, _ in segs]] - self.lnw[0]) / h0
        if all(abs(h / h0 - 1) < 1e-6 for _, _, h in segs) and np.all(np.abs(k - np.round(k)) < 1e-3):
            s0 = np.concatenate([np.full(e - a, a) for a, e, _ in segs])
            s1 = np.concatenate([np.full(e - a, e) for a, e, _ in segs])
            blocks = [(0, self.lnw.size, float(np.mean([h for _, _, h in segs])), s0, s1)]
        else:
            blocks = [(a, e, h, np.full(e - a, a), np.full(e - a, e)) for a, e, h in segs]
        # pixel i (taps i+o-1 ... i+o+2) is valid for whole-pixel offsets lo_i <= o <= hi_i:
        # all taps inside its own segment [s0, s1) with a one-pixel margin at each end
        out = []
        for a, e, h, s0, s1 in blocks:
            i = np.arange(a, e)
            out.append((a, e, h, (s0 - i + 2).astype(np.int32), (s1 - i - 4).astype(np.int32)))
        return out

    def _shift(self, X, v, rv_plane=False, cols=None, xoff=0, xrows=None):
        """Shift rest-frame planes ``X (m, Q, n_pix)`` (plane 0 the flux) to velocities ``v``.

        Returns ``(Y, valid)``: ``Y (m, Q + rv_plane, n_pix)`` the planes interpolated at
        ``lambda_obs / D(v)`` and, with ``rv_plane``, a last plane d flux / d v (the
        derivative of the interpolation weights applied to plane 0); ``valid (m, n_pix)``
        marks pixels whose four taps lie inside the pixel's own grid segment with a
        one-pixel margin.  Values at invalid pixels are finite but meaningless (weights zero them).

        On log-linear blocks a row's shift is one constant number of pixels, so each row
        is first aligned by its whole-pixel offset (one block gather through a sliding-window
        view of the zero-padded block, no per-pixel index arrays) and the four-tap filter
        then runs on contiguous planes with one weight per row and tap.

        ``cols=(x0, x1)``: only observed columns ``x0 .. x1 - 1`` (``Y`` and ``valid`` that
        wide), each computed as over the whole grid.  ``xoff``: column 0 of ``X`` is grid column
        ``xoff`` (``X`` holds the rest-frame columns the taps of ``cols`` read; log-linear grids).
        ``xrows``: row ``r`` of the result shifts ``X[xrows[r]]`` (e.g. precomputed grid planes,
        read in place instead of gathered first).
        """
        if self._uniform is None:
            Y, valid = self._shift_general(X if xrows is None else X[xrows], v, rv_plane)
            return (Y, valid) if cols is None else (Y[:, :, cols[0]:cols[1]], valid[:, cols[0]:cols[1]])
        dt = self.dtype
        _, Q, n_x = X.shape
        m = np.size(v)
        p = self.lnw.size
        x0, x1 = (0, p) if cols is None else cols
        b = np.asarray(v, np.float64) / C_KMS
        lnD = 0.5 * (np.log1p(b) - np.log1p(-b))
        Y = np.empty((m, Q + int(rv_plane), x1 - x0), dt)
        valid = np.zeros((m, x1 - x0), bool)
        for a, e, h, o_lo, o_hi in self._uniform:
            a2, e2 = max(a, x0), min(e, x1)  # the block's columns computed
            if e2 <= a2:
                continue
            n_s, n2 = e - a, e2 - a2
            delta = -lnD / h  # rest position of obs pixel i: u = i + delta
            fl = np.floor(delta)
            c, dc = _catmull_rom(delta - fl)  # (m, 4)
            c = c.astype(dt)
            o = fl.astype(np.int64)  # taps at i + o - 1 ... i + o + 2
            o32 = np.minimum(np.maximum(o, -2**30), 2**30).astype(np.int32)[:, None]  # (np.clip: 10x the call cost)
            np.logical_and(o32 >= o_lo[a2 - a:e2 - a], o32 <= o_hi[a2 - a:e2 - a], out=valid[:, a2 - x0:e2 - x0])
            # al[r, :, j] = X[r, :, a2 + j + o_r - 1], zero outside the block: each row is one
            # slice copy (offsets beyond the block are clipped as a zero padding of
            # min(|o|, n_s) + 2 pixels would clip them)
            pad = int(min(np.abs(o).max(), n_s)) + 2
            s0 = np.minimum(np.maximum(pad + o - 1, 0), n_s + 2 * pad - (n_s + 3)) - pad  # first tap - pixel
            s0 += a2 - a  # first tap of the first column computed, from the block's start
            al = np.empty((m, Q, n2 + 3), dt)
            src = a - xoff  # block start in X's columns
            for r in range(m):
                lo, hi = max(0, -s0[r], -src - s0[r]), min(n2 + 3, n_s - s0[r], n_x - src - s0[r])
                if hi > lo:
                    al[r, :, lo:hi] = X[r if xrows is None else xrows[r], :, src + s0[r] + lo:src + s0[r] + hi]
                else:
                    lo = hi = 0
                al[r, :, :lo] = 0
                al[r, :, hi:] = 0
            seg = Y[:, :Q, a2 - x0:e2 - x0]
            tmp = np.empty_like(seg)
            np.multiply(al[:, :, 0:n2], c[:, 0, None, None], out=seg)
            for k in range(1, 4):
                seg += np.multiply(al[:, :, k:k + n2], c[:, k, None, None], out=tmp)
            if rv_plane:
                dudv = -1.0 / (h * C_KMS * (1.0 - b * b))
                dcv = (dc * dudv[:, None]).astype(dt)
                rv = Y[:, Q, a2 - x0:e2 - x0]
                np.multiply(al[:, 0, 0:n2], dcv[:, 0, None], out=rv)
                tmp = tmp[:, 0]
                for k in range(1, 4):
                    rv += np.multiply(al[:, 0, k:k + n2], dcv[:, k, None], out=tmp)
        return Y, valid

    def _shift_general(self, X, v, rv_plane=False):
        """General grids: per-pixel interpolation weights (see :func:`shift_weights`)."""
        m, Q, p = X.shape
        j0, c, dc, valid = shift_weights(self.lnw, self.lnw, v, self.segments)
        c = c.astype(self.dtype)
        Y = np.zeros((m, Q + int(rv_plane), p), self.dtype)
        for k in range(4):
            Xk = np.take_along_axis(X, (j0 + k)[:, None, :], axis=2)
            Y[:, :Q] += c[:, None, :, k] * Xk
            if rv_plane:
                Y[:, Q] += dc[:, :, k].astype(self.dtype) * Xk[:, 0]
        return Y, valid

    def _apply_ops(self, Y, opi):
        """Convolve the rows that have an LSF-excess operator (every plane: flux and Jacobian), in place."""
        idx = opi.index
        for o in np.unique(idx[idx >= 0]):
            sel = np.flatnonzero(idx == o)
            opi.ops[o].apply(Y, sel)
        return Y

    def _planes(self, theta, opi, want_jac=True, rest=None):
        """Observed-frame model planes at ``theta``: ``(Y, valid)``, ``Y (m, 1 [+ n_par], n_pix)``,
        plane 0 the flux, then d flux / d (scaled labels, v).  ``rest``: when ``theta``'s labels are
        grid points (the starts), their indices into the precomputed ``grid_planes``."""
        L = self.model.n_labels
        s = theta[:, :L]
        v = theta[:, L] if self.config.fit_rv else np.full(theta.shape[0], self.config.rv_fixed)
        win = opi.window
        model, xoff = self.model, 0
        if win is not None and win[4] is not None and rest is None:
            xoff, model = win[4], win[5]  # the model's columns the window's taps read
        xrows = None
        if rest is not None:
            X, xrows = self.grid_planes, rest
        elif want_jac:
            X = model.planar_kernel(s, self.dtype)
        else:
            X = model.predict_scaled(s, self.dtype)[:, None, :]
        return self._observe(X, v, opi, rv_plane=want_jac and self.config.fit_rv, xoff=xoff, xrows=xrows)

    def _observe(self, X, v, opi, rv_plane=False, xoff=0, xrows=None):
        """Rest-frame planes ``X (m or len(X), k, n)`` (rows ``xrows`` of ``X`` when given; columns
        from the model's column ``xoff``) in the observed frame at velocities ``v``: shifted,
        convolved with the rows' LSF-excess operators and cut to the fit's columns: ``(Y, valid)``
        (the part of :meth:`_planes` after the network; ``X`` is linear in these steps)."""
        win = opi.window
        Y, valid = self._shift(X, v, rv_plane=rv_plane, cols=None if win is None else win[:2], xoff=xoff,
                               xrows=xrows)
        if np.any(opi.index >= 0):
            Y = self._apply_ops(Y, opi)
        if win is not None:  # planes computed on x0 .. x1 - 1, used on c0 .. c1 - 1
            x0, _, c0, c1 = win[:4]
            Y, valid = Y[:, :, c0 - x0:c1 - x0], valid[:, c0 - x0:c1 - x0]
        return Y, valid

    def _evaluate(self, theta, opi, want_jac=True):
        """``(f (m, n_pix), J (m, n_pix, n_par) or None, valid)`` (for tests and benchmarks);
        ``opi``: :class:`_RowOps`, or an index array of -1 (no LSF-excess operator)."""
        if not isinstance(opi, _RowOps):
            opi = _RowOps(np.asarray(opi), ())
        Y, valid = self._planes(theta, opi, want_jac)
        J = np.ascontiguousarray(Y[:, 1:].transpose(0, 2, 1)) if want_jac else None
        return np.ascontiguousarray(Y[:, 0]), J, valid

    def _chi2(self, f, valid, d, w):
        r = d - f
        ww = w * valid
        return np.einsum("np,np->n", ww, r * r), r, ww

    def _assess(self, theta, opi, d, w, rest=None):
        """Model at ``theta`` and what LM needs there: f, chi2, weights used, A = J^T W J, g = J^T W r,
        and the Jacobian planes ``J (m, n_par, n_pix)`` when the errors need them (the sandwich
        covariance, :meth:`_ErrorEstimates._estimates`; else None).

        The residual replaces the flux plane, every plane is multiplied by sqrt(W), and one
        batched product of the planes with themselves gives chi2, ``g`` and ``A`` together."""
        Y, valid = self._planes(theta, opi, rest=rest)
        f = Y[:, 0].copy()
        J = Y[:, 1:].copy() if self._keep_jac else None
        chi2, r, ww = self._chi2(f, valid, d, w)
        Y[:, 0] = r
        Y *= np.sqrt(ww).astype(self.dtype)[:, None, :]
        M = np.einsum("nqp,nrp->nqr", Y, Y).astype(np.float64)
        return f, chi2, ww, np.ascontiguousarray(M[:, 1:, 1:]), np.ascontiguousarray(M[:, 1:, 0]), J

    def _chi2_at(self, theta, opi, d, w):
        """Flux, chi2 and used weights at ``theta`` without the Jacobian (a probe)."""
        Y, valid = self._planes(theta, opi, want_jac=False)
        f = Y[:, 0]
        chi2, _, ww = self._chi2(f, valid, d, w)
        return f, chi2, ww

    def _window(self, w):
        """Columns ``c0 .. c1 - 1`` of the grid that hold every pixel with weight in the rows of
        ``w`` (all columns with ``keep_model``, whose model spectra cover the whole grid)."""
        p = w.shape[1]
        cols = np.flatnonzero(np.any(w > 0, axis=0))
        if self.config.keep_model or cols.size == 0:
            return 0, p
        c0 = int(cols[0]) // 64 * 64
        c1 = min(p, c0 + -(-(int(cols[-1]) + 1 - c0) // 64) * 64)
        return c0, c1

    def _rest_model(self, x0, x1):
        """``(r0, model)``: the model restricted to the rest-frame columns ``r0 ..`` that observed
        columns ``x0 .. x1 - 1`` read at any velocity within ``rv_range`` (MLP models on log-linear
        grids: the last layer's rows of those pixels; its products give those columns of the
        whole model's, bit for bit), or ``(None, None)`` (the whole model)."""
        p = self.lnw.size
        if type(self.model) is not MLPPayne or self._uniform is None:
            return None, None
        h = min(blk[2] for blk in self._uniform)
        margin = int(np.ceil(np.arctanh(self.config.rv_range / C_KMS) / h)) + 4
        r0, r1 = max(0, x0 - margin) // 64 * 64, min(p, x1 + margin)
        if r1 - r0 < 256 or r1 - r0 > 0.9 * p:
            return None, None
        m = self.model
        sub = MLPPayne(m.weights[:-1] + [m.weights[-1][r0:r1]], m.biases[:-1] + [m.biases[-1][r0:r1]],
                       m.label_names, m.x_min, m.x_max, m.wave[r0:r1], frame=m.frame,
                       negative_slope=m.negative_slope)
        return r0, sub
