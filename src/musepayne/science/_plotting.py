"""Plot helpers: figures drawn with the Agg canvas, never through pyplot.

Using :class:`matplotlib.figure.Figure` directly keeps the library free of
pyplot's global state (no backend switching, no open-figure registry).
"""

from __future__ import annotations

from pathlib import Path

from ..io.fits import atomic_path

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize=(6.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy optional dependency, loaded when used
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy optional dependency, loaded when used

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi=120):
    """Write ``fig`` atomically; the format comes from the file suffix (default png)."""

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path
