"""Helpers shared by the fit tests: wrap arrays as PreparedSpectra, load the real APOGEE network,
and an independent reference forward model for scipy.optimize.curve_fit."""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.interpolate import CubicHermiteSpline

from musepayne.fit.fitter import doppler_factor, grid_segments
from musepayne.io.prepared import PreparedSpectra

APOGEE_LABELS = ["teff", "logg", "fe_h", "mg_fe", "vmacro"]


def as_prepared(wave, flux, ivar, status=None, lsf_excess=None, mask=None):
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    n = flux.shape[0]
    ivar = np.broadcast_to(np.asarray(ivar, np.float64), flux.shape).copy()
    tab = Table({"stellar_id": [f"s{i}" for i in range(n)],
                 "ra": np.arange(n, dtype=float), "dec": -np.arange(n, dtype=float),
                 "snr": np.full(n, 50.0),
                 "status": list(status) if status is not None else ["ok"] * n,
                 "reason": [""] * n})
    return PreparedSpectra(np.asarray(wave, np.float64), flux, ivar,
                           np.zeros(flux.shape, np.int32) if mask is None else mask,
                           np.zeros(flux.shape) if lsf_excess is None else lsf_excess,
                           np.ones(flux.shape), tab)


def load_apogee(shared):
    from musepayne.models.files import import_payne_npz

    d = shared / "payne_apogee"
    model = import_payne_npz(d / "NN_normalized_spectra.npz", "payne-perpixel", APOGEE_LABELS,
                             d / "apogee_wavelength.npz")
    mask = np.load(d / "apogee_mask.npz")["apogee_mask"]  # True = masked (The Payne convention)
    spec = np.load(d / "spectrum_ap_id_2M13012770+5754582_.npz")
    return model, mask, spec["spectrum"].astype(np.float64), spec["spec_err"].astype(np.float64)


def reference_shift(wave, f, v):
    """Independent implementation of the shifted model: per chip, a cubic Hermite spline in
    ln(lambda) with central-difference slopes (= Catmull-Rom on a log-linear grid), evaluated at
    ln(lambda) - ln D(v) with the exact relativistic D.  NaN where undefined."""
    lnw = np.log(wave)
    seg = grid_segments(lnw)
    f = np.atleast_2d(f)
    out = np.full(f.shape, np.nan)
    for i, (fi, vi) in enumerate(zip(f, np.atleast_1d(v))):
        x = lnw - np.log(doppler_factor(vi))
        for s in np.unique(seg):
            sel = seg == s
            lw = lnw[sel]
            spl = CubicHermiteSpline(lw, fi[sel], np.gradient(fi[sel], lw))
            inside = (x >= lw[1]) & (x <= lw[-2])
            out[i, inside] = spl(x[inside])
    return out


def toy_stellar_model():
    """A random-weight MLP on the LAMOST grid with the default model's labels and ranges of a
    typical training set (Teff 4000-7000 K, log g 0.5-5, [Fe/H] -2.5..0.5)."""
    from musepayne.instrument.wavelength import lamost_wavelength
    from musepayne.testing import toy_mlp_model

    return toy_mlp_model(lamost_wavelength(), label_names=("teff", "logg", "fe_h"),
                         x_min=np.array([4000.0, 0.5, -2.5]), x_max=np.array([7000.0, 5.0, 0.5]))
