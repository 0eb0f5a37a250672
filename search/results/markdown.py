"""Markdown tables without pandas: the layout every markdown table of densitune shares, and a pyarrow
table rendered with :func:`densitune.search.results.report._display`'s cell rules (``query``'s default
output, which so imports neither pandas nor the report code).
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


def _cell(value: Any, column: str, floating: bool) -> str:
    if floating:
        return "-" if value is None or value != value else f"{value:.4g}" if column == "eps" else f"{value:.4f}"
    return "" if value is None else str(value)


def arrow_markdown(title: str, table: pa.Table) -> str:
    """``table`` as :func:`markdown`: floats to 4 decimals (ε to 4 significant digits), nulls "-" (floats) or
    empty, and a ``<c>`` / ``<c>_std`` pair of float columns merged into "mean ± std"."""
    import pyarrow.types as pat

    names = table.column_names
    floating = {n: pat.is_floating(table.schema.field(n).type) for n in names}
    shown = [n for n in names if not (n.endswith("_std") and n[: -len("_std")] in names)]
    values = {n: table.column(n).to_pylist() for n in names}
    cells = {}
    for n in shown:
        std = f"{n}_std"
        if std in names:
            cells[n] = [("-" if m is None or m != m else f"{m:.4f}" + ("" if s is None or s != s else f" ± {s:.4f}"))
                        for m, s in zip(values[n], values[std])]
        else:
            cells[n] = [_cell(v, n, floating[n]) for v in values[n]]
    return markdown(title, shown, zip(*(cells[n] for n in shown)) if shown else [])
