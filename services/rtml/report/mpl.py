"""matplotlib, optional and headless: the Agg backend, figures built without pyplot's global state."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from rtml.core.errors import RtmlError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'rtml[plot]'"
DPI = 100


class PlotUnavailable(RtmlError):
    """matplotlib (the ``plot`` extra) is not installed."""

    code = "plot_unavailable"


def require_matplotlib(what: str = "plotting") -> None:
    """Raise :class:`PlotUnavailable` with the install line when matplotlib cannot be imported.

    Called before any work starts (``rtml bench --plot`` checks it before the benchmark runs)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable(f"{what} needs matplotlib, an optional extra: {INSTALL_HINT}")


def new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of exactly ``width_px`` x ``height_px`` pixels when saved with :func:`save_png`.

    ``matplotlib.figure.Figure`` with an Agg canvas rather than ``pyplot``: no display, no global figure
    registry to leak from a long-running process."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path | None = None) -> bytes:
    """The figure as PNG bytes (size as created: no tight bounding box), also written to ``path`` if given."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data
