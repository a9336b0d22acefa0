"""Unresolved companions of another colour (extract/chromatic.py, the chroma_shift column, HIDDEN_NEIGHBOUR):
tests with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from musepayne.extract.chromatic import chromatic_shift
from musepayne.extract.extractor import ExtractConfig, Extractor
from musepayne.extract.psf import psf_design_matrix
from musepayne.fit.catalogue import EXTRACTION_COLUMNS, add_extraction_columns, apply_quality_flags
from musepayne.flags import FlagThresholds, decode_fit_flags
from musepayne.io.readers import read_spectra
from musepayne.simulate.simulator import SimulateConfig, Simulator, default_psf

WAVES = np.linspace(5000.0, 9000.0, 6)
SHAPE = (31, 31)


def _bands(q, sep, flux=2e6, sky=200.0, seed=4, dpos=(0.0, 0.0)):
    """Per-band images of a star and a companion of light share ``q[b]`` at ``sep`` FWHM, fitted as one star at the
    white-light centroid (offset by ``dpos`` px) with its flux free per band: residual, variance, model, fluxes."""
    psf = default_psf()
    fwhm = psf.fwhm_at(7000.0)
    x0, y0 = 15.2, 14.7
    x2, y2 = x0 + sep * fwhm * np.cos(0.4), y0 + sep * fwhm * np.sin(0.4)
    qw = float(np.mean(q))
    xc, yc = x0 + qw * (x2 - x0) + dpos[0], y0 + qw * (y2 - y0) + dpos[1]  # light centroid over the bands
    rng = np.random.default_rng(seed)
    res, var, mod, fl = [], [], [], []
    for b, w in enumerate(WAVES):
        A = psf_design_matrix(psf, np.array([x0, x2]), np.array([y0, y2]), w, SHAPE, 16, 3).toarray()
        truth = A @ (flux * np.array([1 - q[b], q[b]])) + sky
        data = truth + rng.standard_normal(truth.size) * np.sqrt(truth)
        P = psf_design_matrix(psf, np.array([xc]), np.array([yc]), w, SHAPE, 16, 3).toarray()[:, 0]
        M = np.column_stack([P, np.ones(P.size)])
        coef = np.linalg.solve(M.T @ (M / truth[:, None]), M.T @ (data / truth))
        res.append((data - M @ coef).reshape(SHAPE))
        var.append(truth.reshape(SHAPE))
        mod.append((P * coef[0]).reshape(SHAPE))
        fl.append(coef[0])
    return psf, (np.array(res), np.array(var), np.array(mod), np.ones(SHAPE, bool), [xc], [yc],
                 np.array(fl)[None, :], psf, WAVES)


def test_unresolved_pair_of_different_colours_moves_the_centroid():
    """A companion 0.2 FWHM away whose share of the light grows from 0.1 (red) to 0.4 (blue) -- inside the ~0.3 FWHM
    that the layer-summed residual cannot split -- moves the centroid by ~0.2 FWHM x 0.15 from the mean."""
    q = np.linspace(0.4, 0.1, WAVES.size)
    psf, args = _bands(q, 0.2)
    chi2, shift, dx, dy = chromatic_shift(*args)
    fwhm = psf.fwhm_at(7000.0)
    true_dev = 0.2 * np.max(np.abs(q - q.mean()))  # FWHM; the centroid's largest distance from its mean
    assert chi2[0] > 20, chi2
    assert 0.5 * true_dev < shift[0] <= 1.2 * true_dev, (shift[0], true_dev)
    # the per-band offsets run along the pair's axis, bluest farthest towards the companion
    along = (dx[0] - dx[0].mean()) * np.cos(0.4) + (dy[0] - dy[0].mean()) * np.sin(0.4)
    assert np.all(np.diff(along) < 0)
    assert abs(along[0] - 0.2 * fwhm * (q[0] - q.mean())) < 0.3 * 0.2 * fwhm * (q[0] - q.mean())


@pytest.mark.parametrize("q, dpos", [(np.zeros(6), (0.0, 0.0)), (np.zeros(6), (0.3, -0.2)),
                                     (np.full(6, 0.3), (0.0, 0.0))])
def test_single_star_wrong_position_or_same_colour_pair_has_no_shift(q, dpos):
    """A single star (also fitted 0.36 px from its true place: the same offset in every band) or a pair of the same
    colour: no chromatic shift, chi^2 ~ 1 from noise alone."""
    _, args = _bands(q, 0.2, dpos=dpos)
    chi2, shift, dx, dy = chromatic_shift(*args, model_error=0.0)
    assert shift[0] == 0.0
    assert chi2[0] < 3.0, chi2
    if dpos != (0.0, 0.0):
        assert abs(np.mean(dx[0]) + dpos[0]) < 0.02 and abs(np.mean(dy[0]) + dpos[1]) < 0.02


def test_field_wide_shift_is_removed():
    """The same chromatic shift in every star (residual atmospheric refraction) is not a companion."""
    psf = default_psf()
    rng = np.random.default_rng(8)
    xs, ys = (g.ravel() + rng.uniform(-0.5, 0.5, 9) for g in np.meshgrid([6.0, 15.0, 24.0], [6.0, 15.0, 24.0]))
    ramp = np.linspace(-0.15, 0.15, WAVES.size)  # px, along x
    res, var, mod, fl = [], [], [], []
    for b, w in enumerate(WAVES):
        true = psf_design_matrix(psf, xs + ramp[b], ys, w, SHAPE, 16, 3).toarray()
        P = psf_design_matrix(psf, xs, ys, w, SHAPE, 16, 3).toarray()
        truth = true @ np.full(xs.size, 1e6) + 100.0
        data = truth + rng.standard_normal(truth.size) * np.sqrt(truth)
        coef = np.linalg.lstsq(P / np.sqrt(truth)[:, None], (data - 100.0) / np.sqrt(truth), rcond=None)[0]
        res.append((data - 100.0 - P @ coef).reshape(SHAPE))
        var.append(truth.reshape(SHAPE))
        mod.append((P @ coef).reshape(SHAPE))
        fl.append(coef)
    args = (np.array(res), np.array(var), np.array(mod), np.ones(SHAPE, bool), xs, ys, np.array(fl).T, psf, WAVES)
    assert np.all(chromatic_shift(*args, min_common=100)[1] > 0.02)  # not removed: every star shifts
    chi2, shift, dx, dy = chromatic_shift(*args)
    assert np.all(shift == 0.0), shift


class _ColourPairSimulator(Simulator):
    """Two stars: A, and a much bluer B 0.2 FWHM from it (white-light flux ratio ~0.5); an isolated C."""

    def stars(self):
        t, flux = super().stars()
        fwhm = self.config.psf.fwhm_at(float(np.median(self.wave)))
        x = [12.3, 12.3 + 0.2 * fwhm * np.cos(0.5), 5.2]
        y = [13.2, 13.2 + 0.2 * fwhm * np.sin(0.5), 18.7]
        base = flux[0] * 10 ** (-0.4 * (16.0 - t["mag"][0]))
        blue = (self.wave / 7000.0) ** -4
        flux[0] = base
        flux[1] = 0.5 * base * blue / np.mean(blue)
        flux[2] = base
        t["mag"][:3] = [16.0, 16.75, 16.0]
        for i in range(3):
            t["x"][i], t["y"][i] = x[i], y[i]
        t["in_field"] = True
        return t, flux


@pytest.fixture(scope="module")
def colour_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("chroma")
    cfg = SimulateConfig(nx=24, ny=24, nlayers=120, cdelt3=35.0, nstars=3, seed=2)
    info = _ColourPairSimulator(cfg).write(d / "cube.fits")
    return d, info, Table.read(info["truth"], "TRUTH")


def test_extraction_flags_the_unresolved_companion(colour_pair):
    """Extracted as one star, the pair gets a chroma_shift and HIDDEN_NEIGHBOUR (which the layer-summed hidden_frac
    misses); with both stars listed, and the isolated star, nothing; the column reaches the catalogue."""
    d, info, truth = colour_pair
    ext = Extractor(ExtractConfig(fit_transform=False, block=20))
    src = truth["stellar_id", "x", "y", "mag"]
    full = ext(info["cube"], src).sources
    src = src[[0, 2]]  # the pair as one star at its white-light centroid (where a detector puts it)
    q = 10 ** (-0.4 * (truth["mag"][1] - truth["mag"][0]))
    q = q / (1 + q)
    src["x"][0] += q * (truth["x"][1] - truth["x"][0])
    src["y"][0] += q * (truth["y"][1] - truth["y"][0])
    res = ext(info["cube"], src)
    one = res.sources
    assert np.all(np.asarray(full["chroma_shift"]) == 0.0), list(full["chroma_shift"])
    assert one["chroma_shift"][0] > 0.01 and one["chroma_chi2"][0] > 10, (one["chroma_shift"][0], one["chroma_chi2"][0])
    assert one["chroma_shift"][1] == 0.0 and one["chroma_chi2"][1] < 5
    assert one["hidden_frac"][0] < 0.03  # too close for the layer-summed residual (HIDDEN_NEIGHBOUR's other test)
    # SOURCES -> spectra metadata -> catalogue column with unit and description -> the flag
    res.write(d / "extracted.fits")
    meta = read_spectra(d / "extracted.fits").meta
    cat = Table({"stellar_id": meta["stellar_id"], "fit_flags": np.zeros(len(meta), np.int32)})
    add_extraction_columns(cat, meta)
    assert "chroma_shift" in EXTRACTION_COLUMNS and "FWHM" in cat["chroma_shift"].description
    np.testing.assert_allclose(cat["chroma_shift"], one["chroma_shift"])
    apply_quality_flags(cat)
    assert [decode_fit_flags(int(v)) for v in cat["fit_flags"]] == [["HIDDEN_NEIGHBOUR"], []]
    apply_quality_flags(cat, FlagThresholds(max_chroma_shift=1.0))  # re-flagged with another threshold
    assert list(cat["fit_flags"]) == [0, 0]
    with pytest.raises(ValueError):
        FlagThresholds(max_chroma_shift=None)


def test_unusable_inputs_give_nan_not_an_error():
    """No usable pixel, a NaN or off-image position, a non-positive band flux, a single band: NaN, no exception."""
    psf = default_psf()
    z = np.zeros((3, 12, 12))
    out = chromatic_shift(z, z, z, np.ones((12, 12), bool), [6.0, np.nan, -50.0], [6.0, 1.0, 3.0], np.ones((3, 3)),
                          psf, WAVES[:3])
    assert np.all(np.isnan(out[0])) and np.all(np.isnan(out[1]))
    v = np.ones((2, 12, 12))
    r = np.random.default_rng(1).normal(size=(2, 12, 12))
    assert np.isnan(chromatic_shift(r, v, v, np.ones((12, 12), bool), [6.0], [6.0], [[np.nan, -1.0]], psf,
                                    WAVES[:2])[1][0])
    assert np.isnan(chromatic_shift(r[:1], v[:1], v[:1], np.ones((12, 12), bool), [6.0], [6.0], [[100.0]], psf,
                                    WAVES[:1])[1][0])
