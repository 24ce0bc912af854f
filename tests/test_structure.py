"""The layout rules of DESIGN.md and STYLE.md, checked over the AST of qjournal/ and crashsim/.

Oracle: the source itself (``ast``); tests/ and bench/ are not scanned. Each rule is one
test that lists every violation as ``file:line: what``.

Rules, precisely:

(a) **No import cycles.** The graph has one node per module of qjournal/ and crashsim/
    and an edge for every import outside a function body (``if TYPE_CHECKING:`` blocks
    included, function bodies not: those are rule (b)'s). ``from P import n`` is an edge
    to the module ``P.n`` when that is a module, else to ``P``. Importing a submodule is
    not counted as importing its parent packages. Every strongly connected component of
    more than one module (or a module importing itself) is a cycle.
(b) **No late imports of project modules.** No ``import``/``from ... import`` of
    qjournal, crashsim or a relative module inside a function, method or lambda.
    Optional third-party packages may be imported there.
(c) **No underscore names across modules.** ``x._name`` (one or more leading
    underscores, not a dunder ``__name__``) is allowed only when ``x`` is ``self``,
    ``cls`` or ``super()``, or when ``_name`` is defined in the same module: as a
    function, class or module-level name, in a class body, or assigned as
    ``self._name``/``cls._name``. The same holds for ``getattr``/``setattr``/
    ``hasattr``/``delattr`` with a literal name, and ``from M import _name`` of a
    project module is always a violation. A few documented standard-library names
    that happen to start with an underscore (namedtuple's ``_replace``, ``_asdict``,
    ``_fields``, ``_make``; ``os._exit``, ``sys._getframe``) are allowed.
    A module may use its own private names on its own objects; a name defined in two
    modules is not told apart (a rare miss, never a false alarm).
(d) **No literal format offsets outside qjournal/format/.** Flagged are: the integer
    literal 512 (use a named SECTOR); a slice whose lower bound is an integer literal
    >= 8 (``head[100:104]``, ``buf[96:]``, ``buf[105:n]``); a slice with two integer
    literal bounds of which the upper is >= 8 (``head[4:8]``); an index that is an
    integer literal >= 8 (``head[72]``); a slice with an integer literal bound >= 8
    handed straight to ``int.from_bytes`` or ``struct.unpack*`` (``data[:8]``); an
    integer literal >= 8 given as the offset of ``struct.unpack_from``/``pack_into``;
    and a name ending in ``_off`` or ``_offset`` assigned an integer literal >= 8.
    A one-sided ``x[:N]`` elsewhere is a truncation (``name[:16]``), not an offset.
(e) **Layers import downwards only**: format < storage < journal < core < read < write
    < ops < api (``qjournal/__init__.py``, ``qjournal/api.py``) < cli. Every import
    counts, function bodies included. A module may import its own layer or a lower
    one; ``qjournal.errors`` and ``qjournal.progress`` are leaves anyone may import,
    and they import no project module; nothing in qjournal/ imports crashsim; every
    module of qjournal/ must belong to a layer.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qjournal", "crashsim")

Edge = tuple[str, str, str, int, bool]  # importer, imported, file, line, inside a function


class Module:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rel = path.relative_to(ROOT).as_posix()
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        self.is_package = parts[-1] == "__init__"
        if self.is_package:
            parts = parts[:-1]
        self.name = ".".join(parts)
        self.package = self.name if self.is_package else self.name.rpartition(".")[0]
        self.tree = ast.parse(path.read_text(), str(path))


def _modules() -> dict[str, Module]:
    mods = [Module(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {m.name: m for m in mods}


MODULES = _modules()


def _walk_scoped(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under ``node``, with whether it lies inside a function body."""
    for child in ast.iter_child_nodes(node):
        yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk_scoped(child, inner)


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _resolve(mod: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement names (see rule (a))."""
    out: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and _is_project(alias.name):
                out.append(name)
        return out
    if node.level:
        base = mod.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not _is_project(target):
        return out
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for mod in MODULES.values():
        for node, in_fn in _walk_scoped(mod.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(mod, node):
                    edges.append((mod.name, target, mod.rel, node.lineno, in_fn))
    return edges


EDGES = _edges()


def _report(title: str, violations: list[str]) -> None:
    """Fail with every violation, each once, in file and line order."""
    def key(v: str) -> tuple[str, int, str]:
        f, line, rest = v.split(":", 2)
        return f, int(line), rest
    violations = sorted(set(violations), key=key)
    assert not violations, f"{title}: {len(violations)} violation(s)\n" + "\n".join(violations)


# -- (a) ----------------------------------------------------------------------------------
def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp: list[str] = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph.get(v, ()):
                    out.append(sorted(comp))
    return out


def find_cycles(edges: list[Edge]) -> list[str]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _, in_fn in edges:
        if not in_fn:
            graph.setdefault(a, set()).add(b)
    out = []
    for comp in _cycles(graph):
        members = set(comp)
        lines = [f"  {f}:{line}: {a} imports {b}" for a, b, f, line, in_fn in edges
                 if not in_fn and a in members and b in members]
        out.append(f"cycle between {', '.join(comp)}:\n" + "\n".join(sorted(set(lines))))
    return out


def test_no_import_cycles() -> None:
    _report("import cycles", find_cycles(EDGES))


def test_the_cycle_finder_finds_a_cycle() -> None:
    fake: list[Edge] = [("qjournal.errors", "qjournal.progress", "x.py", 1, False),
                        ("qjournal.progress", "qjournal.errors", "y.py", 2, False)]
    found = find_cycles(fake)
    assert len(found) == 1 and "x.py:1" in found[0] and "y.py:2" in found[0]
    assert find_cycles([fake[0]]) == []


# -- (b) ----------------------------------------------------------------------------------
def test_no_project_imports_inside_functions() -> None:
    violations = [f"{f}:{line}: {a} imports {b} inside a function"
                  for a, b, f, line, in_fn in EDGES if in_fn]
    _report("imports of project modules inside functions", violations)


# -- (c) ----------------------------------------------------------------------------------
ALLOWED_PRIVATE = {"_replace", "_asdict", "_fields", "_make", "_exit", "_getframe"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(tree: ast.AST) -> set[str]:
    """Names the module defines itself (see rule (c))."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                        [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
                    own.update(t.id for t in targets if isinstance(t, ast.Name))
                    if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__"
                                                            for t in stmt.targets):
                        own.update(c.value for c in ast.walk(stmt.value)
                                   if isinstance(c, ast.Constant) and isinstance(c.value, str))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            own.add(node.attr)
    for stmt in getattr(tree, "body", []):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else \
            [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        own.update(t.id for t in targets if isinstance(t, ast.Name))
    return own


def _is_self(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_access(mod: Module) -> list[str]:
    own = _own_names(mod.tree)
    out: list[str] = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not _is_self(node.value) and node.attr not in own and node.attr not in ALLOWED_PRIVATE:
                out.append(f"{mod.rel}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value) \
                    and not _is_self(node.args[0]) and name.value not in own:
                out.append(f"{mod.rel}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.level or _is_project(node.module or "")):
            for alias in node.names:
                if _private(alias.name):
                    out.append(f"{mod.rel}:{node.lineno}: imports {alias.name} from "
                               f"{'.' * node.level}{node.module or ''}")
    return out


def test_no_underscore_names_across_modules() -> None:
    _report("underscore names reached across modules",
            [v for mod in MODULES.values() for v in private_access(mod)])


def test_the_underscore_rule_knows_its_own_names() -> None:
    mod = Module.__new__(Module)
    mod.rel = "m.py"
    mod.tree = ast.parse("class A:\n    def __init__(self):\n        self._x = 1\n"
                         "    def _f(self): pass\n"
                         "def g(a, img):\n    a._x; a._f(); img._commit; img.__class__; img._replace(); "
                         "getattr(img, '_tx')\n"
                         "from .image import _staged\n")
    assert sorted(private_access(mod)) == ["m.py:6: getattr(img, '_tx')", "m.py:6: img._commit",
                                           "m.py:7: imports _staged from .image"]


# -- (d) ----------------------------------------------------------------------------------
def _int(node: ast.AST | None) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _literal_offset_slice(s: ast.AST) -> bool:
    """A subscript's slice that reads bytes at a literal offset (rule (d))."""
    if isinstance(s, ast.Slice):
        lo, hi = _int(s.lower), _int(s.upper)
        return (lo is not None and lo >= 8) or (lo is not None and hi is not None and hi >= 8)
    v = _int(s)
    return v is not None and v >= 8


def _any_literal_bound(s: ast.AST) -> bool:
    if isinstance(s, ast.Slice):
        return any((_int(b) or 0) >= 8 for b in (s.lower, s.upper))
    return (_int(s) or 0) >= 8


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


DECODERS = ("int.from_bytes", "struct.unpack", "struct.unpack_from", "unpack", "unpack_from")


def literal_offsets(mod: Module) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()

    def flag(node: ast.AST, what: str) -> None:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(f"{mod.rel}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(mod.tree):
        if _int(node) == 512:
            flag(node, "literal 512 (use a named SECTOR from qjournal/format/)")
        elif isinstance(node, ast.Subscript) and _literal_offset_slice(node.slice):
            flag(node, f"literal offset {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and _call_name(node) in DECODERS:
            for arg in node.args:
                if isinstance(arg, ast.Subscript) and _any_literal_bound(arg.slice):
                    flag(arg, f"literal offset {ast.unparse(arg)} decoded by {_call_name(node)}")
            if _call_name(node).endswith("unpack_from") and len(node.args) >= 3 and (_int(node.args[2]) or 0) >= 8:
                flag(node, f"literal offset in {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and _call_name(node).endswith("pack_into") and len(node.args) >= 3 \
                and (_int(node.args[2]) or 0) >= 8:
            flag(node, f"literal offset in {ast.unparse(node)}")
        elif isinstance(node, ast.Assign) and (_int(node.value) or 0) >= 8:
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id.lower().endswith(("_off", "_offset")):
                    flag(node, f"literal offset {t.id} = {_int(node.value)}")
    return out


def test_no_literal_offsets_outside_format() -> None:
    _report("literal format offsets outside qjournal/format/",
            [v for mod in MODULES.values() if not mod.name.startswith("qjournal.format")
             for v in literal_offsets(mod)])


@pytest.mark.parametrize("source, flagged", [
    ("x = head[100:104]", True), ("x = head[4:8]", True), ("x = buf[96:]", True), ("x = buf[105:n]", True),
    ("x = head[72]", True), ("x = int.from_bytes(d[:8], 'big')", True), ("y = 512", True),
    ("ac_off = 88", True), ("struct.unpack_from('>Q', b, 72)", True),
    ("x = name[:16]", False), ("x = args[1:]", False), ("x = parts[0]", False), ("x = d[a:b]", False),
    ("n = 88", False), ("x = head[2:4]", False), ("x = 511 + 1", False),
])
def test_the_offset_rule(source: str, flagged: bool) -> None:
    mod = Module.__new__(Module)
    mod.rel = "m.py"
    mod.tree = ast.parse(source)
    assert bool(literal_offsets(mod)) == flagged, literal_offsets(mod)


# -- (e) ----------------------------------------------------------------------------------
LAYERS = ["format", "storage", "journal", "core", "read", "write", "ops", "api", "cli"]
LEAVES = {"qjournal.errors", "qjournal.progress"}


def layer(name: str) -> int | None:
    """The rank of a qjournal module's layer (None: in none of them)."""
    parts = name.split(".")
    if name in ("qjournal", "qjournal.api"):
        return LAYERS.index("api")
    if name == "qjournal.__main__":        # ``python -m qjournal``: the command line's entry point
        return LAYERS.index("cli")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def layer_violations(edges: list[Edge]) -> list[str]:
    out: list[str] = []
    for name in sorted(MODULES):
        if name.startswith("qjournal") and name not in LEAVES and layer(name) is None:
            out.append(f"{MODULES[name].rel}:1: {name} is in no layer of DESIGN.md")
    for a, b, f, line, in_fn in edges:
        if not a.startswith("qjournal"):
            continue
        where = f"{f}:{line}: {a} imports {b}" + (" (inside a function)" if in_fn else "")
        if b.startswith("crashsim"):
            out.append(f"{where}: qjournal never imports crashsim")
        elif a in LEAVES:
            out.append(f"{where}: {a} is a leaf and imports no project module")
        elif b in LEAVES:
            continue
        else:
            la, lb = layer(a), layer(b)
            if la is not None and lb is not None and lb > la:
                out.append(f"{where}: layer {LAYERS[la]} imports the higher layer {LAYERS[lb]}")
    return out


def test_layers_import_downwards_only() -> None:
    _report("imports that run upwards", layer_violations(EDGES))


def test_the_layer_rule_catches_an_upward_import() -> None:
    bad: list[Edge] = [("qjournal.core.allocator", "qjournal.ops.check", "a.py", 3, True),
                       ("qjournal.format.header", "crashsim.model", "b.py", 4, False),
                       ("qjournal.errors", "qjournal.format.header", "c.py", 5, False)]
    good: list[Edge] = [("qjournal.ops.check", "qjournal.core.allocator", "d.py", 6, False),
                        ("qjournal.format.header", "qjournal.errors", "e.py", 7, False),
                        ("qjournal.cli.main", "qjournal", "f.py", 8, False)]
    found = [v for v in layer_violations(bad + good) if "is in no layer" not in v]
    assert [v.split(":")[0] for v in found] == ["a.py", "b.py", "c.py"]
