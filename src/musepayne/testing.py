"""Random-weight emulators with spectrum-like output, for tests and benchmarks.

:func:`toy_mlp_model` builds an :class:`~musepayne.models.model.MLPPayne` of The
Payne's shape (labels -> 300 -> 300 -> pixels, leaky ReLU) whose last layer maps
each hidden unit onto a pattern of Gaussian absorption lines, so its outputs
look like normalised spectra (continuum ~1, lines resolved by a few pixels)
and vary smoothly with the labels.  It is not a physical model: it exists to
test the fitter with known truth and to time it at realistic sizes.
"""

from __future__ import annotations

import numpy as np

from .models.model import MLPPayne

__all__ = ["toy_mlp_model"]


def toy_mlp_model(wave, label_names=("teff", "logg", "fe_h", "mg_fe", "c_fe"), hidden=(300, 300),
                  n_lines=600, line_fwhm_pix=3.0, depth=0.3, seed=0, x_min=None, x_max=None) -> MLPPayne:
    """A deterministic random MLP on ``wave`` (vacuum A) with line-like outputs."""
    rng = np.random.default_rng(seed)
    wave = np.asarray(wave, np.float64)
    npix = wave.size
    L = len(label_names)
    sizes = [L, *hidden]
    weights, biases = [], []
    for a, b in zip(sizes[:-1], sizes[1:]):
        weights.append(rng.normal(0, 1.5 / np.sqrt(a), (b, a)))
        biases.append(rng.normal(0, 0.3, b))
    # last layer: hidden unit k -> a sparse set of Gaussian lines (pixel units)
    h = sizes[-1]
    centres = rng.uniform(3, npix - 4, n_lines)
    owner = rng.integers(0, h, n_lines)
    sig = line_fwhm_pix / 2.3548
    pix = np.arange(npix)
    W = np.zeros((npix, h))
    amp = rng.uniform(0.2, 1.0, n_lines) * depth / np.sqrt(h / 50)
    for c, o, a in zip(centres, owner, amp):
        lo, hi = int(max(c - 5 * sig, 0)), int(min(c + 5 * sig + 1, npix))
        W[lo:hi, o] -= a * np.exp(-0.5 * ((pix[lo:hi] - c) / sig) ** 2)
    weights.append(W)
    biases.append(np.ones(npix))
    if x_min is None:
        x_min = [3800.0 if n == "teff" else 0.0 if n == "logg" else -2.0 if n == "fe_h" else -0.3 for n in label_names]
    if x_max is None:
        x_max = [7000.0 if n == "teff" else 5.0 if n == "logg" else 0.5 if n == "fe_h" else 0.6 for n in label_names]
    return MLPPayne([w.astype(np.float32) for w in weights], [b.astype(np.float32) for b in biases],
                    label_names, x_min, x_max, wave, "vacuum",
                    meta={"name": "toy-mlp", "notes": "random weights; tests and benchmarks only", "seed": seed})
