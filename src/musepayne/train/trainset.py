"""Training sets from labelled library spectra, and simulated MUSE/LAMOST observations.

A *training set* is a prepared-spectra file (:mod:`musepayne.io.prepared`: the
spectra on the model grid at the model's resolution and normalisation, with
``IVAR``/``MASK``) whose ``SPECTRA`` table carries the labels, plus a few
header keywords (``MPTRAIN``, ``TSLABELS``, ``TSCUTS``, ``TSUNMASK``).
:func:`build_trainset` makes one from MILES and STELIB:

1. every library file is read with its literature labels (MILES:
   ``paramsMILES_v9.1.txt``, Cenarro et al. 2007; STELIB: the ``TEFF``,
   ``LOG_G``, ``FE_H`` headers) and its own LSF (MILES 2.5 A, STELIB 3 A);
2. :class:`musepayne.prepare.preparer.Preparer` takes it from native resolution to
   the LAMOST grid, LSF and 50 A pseudo-continuum (standard mode) -- exactly
   the path of observed spectra;
3. pixels a library does not cover, or only partly (``NO_DATA``, ``EDGE``),
   and every other excluding bit of the prepare mask keep ``IVAR = 0``: the
   training loss ignores them, nothing is invented.  Bits listed in
   ``unmask`` (default: the LAMOST ``DICHROIC`` region, an artefact of the
   LAMOST spectrograph that library spectra do not share) get their
   propagated inverse variance back, so the model is also trained there;
4. label cuts (documented in the file): all three labels finite, the
   spectrum usable (status ``ok``), ``teff_range`` (default 3800-8000 K),
   ``logg_range`` (-0.5-5.5), ``feh_range`` (-3.0-1.0).  The default lower
   Teff limit, 3800 K, leaves out M stars: their TiO bands are poorly
   sampled by ~50 library stars and dominated the training loss (the ten
   worst-fitted training stars were mostly Teff < 3700 K giants);
5. a ``star_key`` column (normalised star name) identifies stars present in
   both libraries, so cross-validation can keep them in the same fold.

Library spectra have no errors; the readers assign a photon-like variance at
peak S/N 1000 (:func:`musepayne.io.readers.library_variance`).

Simulated observations (:func:`simulate_muse_observation`,
:func:`simulate_lamost_observation`) degrade a library spectrum to the MUSE
LSF on the MUSE air grid (``4749.75 + 1.25 i`` A) or to the LAMOST LSF on the
LAMOST vacuum grid with the same flux-conserving operator, mask what the
library does not cover, and add Gaussian noise with photon-like variance
``var = |f| median(f) / snr^2`` (S/N = ``snr`` at the median flux).
Where the library is coarser than the requested LSF (STELIB's 3 A against
MUSE's 2.5-3.0 A almost everywhere; any library against LAMOST below ~5400 A)
it cannot be sharpened, so the observation carries its *actual* LSF
(:func:`musepayne.prepare.resample.effective_lsf`: the requested FWHM combined with the operator's excess),
not the requested one; declaring MUSE's made ``prepare`` under-estimate the
resolution and STELIB stars observed as MUSE fit 0.057 dex metal-poorer than
the same spectra prepared directly (``benchmarks/bias_budget.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..flags import EXCLUDING_BITS, flag_value
from ..instrument.lsf import LAMOST_LSF, LSF, MUSE_LSF
from ..instrument.wavelength import lamost_wavelength, linear_grid
from ..io.batching import group_sets
from ..io.fits import atomic_write_fits
from ..io.prepared import PreparedSpectra
from ..io.readers import read_miles, read_miles_params, read_stelib
from ..io.spectra import ReaderError, SpectrumSet
from ..prepare.preparer import PrepareConfig, Preparer, _bridge
from ..prepare.resample import build_operator, effective_lsf

__all__ = [
    "TRAINSET_FORMAT",
    "LABELS",
    "TrainsetCuts",
    "TrainingSet",
    "library_files",
    "read_library",
    "prepare_for_training",
    "build_trainset",
    "simulate_observation",
    "simulate_muse_observation",
    "simulate_lamost_observation",
    "muse_air_grid",
    "star_key",
]

TRAINSET_FORMAT = "musepayne-trainset"
#: the labels real library spectra carry
LABELS = ("teff", "logg", "fe_h")

MUSE_CRVAL, MUSE_CDELT, MUSE_NPIX = 4749.75, 1.25, 3681


def muse_air_grid(npix: int = MUSE_NPIX) -> np.ndarray:
    """The nominal MUSE WFM air grid ``4749.75 + 1.25 i`` A.

    Parameters
    ----------
    npix : int, optional
        Number of pixels (default 3681).

    Returns
    -------
    numpy.ndarray
        Air wavelengths in Angstrom, shape (npix,).
    """
    return linear_grid(MUSE_CRVAL, MUSE_CDELT, npix)


def star_key(name: str) -> str:
    """Normalised star name (upper case, no blanks, no leading zeros in catalogue numbers).

    Parameters
    ----------
    name : str
        Star name, e.g. ``"HD 000123"``.

    Returns
    -------
    str
        The key, e.g. ``"HD123"``.
    """
    s = re.sub(r"\s+", "", str(name).upper())
    s = re.sub(r"^(HD|HDE|HR|HIP|GL|GJ|SAO|HZ)0*(\d)", r"\1\2", s)
    return s


@dataclass(frozen=True)
class TrainsetCuts:
    """Label cuts applied to the library stars (inclusive-exclusive ranges: ``lo < x < hi``).

    Attributes
    ----------
    teff_range : tuple of (float, float)
        Teff range in K (default 3800-8000).
    logg_range : tuple of (float, float)
        log g range in dex (default -0.5-5.5).
    feh_range : tuple of (float, float)
        [Fe/H] range in dex (default -3.0-1.0).
    """

    teff_range: tuple = (3800.0, 8000.0)
    logg_range: tuple = (-0.5, 5.5)
    feh_range: tuple = (-3.0, 1.0)

    def select(self, table: Table) -> np.ndarray:
        """Rows with finite ``teff``, ``logg``, ``fe_h`` strictly inside the ranges.

        Parameters
        ----------
        table : astropy.table.Table
            Table with ``teff`` (K), ``logg`` and ``fe_h`` (dex) columns.

        Returns
        -------
        numpy.ndarray
            bool, shape (len(table),).
        """
        ok = np.ones(len(table), bool)
        for name, (lo, hi) in zip(LABELS, (self.teff_range, self.logg_range, self.feh_range)):
            x = np.asarray(table[name], float)
            ok &= np.isfinite(x) & (x > lo) & (x < hi)
        return ok

    def describe(self) -> str:
        """The cuts as text (stored in the training-set header ``TSCUTS``).

        Returns
        -------
        str
            E.g. ``"finite labels; 3800<teff<8000; ...; status ok"``.
        """
        return (f"finite labels; {self.teff_range[0]:g}<teff<{self.teff_range[1]:g}; "
                f"{self.logg_range[0]:g}<logg<{self.logg_range[1]:g}; "
                f"{self.feh_range[0]:g}<fe_h<{self.feh_range[1]:g}; status ok")


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Prepared spectra plus labels (the ``musepayne train`` input).

    Attributes
    ----------
    prepared : PreparedSpectra
        Spectra on the model grid (vacuum Angstrom), normalised; the ``spectra`` table carries the labels.
    label_names : tuple of str
        Label columns used for training (default teff, logg, fe_h).
    meta : dict
        Header metadata (``tscuts``, ``tsunmask``, ``tssource``, ``tsnfile``, ``tsdrop``, ...).
    n_spectra : int
        Number of spectra n.
    wave : numpy.ndarray
        (n_pix,) vacuum wavelengths in Angstrom.
    flux, ivar : numpy.ndarray
        (n, n_pix) normalised flux and its inverse variance.
    labels : numpy.ndarray
        (n, n_labels) float64 in the order of ``label_names`` (K, dex).
    table : astropy.table.Table
        The per-spectrum table (``prepared.spectra``).
    """

    prepared: PreparedSpectra
    label_names: tuple = LABELS
    meta: dict = field(default_factory=dict)

    @property
    def n_spectra(self) -> int:
        return self.prepared.n_spectra

    @property
    def wave(self):
        return self.prepared.wave

    @property
    def flux(self):
        return self.prepared.flux

    @property
    def ivar(self):
        return self.prepared.ivar

    @property
    def labels(self) -> np.ndarray:
        """(n, n_labels) float64 in the order of :attr:`label_names`."""
        return np.stack([np.asarray(self.prepared.spectra[n], float) for n in self.label_names], axis=1)

    @property
    def table(self) -> Table:
        return self.prepared.spectra

    def select(self, index) -> TrainingSet:
        """A new training set with the spectra at ``index`` (copies of the arrays).

        Parameters
        ----------
        index : int or array_like of int or bool
            Spectra to keep.

        Returns
        -------
        TrainingSet
            Same grid, labels and meta.
        """
        p = self.prepared
        idx = np.atleast_1d(np.asarray(index))
        sub = PreparedSpectra(p.wave.copy(), p.flux[idx], p.ivar[idx], p.mask[idx], p.lsf_excess[idx],
                              p.cont[idx], p.spectra[idx], dict(p.meta))
        return TrainingSet(sub, self.label_names, dict(self.meta))

    def write(self, path):
        """Write as a prepared-spectra FITS file marked ``MPTRAIN`` (atomic; replaces an existing file).

        Parameters
        ----------
        path : str or os.PathLike
            Output file.
        """
        hl = self.prepared.to_hdulist()
        ph = hl[0].header
        ph["MPTRAIN"] = (TRAINSET_FORMAT, "this prepared file is a training set")
        ph["TSLABELS"] = (",".join(self.label_names), "label columns of SPECTRA used for training")
        for k, v in self.meta.items():
            key = k.upper()[:8]
            ph[key] = v if isinstance(v, (int, float, bool)) else str(v)  # long strings: CONTINUE cards

        atomic_write_fits(hl, path)

    @classmethod
    def read(cls, path) -> TrainingSet:
        """Read a training set written by :meth:`write`.

        Parameters
        ----------
        path : str or os.PathLike
            The FITS file.

        Returns
        -------
        TrainingSet
            The set; ``label_names`` from ``TSLABELS`` (default teff, logg, fe_h).

        Raises
        ------
        ReaderError
            If the file is not a readable prepared-spectra file or lacks a label column.
        """
        p = PreparedSpectra.read(path)
        with fits.open(path, memmap=False) as h:
            ph = h[0].header
            names = tuple(str(ph.get("TSLABELS", ",".join(LABELS))).split(","))
            meta = {k.lower(): ph[k] for k in ("TSCUTS", "TSUNMASK", "TSSOURCE", "TSCMD", "TSNFILE", "TSDROP",
                                               "MODE", "TGTLSF", "CONTWID") if k in ph}
        missing = [n for n in names if n not in p.spectra.colnames]
        if missing:
            raise ReaderError(f"{path}: training set lacks label columns {missing}")
        return cls(p, names, meta)


