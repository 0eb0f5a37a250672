"""The layer rules of STRUCTURE.md, read from the source with `ast`: every import, function-local ones included.

The checkers are plain functions of ``{module name: Source}`` (the package's files, or source strings a test
plants), so the tests at the bottom show each rule failing on a planted violation. Every message names
``file:line`` and the rule broken.

**Floors** (rule F). Each module sits on one floor (:func:`floor`); an import of a densitune module, at the top,
inside a function or under ``if TYPE_CHECKING:``, must land on a floor that :data:`ALLOWED` lists for the
importer's floor. Down the stack: faces (``__main__`` -> ``cli`` -> ``api``, i.e. ``densitune`` and
``densitune.api``) -> ``app`` -> ``search`` / ``trainables`` -> ``results`` -> ``run`` -> ``base`` (errors,
checks, registry, device, ood_groups). ``search.ood`` (``ood``) imports only the base; ``trainables`` never
imports ``search``, ``ood`` included.

**Bans** (rule B, :data:`BANNED`). The CLI package imports no ``ray``, no Ray Tune adapter
(``densitune.search.tune``, ``densitune.trainables.train.tune``), no ``densitune.run.runlock`` or
``densitune.run.cleanup`` in its own statements (the services it calls own Ray, the writer lock and stale files,
so what they load is theirs; Ray and the adapters may not be loaded through them at module level either). ``search.ood`` and
``results`` load no ``ray`` (``results`` not ``densitune.run.ray_runtime`` either), directly or through what they
import at module level.

**Function-local imports** (rule L). An import inside a function (a ``def``, method or ``lambda``) is allowed only
when it keeps a heavy third-party module out of the importing module: ``heavy(target)`` must hold a module that
``heavy(importer)`` does not, where ``heavy(m)`` is the set of :data:`HEAVY` modules that ``import m`` loads
through module-level imports (m's own, its parent packages', and those of every densitune module they import,
transitively; ``if TYPE_CHECKING:`` blocks are never run and do not count). So a densitune module that imports
torch at module level is heavy for the CLI or a light service exactly as torch is, and may be imported inside
a function there; a light densitune module, the standard library, a third-party module outside :data:`HEAVY`,
or a heavy module the importer already loads anyway, belongs at the top of the file. One exception: a package's module-level
``__getattr__`` (PEP 562 lazy attributes, ``densitune.fit_detector``) imports lazily by design, or every import of
any module below the package would load what its attributes live in. :data:`HEAVY` is every
third-party library the package imports, each measured (cold ``import`` on the 2-core dev machine): torchvision
3.4 s, torch 1.4 s, sklearn 1.0 s, ray 0.36 s, pandas 0.33 s, matplotlib 0.20 s, optuna 0.18 s, boto3 0.17 s,
scipy 0.11 s, numpy 0.10 s, pyarrow 0.09 s, duckdb 0.09 s, tqdm 0.05 s, yaml 0.03 s, PIL.Image 0.02 s, botocore
0.015 s (with boto3) -- against 0.09 s for all of ``densitune --help``, which loads the standard library only.

**Module-level mutable state** (rule S). A name bound by an assignment at module level that any function
mutates in place fails: a subscript or attribute store or delete (``NAME[k] = v``, ``NAME.x += 1``,
``del NAME[k]``) or a call of a mutating method (:data:`MUTATORS`: ``.append``, ``.update``, ``.setdefault``,
``.pop``, ``.clear``, ``.add``, ``.enter_context``, ...) on it or on anything reached from it by attributes or
subscripts, unless the function binds that name itself (a parameter or local). Every ``global`` statement fails
too. Registries (names bound to ``Registry(...)``, :class:`densitune.registry.Registry`) are mutable by design:
a plugin registers its backbone, data set or density into them (``.register`` / ``.add``, which refuse a second
entry under one name), mostly at import time; memoising decorators (``functools.cache``) are out of its scope: their value is a
function of the arguments. :data:`STATE_ALLOWED` names the few states that are mutable by design, and why.

**The CLI** (rule C). ``parse_args(`` is called only in the CLI package, and there once: argv is parsed once,
never re-parsed. No ``cmd_*`` function of the CLI package is longer than 40 lines (parse -> one call -> print).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Source folder of each top-level part of the package (pyproject's package-dir).
FOLDERS = {"densitune": ROOT / "src" / "densitune", "densitune.search": ROOT / "search",
           "densitune.trainables": ROOT / "trainables"}

#: Floor of each module: the longest matching prefix wins (a prefix matches itself and its submodules).
FLOORS = {
    "densitune": "api", "densitune.api": "api", "densitune.__main__": "main", "densitune.cli": "cli",
    "densitune.app": "app", "densitune.search": "search", "densitune.search.ood": "ood",
    "densitune.trainables": "trainables", "densitune.results": "results", "densitune.run": "run",
    "densitune.errors": "base", "densitune.checks": "base", "densitune.registry": "base", "densitune.device": "base",
    "densitune.ood_groups": "base", "densitune.kernels": "base",
}

#: THE table: the floors a module on each floor may import (its own included). Imports point down.
ALLOWED: dict[str, frozenset[str]] = {
    "main": frozenset({"cli"}),
    "cli": frozenset({"cli", "api", "app", "search", "trainables", "ood", "results", "run", "base"}),
    "api": frozenset({"api", "app", "search", "trainables", "ood", "results", "run", "base"}),
    "app": frozenset({"app", "search", "trainables", "ood", "results", "run", "base"}),
    "search": frozenset({"search", "ood", "trainables", "results", "run", "base"}),
    "trainables": frozenset({"trainables", "results", "run", "base"}),
    "ood": frozenset({"ood", "base"}),
    "results": frozenset({"results", "run", "base"}),
    "run": frozenset({"run", "base"}),
    "base": frozenset({"base"}),
}

_RAY_ADAPTERS = ("ray", "densitune.search.tune", "densitune.trainables.train.tune")
#: importer prefix -> (banned module prefixes, why). Checked on every import and on what module-level imports load,
#: except the names in :data:`DIRECT_ONLY`.
BANNED: dict[str, tuple[tuple[str, ...], str]] = {
    "densitune.cli": ((*_RAY_ADAPTERS, "densitune.run.runlock", "densitune.run.cleanup"),
                      "the CLI parses and prints; the services own Ray, the writer lock and stale files"),
    "densitune.search.ood": (("ray",), "the OOD maths knows nothing of Ray"),
    "densitune.results": (("ray", "densitune.run.ray_runtime"), "the results store knows nothing of Ray"),
}
#: Banned to the importer's own statements only: the CLI calls the services, and a service holds the writer lock and
#: cleans stale files (so it loads runlock and cleanup); what the CLI must never do is take them itself.
DIRECT_ONLY = frozenset({"densitune.run.runlock", "densitune.run.cleanup"})

#: Third-party modules worth keeping off the `--help` path (cold import times in the module docstring).
HEAVY = frozenset({"torch", "torchvision", "sklearn", "ray", "pandas", "matplotlib", "optuna", "boto3", "botocore",
                   "scipy", "numpy", "pyarrow", "duckdb", "tqdm", "yaml", "PIL"})

#: Methods that change their receiver in place (list, dict, set, deque, contextlib.ExitStack).
MUTATORS = frozenset({"append", "extend", "insert", "remove", "pop", "popitem", "popleft", "appendleft", "extendleft",
                      "clear", "update", "setdefault", "add", "discard", "sort", "reverse", "enter_context",
                      "enter_async_context", "push", "callback", "__setitem__", "__delitem__"})

#: (last part of the module's name, global name) -> why it is mutable by design.
STATE_ALLOWED = {
    ("workspace", "_WORKSPACE"): "the per-process cache that the trials of a reused Ray actor share (Tune gives no "
                                 "other home to state that outlives a trial); it holds caches only, never results",
    ("console", "_OPEN"): "the progress bars drawn on this process's terminal, one terminal per process: whatever "
                          "layer drew a bar, the command closes them all before it prints an error (close_progress)",
}

MAX_COMMAND_LINES = 40


@dataclass(frozen=True)
class Source:
    """One module: its dotted name, the path its messages show, its text, and whether it is a package."""

    module: str
    path: str
    text: str
    package: bool = False
    tree: ast.Module = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tree", ast.parse(self.text, self.path))


def package_sources(folders: Mapping[str, Path] = FOLDERS) -> dict[str, Source]:
    """Every module of the package, from its source folders (so a new file cannot be missed)."""
    out = {}
    for top, folder in folders.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            name = ".".join([top, *(parts[:-1] if package else parts)])
            out[name] = Source(name, str(f.relative_to(ROOT)), f.read_text(), package)
    return out


def sources_of(texts: Mapping[str, str]) -> dict[str, Source]:
    """Sources from strings: ``{"densitune.x.y": text}``; a name ending in ``.__init__`` is a package."""
    out = {}
    for name, text in texts.items():
        package = name.endswith(".__init__")
        module = name.removesuffix(".__init__")
        out[module] = Source(module, module.replace(".", "/") + ("/__init__.py" if package else ".py"), text, package)
    return out


def floor(module: str) -> str | None:
    """The floor of a densitune module (None for a name the table does not place: ``densitune`` itself is a face,
    but a new ``densitune.x`` sits on no floor until FLOORS names it -- the top holds only the base and the faces)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if (f := FLOORS.get(".".join(parts[:n]))) is not None:
            return f
    return FLOORS["densitune"] if module == "densitune" else None


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    """One import statement's target: the module it loads (the most specific known one for densitune)."""

    source: Source
    line: int
    target: str
    local: bool  # inside a function
    typing_only: bool  # under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        return f"{self.source.path}:{self.line}"

    @property
    def internal(self) -> bool:
        return _within(self.target, "densitune")

    @property
    def top(self) -> str:
        return self.target.split(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(src: Source, known: Mapping[str, Source]) -> Iterator[Import]:
    """Every import of ``src``; relative ones resolved, ``from p import m`` read as module ``p.m`` when it is one."""

    def visit(node: ast.AST, local: bool, typing_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield Import(src, child.lineno, a.name, local, typing_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = src.module if src.package else src.module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base: None for a in child.names}
                for target in targets:  # one per module: `from m import a, b` is one import of m
                    yield Import(src, child.lineno, target, local, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from visit(ast.Module(body=child.body, type_ignores=[]), local, True)
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]), local, typing_only)
            else:
                inner = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from visit(child, local or inner, typing_only)

    yield from visit(src.tree, False, False)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def loads(sources: Mapping[str, Source]) -> dict[str, frozenset[str]]:
    """What ``import m`` runs, for each module m: the densitune modules and the top-level names of the
    third-party modules that its module-level imports (and its parent packages', transitively) load."""
    direct: dict[str, set[str]] = {}
    for name, src in sources.items():
        deps = set(_parents(name))
        for imp in imports(src, sources):
            if imp.local or imp.typing_only:
                continue
            if imp.internal:
                deps.update(m for m in (*_parents(imp.target), imp.target) if m in sources)
            else:
                deps.add(imp.top)
        direct[name] = deps
    closure = {name: set(deps) for name, deps in direct.items()}
    changed = True
    while changed:  # a fixed point: import cycles at module level are possible
        changed = False
        for got in closure.values():
            more = set().union(*(closure[d] for d in got if d in closure)) - got
            if more:
                got |= more
                changed = True
    return {name: frozenset(got) for name, got in closure.items()}


