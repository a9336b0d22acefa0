"""Guard of the catalogue->cube transformation: which in-field catalogue stars it moved off the field.

:func:`moved_off_field` decides which stars deserve the extractor's warning "catalogue star(s)
inside the field were moved off it by the fitted transformation".  A star that sits on the edge
of the usable field crosses it with any shift, however small: when the transformation is good
(residual rms at most ``max_rms`` FWHM) and moved the star by less than ``min_shift`` pixels,
the change is sub-pixel bookkeeping at the edge and nothing is said.  A poor transformation, or a
good one that moves an in-field star a pixel or more off the field, is reported.
"""

from __future__ import annotations

import numpy as np

__all__ = ["moved_off_field"]


def moved_off_field(edge_before, edge_after, dx, dy, rms, fwhm, max_rms: float = 0.5, min_shift: float = 1.0):
    """Catalogue stars inside the usable field that the transformation moved off it, worth a warning.

    Parameters
    ----------
    edge_before, edge_after : array_like of float
        Signed distance (pixels; >= 0 inside the usable field) of each star from the field's edge,
        at its catalogue position and at its transformed position.
    dx, dy : array_like of float
        Shift of each star by the transformation (pixels, transformed - catalogue position).
    rms : float
        Residual rms of the transformation (pixels; NaN when not measured).
    fwhm : float
        PSF FWHM (pixels).
    max_rms : float, optional
        A transformation whose rms is at most ``max_rms * fwhm`` counts as good.
    min_shift : float, optional
        With a good transformation, stars moved by less than this (pixels) are not reported.

    Returns
    -------
    numpy.ndarray of bool
        True for the stars to report.
    """
    before, after = np.asarray(edge_before, float), np.asarray(edge_after, float)
    moved = (before >= 0) & (after < 0)
    good = bool(np.isfinite(rms) and np.isfinite(fwhm) and rms <= max_rms * fwhm)
    if good:
        shift = np.hypot(np.asarray(dx, float), np.asarray(dy, float))
        moved &= ~(shift < min_shift)  # NaN shifts are reported
    return moved
