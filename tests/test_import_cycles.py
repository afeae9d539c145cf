"""The package layout holds: no module of `reranker` imports one that imports it back, directly or
through others, and no import runs back up the declared layers (LAYERS). Every import counts, also
the ones inside functions (a lazy import only hides a cycle), read with ast from the source, so
nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "reranker"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = {m: p for m, p in ALL_MODULES.items() if not m.startswith("reranker.v1")}


def imports_of(path: Path, known: dict[str, Path] = MODULES) -> set[str]:
    """The modules of `known` that the file imports (`from a import b` counts a and, if a module, a.b)."""
    this = module_name(path) if path.is_relative_to(REPO) else path.stem
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def cycles() -> list[list[str]]:
    graph = {m: sorted(imports_of(p) - {m}) for m, p in MODULES.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_reader_sees_imports() -> None:
    assert "reranker.config" in imports_of(MODULES["reranker.service"])
    assert len(MODULES) > 40


def test_no_module_imports_one_that_imports_it_back() -> None:
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


# The declared layers, lowest first. A module may import modules of a lower layer and of its own
# unit (the package or top-level module it belongs to, e.g. everything under `reranker.users`);
# never one of a higher layer, nor another unit of its own layer (units of one layer are siblings
# that know nothing of each other). A unit is a dotted name: the module itself and all below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # plain types, errors, settings, and leaf helpers that several domain packages share
    ("core", ("reranker.__init__", "reranker.types", "reranker.errors", "reranker.config", "reranker.signals",
              "reranker.runtimesettings", "reranker.itemkeys", "reranker.vectors", "reranker.history",
              "reranker.records", "reranker.userhash", "reranker.metrics", "reranker.cancellation",
              "reranker.fileio")),
    ("vectors of items", ("reranker.model",)),
    ("user state and ranking", ("reranker.users", "reranker.ranking")),
    ("learning", ("reranker.learning",)),
    # the Rerank path as named stages, over the parts the service composes
    ("pipeline", ("reranker.pipeline",)),
    ("service", ("reranker.service",)),
    # generated protobuf code: only the edges and what sits on them speak it
    ("wire", ("reranker.v1",)),
    ("edges", ("reranker.serving", "reranker.client", "reranker.streamconsumer")),
    ("evaluation", ("reranker.evaluation",)),
    # the learner process: trains with evaluation's trainer, gates with in-process services
    ("learner", ("reranker.learner",)),
    ("tools", ("reranker.tools",)),
    # the command line and the `python -m` entry points dispatch to every command
    ("entry points", ("reranker.cli", "reranker.__main__", "reranker.probe")),
]

# Imports that run against the layers and are kept on purpose, each with its reason:
# Layers whose members may import one another (the import-cycle test keeps them acyclic).
OPEN_LAYERS = {"core", "entry points"}

# (importer, imported) -> why. Empty: every one was moved to where the layers put it.
ALLOWED: dict[tuple[str, str], str] = {}


def unit_of(module: str) -> tuple[int, str]:
    """(layer index, unit) of a module: the longest declared unit that contains it."""
    best: tuple[int, str] | None = None
    name = "reranker.__init__" if module == "reranker" else module
    for rank, (_, units) in enumerate(LAYERS):
        for unit in units:
            if (name == unit or name.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    if best is None:
        raise KeyError(f"{module} is in no declared layer: add it to LAYERS")
    return best


def violations() -> list[str]:
    found: list[str] = []
    for module, path in sorted(ALL_MODULES.items()):
        rank, unit = unit_of(module)
        for imported in sorted(imports_of(path, ALL_MODULES) - {module}):
            other_rank, other_unit = unit_of(imported)
            same_unit = other_unit == unit or (other_rank == rank and LAYERS[rank][0] in OPEN_LAYERS)
            if same_unit or other_rank < rank or (module, imported) in ALLOWED:
                continue
            where = "a higher layer" if other_rank > rank else "a sibling of its layer"
            found.append(f"{module} ({LAYERS[rank][0]}) imports {imported} ({LAYERS[other_rank][0]}: {where})")
    return found


def test_every_module_is_in_a_declared_layer() -> None:
    for module in ALL_MODULES:
        unit_of(module)


def test_the_layer_check_sees_an_import_that_runs_back_up(tmp_path: Path) -> None:
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from reranker.serving.server import serve\n    from reranker.v1 import reranker_pb2\n")
    seen = imports_of(lazy, ALL_MODULES)
    assert {"reranker.serving.server", "reranker.v1.reranker_pb2"} <= seen
    assert unit_of("reranker.serving.server")[0] > unit_of("reranker.service")[0]
    assert unit_of("reranker.users.profiles")[0] == unit_of("reranker.ranking.head")[0]


def test_no_import_runs_back_up_the_layers() -> None:
    found = violations()
    assert not found, "imports against the declared layers (tests/test_import_cycles.py, LAYERS):\n" + "\n".join(found)


def test_every_allowed_exception_is_still_needed() -> None:
    for (importer, imported), reason in ALLOWED.items():
        assert reason and imported in imports_of(ALL_MODULES[importer], ALL_MODULES), (importer, imported)
