import numpy as np
import pytest

from musepayne.instrument.lsf import (
    LAMOST_LSF,
    MUSE_LSF,
    ConstantFWHM,
    ConstantResolvingPower,
    TabulatedLSF,
    lsf_from_spec,
)
from musepayne.instrument.wavelength import C_KMS, air_to_vacuum, bin_edges, lamost_wavelength, vacuum_to_air


def test_air_vacuum_known_lines():
    # H-alpha: 6562.80 A (air) <-> 6564.61 A (vacuum); Ca II 8542.09 (air) <-> 8544.44 (vacuum)
    assert air_to_vacuum(6562.80) == pytest.approx(6564.614, abs=0.003)
    assert air_to_vacuum(8542.09) == pytest.approx(8544.438, abs=0.003)
    assert vacuum_to_air(5897.558) == pytest.approx(5895.924, abs=0.003)  # Na D1


def test_air_vacuum_roundtrip_and_velocity_size():
    w = np.linspace(3600, 10000, 5000)
    back = vacuum_to_air(air_to_vacuum(w))
    assert np.max(np.abs(back / w - 1)) < 1e-12
    # the offset is ~80 km/s: the reason the conversion matters
    dv = (air_to_vacuum(w) / w - 1) * C_KMS
    assert 75 < dv.min() < dv.max() < 90


def test_lamost_grid():
    w = lamost_wavelength()
    assert w.size == 3909
    assert w[0] == pytest.approx(3699.985, abs=1e-3)
    assert np.allclose(np.diff(np.log10(w)), 1e-4)
    e = bin_edges(w)
    assert np.all(e[:-1] < w) and np.all(w < e[1:])


def test_muse_lsf_values_bacon17():
    # method brief: ~3.00 A at 4750, 2.64 at 6000, 2.48 at 7000, 2.58 at 9350
    assert MUSE_LSF.fwhm(np.array([4750, 6000, 7000, 9350])) == pytest.approx([3.00, 2.64, 2.48, 2.58], abs=0.015)


def test_lamost_crossover_near_5150():
    w = np.linspace(4750, 6000, 2000)
    coarser = MUSE_LSF.fwhm(w) > LAMOST_LSF.fwhm(w)
    cross = w[np.argmin(coarser)]
    assert 5100 < cross < 5200


def test_lsf_specs():
    assert lsf_from_spec("fwhm=2.7").fwhm(5000.0) == pytest.approx(2.7)
    assert lsf_from_spec("R=2000").fwhm(6000.0) == pytest.approx(3.0)
    t = TabulatedLSF((5000.0, 7000.0), (3.0, 2.0))
    assert t.fwhm(6000.0) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="unknown LSF"):
        lsf_from_spec("nonsense")
    with pytest.raises(ValueError):
        ConstantFWHM(-1.0)
    with pytest.raises(ValueError):
        ConstantResolvingPower(0.0)
