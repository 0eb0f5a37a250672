"""Markdown tables without pandas: the layout every markdown table of densitune shares, and a pyarrow
table rendered with the cell rules the report's tables use too (``query``'s default output, which so
imports neither pandas nor the report code).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def markdown(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``### title``, a blank line, then a pipe table of ``columns`` and ``rows`` (cells already strings)."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _na(value: Any) -> bool:
    """A missing number: None, NaN, or a pandas NA (whose comparisons are NA, not a bool)."""
    try:
        return value is None or bool(value != value)
    except (TypeError, ValueError):
        return True


def cell(value: Any, column: str, floating: bool) -> str:
    """One table cell: a float to 4 decimals (``eps`` to 4 significant digits), a missing float "-", anything
    else ``str``, None or NaN empty."""
    if floating:
        return "-" if _na(value) else f"{value:.4g}" if column == "eps" else f"{value:.4f}"
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def mean_std(mean: Any, std: Any) -> str:
    """"mean ± std" to 4 decimals; "-" without a mean, the mean alone without a std."""
    return "-" if _na(mean) else f"{mean:.4f}" + ("" if _na(std) else f" ± {std:.4f}")


def arrow_markdown(title: str, table: pa.Table) -> str:
    """``table`` as :func:`markdown` with the report's cell rules (:func:`cell`), a ``<c>`` / ``<c>_std`` pair
    of columns merged into "mean ± std" (:func:`mean_std`)."""
    import pyarrow.types as pat

    names = table.column_names
    shown = [n for n in names if not (n.endswith("_std") and n[: -len("_std")] in names)]
    values = {n: table.column(n).to_pylist() for n in names}
    cells = {}
    for n in shown:
        if f"{n}_std" in names:
            cells[n] = [mean_std(m, s) for m, s in zip(values[n], values[f"{n}_std"])]
        else:
            floating = pat.is_floating(table.schema.field(n).type)
            cells[n] = [cell(v, n, floating) for v in values[n]]
    return markdown(title, shown, zip(*(cells[n] for n in shown)) if shown else [])
