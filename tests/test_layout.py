"""The layers of the code read top-down, and the import graph has no circle.

Every import counts, at module level or inside a function (a lazy import is still a dependency): the
top-level entry points (app, generate_twin, model_loader, ipadapter_manager, instantid) are imported by
nothing in utils/; inside utils/ a package imports only packages of a lower layer (or modules of its own):

    utils.api, utils.cli          the fronts: HTTP and the command line
    utils.service                 use cases, the job runner, the wiring (settings -> components)
    utils.engine                  the engine: families, identity methods, requests, tuning
    utils.models                  model files: layout, download, load, tiny builder, verify
    utils.faces, utils.jobs,      faces; job records, queues, workers, events, webhooks;
    utils.safety                  content safety and provenance
    foundation                    config, errors, logging, storage, images, ... contracts (typing only)

``if TYPE_CHECKING:`` imports count too: a type-only import is still a reader's dependency, and the
contracts module, which every layer reads, imports nothing of the project.
"""
import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("app", "generate_twin", "model_loader", "ipadapter_manager", "instantid")
LAYERS = {"utils.api": 5, "utils.cli": 5, "utils.service": 4, "utils.engine": 3, "utils.models": 2,
          "utils.faces": 1, "utils.jobs": 1, "utils.safety": 1}


def project_modules() -> dict[str, Path]:
    mods = {m: ROOT / f"{m}.py" for m in ENTRY_POINTS}
    for p in sorted((ROOT / "utils").rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


MODULES = project_modules()


def imported(module: str, path: Path) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (resolved to the longest known name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != module:
                out.add(n)
    return out


GRAPH = {m: imported(m, p) for m, p in MODULES.items()}


def layer(module: str) -> tuple[str, int]:
    """(room, rank): the utils package a module belongs to and its layer; foundation modules rank 0."""
    if module in ENTRY_POINTS:
        return module, 9
    for room, rank in LAYERS.items():
        if module == room or module.startswith(room + "."):
            return room, rank
    return module, 0


def circles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_and_covers_the_rooms():
    # Guards the tests below against passing on an empty or misread tree.
    assert len(MODULES) >= 60
    rooms = {layer(m)[0] for m in MODULES}
    assert set(LAYERS) <= rooms
    assert "utils.service.wiring" in GRAPH["app"] and "utils.engine.generator" in GRAPH["utils.service.wiring"]


def test_no_import_circle():
    assert circles() == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in ENTRY_POINTS))
def test_imports_only_go_down(module):
    room, rank = layer(module)

    def upward(target: str) -> bool:
        t_room, t_rank = layer(target)
        if t_room == room or (rank == 0 and t_rank == 0):   # within a room; foundation among itself
            return False
        return t_rank >= rank
    up = sorted(t for t in GRAPH[module] if upward(t))
    assert up == [], f"{module} ({room}, layer {rank}) imports {up}: same or higher layer"


def test_foundation_modules_import_no_room():
    """Foundation modules (rank 0) import only each other."""
    bad = {m: sorted(t for t in GRAPH[m] if layer(t)[1] > 0) for m in MODULES if layer(m)[1] == 0
           and m not in ENTRY_POINTS}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_contracts_import_nothing_of_the_project():
    assert GRAPH["utils.contracts"] == set()


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if "__all__" in p.read_text()))
def test_all_names_exist(module):
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert missing == [], f"{module}.__all__ names {missing}, which it does not define"


@pytest.mark.parametrize("package, modules", [
    ("utils/jobs", {"status.py", "events.py", "webhooks.py", "lifecycle.py"}),
    ("utils/jobs/local", {"store.py", "threads.py", "generator_process.py", "pipe_errors.py", "idempotency.py"}),
    ("utils/jobs/cluster", {"store.py", "queue.py", "worker.py", "registry.py", "events.py", "idempotency.py"}),
    ("utils/faces", {"service.py", "backends.py", "dlib_resnet.py"}),
    ("utils/api", {"auth.py", "security.py", "openapi.py", "render.py", "sessions.py", "jobs.py", "models.py"}),
    ("utils/service", {"wiring.py", "runtime.py", "runner.py", "sessions.py", "jobs.py", "models.py"}),
    ("utils/engine", {"generator.py", "request.py", "tuning.py", "previews.py"}),
    ("utils/models", {"layout.py", "download.py", "load.py", "tiny.py", "verify.py"}),
])
def test_concerns_live_in_their_room(package, modules):
    assert modules <= {p.name for p in (ROOT / package).glob("*.py")}



# --- the tests themselves ------------------------------------------------------------------------
# A test module is not a library: what two of them share lives in tests/helpers/ (functions, by concern),
# tests/fixtures/ (fixtures, registered in conftest.py) or tests/fakes.py (doubles).

TEST_MODULE = re.compile(r"tests\.test_\w+")
IMPORT_IN_TEXT = re.compile(r"\b(?:from|import)\s+(tests(?:\.\w+)+)")


def test_modules_imported(source: str, module: str) -> list[tuple[int, str]]:
    """(line, tests.test_* module) for each import of a test module in ``source`` (the module ``module``):
    import statements anywhere (relative ones resolved), and import lines in string literals, which is how
    code reaches a child interpreter (``python -c "from tests.test_<name> import ..."``)."""
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = IMPORT_IN_TEXT.findall(node.value)
        else:
            continue
        found += sorted({(node.lineno, m.group(0)) for n in names if (m := TEST_MODULE.match(n))})
    return found


test_modules_imported.__test__ = False  # a helper whose name pytest would otherwise collect


def tests_modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "tests").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


T = "tests.test_"  # the table spells imports through it, so this file's own strings import nothing


@pytest.mark.parametrize("source, module, expected", [
    (f"from {T}api import upload", "tests.test_x", [f"{T}api"]),
    (f"import {T}api as api", "tests.test_x", [f"{T}api"]),
    ("from tests import test_api, fakes", "tests.test_x", [f"{T}api"]),
    ("def f():\n    from .test_events import parse_sse", "tests.test_x", [f"{T}events"]),
    ("from ..test_cluster import Workers", "tests.helpers.cluster", [f"{T}cluster"]),
    (f"CODE = 'import sys; from {T}cli import Fake; sys.exit(0)'", "tests.test_x", [f"{T}cli"]),
    ("from tests.helpers.http import upload\nfrom tests.fakes import image_bytes\nimport tests.testing",
     "tests.test_x", []),
    ("ARGS = ['pytest', 'tests/test_api.py']", "tests.test_x", []),
])
def test_the_test_import_check_sees_every_form(source, module, expected):
    assert [name for _, name in test_modules_imported(source, module)] == expected


def test_no_test_module_imports_another():
    """Nor itself in a child interpreter: a test module is never imported outside pytest's collection."""
    mods = tests_modules()
    assert {"tests.conftest", "tests.helpers.http", "tests.fixtures.service", "tests.test_layout"} <= set(mods)
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for m, p in mods.items()
           for line, name in test_modules_imported(p.read_text(), m)]
    assert bad == [], "put what test modules share in tests/helpers/ (fixtures: tests/fixtures/):\n" + "\n".join(bad)
