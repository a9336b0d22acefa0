"""Realistic mock MUSE cubes with a truth table, for injection-recovery tests.

:class:`Simulator` (configured by a frozen :class:`SimulateConfig`) builds a
crowded stellar field and writes it as an ESO-like MUSE cube (primary header,
``DATA`` and ``STAT`` extensions, celestial TAN WCS with a CD matrix,
``CTYPE3 = AWAV`` on the nominal air grid ``4749.75 + 1.25 i`` Angstrom):

* positions: a King (1962) cluster plus uniform field stars (paper Sect. 6.2:
  globular-cluster cores are MUSE's main crowded targets);
* magnitudes from an exponential luminosity function ``dN/dm ~ 10^(lf_slope m)``;
* spectra from a pluggable *spectrum source* (``labels -> spectrum`` on the
  MUSE air grid at the MUSE LSF, rest frame): the default :class:`ToySpectra`
  uses :func:`musepayne.simulate.toyspec.toy_spectrum` (no physical labels);
  :class:`CallableSpectra` wraps any function, e.g. a trained model;
  :class:`LibrarySpectra` takes real library spectra (a ``SpectrumSet``)
  degraded to the MUSE LSF (the sources live in :mod:`musepayne.simulate.sources` and are
  re-exported here);
* radial velocities applied by flux-conserving rebinning (no interpolation);
* the wavelength-dependent Moffat PSF of :mod:`musepayne.extract.psf`, evaluated at
  nodes every ``psf_step`` layers and interpolated linearly in between;
* sky continuum plus emission lines at the MUSE LSF;
* photon noise (``gain`` e-/flux unit) and read noise, with ``STAT`` the exact
  variance of the injected noise.

The cube is streamed to disk in blocks of layers (memory does not grow with
the number of layers) and renamed into place atomically.  Next to it go a
truth file (``<stem>_truth.fits``: ``TRUTH`` table with stellar_id, ra, dec,
x, y, mag, rv and labels; ``WAVE``; ``TRUE_FLUX`` n_stars x n_layers in flux
units per Angstrom) and a source catalogue usable by ``musepayne extract``
(``<stem>_sources.csv``: stellar_id, ra, dec, mag with catalogue errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ..extract.psf import MoffatPSF, psf_design_matrix
from ..instrument.lsf import FWHM_TO_SIGMA, MUSE_LSF
from ..instrument.wavelength import C_KMS, bin_edges, linear_grid
from ..io.fits import atomic_path, atomic_write_fits, preallocate
from ..prepare.resample import rebin_matrix
from ..threads import blas_threads
from .sources import CallableSpectra, LibrarySpectra, ToySpectra

__all__ = [
    "SimulateConfig",
    "Simulator",
    "ToySpectra",
    "CallableSpectra",
    "LibrarySpectra",
    "SKY_LINES",
    "default_psf",
    "king_radii",
]

#: air wavelengths (A) and relative strengths of bright night-sky emission lines (OI, NaD, OH)
SKY_LINES = (
    (5577.34, 30.0), (5889.95, 6.0), (5895.92, 4.0), (6300.30, 20.0), (6363.78, 7.0),
    (6863.96, 6.0), (7316.28, 8.0), (7340.89, 8.0), (7750.64, 9.0), (7794.11, 9.0),
    (7821.50, 7.0), (7913.71, 10.0), (7993.33, 12.0), (8344.60, 20.0), (8399.17, 15.0),
    (8430.17, 14.0), (8827.10, 25.0), (8885.85, 20.0), (8958.08, 18.0), (9001.35, 15.0),
    (9037.95, 12.0), (9375.96, 25.0),
)

BUNIT = "10**(-20)*erg/s/cm**2/Angstrom"


def default_psf() -> MoffatPSF:
    """Typical MUSE WFM seeing-limited PSF in 0.2" pixels (FWHM ~0.75" at 7000 A, ~lambda^-0.2).

    Returns
    -------
    MoffatPSF
        Moffat PSF whose FWHM (pixels), beta, ellipticity and angle (deg) are polynomials in wavelength.
    """
    return MoffatPSF(fwhm=(3.6, -0.245, 0.045), beta=(2.6, -0.1), ellip=(0.05,), angle=(30.0,))


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SimulateConfig:
    """Everything that defines a mock cube (all lengths in pixels unless stated).

    Attributes
    ----------
    nx, ny : int
        Spatial size in spaxels (>= 8; default 150).
    nlayers : int
        Number of wavelength layers (>= 1; default 1000).
    crval3 : float
        First layer, air Angstrom (4749.75).
    cdelt3 : float
        Layer step, Angstrom (1.25).
    nstars : int
        Number of stars (>= 1; default 500).
    cluster_fraction : float
        Fraction of stars in the King cluster (0.8).
    king_rc, king_rt : float
        King core and tidal radius, pixels (40, 600).
    margin : float
        Stars are placed up to this far outside the field, pixels (8).
    mag_bright, mag_faint : float
        Magnitude range of the luminosity function (16, 21).
    lf_slope : float
        ``dN/dm ~ 10^(lf_slope m)`` (0.3 per mag).
    zeropoint : float
        Magnitude of a star with 1 flux unit/A (mean over the band) (28.9).
    rv_mean, rv_sigma : float
        Mean and dispersion of the radial velocities, km/s (0, 15).
    psf : MoffatPSF
        The wavelength-dependent PSF (default :func:`default_psf`).
    psf_radius : float
        Stamp radius for each star, pixels (16).
    psf_oversample : int
        Sub-pixel oversampling of the PSF stamps (4).
    psf_step : int
        Layers between PSF nodes, linear interpolation between (50).
    sky_level : float
        Sky continuum per spaxel per Angstrom, flux units (5).
    sky_line_scale : float
        Sky line amplitude per unit strength, flux units integrated over the line (20).
    gain : float
        Electrons per flux unit per layer, the photon-noise scale (2).
    read_noise : float
        Read noise per exposure, electrons (3).
    n_exp : int
        Number of exposures (4; 600 s each in the header).
    pixscale : float
        Spaxel size, arcsec (0.2).
    ra0, dec0 : float
        Field centre, degrees.
    cat_offset : tuple of (float, float)
        Catalogue -> cube offset, pixels.
    cat_rotation : float
        Catalogue -> cube rotation, degrees.
    cat_scale : float
        Catalogue -> cube scale (dimensionless).
    cat_pos_noise : float
        Catalogue position error per axis, pixels.
    cat_mag_noise : float
        Catalogue magnitude error, mag.
    block : int
        Layers per streamed block (64).
    seed : int
        Random seed (1).
    bad_layers : tuple of int
        0-based layers filled with NaN (to test flagging).

    Raises
    ------
    ValueError
        If nx or ny < 8, or nlayers or nstars < 1.
    """

    nx: int = 150
    ny: int = 150
    nlayers: int = 1000
    crval3: float = 4749.75            #: first layer (air, A)
    cdelt3: float = 1.25               #: layer step (A)
    nstars: int = 500
    cluster_fraction: float = 0.8      #: fraction of stars in the King cluster
    king_rc: float = 40.0              #: King core radius (px)
    king_rt: float = 600.0             #: King tidal radius (px)
    margin: float = 8.0                #: stars are placed up to this far outside the field
    mag_bright: float = 16.0
    mag_faint: float = 21.0
    lf_slope: float = 0.3              #: dN/dm ~ 10^(lf_slope m)
    zeropoint: float = 28.9            #: magnitude of a star with 1 flux unit/A (mean over the band)
    rv_mean: float = 0.0               #: km/s
    rv_sigma: float = 15.0             #: km/s
    psf: MoffatPSF = field(default_factory=default_psf)
    psf_radius: float = 16.0           #: stamp radius (px) for each star
    psf_oversample: int = 4
    psf_step: int = 50                 #: layers between PSF nodes (linear interpolation between)
    sky_level: float = 5.0             #: sky continuum per spaxel per A (flux units)
    sky_line_scale: float = 20.0       #: sky line amplitude per unit strength (flux units, integrated)
    gain: float = 2.0                  #: electrons per flux unit per layer (photon-noise scale)
    read_noise: float = 3.0            #: electrons per exposure
    n_exp: int = 4
    pixscale: float = 0.2              #: arcsec per spaxel
    ra0: float = 6.0236                #: field centre (deg)
    dec0: float = -72.0813
    cat_offset: tuple = (0.6, -0.4)    #: catalogue -> cube offset (px)
    cat_rotation: float = 0.15         #: catalogue -> cube rotation (deg)
    cat_scale: float = 1.002           #: catalogue -> cube scale
    cat_pos_noise: float = 0.03        #: catalogue position error (px, per axis)
    cat_mag_noise: float = 0.02        #: catalogue magnitude error
    block: int = 64                    #: layers per streamed block
    seed: int = 1
    bad_layers: tuple = ()             #: layers filled with NaN (to test flagging)

    def __post_init__(self):
        if self.nx < 8 or self.ny < 8 or self.nlayers < 1 or self.nstars < 1:
            raise ValueError("SimulateConfig: need nx, ny >= 8 and nlayers, nstars >= 1")
        if not (np.isfinite(self.mag_bright) and np.isfinite(self.mag_faint) and self.mag_bright <= self.mag_faint):
            raise ValueError("SimulateConfig: the magnitude range needs finite mag_bright <= mag_faint")


def king_radii(rng, n, rc, rt):
    """Radii drawn from the King (1962) surface-density profile (inverse CDF on a grid).

    Parameters
    ----------
    rng : numpy.random.Generator
        Random generator.
    n : int
        Number of radii.
    rc, rt : float
        Core and tidal radius (same length unit as the result, e.g. pixels).

    Returns
    -------
    numpy.ndarray
        Radii in [0, rt], shape (n,).
    """
    r = np.linspace(0.0, rt, 20001)
    sig = (1.0 / np.sqrt(1.0 + (r / rc) ** 2) - 1.0 / np.sqrt(1.0 + (rt / rc) ** 2)) ** 2
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (sig[1:] * r[1:] + sig[:-1] * r[:-1]) * np.diff(r))])
    cdf /= cdf[-1]
    return np.interp(rng.uniform(0, 1, n), cdf, r)  # inverse CDF of a scalar distribution, not flux


# --------------------------------------------------------------------------- simulator
class Simulator:
    """Configure once, then ``write(path)`` a cube, its truth file and a source catalogue.

    Parameters
    ----------
    config : SimulateConfig, optional
        The field (default ``SimulateConfig()``).
    source : object, optional
        Spectrum source with ``label_names``, ``sample(rng, n)`` and ``__call__(labels, wave[, rv])``
        (default :class:`ToySpectra`).

    Attributes
    ----------
    config : SimulateConfig
        The configuration.
    source : object
        The spectrum source.
    wave : numpy.ndarray
        Layer air wavelengths in Angstrom, shape (nlayers,).
    """

    def __init__(self, config: SimulateConfig = SimulateConfig(), source=None):
        self.config = config
        self.source = source if source is not None else ToySpectra()
        self.wave = linear_grid(config.crval3, config.cdelt3, config.nlayers)

    # ------------------------------------------------------------ pieces
    def wcs_header(self) -> fits.Header:
        """The 3-D WCS cards of the cube (TAN projection with a CD matrix, ``CTYPE3 = AWAV``).

        Returns
        -------
        astropy.io.fits.Header
            Celestial axes in degrees centred on (ra0, dec0), wavelength axis in air Angstrom.
        """
        c = self.config
        h = fits.Header()
        h["CTYPE1"] = "RA---TAN"
        h["CTYPE2"] = "DEC--TAN"
        h["CUNIT1"] = "deg"
        h["CUNIT2"] = "deg"
        h["CRPIX1"] = (c.nx + 1) / 2.0
        h["CRPIX2"] = (c.ny + 1) / 2.0
        h["CRVAL1"] = c.ra0
        h["CRVAL2"] = c.dec0
        h["CD1_1"] = -c.pixscale / 3600.0
        h["CD1_2"] = 0.0
        h["CD2_1"] = 0.0
        h["CD2_2"] = c.pixscale / 3600.0
        h["CTYPE3"] = "AWAV"
        h["CUNIT3"] = "Angstrom"
        h["CRPIX3"] = 1.0
        h["CRVAL3"] = c.crval3
        h["CD3_3"] = c.cdelt3
        h["CD1_3"] = 0.0
        h["CD2_3"] = 0.0
        h["CD3_1"] = 0.0
        h["CD3_2"] = 0.0
        return h

    def celestial_wcs(self):
        """The celestial (2-D) part of :meth:`wcs_header`.

        Returns
        -------
        astropy.wcs.WCS
            Pixel (0-based x, y) <-> (RA, Dec) in degrees.
        """
        return WCS(self.wcs_header()).celestial

    def sky_spectrum(self) -> np.ndarray:
        """Sky per spaxel per A: smooth continuum plus Gaussian emission lines at the MUSE LSF.

        Returns
        -------
        numpy.ndarray
            Flux units per Angstrom per spaxel, shape (nlayers,).
        """
        c = self.config
        w = self.wave
        sky = c.sky_level * (1.0 + 0.5 * (w - 4750.0) / 4500.0)
        for lam, strength in SKY_LINES:
            s = MUSE_LSF.fwhm(lam) * FWHM_TO_SIGMA
            sky = sky + c.sky_line_scale * strength * np.exp(-0.5 * ((w - lam) / s) ** 2) / (np.sqrt(2 * np.pi) * s)
        return sky

    def stars(self) -> tuple[Table, np.ndarray]:
        """Truth table and true spectra ``(n_stars, n_layers)`` (flux units per A, observed frame).

        Returns
        -------
        table : astropy.table.Table
            ``stellar_id``, ``ra``/``dec`` (deg), ``x``/``y`` (0-based cube pixels), ``mag``, ``rv`` (km/s),
            the source's labels, ``ra_cat``/``dec_cat``/``mag_cat`` (the noisy catalogue) and ``in_field``.
        flux : numpy.ndarray
            (n_stars, nlayers), flux units per Angstrom, Doppler-shifted.
        """
        c = self.config
        rng = np.random.default_rng(c.seed)
        n = c.nstars
        ncl = int(round(c.cluster_fraction * n))
        # positions in the catalogue frame; field stars uniform over the field + margin
        xc, yc = (c.nx - 1) / 2.0 + rng.normal(0, 3), (c.ny - 1) / 2.0 + rng.normal(0, 3)
        xs, ys = [], []
        need = ncl
        while need > 0:
            r = king_radii(rng, 4 * need, c.king_rc, c.king_rt)
            phi = rng.uniform(0, 2 * np.pi, r.size)
            x, y = xc + r * np.cos(phi), yc + r * np.sin(phi)
            keep = (x > -c.margin) & (x < c.nx - 1 + c.margin) & (y > -c.margin) & (y < c.ny - 1 + c.margin)
            xs.append(x[keep][:need])
            ys.append(y[keep][:need])
            need -= int(min(keep.sum(), need))
        xs.append(rng.uniform(-c.margin, c.nx - 1 + c.margin, n - ncl))
        ys.append(rng.uniform(-c.margin, c.ny - 1 + c.margin, n - ncl))
        xcat, ycat = np.concatenate(xs), np.concatenate(ys)
        # magnitudes: exponential luminosity function between mag_bright and mag_faint
        k = c.lf_slope * np.log(10.0)
        u = rng.uniform(0, 1, n)
        mag = c.mag_bright + np.log1p(u * np.expm1(k * (c.mag_faint - c.mag_bright))) / k
        rv = rng.normal(c.rv_mean, c.rv_sigma, n)
        labels = self.source.sample(rng, n)
        # catalogue -> cube transformation (what extract has to recover)
        x, y = self.catalogue_to_cube(xcat, ycat)
        wcs = self.celestial_wcs()
        ra, dec = wcs.pixel_to_world_values(x, y)
        xn = xcat + rng.normal(0, c.cat_pos_noise, n)
        yn = ycat + rng.normal(0, c.cat_pos_noise, n)
        ra_cat, dec_cat = wcs.pixel_to_world_values(xn, yn)
        mag_cat = mag + rng.normal(0, c.cat_mag_noise, n)
        ids = np.array([f"sim{i:06d}" for i in range(n)])
        t = Table()
        t["stellar_id"] = ids
        t["ra"] = ra
        t["ra"].unit = "deg"
        t["dec"] = dec
        t["dec"].unit = "deg"
        t["x"] = x
        t["x"].description = "true 0-based cube pixel x"
        t["y"] = y
        t["mag"] = mag
        t["mag"].description = "true magnitude (zeropoint: 1 flux unit/A mean over the band)"
        t["rv"] = rv
        t["rv"].unit = "km/s"
        for name in self.source.label_names:
            t[name] = np.asarray(labels[name], float)
        t["ra_cat"] = ra_cat
        t["dec_cat"] = dec_cat
        t["mag_cat"] = mag_cat
        t["in_field"] = (x >= -0.5) & (x <= c.nx - 0.5) & (y >= -0.5) & (y <= c.ny - 0.5)
        flux = self._spectra(labels, rv, mag)
        return t, flux

    def catalogue_to_cube(self, xcat, ycat):
        """Map catalogue pixel positions to cube pixels (offset, rotation, scale about the centre).

        Parameters
        ----------
        xcat, ycat : array_like
            Positions in the catalogue frame, 0-based pixels.

        Returns
        -------
        x, y : numpy.ndarray
            Positions in the cube, 0-based pixels.
        """
        c = self.config
        x0, y0 = (c.nx - 1) / 2.0, (c.ny - 1) / 2.0
        th = np.deg2rad(c.cat_rotation)
        dx, dy = np.asarray(xcat) - x0, np.asarray(ycat) - y0
        x = x0 + c.cat_scale * (np.cos(th) * dx - np.sin(th) * dy) + c.cat_offset[0]
        y = y0 + c.cat_scale * (np.sin(th) * dx + np.cos(th) * dy) + c.cat_offset[1]
        return x, y

    def _spectra(self, labels, rv, mag):
        # one spectrum at a time: BLAS threads cannot help these small products, and on a busy machine
        # OpenBLAS's spinning threads made the demo's synthesis 10x slower (27 s -> 278 s with 2 threads
        # on a 2-core machine running one other job); one thread also makes the bits independent of the default
        with blas_threads(1):
            return self._spectra_one_thread(labels, rv, mag)

    def _spectra_one_thread(self, labels, rv, mag):
        w = self.wave
        edges = bin_edges(w)
        out = np.empty((rv.size, w.size))
        for i in range(rv.size):
            lab = {k: v[i] for k, v in labels.items()}
            if getattr(self.source, "shifts_rv", False):
                # the source evaluates its (model) spectrum at Doppler-shifted wavelengths itself,
                # which avoids the extra smoothing of re-binning onto the same grid
                g = np.asarray(self.source(lab, w, rv=float(rv[i])), dtype=np.float64)
                g = g / np.mean(g)
                out[i] = g * 10.0 ** (-0.4 * (mag[i] - self.config.zeropoint))
                continue
            f = np.asarray(self.source(lab, w), dtype=np.float64)
            f = f / np.mean(f)
            # Doppler shift: rest-frame bins move to edges*(1+v/c); overlap-average onto the grid
            R, cov = rebin_matrix(edges * (1.0 + rv[i] / C_KMS), edges)
            g = R @ f
            ok = cov > 0.999
            g[ok] /= cov[ok]
            if not ok.all():  # uncovered edge bins: nearest covered value
                idx = np.nonzero(ok)[0]
                g[~ok] = f[np.clip(np.searchsorted(idx, np.nonzero(~ok)[0]), 0, idx.size - 1)]
            out[i] = g * 10.0 ** (-0.4 * (mag[i] - self.config.zeropoint))
        return out

    # ------------------------------------------------------------ writing
    def headers(self):
        """Primary and extension headers of the cube.

        Returns
        -------
        primary : astropy.io.fits.Header
            Instrument, simulation parameters and the PSF.
        extensions : list of astropy.io.fits.Header
            DATA and STAT headers (float32 images of (nlayers, ny, nx), WCS, BUNIT).
        """
        c = self.config
        p = fits.Header()
        p["TELESCOP"] = "ESO-VLT-U4"
        p["INSTRUME"] = "MUSE"
        p["OBJECT"] = "musepayne simulated field"
        p["RA"] = c.ra0
        p["DEC"] = c.dec0
        p["EXPTIME"] = 600.0 * c.n_exp
        p["HIERARCH ESO INS MODE"] = "WFM-NOAO-N"
        p["HIERARCH ESO DRS MUSE PIXSCALE"] = c.pixscale
        p["ORIGIN"] = "musepayne.simulate"
        p["SIMSEED"] = c.seed
        p["SIMNSTAR"] = c.nstars
        p["SIMGAIN"] = (c.gain, "electrons per flux unit per layer")
        p["SIMRON"] = (c.read_noise, "read noise per exposure [e-]")
        c.psf.to_header(p)
        ext = []
        for name, unit in (("DATA", BUNIT), ("STAT", f"({BUNIT})**2")):
            h = fits.Header()
            h["XTENSION"] = "IMAGE"
            h["BITPIX"] = -32
            h["NAXIS"] = 3
            h["NAXIS1"] = c.nx
            h["NAXIS2"] = c.ny
            h["NAXIS3"] = c.nlayers
            h["PCOUNT"] = 0
            h["GCOUNT"] = 1
            h["EXTNAME"] = name
            h["BUNIT"] = unit
            h.extend(self.wcs_header())
            ext.append(h)
        return p, ext

    def write(self, path, truth: bool = True, catalogue: bool = True) -> dict:
        """Write the cube (and truth file and source catalogue); return the paths.

        Parameters
        ----------
        path : str or os.PathLike
            Cube file; written atomically, an existing file is replaced.
        truth : bool, optional
            Also write ``<stem>_truth.fits`` (TRUTH, WAVE, TRUE_FLUX, SKY).
        catalogue : bool, optional
            Also write ``<stem>_sources.csv`` (stellar_id, ra, dec, mag with catalogue errors).

        Returns
        -------
        dict
            ``cube``, ``truth``, ``sources`` (paths as str, those written), ``n_stars`` and ``n_in_field`` (int).
        """
        c = self.config
        path = Path(path)
        table, flux = self.stars()
        sky = self.sky_spectrum()
        nz, ny, nx = c.nlayers, c.ny, c.nx
        primary, (hdata, hstat) = self.headers()
        p0 = fits.PrimaryHDU(header=primary).header
        blocks = [p0.tostring().encode("ascii"), hdata.tostring().encode("ascii"), hstat.tostring().encode("ascii")]
        nbytes = nz * ny * nx * 4
        padded = -(-nbytes // 2880) * 2880
        off_data = len(blocks[0]) + len(blocks[1])
        off_stat = off_data + padded + len(blocks[2])
        total = off_stat + padded
        rng = np.random.default_rng(c.seed + 7919)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.truncate(total)
                # reserve the blocks: a full disk is an OSError here, not a SIGBUS in the memory map
                preallocate(fh, total, path)
                fh.seek(0)
                fh.write(blocks[0])
                fh.write(blocks[1])
                fh.seek(off_data + padded)
                fh.write(blocks[2])
            dmap = np.memmap(tmp, dtype=">f4", mode="r+", offset=off_data, shape=(nz, ny, nx))
            smap = np.memmap(tmp, dtype=">f4", mode="r+", offset=off_stat, shape=(nz, ny, nx))
            self._stream(dmap, smap, table, flux, sky, rng)
            dmap.flush()
            smap.flush()
            del dmap, smap
        out = {"cube": str(path)}
        if truth:
            tpath = path.with_name(path.stem + "_truth.fits")
            th = fits.BinTableHDU(table, name="TRUTH")
            wh = fits.ImageHDU(self.wave, name="WAVE")
            wh.header["CTYPE1"] = "AWAV"
            wh.header["BUNIT"] = "Angstrom"
            fh_ = fits.ImageHDU(flux.astype(np.float32), name="TRUE_FLUX")
            fh_.header["BUNIT"] = BUNIT
            sh = fits.ImageHDU(sky.astype(np.float32), name="SKY")
            atomic_write_fits(fits.HDUList([fits.PrimaryHDU(header=primary), th, wh, fh_, sh]), tpath)
            out["truth"] = str(tpath)
        if catalogue:
            cpath = path.with_name(path.stem + "_sources.csv")
            cat = Table({"stellar_id": table["stellar_id"], "ra": table["ra_cat"], "dec": table["dec_cat"],
                         "mag": table["mag_cat"]})
            with atomic_path(cpath) as tmp:
                cat.write(tmp, format="ascii.csv", overwrite=True)
            out["sources"] = str(cpath)
        out["n_stars"] = int(len(table))
        out["n_in_field"] = int(np.sum(table["in_field"]))
        return out

    def _stream(self, dmap, smap, table, flux, sky, rng):
        c = self.config
        nz, ny, nx = c.nlayers, c.ny, c.nx
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        step = max(1, int(c.psf_step))
        nodes = np.arange(0, nz, step)
        if nodes[-1] != nz - 1:
            nodes = np.append(nodes, nz - 1)
        cache: dict[int, object] = {}

        def node_matrix(k):
            if k not in cache:
                for old in [j for j in cache if j < k - 1]:
                    del cache[old]
                cache[k] = psf_design_matrix(c.psf, x, y, self.wave[nodes[k]], (ny, nx), c.psf_radius,
                                             c.psf_oversample).tocsr()
            return cache[k]

        bad = set(int(b) for b in c.bad_layers)
        for i0 in range(0, nz, c.block):
            i1 = min(nz, i0 + c.block)
            layers = np.arange(i0, i1)
            k = np.clip(np.searchsorted(nodes, layers, side="right") - 1, 0, max(0, nodes.size - 2))
            if nodes.size == 1:
                model = node_matrix(0) @ flux[:, i0:i1]
            else:
                t = (layers - nodes[k]) / (nodes[k + 1] - nodes[k])
                model = np.zeros((ny * nx, i1 - i0))
                for kk in np.unique(k):
                    sel = k == kk
                    coef_lo = np.where(sel, 1.0 - t, 0.0)
                    coef_hi = np.where(sel, t, 0.0)
                    model += node_matrix(kk) @ (flux[:, i0:i1] * coef_lo)
                    model += node_matrix(kk + 1) @ (flux[:, i0:i1] * coef_hi)
            model += sky[i0:i1][None, :]
            var = (np.maximum(model, 0.0) * c.gain + c.n_exp * c.read_noise**2) / c.gain**2
            data = model + rng.standard_normal(model.shape) * np.sqrt(var)
            data = data.T.reshape(i1 - i0, ny, nx)
            var = var.T.reshape(i1 - i0, ny, nx)
            for j, l in enumerate(layers):
                if int(l) in bad:
                    data[j] = np.nan
            dmap[i0:i1] = data.astype(np.float32)
            smap[i0:i1] = var.astype(np.float32)
