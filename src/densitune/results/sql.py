"""SQL over the results, confined: ``--where`` can only filter, ``query`` can only read.

* ``--where`` is parsed as *one SQL expression* by DuckDB's own parser
  (``duckdb.SQLExpression``), then checked on DuckDB's syntax tree
  (``json_serialize_sql`` of ``SELECT * FROM results WHERE (<expr>)``): the statement must
  be that one SELECT and the expression may hold only column references, constants,
  operators, comparisons, casts, CASE and scalar function calls (no subquery, no star, no
  window, no parameter). It is then applied with the relation API
  (``table.filter(expression)``), never pasted into a statement: ``;``, ``UNION``,
  ``COPY``, ``ATTACH``, a parenthesis escape (``1=1) UNION ALL SELECT ... WHERE (1=1``) or
  a subquery cannot change which rows are read or write anything.
* ``query`` takes one ``SELECT`` statement (DuckDB's ``extract_statements`` gives its type).
* Both run on an in-memory connection with external access disabled (no files, no
  extensions, no network) and the configuration locked, so the SQL cannot switch it back
  on. ``query(..., allow_files=True)`` (``densitune query --allow-files``) opts in to
  reading files such as ``read_csv('other.csv')``; it is still one SELECT.

No Ray, no training loop, no CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from densitune.errors import ResultsError

if TYPE_CHECKING:
    import pyarrow as pa

#: How much of a user's SQL an error message repeats.
ECHO_LIMIT = 200

#: Expression node classes a ``--where`` filter may contain (DuckDB's ParsedExpression classes).
FILTER_NODES = frozenset({
    "COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "FUNCTION", "CAST", "TYPE",
    "BETWEEN", "CASE", "COLLATE",
})


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message may quote it: one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 2 * ECHO_LIMIT else line[: 2 * ECHO_LIMIT - 1] + "…"


def connect(*, allow_files: bool = False) -> Any:
    """An in-memory DuckDB connection; without ``allow_files`` it cannot touch files, extensions or the network."""
    import duckdb

    con = duckdb.connect(config={
        "enable_external_access": bool(allow_files),
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
    })
    con.execute("SET enable_progress_bar = false")  # a reading command shows no progress display
    con.execute("SET lock_configuration = true")  # the user's SQL cannot change any of this
    return con


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a JSON syntax tree that is an expression node (has a ``class``)."""
    if isinstance(tree, dict):
        if "class" in tree:
            yield tree
        for v in tree.values():
            yield from _nodes(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _nodes(v)


def check_filter(where: str) -> Any:
    """The parsed ``duckdb.SQLExpression`` of ``where``; :class:`ResultsError` unless it is one plain filter expression."""
    import duckdb

    bad = f"bad --where {echo(where)}"
    if not where.strip():
        raise ResultsError(f"{bad}: empty filter")
    try:
        expression = duckdb.SQLExpression(where)
    except duckdb.Error as e:
        raise ResultsError(f"{bad}: not one SQL expression ({_first_line(e)})") from None
    con = connect()
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [f"SELECT * FROM results WHERE (\n{where}\n)"]).fetchone()
    finally:
        con.close()
    tree: dict[str, Any] = json.loads(raw[0]) if raw else {"error": True}
    statements: list[dict[str, Any]] = tree.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    shaped = (
        not tree.get("error") and node.get("type") == "SELECT_NODE" and not node.get("modifiers")
        and not (node.get("cte_map") or {}).get("map") and not node.get("group_expressions")
        and node.get("having") is None and node.get("qualify") is None
        and [s.get("class") for s in node.get("select_list", [])] == ["STAR"]
        and (node.get("from_table") or {}).get("table_name") == "results" and node.get("where_clause") is not None
    )
    if not shaped:
        raise ResultsError(f"{bad}: a filter is one expression over the result columns")
    for n in _nodes(node["where_clause"]):
        if n["class"] not in FILTER_NODES:
            what = {"SUBQUERY": "a subquery"}.get(n["class"], f"a {n['class'].lower()} expression")
            raise ResultsError(f"{bad}: {what} is not allowed in a filter; use column comparisons, AND, OR, IN, functions")
    return expression


def referenced_columns(sql: str, names: Iterable[str], *, expression: bool = False) -> set[str] | None:
    """The columns among ``names`` that a SELECT (``expression``: a ``--where`` expression) refers to, so
    that a reader loads only those; None when it may use every column (a ``*``, ``COLUMNS(...)``) or does
    not parse (running it then gives the error). Matching is case-insensitive, as DuckDB's binder is."""
    text = f"SELECT 1 FROM results WHERE (\n{sql}\n)" if expression else sql
    con = connect()
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()
    finally:
        con.close()
    tree: dict[str, Any] = json.loads(raw[0]) if raw else {"error": True}
    if tree.get("error"):
        return None
    by_lower = {n.lower(): n for n in names}
    found: set[str] = set()
    for node in _nodes(tree):
        if node["class"] == "STAR":
            return None
        for part in node.get("column_names") or [] if node["class"] == "COLUMN_REF" else []:
            if str(part).lower() in by_lower:
                found.add(by_lower[str(part).lower()])
    return found


def filter_table(table: pa.Table, where: str | None) -> pa.Table:
    """Rows of ``table`` matching the SQL expression ``where`` (e.g. ``density = 'kde' AND D >= 16``)."""
    if where is None:
        return table
    import duckdb

    expression = check_filter(where)
    con = connect()
    try:
        con.register("results", table)
        return _arrow(con.table("results").filter(expression))
    except duckdb.Error as e:
        raise ResultsError(f"bad --where {echo(where)}: {_first_line(e)}") from None
    finally:
        con.close()


def run_query(table: pa.Table, sql: str, *, allow_files: bool = False) -> pa.Table:
    """One read-only ``SELECT`` over ``table`` (the view ``results``); anything else is a one-line error."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ResultsError(f"bad query {echo(sql)}: {_first_line(e)}") from None
    if len(statements) != 1:
        raise ResultsError(f"bad query {echo(sql)}: give exactly one SELECT statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind))
        raise ResultsError(f"bad query {echo(sql)}: only a SELECT can run here (got {name}); results are read-only")
    con = connect(allow_files=allow_files)
    try:
        con.register("results", table)
        return _arrow(con.sql(sql))
    except duckdb.Error as e:
        hint = "" if allow_files or "disabled by configuration" not in str(e) else " (pass --allow-files to read files)"
        raise ResultsError(f"bad query {echo(sql)}: {_first_line(e)}{hint}") from None
    finally:
        con.close()


def _arrow(rel: Any) -> pa.Table:
    table: pa.Table = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    return table
