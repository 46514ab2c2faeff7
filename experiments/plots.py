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
