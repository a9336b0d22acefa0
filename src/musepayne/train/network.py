"""The PyTorch side of training: the networks, their analytic label Jacobian, the losses, the Adam loop.

:func:`fit_network` optimises one network on scaled labels (``(l - x_min) / (x_max - x_min) - 0.5``)
with the loss of :mod:`musepayne.train.trainer` (ivar-weighted data term plus the DD-Payne
gradient term at the reference stars) and early stopping on the validation score; it returns
plain numpy parameters and the loss history.  Everything here runs inside one call (no state
kept between calls); the seed, deterministic algorithms and device are set per call and the
previous deterministic-algorithms setting is restored.

torch is imported only when training runs (:func:`torch_module`, the optional ``train`` extra).
May import numpy and rich only; :mod:`musepayne.train.trainer` is the public entry point.
"""

from __future__ import annotations

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["torch_module", "fit_network"]


def torch_module():
    """The torch module, or an ImportError that names the extra to install.

    Returns
    -------
    module
        :mod:`torch`.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    """
    try:
        import torch  # noqa: PLC0415 - heavy optional dependency, loaded when used
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("training needs PyTorch: pip install 'musepayne[train]'") from exc
    return torch


class _Net:
    """Parameters and the forward pass + analytic label Jacobian (forward mode)."""

    def __init__(self, torch, arch, n_labels, n_pix, hidden, slope, dtype, device, mean_flux):
        self.t, self.arch, self.slope = torch, arch, slope
        g = torch.Generator(device="cpu")
        g.manual_seed(int(torch.initial_seed()) % (2**63))
        self.params = []
        if arch == "mlp":
            sizes = [n_labels, *hidden, n_pix]
            self.W, self.b = [], []
            for i in range(len(sizes) - 1):
                fan_in = sizes[i]
                # Kaiming-uniform for leaky ReLU; the last layer small so the start is the mean spectrum
                bound = np.sqrt(6.0 / fan_in) if i < len(sizes) - 2 else 0.1 / np.sqrt(fan_in)
                W = (torch.rand(sizes[i + 1], fan_in, generator=g, dtype=torch.float64) * 2 - 1) * bound
                b = torch.zeros(sizes[i + 1], dtype=torch.float64)
                if i == len(sizes) - 2:
                    b = torch.as_tensor(mean_flux, dtype=torch.float64).clone()
                self.W.append(W.to(device=device, dtype=dtype).requires_grad_(True))
                self.b.append(b.to(device=device, dtype=dtype).requires_grad_(True))
            self.params = self.W + self.b
        else:
            nh = hidden[0]
            w0 = (torch.rand(n_pix, nh, n_labels, generator=g, dtype=torch.float64) * 2 - 1) * 1.0
            b0 = (torch.rand(n_pix, nh, generator=g, dtype=torch.float64) * 2 - 1) * 0.5
            w1 = (torch.rand(n_pix, nh, generator=g, dtype=torch.float64) * 2 - 1) * 0.05
            m = torch.as_tensor(mean_flux, dtype=torch.float64)
            b1 = m - 0.5 * w1.sum(1)
            self.w0, self.b0, self.w1, self.b1 = (p.to(device=device, dtype=dtype).requires_grad_(True)
                                                  for p in (w0, b0, w1, b1))
            self.params = [self.w0, self.b0, self.w1, self.b1]

    def forward(self, x, with_jac=False):
        """x: scaled labels (n, nl). Returns flux (n, npix) and, if asked, d flux / d x (n, npix, nl)."""
        t = self.t
        if self.arch == "mlp":
            h = x
            dh = None
            if with_jac:
                dh = t.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)  # (n, nl, nl)
            L = len(self.W)
            for i in range(L):
                z = h @ self.W[i].T + self.b[i]
                if with_jac:
                    dz = t.einsum("oi,nil->nol", self.W[i], dh)
                if i < L - 1:
                    pos = z > 0
                    h = t.where(pos, z, self.slope * z)
                    if with_jac:
                        dh = dz * t.where(pos, 1.0, self.slope).to(z.dtype)[..., None]
                else:
                    h = z
                    if with_jac:
                        dh = dz
            return (h, dh) if with_jac else h
        z = t.einsum("pkl,nl->npk", self.w0, x) + self.b0
        s = t.sigmoid(z)
        f = t.einsum("pk,npk->np", self.w1, s) + self.b1
        if not with_jac:
            return f
        ds = s * (1 - s)
        jac = t.einsum("pk,npk,pkl->npl", self.w1, ds, self.w0)
        return f, jac

    def numpy(self):
        if self.arch == "mlp":
            return ([W.detach().cpu().double().numpy().copy() for W in self.W],
                    [b.detach().cpu().double().numpy().copy() for b in self.b])
        return ([self.w0.detach().cpu().double().numpy().copy(), self.w1.detach().cpu().double().numpy().copy()],
                [self.b0.detach().cpu().double().numpy().copy(), self.b1.detach().cpu().double().numpy().copy()])