def heavy(module: str, loaded: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The :data:`HEAVY` modules that importing ``module`` (densitune or third-party) loads."""
    if module in loaded:
        return loaded[module] & HEAVY
    return frozenset({module.split(".")[0]}) & HEAVY


def check_imports(sources: Mapping[str, Source]) -> list[str]:
    """Rules F, B and L over ``sources``: one message per broken rule, ``path:line: rule: what``."""
    loaded = loads(sources)
    bad = []
    for name, src in sources.items():
        here = floor(name)
        bans = [(prefixes, why) for p, (prefixes, why) in BANNED.items() if _within(name, p)]
        for imp in imports(src, sources):
            t = imp.target
            if imp.internal:
                there = floor(t)
                if t not in sources:
                    bad.append(f"{imp.where}: F: imports {t}, which is no module of the package")
                elif here is None or there is None:
                    bad.append(f"{imp.where}: F: {name} -> {t}: a module on no floor (add its prefix to FLOORS)")
                elif there not in ALLOWED[here]:
                    bad.append(f"{imp.where}: F: {name} ({here}) imports {t} ({there}); {here} may import only "
                               f"{', '.join(sorted(ALLOWED[here]))}")
            for prefixes, why in bans:
                hit = [p for p in prefixes if _within(t, p)]
                if not hit and imp.internal and not imp.local and not imp.typing_only:
                    hit = [p for p in prefixes if p not in DIRECT_ONLY and any(_within(m, p) for m in loaded.get(t, ()))]
                    if hit:
                        bad.append(f"{imp.where}: B: {name} imports {t}, which loads {hit[0]}: {why}")
                        continue
                if hit:
                    bad.append(f"{imp.where}: B: {name} imports {t}: {why}")
            if imp.local and not imp.typing_only and imp.line not in _lazy_lines(src):
                deferred = heavy(t, loaded) - heavy(name, loaded)
                if not deferred:
                    already = heavy(t, loaded)
                    reason = (f"it loads only {', '.join(sorted(already))}, which {name} loads anyway" if already
                              else "it is light (no HEAVY module behind it)")
                    bad.append(f"{imp.where}: L: function-local import of {t}: {reason}; import it at module level")
    return sorted(bad)


def _lazy_lines(src: Source) -> set[int]:
    """Lines of a package's module-level ``__getattr__`` (PEP 562 lazy attributes): its imports stay lazy, or every
    import of any module below the package would load what the attribute lives in (``densitune.fit_detector``)."""
    return {line for node in src.tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            and src.package for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}


def _stored_root(node: ast.expr) -> str | None:
    """The name at the root of ``a.b[c].d`` (None unless the expression is an attribute/subscript chain)."""
    seen = False
    while isinstance(node, ast.Attribute | ast.Subscript):
        node, seen = node.value, True
    return node.id if seen and isinstance(node, ast.Name) else None


def _is_registry(value: ast.expr | None) -> bool:
    """``Registry(...)``: a registry, filled by design (see the module docstring)."""
    return isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) == "Registry"


def _module_bindings(tree: ast.Module) -> dict[str, int]:
    """Names bound by assignments at module level (not imports, defs, classes or registries), with their line."""
    out: dict[str, int] = {}

    def targets(t: ast.expr) -> Iterator[ast.Name]:
        if isinstance(t, ast.Name):
            yield t
        elif isinstance(t, ast.Tuple | ast.List):
            for e in t.elts:
                yield from targets(e)
        elif isinstance(t, ast.Starred):
            yield from targets(t.value)

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Assign | ast.AnnAssign) and _is_registry(stmt.value):
                continue
            if isinstance(stmt, ast.Assign):
                names = [n for t in stmt.targets for n in targets(t)]
            elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
                names = list(targets(stmt.target))
            elif isinstance(stmt, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(stmt, block, []))
                for h in getattr(stmt, "handlers", []):
                    visit(h.body)
                continue
            else:
                continue
            for n in names:
                out.setdefault(n.id, stmt.lineno)

    visit(tree.body)
    return out


def _local_names(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """The names a function binds itself: parameters and stores (minus those it declares global/nonlocal)."""
    a = fn.args
    names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg)))}
    declared: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            declared.update(node.names)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names - declared


def check_state(sources: Mapping[str, Source]) -> list[str]:
    """Rule S over ``sources``: one message per mutation of module-level state from a function."""
    return sorted(m for src in sources.values() for m in _state_of(src))


def _state_of(src: Source) -> list[str]:
    bad: list[str] = []
    bound = _module_bindings(src.tree)
    allowed = {g for (last, g) in STATE_ALLOWED if src.module.rpartition(".")[2] == last}

    def visit(node: ast.AST, shadowed: frozenset[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            scope = shadowed
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                scope = shadowed | _local_names(child)
                visit(child, scope, True)
                continue
            if in_function:
                hit = None
                if isinstance(child, ast.Global):
                    for g in child.names:
                        if g not in allowed:
                            bad.append(f"{src.path}:{child.lineno}: S: `global {g}`: module-level mutable state")
                elif isinstance(child, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
                    stores = child.targets if isinstance(child, ast.Assign | ast.Delete) else [child.target]
                    hit = next((r for t in stores if (r := _stored_root(t)) is not None), None)
                    verb = "deletes from" if isinstance(child, ast.Delete) else "assigns into"
                elif isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                        and child.func.attr in MUTATORS:
                    v = child.func.value
                    hit = v.id if isinstance(v, ast.Name) else _stored_root(v)
                    verb = f"calls .{child.func.attr}() on"
                if hit is not None and hit in bound and hit not in shadowed and hit not in allowed:
                    bad.append(f"{src.path}:{child.lineno}: S: a function {verb} the module-level {hit} "
                               f"(bound at line {bound[hit]}): module-level mutable state")
            visit(child, scope, in_function)

    visit(src.tree, frozenset(), False)
    return bad


def check_cli(sources: Mapping[str, Source]) -> list[str]:
    """Rule C over ``sources``: where ``parse_args(`` is called, and how long each ``cmd_*`` function is."""
    bad, in_cli = [], []
    for name, src in sources.items():
        cli = _within(name, "densitune.cli")
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Call):
                f = node.func
                if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == "parse_args":
                    if cli:
                        in_cli.append(f"{src.path}:{node.lineno}")
                    else:
                        bad.append(f"{src.path}:{node.lineno}: C: parse_args( outside the CLI package")
            elif cli and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("cmd_"):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_COMMAND_LINES:
                    bad.append(f"{src.path}:{node.lineno}: C: {node.name} is {n} lines (at most {MAX_COMMAND_LINES}: "
                               f"parse -> one service or API call -> print)")
    if len(in_cli) > 1:
        bad += [f"{w}: C: parse_args( called {len(in_cli)} times in the CLI package: argv is parsed once" for w in in_cli]
    return sorted(bad)


# ---------------------------------------------------------------------------------------------------------------
# The package


@functools.cache
def _package() -> dict[str, Source]:
    return package_sources()


@functools.cache
def _found(rule: str) -> tuple[str, ...]:
    check = {"imports": check_imports, "state": check_state, "cli": check_cli}[rule]
    return tuple(check(_package()))


def _of(rule: str, module: str) -> list[str]:
    path = _package()[module].path
    return [m for m in _found(rule) if m.startswith(path + ":")]


MODULES = sorted(_package())


def test_every_module_sits_on_a_floor():
    assert [m for m in MODULES if floor(m) is None] == []
    assert floor("densitune") == floor("densitune.api") == "api" and floor("densitune.search.ood.x") == "ood"
    assert floor("densitune.new_top_level_module") is None  # nothing at the top but the base and the faces
    assert set(FLOORS.values()) == set(ALLOWED)
    assert all(f in ALLOWED[f] for f in ALLOWED if f != "main")  # a floor may import itself


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    bad = _of("imports", module)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", MODULES)
def test_no_module_level_mutable_state(module):
    bad = _of("state", module)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", [m for m in MODULES if _within(m, "densitune.cli")])
def test_cli_parses_argv_once_and_commands_are_short(module):
    bad = _of("cli", module)
    assert not bad, "\n".join(bad)


def test_parse_args_only_in_the_cli_package():
    assert [m for m in _found("cli") if "outside the CLI package" in m] == []


def test_allowed_state_still_exists():
    """An allow-list entry that matches nothing is a stale hole: each one names a real module-level binding."""
    for last, name in STATE_ALLOWED:
        assert any(m.rpartition(".")[2] == last and name in _module_bindings(s.tree) for m, s in _package().items()), \
            (last, name)


def test_heavy_is_what_it_says():
    """The measure behind rule L: torch, through a densitune module, is heavy; the --help path's modules are not."""
    loaded = loads(_package())
    assert "torch" in heavy("densitune.trainables.train.loop", loaded)
    assert heavy("densitune.errors", loaded) == heavy("densitune.run.console", loaded) == frozenset()


# ---------------------------------------------------------------------------------------------------------------
# The checkers fail on planted violations


BASE = {
    "densitune.__init__": "",
    "densitune.errors": "class DensituneError(Exception): ...\n",
    "densitune.run.__init__": "",
    "densitune.run.files": "import os\nfrom densitune.errors import DensituneError\n",
    "densitune.results.__init__": "",
    "densitune.results.store": "import pyarrow\nfrom densitune.run.files import os\n",
    "densitune.search.__init__": "",
    "densitune.search.ood.__init__": "",
    "densitune.search.ood.densities": "import torch\nfrom densitune.errors import DensituneError\n",
    "densitune.search.tune": "import torch\n\ndef run():\n    import ray\n    from densitune.results import store\n",
    "densitune.trainables.__init__": "",
    "densitune.trainables.nets": "import torch\n",
    "densitune.cli.__init__": "import argparse\n",
}


def _planted(texts: Mapping[str, str] | None = None) -> dict[str, Source]:
    """:data:`BASE` with some modules replaced or added."""
    return sources_of({**BASE, **(texts or {})})


def test_planted_tree_is_clean():
    assert check_imports(_planted()) == check_state(_planted()) == check_cli(_planted()) == []


def test_layer_check_fails_on_an_upward_import():
    bad = check_imports(_planted({"densitune.run.files": "from densitune.results.store import pyarrow\n"}))
    assert bad == ["densitune/run/files.py:1: F: densitune.run.files (run) imports densitune.results.store (results); "
                   "run may import only base, run"]
    # inside a function, and as a relative import, too
    bad = check_imports(_planted({"densitune.trainables.nets": "import torch\n\ndef f():\n    from ..search import tune\n"}))
    assert any(m.startswith("densitune/trainables/nets.py:4: F:") and "(search)" in m for m in bad), bad
    bad = check_imports(_planted({"densitune.search.ood.densities": "import torch\nfrom densitune.results import store\n"}))
    assert [m.split(": ")[1] for m in bad] == ["F"]
    bad = check_imports(_planted({"densitune.search.tune": "from densitune.cli import main\n"}))
    assert any(": F: densitune.search.tune (search) imports densitune.cli (cli)" in m for m in bad), bad


def test_layer_check_fails_on_a_function_local_import_of_a_light_module():
    bad = check_imports(_planted({"densitune.results.store": "import pyarrow\n\ndef f():\n    import json\n"
                                                           "    from densitune.run import files\n"}))
    assert bad == ["densitune/results/store.py:4: L: function-local import of json: it is light (no HEAVY module "
                   "behind it); import it at module level",
                   "densitune/results/store.py:5: L: function-local import of densitune.run.files: it is light (no HEAVY "
                   "module behind it); import it at module level"]


def test_function_local_import_must_defer_something_heavy_the_module_does_not_load():
    # torch deferred by a light module: fine; the same import in a module that loads torch anyway: not
    assert check_imports(_planted({"densitune.run.files": "def f():\n    import torch\n"})) == []
    bad = check_imports(_planted({"densitune.search.ood.densities": "import torch\n\ndef f():\n    import torch.nn\n"}))
    assert bad == ["densitune/search/ood/densities.py:4: L: function-local import of torch.nn: it loads only torch, "
                   "which densitune.search.ood.densities loads anyway; import it at module level"]
    # a densitune module that imports torch at module level is heavy: the CLI may defer it, a torch module may not
    assert check_imports(_planted({"densitune.cli.__init__": "def main():\n    from densitune.trainables import nets\n"})) == []
    bad = check_imports(_planted({"densitune.search.ood.densities": "import torch\n\ndef f():\n"
                                                                   "    from densitune.errors import DensituneError\n"}))
    assert [m.split(": ")[1] for m in bad] == ["L"]


def test_cli_bans_ray_tune_runlock_and_cleanup_even_inside_functions():
    bad = check_imports(_planted({"densitune.cli.__init__": "import argparse\n\ndef main():\n"
                                                          "    from densitune.search import tune\n"}))
    assert bad == ["densitune/cli/__init__.py:4: B: densitune.cli imports densitune.search.tune: the CLI parses and "
                   "prints; the services own Ray, the writer lock and stale files"]
    bad = check_imports(_planted({"densitune.cli.__init__": "def main():\n    import ray.tune\n"}))
    assert [m.split(": ")[1] for m in bad] == ["B"]
    bad = check_imports(_planted({"densitune.results.store": "import pyarrow\nfrom densitune.run.files import os\n\n"
                                                           "def f():\n    import ray\n"}))
    assert [m.split(": ")[1] for m in bad] == ["B"]
    # through a module-level import: results -> run.files -> ray
    bad = check_imports(_planted({"densitune.run.files": "import ray\n"}))
    assert any(": B: densitune.results.store imports densitune.run.files, which loads ray" in m for m in bad), bad


def test_state_check_fails_on_planted_mutable_state():
    texts = {
        "densitune.cli.__init__": "import contextlib, time\nSTAGE_SECONDS: dict = {}\n_HELD = contextlib.ExitStack()\n"
                                  "def cmd(lock):\n    STAGE_SECONDS['report'] = time.time()\n"
                                  "    _HELD.enter_context(lock)\n",
        "densitune.run.files": "_CACHE = None\n_SEEN = []\nclass C:\n    def f(self):\n        global _CACHE\n"
                               "        _CACHE = 1\n        _SEEN.append(self)\n",
        "densitune.run.console": "import os\nlog = object()\ndef f(log):\n    log.x = 1\n    os.environ['A'] = '1'\n"
                                 "    d = {}\n    d['k'] = 1\n",
        "densitune.registry": "from x import Registry\nREG = Registry('kind')\ndef plug(obj):\n    REG.add('a', obj)\n",
    }
    assert check_state(sources_of(texts)) == [
        "densitune/cli/__init__.py:5: S: a function assigns into the module-level STAGE_SECONDS (bound at line 2): "
        "module-level mutable state",
        "densitune/cli/__init__.py:6: S: a function calls .enter_context() on the module-level _HELD (bound at line 3): "
        "module-level mutable state",
        "densitune/run/files.py:5: S: `global _CACHE`: module-level mutable state",
        "densitune/run/files.py:7: S: a function calls .append() on the module-level _SEEN (bound at line 2): "
        "module-level mutable state",
    ]  # the parameter `log`, the module `os`, the local `d` and the registry `REG` are not module-level state


def test_cli_check_fails_on_reparsing_and_long_commands():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_COMMAND_LINES))
    texts = {"densitune.cli.__init__": f"def main(p):\n    a = p.parse_args()\n    return p.parse_args(['x'])\n"
                                       f"def cmd_long(args):\n{body}",
             "densitune.app.studies": "def run(p):\n    return p.parse_args(['search'])\n"}
    assert check_cli(sources_of(texts)) == [
        "densitune/app/studies.py:2: C: parse_args( outside the CLI package",
        "densitune/cli/__init__.py:2: C: parse_args( called 2 times in the CLI package: argv is parsed once",
        "densitune/cli/__init__.py:3: C: parse_args( called 2 times in the CLI package: argv is parsed once",
        f"densitune/cli/__init__.py:4: C: cmd_long is {MAX_COMMAND_LINES + 1} lines (at most {MAX_COMMAND_LINES}: "
        "parse -> one service or API call -> print)",
    ]
