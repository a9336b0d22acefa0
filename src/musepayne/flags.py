"""Named bit flags: the pixel mask registry and the spectrum status registry.

Pixel mask (``MASK`` HDU of a prepared file)
--------------------------------------------
Each prepared pixel carries an integer bit mask.  Bits in :data:`PIXEL_FLAGS`
are either *excluding* (the pixel carries no information for a fit; its
``IVAR`` is set to zero) or *informational* (the pixel is used, but something
about it is worth knowing).  ``decode_mask`` turns a mask value into names.

Spectrum status (``status`` column)
-----------------------------------
A spectrum that cannot be used is never dropped: it keeps its row, with a
status name from :data:`SPECTRUM_STATUS` and a human-readable reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PixelFlag",
    "PIXEL_FLAGS",
    "EXCLUDING_BITS",
    "flag_value",
    "decode_mask",
    "SpectrumStatus",
    "SPECTRUM_STATUS",
    "OK",
]


@dataclass(frozen=True)
class PixelFlag:
    name: str
    bit: int
    excluding: bool
    description: str

    @property
    def value(self) -> int:
        return 1 << self.bit


_PIXEL_FLAG_LIST = (
    PixelFlag("NO_DATA", 0, True, "outside the input spectrum's wavelength coverage"),
    PixelFlag("BAD_INPUT", 1, True,
              "input pixel(s) non-finite, with zero/negative/non-finite variance, or flagged bad by the input file"),
    PixelFlag("TELLURIC", 2, True, "inside a telluric absorption band of the chosen mode"),
    PixelFlag("RED_CUTOFF", 3, True, "lambda > 8750 A (standard mode; LAMOST red end)"),
    PixelFlag("DICHROIC", 4, True, "LAMOST dichroic region 5720-6060 A (standard mode)"),
    PixelFlag("BLUE_CUTOFF", 5, True, "lambda < 5991 A (bulge / high-extinction mode)"),
    PixelFlag("AO_NOTCH", 6, True, "NaD laser notch filter of MUSE AO modes"),
    PixelFlag("SKY_RESIDUAL", 7, False,
              "sky-emission residual detected; flux replaced by the mean of adjacent clean pixels"),
    PixelFlag("RES_COARSE", 8, False,
              "input LSF is broader than the target LSF: not sharpened; excess broadening recorded in LSF_EXCESS"),
    PixelFlag("NO_CONTINUUM", 9, True, "pseudo-continuum undefined (no valid pixels within ~3x the 50 A kernel)"),
    PixelFlag("USER_MASK", 10, True, "masked by a user-supplied wavelength range"),
    PixelFlag("EDGE", 11, True, "within one LSF kernel of the input coverage edge (convolution incomplete)"),
    PixelFlag("CONT_EDGE", 12, True,
              "within 2 continuum-kernel widths of an input coverage edge that lies inside the continuum range: "
              "the pseudo-continuum there differs from that of a spectrum covering the whole range"),
)

#: Registry of pixel flags by name.
PIXEL_FLAGS = {f.name: f for f in _PIXEL_FLAG_LIST}

#: OR of every flag that excludes a pixel from fitting.
EXCLUDING_BITS = int(sum(f.value for f in _PIXEL_FLAG_LIST if f.excluding))


def flag_value(*names: str) -> int:
    """Integer value of the OR of named pixel flags."""
    try:
        return int(sum(PIXEL_FLAGS[n].value for n in names))
    except KeyError as exc:
        raise KeyError(f"unknown pixel flag {exc.args[0]!r}; known: {sorted(PIXEL_FLAGS)}") from None


def decode_mask(value: int) -> list[str]:
    """Names of the flags set in one mask value."""
    v = int(value)
    return [f.name for f in _PIXEL_FLAG_LIST if v & f.value]


def mask_summary(mask) -> dict:
    """Count of pixels per flag name in a mask array."""
    m = np.asarray(mask)
    return {f.name: int(np.count_nonzero(m & f.value)) for f in _PIXEL_FLAG_LIST}


@dataclass(frozen=True)
class SpectrumStatus:
    name: str
    usable: bool
    description: str


_STATUS_LIST = (
    SpectrumStatus("ok", True, "prepared without problems"),
    SpectrumStatus("low_coverage", True, "fewer than 30 % of the model pixels are usable"),
    SpectrumStatus("no_valid_pixels", False, "no usable pixel after masking (all NaN, zero variance or masked)"),
    SpectrumStatus("bad_variance", False, "variance/error array zero, negative or non-finite everywhere"),
    SpectrumStatus("bad_wavelength", False,
                   "wavelength axis unusable (not increasing, wrong units or does not overlap the target grid)"),
    SpectrumStatus("read_error", False, "the input file could not be read; see the reason column"),
    SpectrumStatus("failed", False, "an unexpected error; see the reason column"),
)

#: Registry of spectrum status names.
SPECTRUM_STATUS = {s.name: s for s in _STATUS_LIST}

OK = "ok"
