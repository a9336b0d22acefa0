"""Grouping spectra that share a grid so stages can work on whole batches."""

from __future__ import annotations

import hashlib

import numpy as np
from astropy.table import vstack

from .spectra import SpectrumSet

__all__ = ["group_sets"]


def _key(s: SpectrumSet):
    h = hashlib.sha1(np.ascontiguousarray(s.wave).tobytes()).hexdigest()
    return (h, s.frame, s.lsf.describe(), s.synthetic_errors)


def group_sets(sets):
    """Merge SpectrumSets with identical grid, frame, LSF into larger batches.

    Order of spectra is preserved within each group; groups appear in the
    order of their first member.

    Two sets join a group when their wavelength arrays are identical (byte for byte), and they share
    the frame, the LSF description and ``synthetic_errors``.  Inputs are not modified; a group of
    one is returned as the same object.

    Parameters
    ----------
    sets : iterable of SpectrumSet
        The sets to merge.

    Returns
    -------
    list of SpectrumSet
        One set per group; ``bad`` is all-False for members that had none, when any member has one.
    """
    groups: dict = {}
    for s in sets:
        groups.setdefault(_key(s), []).append(s)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        first = members[0]
        bad = None
        if any(m.bad is not None for m in members):
            bad = np.vstack([m.bad if m.bad is not None else np.zeros(m.flux.shape, bool) for m in members])
        out.append(SpectrumSet(
            first.wave, np.vstack([m.flux for m in members]), np.vstack([m.variance for m in members]),
            first.frame, first.lsf, vstack([m.meta for m in members], metadata_conflicts="silent"),
            bad, first.synthetic_errors, first.notes,
        ))
    return out
