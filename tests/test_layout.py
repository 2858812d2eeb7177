"""The layers of the code read top-down: nothing in utils/ reaches up to the engine modules (or the app)
except through the one wiring place, utils/services.py, and only lazily (nothing heavy at import)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODULES = {"app", "generate_twin", "ipadapter_manager", "model_loader"}
WIRING = "utils/services.py"
UTILS_MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "utils").rglob("*.py"))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module imported, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


@pytest.mark.parametrize("module", UTILS_MODULES)
def test_utils_module_reaches_engines_only_through_the_wiring_place(module):
    ups = [(name, at_import) for name, at_import in imports(ROOT / module) if name in ENGINE_MODULES]
    assert not [n for n, at_import in ups if at_import], f"{module} imports an engine module at import time: {ups}"
    if module != WIRING:
        assert ups == [], f"{module} imports {ups}; go through {WIRING}"


def test_the_wiring_place_is_found_and_names_the_engines():
    # Guards the test above against passing on an empty or misread tree.
    assert WIRING in UTILS_MODULES and len(UTILS_MODULES) >= 15
    assert {"generate_twin", "ipadapter_manager"} <= {n for n, _ in imports(ROOT / WIRING)}


@pytest.mark.parametrize("package, modules", [
    ("utils/jobs", {"status.py", "events.py", "webhooks.py", "lifecycle.py"}),
    ("utils/jobs/local", {"store.py", "threads.py", "generator_process.py", "idempotency.py"}),
    ("utils/jobs/cluster", {"store.py", "queue.py", "maintenance.py", "worker.py", "registry.py", "events.py",
                            "idempotency.py"}),
    ("utils/faces", {"service.py", "backends.py", "dlib_resnet.py"}),
    ("utils/api", {"auth.py", "security.py", "openapi.py"}),
])
def test_concerns_live_in_their_subpackage(package, modules):
    assert modules <= {p.name for p in (ROOT / package).glob("*.py")}


def _model_imports(module: str) -> set[str]:
    """The utils.models modules ``module`` imports (anywhere in the file)."""
    tree = ast.parse((ROOT / "utils" / "models" / f"{module}.py").read_text())
    return {n.module.removeprefix("utils.models.") for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("utils.models.")}


@pytest.mark.parametrize("reader", ["layout", "download", "adapters", "identitynet", "load", "single_file",
                                    "filecheck", "lora_check", "onnx_check", "verify"])
def test_model_readers_never_reach_the_tiny_builder(reader):
    # tiny.py writes what these read, from their names and layouts; only startup / cli put it before them.
    seen, todo = set(), [reader]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _model_imports(m)
    assert "tiny" not in seen and {"startup", "cli"}.isdisjoint(seen), sorted(seen)


# The job backends' rooms: the shared modules of utils/jobs know neither backend, and neither backend
# knows the other (both meet only in the wiring place, through the contracts of utils/contracts.py).
ROOMS = {"local": "utils.jobs.local", "cluster": "utils.jobs.cluster"}


def _module_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("module", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "utils" / "jobs").rglob("*.py")))
def test_job_backends_stay_in_their_rooms(module):
    room = next((r for r in ROOMS if module.startswith(f"utils/jobs/{r}/")), None)
    forbidden = [pkg for r, pkg in ROOMS.items() if r != room]
    found = sorted(m for m in _module_imports(ROOT / module) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert found == [], f"{module} imports {found}"