# --------------------------------------------------------------------------- reading
def library_files(root, kind: str):
    """Sorted library files below ``root`` (MILES ``*.fits`` with ``_star_m``, STELIB ``STELIB*.fits``).

    Only the folder itself is searched (no recursion).

    Parameters
    ----------
    root : str or os.PathLike
        The folder.
    kind : {'miles', 'stelib'}
        Library; anything other than 'miles' means STELIB.

    Returns
    -------
    list of pathlib.Path
        The files, sorted.
    """
    root = Path(root)
    pattern = "MILES*_star_m*.fits" if kind == "miles" else "STELIB*.fits"
    return sorted(root.glob(pattern))


def read_library(paths, kind: str, params=None):
    """Read library files; returns ``(sets, failures)`` with failures as ``(path, reason)``.

    Parameters
    ----------
    paths : iterable of str or os.PathLike
        Library files.
    kind : {'miles', 'stelib'}
        Library.
    params : str, os.PathLike or astropy.table.Table, optional
        MILES parameter file or table (:func:`~musepayne.io.readers.read_miles_params`).

    Returns
    -------
    sets : list of SpectrumSet
        One per readable file (air, labels in K and dex).
    failures : list of tuple of (str, str)
        Files that could not be read and why.

    Raises
    ------
    ReaderError
        If ``params`` is a file without parameter rows.
    """
    sets, failures = [], []
    tab = None
    if kind == "miles" and params is not None:
        tab = params if isinstance(params, Table) else read_miles_params(params)
    for p in paths:
        try:
            s = read_miles(p, params=tab) if kind == "miles" else read_stelib(p)
            sets.append(s)
        except (ReaderError, OSError, ValueError) as exc:
            failures.append((str(p), str(exc)))
    return sets, failures


