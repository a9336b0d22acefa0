"""The batched, bounded Levenberg-Marquardt core of a fit.

*Bounded Levenberg-Marquardt* on (scaled labels, v), one row per spectrum (or per
start), all rows of a chunk together: per-row damping (Marquardt diagonal scaling,
Nielsen 1999 update), Gauss-Newton normal matrix ``J^T W J`` from the analytic
Jacobian, and an active-set projection that keeps labels inside the training box
``[x_min, x_max]`` and ``|v| <= rv_range`` (parameters at a bound whose gradient
points outward are frozen for the step).  All ``n_starts`` starts run ``explore_iter``
iterations; each spectrum then keeps its lowest-chi2 start and continues until the
undamped Gauss-Newton step promises less than ``chi2_tol`` (or, at the kinks of
leaky-ReLU networks, an accepted step gains -- or a rejected one promised -- less than
``stall_tol``).

Where the time goes, and how it is kept small (all vectorised over the rows of a chunk):

* the model and its Jacobian are one *planar* array ``(rows, 1 + n_labels, n_pix)``
  (:meth:`SpectralModel.planar_kernel`), so every plane is a contiguous spectrum;
* on log-linear grids the shift is one whole-pixel offset per row plus a 4-tap filter:
  rows are aligned by one block gather and filtered with one weight per row and tap;
  grids split into segments on one common lattice (APOGEE chips) are shifted in one go
  (:mod:`musepayne.fit.forward`);
* the residual replaces the flux plane and one batched product of the sqrt(W)-weighted
  planes with themselves gives chi2, ``J^T W r`` and ``J^T W J`` together;
* the grid points' flux and Jacobian are precomputed, so the starts cost no network call;
* lazy Jacobians: the explored steps of all starts, and any trial that follows a
  rejected one, are first evaluated without the Jacobian (flux only); the Jacobian is
  computed only for the kept start and for accepted points;
* a rejected sub-sigma step (a kink) raises the damping to ~1 at once;
* the LM works on the window of grid columns holding every pixel with weight in the chunk
  (MUSE spectra use half of a LAMOST-grid model's pixels), cut at multiples of 64 columns so
  that numpy's SIMD sums over it (chi2, ``J^T W J``, ``J^T W r``) are those over the whole grid
  bit for bit (the terms outside are zero); the shift and the LSF-excess operators compute
  only the columns it needs, and an MLP's last layer only the rest-frame pixels those read
  (``Fitter._rest_model``).  Results are those of the whole grid, bit for bit.

Per row ``J^T W J`` and ``J^T W r`` are kept; the Jacobian planes only when the errors need
them (the sandwich covariance: they are then not evaluated again at the solution).

This module owns :class:`_LevenbergMarquardt`, the part of
:class:`~musepayne.fit.fitter.Fitter` that iterates (``_lm`` and its steps).

May import: numpy.
"""

from __future__ import annotations

import numpy as np


def _nielsen_update(lam, nu, ia, ir, gain, pred_acc, pred_rej):
    """Damping update of Nielsen (1999), in place: accepted rows ``ia`` (achieved ``gain``
    against the predicted ``pred_acc``), rejected rows ``ir`` (predicted ``pred_rej``)."""
    # rho = achieved / predicted gain
    rho = gain / np.maximum(pred_acc, 1e-300)
    lam[ia] = np.maximum(lam[ia] * np.maximum(1.0 / 3.0, 1.0 - (2.0 * np.minimum(np.maximum(rho, 0), 1) - 1.0) ** 3), 1e-9)
    nu[ia] = 2.0
    lam[ir] *= nu[ir]
    nu[ir] *= 2.0
    # a rejected step that promised less than one unit of chi2 (a sub-sigma step) failed
    # on a non-linearity at that small scale (a kink of a leaky-ReLU network): damp at
    # once to about half the step instead of doubling lam from ~1e-5 over many trials
    lam[ir] = np.where(pred_rej < 1.0, np.maximum(lam[ir], 1.0), lam[ir])