def _grad_term(torch, jac_phys, tmpl, use, kind):
    """Per-label gradient mismatch.  jac_phys, tmpl: (n_ref, npix); use: (npix,) bool tensor."""
    a = jac_phys[:, use]
    b = tmpl[:, use]
    if kind == "corr":
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        num = (a * b).sum(1)
        den = torch.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-30)
        return (1.0 - num / den).mean()
    return (((a - b) ** 2).sum(1) / ((b * b).sum(1) + 1e-30)).mean()


def resolve_device(torch, requested):
    """'cpu' or 'cuda' for a requested 'cpu', 'cuda' or 'auto' (RuntimeError: cuda asked, none present)."""
    dev = requested
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return dev


def _reference_terms(torch, templates, active, names, xmin, xmax, wave, T, dev):
    """The gradient-term inputs: ``[(label, index, weight, template, usable, range)]``, scaled reference labels, n."""
    reg = []
    if not active:
        return reg, None, 0
    if templates.wave.shape != wave.shape or not np.allclose(templates.wave, wave, rtol=1e-9, atol=0):
        raise ValueError("gradient templates are on a different wavelength grid than the training set")
    ref = np.stack([np.asarray(templates.ref_labels[k], float) if k in templates.ref_labels.colnames
                    else np.full(templates.n_ref, np.nan) for k in names], 1)
    inside = np.all((ref >= xmin) & (ref <= xmax), axis=1)
    if not inside.any():
        raise ValueError("no reference star lies inside the training label range")
    n_ref_used = int(inside.sum())
    Xr = T((ref[inside] - xmin) / (xmax - xmin) - 0.5)
    for k, w in active.items():
        if k not in templates.label_names:
            raise ValueError(f"no gradient template for label {k!r} (templates have {templates.label_names})")
        g = templates.gradient(k, np.nonzero(inside)[0])
        use = templates.usable & np.all(np.isfinite(g), axis=0)
        j = names.index(k)
        reg.append((k, j, float(w), T(np.where(np.isfinite(g), g, 0.0)),
                    torch.as_tensor(use, device=dev), float(xmax[j] - xmin[j])))
    return reg, Xr, n_ref_used


class _Losses:
    """The data loss, the gradient term and the validation score of one network on one training set."""

    def __init__(self, torch, net, X, F, W, reg, Xr, cfg, dt, dev):
        self.t, self.net, self.X, self.F, self.W = torch, net, X, F, W
        self.reg, self.Xr, self.cfg, self.dt, self.dev = reg, Xr, cfg, dt, dev

    def reg_loss(self, sub=None):
        torch = self.t
        if not self.reg:
            return torch.zeros((), dtype=self.dt, device=self.dev), {}
        xr = self.Xr if sub is None else self.Xr[sub]
        _, jac = self.net.forward(xr, with_jac=True)  # (n_ref, npix, nl) per scaled label
        total = torch.zeros((), dtype=self.dt, device=self.dev)
        parts = {}
        for k, j, w, tm, use, rng_j in self.reg:
            tsub = tm if sub is None else tm[sub]
            term = _grad_term(torch, jac[:, :, j] / rng_j, tsub, use, self.cfg.gradient_loss)
            parts[k] = term
            total = total + w * term
        return total, parts

    def data_loss(self, idx):
        pred = self.net.forward(self.X[idx])
        w = self.W[idx]
        return (w * (pred - self.F[idx]) ** 2).sum() / w.sum()

    def val_score(self, idx):
        if self.cfg.val_metric == "mean":
            return float(self.data_loss(idx))
        w = self.W[idx]
        per = (w * (self.net.forward(self.X[idx]) - self.F[idx]) ** 2).sum(1) / w.sum(1).clamp_min(1e-30)
        return float(per.median())


