"""Number formats shared by the docs' tables (bench/readme_tables.py and the table modules it
renders with): one spelling of a duration, a size and a mean ± std everywhere."""

from __future__ import annotations


def ms(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:,.2f} s"
    return f"{seconds * 1000:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def pct(m: dict | None, key: str, scale: float = 100, digits: int = 1) -> str:
    """mean ± std over seeds (std only with two or more seeds); blank when the run lacks it."""
    if m is None or key not in m:
        return "–"
    value = m[key]
    text = f"{scale * value['mean']:.{digits}f}"
    return text + (f" ± {scale * value['std']:.{digits}f}" if value.get("std") is not None else "")
