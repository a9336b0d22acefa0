"""Errors and per-spectrum results of a fit: covariance, error scaling, goodness of fit, status.

Errors
------
Covariance ``C = (J^T W J)^{-1}`` at the solution (labels and RV jointly, so
label errors include their correlation with v).  When the fit is worse than the
stated errors allow, ``chi2 / (n - n_par) > 1``, errors are multiplied by
``sqrt(chi2 / (n - n_par))``: MUSE pipeline flux errors are underestimated by a
factor 2-5 (paper Fig. 3), and the covariance with the stated errors would then
understate the label errors by the same factor.  With correct errors the factor
is ~1 and the errors are the Cramér-Rao bound of the model.
With the model's intrinsic scatter in the variance but not in the fit weights
(``FitConfig.model_scatter='errors'``), the covariance is the sandwich ``A^-1 B A^-1`` of
that estimator.

This module owns :class:`_ErrorEstimates`, the part of :class:`~musepayne.fit.fitter.Fitter`
that turns a converged chunk into results (``_estimates``: chi2, covariance, errors, flux
correlation; ``_store``: the rows of :class:`~musepayne.fit.fitter.FitArrays`, with status
and reason).

May import: numpy.
"""

from __future__ import annotations

import numpy as np


class _ErrorEstimates:
    """Error-estimation part of :class:`~musepayne.fit.fitter.Fitter` (a mixin: uses its
    ``model``, ``config``, ``n_par``, ``lo``, ``hi``, ``_use_scatter``, ``_use_members`` and the
    forward model's ``_observe``)."""

    def _estimates(self, st, d, w_obs, opi):
        """Chi2, covariance and errors of the solutions ``st`` (what :meth:`_lm` returns) of a
        chunk with data ``d`` and observed weights ``w_obs``: a dict of per-row arrays
        (``chi2``, ``chi2_model``, ``n_used``, ``scale``, ``cov_phys``, ``err``, ``labels``,
        ``corr``, ``at_lo``, ``at_hi``)."""
        cfg = self.config
        L = self.model.n_labels
        P = self.n_par
        m = d.shape[0]
        scatter = self._use_scatter
        theta, ww, f, A = st["theta"], st["ww"], st["f"], st["A"]
        used = ww > 0
        n_used = used.sum(1)
        # chi2 with the observed errors (paper Eq. 3) and, with a scatter, with 1/ivar + s_p^2
        r2 = np.where(used, (d - f.astype(np.float64)) ** 2, 0.0)
        w_obs_used = np.where(used, w_obs, 0.0)
        chi2 = np.einsum("np,np->n", w_obs_used, r2)
        chi2_model = (np.einsum("np,np->n", self.model.inflate_ivar(w_obs_used), r2) if scatter
                      else np.full(m, np.nan))
        # covariance in (scaled labels, v); guard singular matrices
        try:  # (one call for the chunk: the same LAPACK solve per matrix as one call each)
            cov = np.linalg.inv(A)
        except np.linalg.LinAlgError:
            cov = np.full((m, P, P), np.nan)
            for i in range(m):
                try:
                    cov[i] = np.linalg.inv(A[i])
                except np.linalg.LinAlgError:
                    if np.all(np.isfinite(A[i])):  # (pinv of a non-finite matrix raises: that row stays NaN)
                        cov[i] = np.linalg.pinv(A[i])
        # the Jacobian planes at the solution the LM kept (when the errors need them), in float64 once
        J64 = None if st.get("J") is None else st["J"].astype(np.float64)
        if scatter and cfg.model_scatter == "errors":
            # labels fitted with W = ivar while the variance is 1/ivar + s^2: cov = A^-1 B A^-1 with
            # B = J^T W (W^-1 + S) W J = A + J^T diag(W^2 s^2) J
            # (J: the Jacobian planes at the solution the LM kept, on its window of weighted
            # pixels: the terms outside it are zero)
            cols = slice(None) if opi.window is None else slice(*opi.window[2:4])
            ws = (w_obs_used * self.model.scatter)[:, cols]
            Jw = J64 * ws[:, None, :]
            B = A + np.einsum("nqp,nrp->nqr", Jw, Jw)
            cov = np.einsum("nij,njk,nkl->nil", cov, B, cov)
        dof = np.maximum(n_used - P, 1)
        rchi_dof = (chi2_model if scatter else chi2) / dof
        scale = np.sqrt(np.maximum(rchi_dof, 1.0)) if cfg.scale_errors else np.ones(m)
        conv_scale = np.r_[self.model.scale_width, [1.0] if cfg.fit_rv else []]
        cov_phys = cov * conv_scale[None, :, None] * conv_scale[None, None, :] * (scale ** 2)[:, None, None]
        err = np.sqrt(np.clip(np.einsum("nkk->nk", cov_phys), 0, None))
        labels = self.model.unscale(theta[:, :L])
        # Pearson correlation of data and best-fit model over used pixels
        dd = np.where(used, d, 0.0)
        ff = np.where(used, f.astype(np.float64), 0.0)
        nu = np.maximum(n_used, 1)
        md, mf = dd.sum(1) / nu, ff.sum(1) / nu
        xd, xf = np.where(used, d - md[:, None], 0), np.where(used, ff - mf[:, None], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = (xd * xf).sum(1) / np.sqrt((xd * xd).sum(1) * (xf * xf).sum(1))
        at_lo = theta <= self.lo + 1e-6 * (self.hi - self.lo)
        at_hi = theta >= self.hi - 1e-6 * (self.hi - self.lo)
        err_seed = self._seed_spread(st, opi, J64) if self._use_members else None
        return dict(chi2=chi2, chi2_model=chi2_model, n_used=n_used, scale=scale, cov_phys=cov_phys, err=err,
                    labels=labels, corr=corr, at_lo=at_lo, at_hi=at_hi, err_seed=err_seed)

    def _seed_spread(self, st, opi, J64):
        """(m, n_labels) spread of the labels over the model and its seed members (physical units);
        ``J64``: the kept Jacobian planes ``st['J']`` in float64.

        Member ``k`` predicts ``M_k(s) = M_0(s) + D_k(s)``.  Fitted with it, the labels of a
        spectrum move, to first order, by ``dtheta_k = A^-1 J^T W D_k`` (``A = J^T W J`` and
        ``J`` at the solution, ``W`` the fit's weights; ``D_k`` taken through the same Doppler
        shift and LSF-excess convolution as the model).  The spread is the standard deviation
        (ddof 1) of ``{0, dtheta_1, ..., dtheta_K}``: the scatter of the labels between networks
        trained with different seeds, i.e. the model's own uncertainty where the training set
        leaves it undetermined.  It is not scaled by ``sqrt(chi2 / dof)`` (it is no noise)."""
        model = self.model
        L = model.n_labels
        theta, A = st["theta"], st["A"]
        m = theta.shape[0]
        s = theta[:, :L]
        v = theta[:, L] if self.config.fit_rv else np.full(m, self.config.rv_fixed)
        win = opi.window
        r0, r1 = 0, model.n_pix
        if win is not None and win[4] is not None:  # the rest-frame columns the window's pixels read
            r0, r1 = win[4], win[4] + win[5].n_pix
        X = np.stack([mem.predict_scaled_columns(s, r0, r1, self.dtype) for mem in model.seed_members], 1)
        Y, valid = self._observe(X, v, opi, xoff=r0)
        cols = slice(None) if win is None else slice(*win[2:4])
        Y -= st["f"][:, None, cols].astype(Y.dtype)  # the members' spectra minus the model's, observed
        ww = np.where(valid, st["ww"][:, cols], 0.0)
        Jw = J64 * ww[:, None, :]
        g = np.einsum("nqp,nkp->nqk", Jw, Y.astype(np.float64))  # (m, P, K)
        try:
            dth = np.linalg.solve(A, g)
        except np.linalg.LinAlgError:  # a singular matrix in the chunk: row by row, NaN for it
            dth = np.full(g.shape, np.nan)
            for i in range(m):
                try:
                    dth[i] = np.linalg.solve(A[i], g[i])
                except np.linalg.LinAlgError:
                    pass
        shifts = np.concatenate([np.zeros((m, L, 1)), dth[:, :L]], 2)  # (m, L, 1 + K), scaled labels
        return shifts.std(axis=2, ddof=1) * model.scale_width[None, :]

    def _store(self, idx, st, iters, est, out):
        """Write the results of a chunk (solutions ``st``, iteration counts ``iters``, the
        :meth:`_estimates` ``est``) into rows ``idx`` of ``out``, with status and reason."""
        cfg = self.config
        L = self.model.n_labels
        P = self.n_par
        m = idx.size
        theta, f = st["theta"], st["f"]
        labels, err, chi2, chi2_model = est["labels"], est["err"], est["chi2"], est["chi2_model"]
        n_used, corr, scale, cov_phys = est["n_used"], est["corr"], est["scale"], est["cov_phys"]
        at_lo, at_hi = est["at_lo"], est["at_hi"]
        names = list(self.model.label_names) + (["rv"] if cfg.fit_rv else [])
        for i in range(m):
            g = idx[i]
            edge = [names[k] + ("<" if at_lo[i, k] else ">") for k in range(P) if at_lo[i, k] or at_hi[i, k]]
            finite = np.isfinite(chi2[i]) and np.all(np.isfinite(theta[i]))  # chi2 with observed errors
            if not finite:
                out.status[g], out.reason[g] = "failed:numerical", "non-finite chi2 or labels"
                continue
            out.labels[g] = labels[i]
            out.labels_err[g] = err[i, :L]
            if est["err_seed"] is not None:
                out.labels_err_seed[g] = est["err_seed"][i]
            out.rv[g] = theta[i, L] if cfg.fit_rv else cfg.rv_fixed
            out.rv_err[g] = err[i, L] if cfg.fit_rv else 0.0
            out.chi2[g] = chi2[i]
            out.red_chi2[g] = chi2[i] / max(n_used[i], 1)
            out.red_chi2_model[g] = chi2_model[i] / max(n_used[i], 1)
            out.corr_flux[g] = corr[i]
            out.n_pix_used[g] = n_used[i]
            out.n_iter[g] = iters[i]
            out.error_scale[g] = scale[i]
            out.cov[g] = cov_phys[i]
            out.edge_labels[g] = ",".join(edge)
            if edge:
                out.status[g] = "edge"
                out.reason[g] = "solution at the model's training-range (or RV) bound: " + ", ".join(edge)
            elif not st["done"][i]:
                out.status[g] = "not_converged"
                out.reason[g] = f"no convergence in {cfg.max_iter} iterations"
            else:
                out.status[g] = "converged"
            if out.model_flux is not None:
                out.model_flux[g] = f[i]
