"""Training sets from real library spectra and simulated MUSE/LAMOST observations."""

from __future__ import annotations

import numpy as np
import pytest

from musepayne.flags import flag_value
from musepayne.instrument.wavelength import air_to_vacuum
from musepayne.io.readers import read_miles, read_miles_params
from musepayne.prepare.preparer import Preparer
from musepayne.train.trainset import (
    TrainingSet,
    TrainsetCuts,
    build_trainset,
    muse_air_grid,
    simulate_lamost_observation,
    simulate_muse_observation,
    star_key,
)

pytestmark = pytest.mark.shared

MILES_IDS = ("0001", "0010", "0081")
STELIB = ("STELIB_v3.2_HD102224.fits", "STELIB_v3.2_Feige110.fits")


def _files(shared):
    lib = shared / "libraries"
    return ([("miles", lib / "miles" / f"MILES_res2.50_star_m{i}V.fits") for i in MILES_IDS]
            + [("stelib", lib / "stelib" / s) for s in STELIB])


def test_trainset_labels_masks_and_roundtrip(shared, tmp_path):
    ts = build_trainset(files=_files(shared))
    params = read_miles_params(shared / "libraries" / "miles" / "paramsMILES_v9.1.txt")
    t = ts.table
    # Feige 110 (a hot sdO without a finite/in-range Teff) fails the cuts; the others stay
    assert len(t) == 4 and ts.meta["tsdrop"] == 1
    for i in MILES_IDS:
        row = t[t["stellar_id"] == f"MILES{i}"][0]
        ref = params[params["miles_id"] == i][0]
        assert (row["teff"], row["logg"], row["fe_h"]) == (ref["teff"], ref["logg"], ref["fe_h"])
    st = t[t["instrument"] == "stelib"][0]
    from astropy.io import fits

    hdr = fits.getheader(shared / "libraries" / "stelib" / STELIB[0])
    assert (st["teff"], st["logg"], st["fe_h"]) == (hdr["TEFF"], hdr["LOG_G"], hdr["FE_H"])
    w = ts.wave
    miles = np.asarray(t["instrument"]) == "miles"
    iv, mask = ts.ivar, ts.prepared.mask
    # MILES ends at 7409.6 A (air): everything redward is uncovered -> ivar 0, NO_DATA/EDGE
    red = w > air_to_vacuum(7409.6) + 5
    assert np.all(iv[miles][:, red] == 0)
    assert np.all(mask[miles][:, red] & flag_value("NO_DATA", "EDGE"))
    # STELIB covers 3200-9900: usable up to the 8750 A red cut-off outside tellurics
    stel = ~miles
    ok_band = (w > 8400) & (w < 8700)
    assert np.all(iv[stel][:, ok_band] > 0)
    assert np.all(iv[:, w > 8760] == 0)
    tell = (w > 7600) & (w < 7700)
    assert np.all(iv[:, tell] == 0)
    # the LAMOST dichroic region is trained on (libraries do not share that artefact)
    dich = (w > 5800) & (w < 6000)
    assert np.all(iv[:, dich] > 0) and np.all(mask[:, dich] & flag_value("DICHROIC"))
    # normalised flux near 1 in the continuum-rich red, finite where used
    assert np.all(np.isfinite(ts.flux[iv > 0]))
    assert 0.9 < np.median(ts.flux[iv > 0]) < 1.05
    p = tmp_path / "ts.fits"
    ts.write(p)
    back = TrainingSet.read(p)
    np.testing.assert_allclose(back.labels, ts.labels)
    assert back.label_names == ("teff", "logg", "fe_h") and "3800<teff<8000" in back.meta["tscuts"]
    # without unmasking the dichroic has ivar 0, as in observed standard-mode spectra
    ts2 = build_trainset(files=_files(shared)[:1], unmask=())
    assert np.all(ts2.ivar[:, dich] == 0)


def test_cuts_and_star_key():
    assert star_key("HD 001326") == star_key("hd1326") == "HD1326"
    assert star_key("BD+44 4551") == "BD+444551"
    from astropy.table import Table

    t = Table({"teff": [3400.0, 5000.0, np.nan, 7999.0], "logg": [4.0, 2.0, 3.0, 4.0], "fe_h": [0.0, -0.5, 0, -3.5]})
    assert TrainsetCuts().select(t).tolist() == [False, True, False, False]


def test_simulated_muse_and_lamost_observations(shared):
    s = read_miles(shared / "libraries" / "miles" / "MILES_res2.50_star_m0010V.fits")
    flux_before = s.flux.copy()
    muse = simulate_muse_observation(s, 100.0, np.random.default_rng(0))
    np.testing.assert_array_equal(s.flux, flux_before)  # input untouched
    assert muse.frame == "air" and muse.wave.size == 3681 and muse.wave[0] == 4749.75
    np.testing.assert_allclose(np.diff(muse.wave), 1.25)
    assert muse.meta["instrument"][0] == "muse"
    good = np.isfinite(muse.flux[0])
    # MILES stops at 7409.6 A: MUSE pixels redward are not invented
    assert not good[muse.wave > 7411].any() and good[(muse.wave > 4760) & (muse.wave < 7390)].all()
    snr = np.median(muse.flux[0, good] / np.sqrt(muse.variance[0, good]))
    assert snr == pytest.approx(100, rel=0.1)
    # the realised noise matches the stated variance: compare with a noise-free copy
    clean = simulate_muse_observation(s, 1e9, np.random.default_rng(0))
    pull = (muse.flux[0, good] - clean.flux[0, good]) / np.sqrt(muse.variance[0, good])
    assert np.std(pull) == pytest.approx(1.0, abs=0.05)
    # library -> MUSE -> LAMOST equals library -> LAMOST (noise-free) where MUSE is sharper than LAMOST
    prep = Preparer()
    direct = prep(s)
    via = prep(clean)
    prepare_l = prep(simulate_lamost_observation(s, 1e9, np.random.default_rng(0)))
    w = direct.wave
    sel = (w > 5300) & (w < 7300) & (direct.ivar[0] > 0) & (via.ivar[0] > 0)
    assert sel.sum() > 800
    d = via.flux[0, sel] - direct.flux[0, sel]
    # two-step degradation agrees with one step (box-car terms are Gaussian-approximated)
    assert np.sqrt(np.mean(d**2)) < 0.004 and np.max(np.abs(d)) < 0.02
    # (bluer, the ivar-weighted pseudo-continuum feels the different noise model: per-pixel
    # photon-like noise on the LAMOST grid vs the library's noise propagated through rebinning)
    sel2 = (w > 4500) & (w < 7300) & (direct.ivar[0] > 0) & (prepare_l.ivar[0] > 0)
    assert np.max(np.abs(prepare_l.flux[0, sel2] - direct.flux[0, sel2])) < 0.005
    assert muse_air_grid()[-1] == pytest.approx(4749.75 + 1.25 * 3680)