def prepare_for_training(spectra: SpectrumSet, preparer: Preparer, unmask=("DICHROIC",)) -> PreparedSpectra:
    """Prepare one batch, restoring the inverse variance of pixels excluded only by ``unmask`` bits.

    Parameters
    ----------
    spectra : SpectrumSet
        Library spectra on one grid (not modified).
    preparer : Preparer
        The preparer (model grid, LSF, continuum).
    unmask : sequence of str, optional
        Pixel-flag names whose pixels get their inverse variance back (default ``("DICHROIC",)``).

    Returns
    -------
    PreparedSpectra
        The prepared spectra; ``n_used`` counts the restored pixels.

    Raises
    ------
    KeyError
        For an unknown flag name in ``unmask``.
    """
    out = preparer(spectra)
    if not unmask:
        return out
    unbits = flag_value(*unmask)
    keep_bits = EXCLUDING_BITS & ~unbits
    restore = ((out.mask & unbits) != 0) & ((out.mask & keep_bits) == 0) & np.isfinite(out.flux)
    if not restore.any():
        return out
    # the continuum does not depend on fit masks; recompute the propagated variance only
    bad = ~np.isfinite(spectra.flux) | ~np.isfinite(spectra.variance) | (spectra.variance <= 0)
    if spectra.bad is not None:
        bad |= spectra.bad
    op = preparer.operator(spectra.wave, spectra.frame, spectra.lsf)
    v_out = op.apply_variance(np.where(bad, 0.0, spectra.variance))
    with np.errstate(divide="ignore", invalid="ignore"):
        ivn = np.where(v_out > 0, out.cont**2 / v_out, 0.0)
    usable = np.isin(np.asarray(out.spectra["status"]), ["ok", "low_coverage"])[:, None]
    ivar = np.where(restore & usable & np.isfinite(ivn), ivn, out.ivar)
    t = out.spectra.copy()
    t["n_used"] = np.count_nonzero(ivar > 0, axis=1).astype(np.int32)
    return PreparedSpectra(out.wave, out.flux, ivar, out.mask, out.lsf_excess, out.cont, t, out.meta)


