"""Figures as a person reads them: sizes in binary units, shares as percentages."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(num_bytes: int) -> str:
    """``512 B``, ``1.5 KiB``, ``244.0 GiB``: powers of 1024, like the exporter's GB."""
    size, unit = float(num_bytes), 0
    while abs(size) >= 1024 and unit < len(_UNITS) - 1:
        size /= 1024
        unit += 1
    return f"{num_bytes} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def format_percent(fraction: float) -> str:
    """A share 0..1 as ``93.0 %``; a non-zero share that would round to zero reads ``< 0.1 %``."""
    if 0 < fraction < 0.0005:
        return "< 0.1 %"
    return f"{100 * fraction:.1f} %"


def format_rate(bytes_per_day: float | None) -> str:
    """``+1.5 GiB/d``, ``-200 B/d``; ``-`` when unknown."""
    if bytes_per_day is None:
        return "-"
    sign = "-" if bytes_per_day < 0 else "+" if bytes_per_day > 0 else ""
    return f"{sign}{format_bytes(round(abs(bytes_per_day)))}/d"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table: a header, a rule, left-aligned columns."""
    table = [headers, *rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
