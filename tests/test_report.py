import numpy as np
from astropy.table import Table

from musepayne.pipeline.report import make_report


def test_report_figures_and_truth_stats(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    truth = Table({"stellar_id": [f"s{i}" for i in range(n)], "teff": rng.uniform(4500, 6000, n),
                   "logg": rng.uniform(1, 4.5, n), "fe_h": rng.uniform(-2, 0, n), "rv": rng.normal(0, 20, n)})
    cat = Table({"stellar_id": truth["stellar_id"], "teff": truth["teff"] + 50.0, "logg": truth["logg"],
                 "fe_h": truth["fe_h"] + rng.normal(0, 0.1, n), "rv": truth["rv"],
                 "snr_muse": rng.uniform(20, 200, n), "red_chi2": rng.uniform(0.8, 3, n),
                 "corr_flux": rng.uniform(0.9, 1, n), "status": ["converged"] * (n - 2) + ["failed:nan"] * 2,
                 "fit_flags": [0] * (n - 4) + [128 + 8, 8, 1, 1]})
    wave = np.linspace(4800, 8700, 500)
    flux = 1 - 0.3 * np.exp(-0.5 * ((wave - 6565) / 3) ** 2) + rng.normal(0, 0.01, (n, 500))
    ivar = np.full((n, 500), 1e4)
    model = np.tile(1 - 0.3 * np.exp(-0.5 * ((wave - 6565) / 3) ** 2), (n, 1))
    img = rng.normal(size=(30, 30))
    src = Table({"x": rng.uniform(0, 30, n), "y": rng.uniform(0, 30, n), "status": ["ok"] * n})
    s = make_report(tmp_path, cat, white_light=img, sources=src, wave=wave, flux=flux, ivar=ivar,
                    model_flux=model, truth=truth)
    for f in ("white_light.png", "kiel.png", "quality.png", "fits.png", "truth.png"):
        assert (tmp_path / f).stat().st_size > 5000
    html = (tmp_path / "index.html").read_text()
    assert "truth.png" in html and "No [X/Fe] labels" in html
    assert s["truth"]["teff"]["bias"] == np.float64(50.0)
    assert s["truth"]["teff"]["n"] == n - 2  # failed rows excluded
    assert abs(s["truth"]["fe_h"]["dispersion"] - 0.1) < 0.05
    assert s["n_kiel"] == n - 2
    assert s["fit_flag_counts"] == {"FAILED": 2, "NOT_CONVERGED": 0, "LABEL_EDGE": 0, "HIGH_CHI2": 2, "LOW_SNR": 0,
                                    "BLENDED": 0, "LARGE_ERRORS": 0, "MISFIT": 1, "SPARSE_LABELS": 0,
                                    "HIDDEN_NEIGHBOUR": 0,
                                    "clean": n - 4}
    assert "fit_flag_counts" in html