def build_trainset(miles_dir=None, stelib_dir=None, miles_params=None, cuts: TrainsetCuts | None = None,
                   config: PrepareConfig | None = None, unmask=("DICHROIC",), files=None) -> TrainingSet:
    """Build a training set from MILES and/or STELIB (see the module docstring).

    ``files``: optional explicit list of ``(kind, path)`` instead of folders.
    Spectra failing the cuts or the preparation are dropped (counted in
    ``meta['tsdrop']``).

    Parameters
    ----------
    miles_dir, stelib_dir : str or os.PathLike, optional
        Library folders (see :func:`library_files`).
    miles_params : str, os.PathLike or astropy.table.Table, optional
        MILES labels (default ``paramsMILES_v9.1.txt`` next to the first MILES file).
    cuts : TrainsetCuts, optional
        Label cuts (default ``TrainsetCuts()``).
    config : PrepareConfig, optional
        Prepare settings (default ``PrepareConfig()``, the LAMOST grid).
    unmask : sequence of str, optional
        See :func:`prepare_for_training`.
    files : sequence of (str, path), optional
        Explicit ``(kind, path)`` pairs instead of folders.

    Returns
    -------
    TrainingSet
        Labels teff (K), logg, fe_h (dex) and a ``star_key`` column.

    Raises
    ------
    FileNotFoundError
        If MILES files are given but no parameter file is found.
    ValueError
        If no library spectrum could be read.
    """
    cuts = cuts or TrainsetCuts()
    prep = Preparer(config or PrepareConfig())
    todo = {"miles": [], "stelib": []}
    if files is not None:
        for kind, p in files:
            todo[kind].append(Path(p))
    else:
        if miles_dir is not None:
            todo["miles"] = library_files(miles_dir, "miles")
        if stelib_dir is not None:
            todo["stelib"] = library_files(stelib_dir, "stelib")
    if miles_params is None and todo["miles"]:
        cand = todo["miles"][0].parent / "paramsMILES_v9.1.txt"
        miles_params = cand if cand.exists() else None
    if todo["miles"] and miles_params is None:
        raise FileNotFoundError("MILES labels need paramsMILES_v9.1.txt (next to the spectra or given)")
    parts, n_read_fail, n_files = [], 0, 0
    for kind in ("miles", "stelib"):
        if not todo[kind]:
            continue
        n_files += len(todo[kind])
        sets, fails = read_library(todo[kind], kind, miles_params if kind == "miles" else None)
        n_read_fail += len(fails)
        for s in group_sets(sets):
            parts.append(prepare_for_training(s, prep, unmask))
    if not parts:
        raise ValueError("no library spectrum could be read")
    allp = PreparedSpectra.concatenate(parts)
    t = allp.spectra
    keep = cuts.select(t) & (np.asarray(t["status"]) == "ok")
    idx = np.nonzero(keep)[0]
    sub = PreparedSpectra(allp.wave, allp.flux[idx], allp.ivar[idx], allp.mask[idx], allp.lsf_excess[idx],
                          allp.cont[idx], t[idx], allp.meta)
    names = sub.spectra["name"] if "name" in sub.spectra.colnames else sub.spectra["stellar_id"]
    sub.spectra["star_key"] = np.array([star_key(n) for n in names], dtype="U32")
    meta = {
        "tscuts": cuts.describe(),
        "tsunmask": ",".join(unmask) if unmask else "none",
        "tssource": ",".join(k for k in ("miles", "stelib") if todo[k]),
        "tsnfile": int(n_files),
        "tsdrop": int(n_files - idx.size),
        "tsrdfail": int(n_read_fail),
    }
    return TrainingSet(sub, LABELS, meta)


