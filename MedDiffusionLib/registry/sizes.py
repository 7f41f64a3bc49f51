"""Byte counts as people read them (one formatting rule for CLI, server and Slicer)."""
from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: int | float | None) -> str:
    """'2.52 GB', '612 MB', '3.1 kB' (decimal units, as the Hub and download dialogs show them)."""
    if n is None:
        return "unknown size"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= 1000
    return f"{value:.0f} TB"  # unreachable: the loop returns at TB
