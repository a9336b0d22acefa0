"""Thread limits for the numerical libraries (BLAS/LAPACK/OpenMP) during a block of work.

Floating-point sums in BLAS depend on how many threads share them, so holding the count
fixed makes results independent of the machine's defaults, and it keeps stages that run
their own threads (chunk threads, Dask workers) from oversubscribing the cores.
"""

from __future__ import annotations

from contextlib import contextmanager

from threadpoolctl import threadpool_limits

__all__ = ["blas_threads"]


@contextmanager
def blas_threads(limit: int, scipy: bool = True):
    """Hold numpy's and scipy's BLAS/LAPACK (and OpenMP) to ``limit`` threads inside the block.

    ``scipy=False``: do not load scipy's own BLAS/LAPACK first (~0.1-0.2 s of imports) -- for
    work that uses only numpy's (``musepayne fit``); limits reach only libraries already loaded."""
    if scipy:
        import scipy.linalg  # noqa: F401, PLC0415 - load scipy's BLAS/LAPACK first: limits only reach loaded libraries
        import scipy.sparse.linalg  # noqa: F401, PLC0415

    with threadpool_limits(limits=int(limit)):
        yield