# --------------------------------------------------------------------------- simulation
def simulate_observation(spectra: SpectrumSet, snr: float, rng, wave_out, lsf_out: LSF, frame_out: str,
                         instrument: str) -> SpectrumSet:
    """Degrade ``spectra`` to ``lsf_out`` on ``wave_out`` and add noise at ``snr``.

    Pixels the input does not fully cover (incomplete kernel or rebinning)
    are NaN with infinite variance.  ``rng`` is a :class:`numpy.random.Generator`
    (or a seed).  The input is not modified.

    Parameters
    ----------
    spectra : SpectrumSet
        Library spectra (wavelengths in Angstrom in their frame, their own LSF); not modified.
    snr : float
        S/N per pixel at the median flux, positive.
    rng : numpy.random.Generator or int or None
        Noise generator (or a seed).
    wave_out : array_like
        Output wavelengths in Angstrom, shape (n_pix,), in ``frame_out``.
    lsf_out : LSF
        Requested LSF.
    frame_out : {'air', 'vacuum'}
        Frame of ``wave_out``.
    instrument : str
        Written to ``meta['instrument']``.

    Returns
    -------
    SpectrumSet
        Noisy spectra on ``wave_out`` with the LSF they really have (:func:`~musepayne.prepare.resample.effective_lsf`)
        and ``meta['sim_snr']``.

    Raises
    ------
    ValueError
        If ``snr`` is not positive and finite, or a frame is invalid.
    """
    if not np.isfinite(snr) or snr <= 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    rng = np.random.default_rng(rng)
    w_out = np.asarray(wave_out, np.float64)
    op = build_operator(spectra.wave, spectra.frame, spectra.lsf, w_out, lsf_out, frame_out)
    bad = ~np.isfinite(spectra.flux) | ~np.isfinite(spectra.variance) | (spectra.variance <= 0)
    if spectra.bad is not None:
        bad |= spectra.bad
    f = op.apply(_bridge(np.array(spectra.flux, np.float64), bad))
    covered = (op.coverage >= 0.999) & (op.edge_loss <= 0.01)
    badfrac = op.bad_fraction(bad)
    ok = covered[None, :] & (badfrac < 0.05) & np.isfinite(f)
    fmed = np.array([np.median(r[o]) if o.any() else np.nan for r, o in zip(f, ok)])
    var = np.abs(f) * np.abs(fmed)[:, None] / snr**2
    ok &= var > 0
    noisy = f + rng.standard_normal(f.shape) * np.sqrt(np.where(ok, var, 0.0))
    flux = np.where(ok, noisy, np.nan)
    variance = np.where(ok, var, np.inf)
    meta = spectra.meta.copy()
    meta["instrument"] = np.array([instrument] * len(meta))
    meta["sim_snr"] = np.full(len(meta), float(snr))
    return SpectrumSet(w_out, flux, variance, frame_out, effective_lsf(op, w_out, lsf_out), meta,
                       notes=(f"simulated {instrument} observation at S/N {snr:g} from {spectra.lsf.describe()}",))