def _optimise(torch, net, losses, tr_t, va_t, n_ref_used, cfg, dev, progress):
    """The Adam loop with early stopping: ``(best (score, params, epoch), history, stopped)``."""
    n_tr, n_va = int(tr_t.numel()), int(va_t.numel())
    opt = torch.optim.Adam(net.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(cfg.seed)
    best = (np.inf, None, -1)
    history, bad_evals = [], 0
    bar = _progress(progress, cfg.epochs)
    stopped = "max_epochs"
    try:
        for epoch in range(1, cfg.epochs + 1):
            if cfg.batch_size and cfg.batch_size < n_tr:
                perm = tr_t[torch.randperm(n_tr, generator=gen).to(dev)]
                batches = [perm[i:i + cfg.batch_size] for i in range(0, n_tr, cfg.batch_size)]
            else:
                batches = [tr_t]
            for bidx in batches:
                opt.zero_grad(set_to_none=True)
                ld = losses.data_loss(bidx)
                sub = None
                if losses.reg and cfg.ref_batch and cfg.ref_batch < n_ref_used:
                    sub = torch.randperm(n_ref_used, generator=gen)[:cfg.ref_batch].to(dev)
                lr_, _ = losses.reg_loss(sub)
                loss = ld + lr_
                loss.backward()
                opt.step()
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                with torch.no_grad():
                    ltr = float(losses.data_loss(tr_t))
                    lva = float(losses.data_loss(va_t)) if n_va else ltr
                    sva = losses.val_score(va_t) if n_va else ltr
                rl, parts = losses.reg_loss()
                rl = float(rl.detach())
                score = sva + rl
                rec = {"epoch": epoch, "train_data": ltr, "val_data": lva, "val_score": sva, "reg": rl,
                       **{f"grad_{k}": float(v.detach()) for k, v in parts.items()}}
                history.append(rec)
                if score < best[0] * (1 - 1e-5):
                    best = (score, [p.detach().clone() for p in net.params], epoch)
                    bad_evals = 0
                else:
                    bad_evals += 1
                if bar is not None:
                    bar.update(epoch, ltr, lva, rl)
                if bad_evals >= cfg.patience:
                    stopped = "early_stopping"
                    break
    finally:
        if bar is not None:
            bar.close()
    return best, history, stopped


def fit_network(torch, cfg, xs, flux, ivar, tr, va, mean_flux, names, xmin, xmax, wave, templates, active,
                progress=False) -> dict:
    """Optimise one network (seeded, deterministic algorithms) and return its parameters and history.

    Parameters
    ----------
    torch : module
        :mod:`torch` (from :func:`torch_module`).
    cfg : musepayne.train.trainer.TrainConfig
        The training configuration (architecture, optimiser, stopping, device, dtype).
    xs : numpy.ndarray
        (n, n_labels) scaled labels, ``(l - xmin) / (xmax - xmin) - 0.5`` (dimensionless).
    flux, ivar : numpy.ndarray
        (n, n_pix) normalised flux and inverse variance (0 on unusable pixels).
    tr, va : numpy.ndarray
        Row indices (int) of the training and validation spectra.
    mean_flux : numpy.ndarray
        (n_pix,) ivar-weighted mean training spectrum (the output bias at the start).
    names : tuple of str
        Label names, in the order of the columns of ``xs``.
    xmin, xmax : numpy.ndarray
        (n_labels,) label ranges in physical units (K, dex).
    wave : numpy.ndarray
        (n_pix,) wavelengths in Angstrom (checked against the templates' grid).
    templates : GradientTemplates or None
        Theoretical gradients for the DD-Payne term.
    active : dict of str to float
        Labels with a gradient weight > 0 and their weights.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    dict
        ``weights``, ``biases`` (lists of numpy arrays), ``history`` (list of dict), ``best_epoch`` (int),
        ``stopped`` (str), ``final_train_loss``, ``final_val_loss`` (float, NaN without validation
        stars), ``final_grad_loss`` (dict), ``n_ref_used`` (int), ``device`` (str), ``torch_version`` (str).

    Raises
    ------
    RuntimeError
        If ``cfg.device`` is 'cuda' and no CUDA device is available.
    ValueError
        If the templates do not fit the training set (grid, label range, labels).
    """
    dev = resolve_device(torch, cfg.device)
    torch.manual_seed(cfg.seed)
    prev_det = torch.are_deterministic_algorithms_enabled()
    # on CUDA some kernels have no deterministic variant without CUBLAS_WORKSPACE_CONFIG: warn, do not fail
    torch.use_deterministic_algorithms(True, warn_only=(dev == "cuda"))
    try:
        dt = torch.float32 if cfg.dtype == "float32" else torch.float64
        T = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
        X, F, W = T(xs), T(flux), T(ivar)
        net = _Net(torch, cfg.arch, len(names), flux.shape[1], cfg.hidden, cfg.negative_slope, dt, dev, mean_flux)
        reg, Xr, n_ref_used = _reference_terms(torch, templates, active, names, xmin, xmax, wave, T, dev)
        losses = _Losses(torch, net, X, F, W, reg, Xr, cfg, dt, dev)
        tr_t = torch.as_tensor(tr, device=dev)
        va_t = torch.as_tensor(va, device=dev)
        best, history, stopped = _optimise(torch, net, losses, tr_t, va_t, n_ref_used, cfg, dev, progress)
        if best[1] is not None and cfg.restore_best:
            with torch.no_grad():
                for p, b in zip(net.params, best[1]):
                    p.copy_(b)
        with torch.no_grad():
            final_tr = float(losses.data_loss(tr_t))
            final_va = float(losses.data_loss(va_t)) if va.size else float("nan")
        rl, parts = losses.reg_loss()
        weights, biases = net.numpy()
        return {"weights": weights, "biases": biases, "history": history, "best_epoch": int(best[2]),
                "stopped": stopped, "final_train_loss": final_tr, "final_val_loss": final_va,
                "final_grad_loss": {k: float(v.detach()) for k, v in parts.items()},
                "n_ref_used": n_ref_used, "device": dev, "torch_version": torch.__version__}
    finally:
        torch.use_deterministic_algorithms(prev_det)


class _progress:
    """A rich progress bar (no-op when disabled or not installed)."""

    def __new__(cls, enabled, total):
        if not enabled:
            return None
        return super().__new__(cls)

    def __init__(self, enabled, total):
        self.p = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=total, info="")

    def update(self, epoch, ltr, lva, rl):
        self.p.update(self.task, completed=epoch, info=f"train {ltr:.3e} val {lva:.3e} grad {rl:.3f}")

    def close(self):
        self.p.stop()
