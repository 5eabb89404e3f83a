"""One look for every figure: the colour table, the rc settings, and how figures are saved.

Every analysis plots through these helpers, so a cell, an excitatory or an inhibitory
quantity has the same colour in every figure. Figures are built with the
object-oriented API on an Agg canvas: nothing here opens a window or touches pyplot's
global state.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "COLORS",
    "cell_color",
    "level_colors",
    "new_figure",
    "panel_label",
    "save_figure",
    "styled",
    "write_csv",
]

P = ParamSpec("P")
R = TypeVar("R")

# The one colour table. Cells: Okabe-Ito colours (distinguishable with colour blindness);
# excitation warm, inhibition cool, as in the usual E/I diagrams.
COLORS: dict[str, str] = {
    "lstm": "#000000",
    "sublstm": "#D55E00",
    "fix_sublstm": "#0072B2",
    "elm": "#CC79A7",
    "branch_elm": "#E69F00",
    "cmc": "#009E73",
    "cmc_hierarchy": "#56B4E9",
    "mlp": "#999999",
    "excitation": "#C0392B",
    "inhibition": "#2E86C1",
    "net": "#555555",
    "simulation": "#222222",
    "target": "#009E73",
}
# Graded levels (inhibition or gate strength) are shades of one sequential map.
LEVEL_CMAP = "viridis"

_RC = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "legend.frameon": False,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,  # editable text in the PDF
}
PNG_DPI = 200


def cell_color(name: str) -> str:
    """Colour of a model by registry name (``"lstm"``, ..., ``"elm"``; the keys of
    :data:`~microcircuits.model_registry.MODELS`)."""
    return COLORS.get(name, COLORS["net"])


def level_colors(count: int) -> list[tuple[float, float, float, float]]:
    """``count`` colours from dark (first level) to light (last), for graded curves."""
    cmap = matplotlib.colormaps[LEVEL_CMAP]
    return [cmap(v) for v in np.linspace(0.05, 0.85, max(count, 1))][:count]


@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(_RC):
        yield


def styled(plot: Callable[P, R]) -> Callable[P, R]:
    """Run a plotting function under the house rc settings (fonts, spines, sizes)."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with _style():
            return plot(*args, **kwargs)

    return wrapper


def new_figure(ncols: int, nrows: int = 1, *, width: float = 7.0, height: float = 2.4):
    """A figure with an ``nrows x ncols`` grid of axes (always a 2-D array) on Agg.

    ``width``/``height`` are inches for the whole figure and for each row. Call it
    inside a :func:`styled` function so the axes pick up the house settings.
    """
    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def panel_label(ax, letter: str) -> None:
    """Bold panel letter in the top-left corner, outside the axes."""
    ax.text(
        -0.12,
        1.06,
        letter,
        transform=ax.transAxes,
        fontweight="bold",
        fontsize=10,
        va="bottom",
        ha="right",
    )


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` into ``out_dir`` (created if missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    with _style():
        fig.savefig(paths[0], dpi=PNG_DPI)
        fig.savefig(paths[1])
    return paths


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Write a tidy CSV (one observation per row); floats with 6 significant digits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_format(v) for v in row])
    return path


def _format(value: object) -> object:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return value


LINE_STYLES = ("-", "--", ":", "-.")
HATCHES = ("", "///", "...", "xx")


def repeat_index(cells: list[str]) -> list[int]:
    """For each model, how many earlier models share its cell (0 for the first).

    Models of one cell share a colour; this index picks their line style or hatch
    (e.g. solid for a network at initialisation, dashed for it trained).
    """
    seen: dict[str, int] = {}
    index = []
    for cell in cells:
        index.append(seen.get(cell, 0))
        seen[cell] = seen.get(cell, 0) + 1
    return index