def simulate_muse_observation(spectra: SpectrumSet, snr: float, rng, lsf: LSF = MUSE_LSF) -> SpectrumSet:
    """The same stars observed as MUSE: MUSE LSF (Bacon+17), air grid 4749.75 + 1.25 i A, noise at ``snr``.

    Parameters
    ----------
    spectra : SpectrumSet
        Library spectra (wavelengths in Angstrom in their frame, their own LSF); not modified.
    snr : float
        S/N per pixel at the median flux, positive.
    rng : numpy.random.Generator or int or None
        Noise generator (or a seed).
    lsf : LSF, optional
        Requested LSF (default MUSE).

    Returns
    -------
    SpectrumSet
        See :func:`simulate_observation`.

    Raises
    ------
    ValueError
        If ``snr`` is not positive and finite.
    """
    return simulate_observation(spectra, snr, rng, muse_air_grid(), lsf, "air", "muse")


def simulate_lamost_observation(spectra: SpectrumSet, snr: float, rng, lsf: LSF = LAMOST_LSF) -> SpectrumSet:
    """The same stars observed as LAMOST: R = 1800 on the 3909-px vacuum log-linear grid, noise at ``snr``.

    Parameters
    ----------
    spectra : SpectrumSet
        Library spectra (wavelengths in Angstrom in their frame, their own LSF); not modified.
    snr : float
        S/N per pixel at the median flux, positive.
    rng : numpy.random.Generator or int or None
        Noise generator (or a seed).
    lsf : LSF, optional
        Requested LSF (default LAMOST, R = 1800).

    Returns
    -------
    SpectrumSet
        See :func:`simulate_observation`.

    Raises
    ------
    ValueError
        If ``snr`` is not positive and finite.
    """
    return simulate_observation(spectra, snr, rng, lamost_wavelength(), lsf, "vacuum", "lamost")
