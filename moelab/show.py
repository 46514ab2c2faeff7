"""Terminal output helpers: one console, one number format."""

from __future__ import annotations

import sys


def console():
    """A rich console; when piped, wide enough that tables don't fold."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def fmt(x: float | None) -> str:
    """Numbers as people read them: 307,200 and 75 and 0.0625 and 1.2e-05."""
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 1 and abs(x) < 1e12 and abs(x - round(x)) < 1e-9 * abs(x):
        return f"{round(x):,}"
    if 1e3 <= abs(x) < 1e12:
        return f"{x:,.0f}"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:,.4g}"
