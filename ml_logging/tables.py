"""Plain-text tables for the console: aligned columns, numbers right-aligned, never wider than a limit.

A table wider than `max_width` is printed as several blocks of value columns, each block repeating the
label columns, so that no line is longer than the limit and every value is printed exactly once.

Example:
    print(format_table(["task", "auroc", "count"], [["fav", 0.81234, 5000.0], ["reply", 0.7, 5000.0]]))
    # task   auroc  count
    # fav   0.8123   5000
    # reply    0.7   5000
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONSOLE_WIDTH = 200  # the longest console line the loggers print


def format_number(value: float) -> str:
    """4 significant digits; whole numbers (counts) in full; `nan` / `inf` as Python spells them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.4g}"


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    label_columns: int = 1,
    max_width: int = CONSOLE_WIDTH,
) -> str:
    """Rows under `header`; the first `label_columns` cells of a row are left-aligned labels.

    Numbers are formatted by `format_number` and right-aligned; None is an empty cell.

    Args:
        header: one name per column.
        rows: cells per row, as many as `header` (numbers, strings or None).
        label_columns: how many leading columns name the row (repeated in every block).
        max_width: the longest line; value columns are split into blocks to stay within it.
    """
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(header)]
    labels = list(range(label_columns))
    label_width = sum(widths[i] + 2 for i in labels)
    blocks: list[list[int]] = [[]]
    for i in range(label_columns, len(header)):
        used = label_width + sum(widths[j] + 2 for j in blocks[-1])
        if blocks[-1] and used + widths[i] > max_width:
            blocks.append([])
        blocks[-1].append(i)
    out: list[str] = []
    for block in blocks:
        if out:
            out.append("")
        columns = labels + block
        out.append(_line([header[i] for i in columns], [widths[i] for i in columns], label_columns))
        for row in cells:
            out.append(_line([row[i] for i in columns], [widths[i] for i in columns], label_columns))
    return "\n".join(out)


def wrap_items(first: str, items: Sequence[str], max_width: int = CONSOLE_WIDTH, indent: int = 2) -> str:
    """`first` and the items, two spaces apart, continued on indented lines to stay within `max_width`.

    Items are never cut: one longer than the limit makes a longer line.
    """
    lines, line, has_item = [], first, False
    for item in items:
        if has_item and len(line) + 2 + len(item) > max_width:
            lines.append(line)
            line = " " * indent + item
        else:
            line += ("  " if has_item else " ") + item
        has_item = True
    lines.append(line)
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "" if value is None else format_number(value) if isinstance(value, (int, float)) else str(value)


def _line(cells: list[str], widths: list[int], label_columns: int) -> str:
    parts = [
        cell.ljust(width) if i < label_columns else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()
