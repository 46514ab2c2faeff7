"""Shared matplotlib helpers: Agg backend, labelled axes with units, PNG + SVG written atomically.

matplotlib is imported inside the functions, never at module import, so the CLI starts fast.
Every saved figure is checked: each axis (colour bars included) must carry a label with
its unit in brackets, e.g. "prefill tokens N_t [tokens]" or "gamma [ratio]".
"""

from __future__ import annotations

import io
from pathlib import Path

from moelab.io import write_atomic

GAMMA_LABEL = "gamma = offload overhead / EP overhead [ratio]"
OFFLOAD_COLOR, EP_COLOR = "#1f77b4", "#d62728"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure(ncols: int = 1, width: float = 6.4, height: float = 4.2, nrows: int = 1, **kw):
    plt = pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), **kw)
    return fig, axes


# Okabe & Ito's colour-blind-safe palette without its yellow (too pale on white) and black
# (the gamma = 1 line), ordered so that neighbours differ most (blue and sky blue, orange
# and vermillion far apart); with three line styles, 18 series stay distinct.
SERIES_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")
SERIES_STYLES = ("-", "--", "-.")
GUIDE_COLOR = "#555555"  # reference lines (dark enough to see at 1.2 pt, lighter than data)


def series_style(i: int) -> dict:
    """Colour and line style of series i: colours cycle first, then the style changes."""
    n = len(SERIES_COLORS)
    if i >= n * len(SERIES_STYLES):
        raise ValueError(f"series {i}: at most {n * len(SERIES_STYLES)} distinct series; split the figure")
    return {"color": SERIES_COLORS[i % n], "ls": SERIES_STYLES[i // n]}


def relative_luminance(rgb) -> float:
    """WCAG 2 relative luminance of an sRGB colour given as components in [0, 1]."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color_on(rgb) -> str:
    """"white" or "black": whichever has the higher WCAG contrast ratio on the colour rgb.

    Contrast with white is 1.05 / (L + 0.05), with black (L + 0.05) / 0.05; they are equal
    at L = sqrt(1.05 * 0.05) - 0.05 = 0.179.
    """
    lum = relative_luminance(rgb)
    return "white" if 1.05 / (lum + 0.05) > (lum + 0.05) / 0.05 else "black"


def gamma_line(ax, label: str = "gamma = 1: offload and EP cost the same") -> None:
    """The decision boundary: below it offload wins, above it EP wins."""
    ax.axhline(1.0, color="black", lw=1, ls="--", label=label)


def unlabelled_axes(fig) -> list[str]:
    """Axes whose x or y label is missing or has no [unit]; empty when the figure is fine."""
    bad = []
    for i, ax in enumerate(fig.get_axes()):
        if not ax.get_visible() or not ax.axison:
            continue
        is_colorbar = hasattr(ax, "_colorbar") or ax.get_label() == "<colorbar>"
        labels = [ax.get_ylabel() or ax.get_xlabel()] if is_colorbar else [ax.get_xlabel(), ax.get_ylabel()]
        for which, label in zip("xy", labels, strict=False):
            if not label or "[" not in label or "]" not in label:
                bad.append(f"axes {i} ({ax.get_title() or 'untitled'}): {which} label {label!r}")
    return bad


def save(fig, folder, stem: str, dpi: int = 110) -> list[Path]:
    """Write `<stem>.png` and `<stem>.svg` atomically and close the figure."""
    plt = pyplot()
    problems = unlabelled_axes(fig)
    if problems:
        plt.close(fig)
        raise ValueError("plot " + stem + ": every axis needs a label with [unit]: " + "; ".join(problems))
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, metadata={"Date": None} if ext == "svg" else None)
        paths.append(write_atomic(Path(folder) / f"{stem}.{ext}", buf.getvalue()))
    plt.close(fig)
    return paths