class _LevenbergMarquardt:
    """Optimiser part of :class:`~musepayne.fit.fitter.Fitter` (a mixin: uses its ``config``,
    ``lo``, ``hi``, ``_chi2_noise``, ``_assess`` and ``_chi2_at``)."""

    def _lm(self, theta, d, w, opi, n_iter, lam, state=None, stale=None, probe_all=False, final_jac=True):
        """Bounded Levenberg-Marquardt on the rows of ``theta`` (one row per spectrum/start).

        Per iteration and row: normal matrix ``A = J^T W J`` and gradient ``g = J^T W r``;
        parameters at a bound whose gradient points outward are frozen; the damped
        step solves ``(A + lam diag A) delta = g``; the trial point is clipped into the
        bounds and accepted when chi2 falls or rejected (damping update of Nielsen 1999).
        A row has converged when the undamped Gauss-Newton step predicts a chi2 gain
        below ``chi2_tol`` (or the float32 rounding noise of chi2), or when it is stuck
        (``lam > 1e8``).  ``state``: (f, chi2, ww, A, g, J) at ``theta`` if already known; its
        arrays are taken over (updated in place and returned), so callers pass arrays of their own.
        Per row ``A`` and ``g`` are kept, and the Jacobian planes ``J`` only when the errors
        need them (``J`` None otherwise; see :meth:`_assess`).

        Lazy Jacobians: a trial that is likely to be rejected is first *probed* (flux and
        chi2 only, a fraction of the cost); its Jacobian is computed only if it is accepted,
        at the start of the next iteration (rows marked ``stale``).  Probed are all trials
        with ``probe_all`` (the exploration of several starts, of which one is kept) and
        otherwise the trials that follow a rejection.  With ``final_jac=False`` rows may come
        back ``stale`` (their ``A``, ``g`` not yet evaluated at ``theta``).
        """
        cfg = self.config
        m, P = theta.shape
        theta = theta.copy()
        lam = lam.copy()
        if state is None:
            f, chi2, ww, A_all, g_all, J_all = self._assess(theta, opi, d, w)
        else:
            f, chi2, ww, A_all, g_all, J_all = state  # (fresh arrays of the caller's: updated in place)
        stale = np.zeros(m, bool) if stale is None else stale.copy()
        done = np.zeros(m, bool)
        iters = np.zeros(m, np.int64)
        nu = np.full(m, 2.0)
        rejected = np.zeros(m, bool)

        def refresh(rows):
            if rows.size:
                f[rows], chi2[rows], ww[rows], A_all[rows], g_all[rows], J = self._assess(
                    theta[rows], opi[rows], d[rows], w[rows])
                if J_all is not None:
                    J_all[rows] = J
                stale[rows] = False

        for _ in range(n_iter):
            refresh(np.flatnonzero(~done & stale))
            act = np.flatnonzero(~done)
            if act.size == 0:
                break
            th = theta[act]
            delta, pred_d, tol, conv = self._lm_steps(A_all[act], g_all[act], th, lam[act], chi2[act])
            done[act[conv]] = True
            keep = ~conv
            act, th, delta, tol, pred_d = act[keep], th[keep], delta[keep], tol[keep], pred_d[keep]
            if act.size == 0:
                break
            th_new = np.minimum(np.maximum(th + delta, self.lo), self.hi)  # (np.clip: 10x the call cost)
            probe = np.ones(act.size, bool) if probe_all else rejected[act]
            f_n, chi_n, ww_n, full, A_n, g_n, J_n = self._lm_trial(th_new, act, probe, opi, d, w, f, ww)
            acc = np.isfinite(chi_n) & (chi_n < chi2[act])
            ia = act[acc]
            gain = chi2[ia] - chi_n[acc]
            theta[ia], f[ia], chi2[ia], ww[ia] = th_new[acc], f_n[acc], chi_n[acc], ww_n[acc]
            if full.size:
                ka = acc[full]  # accepted rows evaluated with their Jacobian
                A_all[act[full[ka]]], g_all[act[full[ka]]] = A_n[ka], g_n[ka]
                if J_all is not None:
                    J_all[act[full[ka]]] = J_n[ka]
            stale[act[acc & probe]] = True
            rejected[act] = ~acc
            iters[act] += 1
            ir = act[~acc]
            _nielsen_update(lam, nu, ia, ir, gain, pred_d[acc], pred_d[~acc])
            # piecewise-smooth models (leaky ReLU) have kinks where Gauss-Newton keeps promising a
            # gain it cannot deliver: stop when an accepted step gains less than the stall
            # tolerance, or a rejected step was predicted to gain less than that (had it been
            # accepted, the fit would have stopped after it anyway)
            stall = np.maximum(tol, cfg.stall_tol)
            done[ia[gain < stall[acc]]] = True
            done[ir[(lam[ir] > 1e8) | (pred_d[~acc] < stall[~acc])]] = True
        if final_jac:
            refresh(np.flatnonzero(stale))
        return dict(theta=theta, f=f, chi2=chi2, ww=ww, A=A_all, g=g_all, J=J_all, lam=lam, done=done,
                    iters=iters, stale=stale)

    def _lm_steps(self, A, g, th, lam, chi2):
        """Damped and undamped steps of the rows ``(A, g)`` at ``th`` with damping ``lam``.

        Returns ``(delta, pred_d, tol, conv)``: the damped step (zero for parameters frozen at
        a bound), the chi2 gain it predicts, each row's convergence tolerance (``chi2_tol``, or
        the rounding noise of ``chi2`` at this precision) and whether the row has converged
        (the undamped Gauss-Newton step promises less than ``tol``, or is negligible)."""
        cfg = self.config
        P = th.shape[1]
        eps = 1e-9
        eye = np.eye(P)
        fixed = ((th <= self.lo + eps) & (g < 0)) | ((th >= self.hi - eps) & (g > 0))
        free = (~fixed).astype(np.float64)
        Af = A * free[:, :, None] * free[:, None, :] + eye * fixed[:, :, None]
        rhs = g * free
        diag = np.einsum("nkk->nk", Af).copy()
        diag = np.maximum(diag, 1e-12 * np.maximum(diag.max(1, keepdims=True), 1e-30))
        M = Af + (lam[:, None] * diag)[:, :, None] * eye
        try:
            delta = np.linalg.solve(M, rhs[:, :, None])[:, :, 0]
            d_gn = np.linalg.solve(Af + 1e-12 * diag[:, :, None] * eye, rhs[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            delta = np.stack([np.linalg.lstsq(Mi, ri, rcond=None)[0] for Mi, ri in zip(M, rhs)])
            d_gn = delta
        # tolerance: chi2_tol, or the rounding noise of chi2 at this precision
        tol = np.maximum(cfg.chi2_tol, self._chi2_noise * chi2)
        pred_gn = np.einsum("nk,nk->n", d_gn, rhs)  # chi2 gain the undamped step promises
        conv = (pred_gn < tol) | (np.max(np.abs(d_gn) / (self.hi - self.lo), axis=1) < 1e-9)
        pred_d = (2 * np.einsum("nk,nk->n", delta, rhs)
                  - np.einsum("nk,nkl,nl->n", delta, Af - eye * fixed[:, :, None], delta))
        return delta, pred_d, tol, conv

    def _lm_trial(self, th_new, act, probe, opi, d, w, f, ww):
        """Model at the trial points ``th_new`` of rows ``act``: the rows marked ``probe`` with
        flux and chi2 only (:meth:`_chi2_at`), the others with ``A`` and ``g`` too.  Returns
        ``(f_n, chi_n, ww_n, full, A_n, g_n, J_n)`` (``full``: positions evaluated in full, whose
        ``A_n``, ``g_n`` and Jacobian planes ``J_n`` these are; ``None`` when there are none)."""
        full, pr = np.flatnonzero(~probe), np.flatnonzero(probe)
        f_n, chi_n, ww_n = np.empty((act.size, f.shape[1]), f.dtype), np.empty(act.size), np.empty((act.size, ww.shape[1]))
        A_n = g_n = J_n = None
        if full.size:
            f_n[full], chi_n[full], ww_n[full], A_n, g_n, J_n = self._assess(
                th_new[full], opi[act[full]], d[act[full]], w[act[full]])
        if pr.size:
            f_n[pr], chi_n[pr], ww_n[pr] = self._chi2_at(th_new[pr], opi[act[pr]], d[act[pr]], w[act[pr]])
        return f_n, chi_n, ww_n, full, A_n, g_n, J_n
