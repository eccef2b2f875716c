"""Small text helpers shared by every table: sizes, rates, durations, long names at 80 columns."""

from __future__ import annotations

import math

from rich import box
from rich.table import Table


def human_bytes(n: float | None) -> str:
    """Decimal units, three significant digits: 307 kB, 70.7 kB, 1.20 GB (the units disks and rich use)."""
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"
        n /= 1000
    return f"{n:.0f} TB"


def two_digits(x: float) -> str:
    """Two significant digits without scientific notation: 0.31, 3.2, 32, 320."""
    if x == 0:
        return "0"
    if abs(x) >= 10:
        return f"{round(x, -len(str(int(abs(x)))) + 2):.0f}"
    if abs(x) < 0.001:
        return f"{x:.1e}"
    places = 1 - math.floor(math.log10(abs(x)))  # 1.0 keeps its zero: two digits, always
    return f"{round(x, places):.{places}f}"


def human_rate(nbytes: float, seconds: float) -> str:
    """Bytes per second in human units with two significant digits (31 kB/s, 1.2 GB/s)."""
    if seconds <= 0 or nbytes <= 0:
        return ""
    rate = nbytes / seconds
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if rate < 1000 or unit == "TB":
            return f"{two_digits(rate)} {unit}/s"
        rate /= 1000
    return ""


def abbreviate_middle(text: str, width: int) -> str:
    """Keep the start and the distinguishing end of a long name: model.layers.1…self_attn.q_proj."""
    if len(text) <= width or width < 5:
        return text
    keep_end = (width - 1) * 2 // 3
    return text[: width - 1 - keep_end] + "…" + text[-keep_end:]


def table(title: str | None = None, *columns: str, caption: str | None = None) -> Table:
    """A compact table that fits 80 columns: no vertical rules, long cells wrap (fold), never cut."""
    t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
              title_justify="left", caption_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    return t
