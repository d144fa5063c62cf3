"""The package's layering, read from its real import graph (every import statement, parsed):
each module imports only its own layer or lower ones, no import circles, and the record,
reporting and orchestration modules load no model library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flare_exp"
# Lowest first; a module belongs to the layer of its first path component (flare_exp/<part>...).
LAYERS = [
    ("core", {"flare"}),                                                       # the method as a library
    ("foundations", {"errors", "settings", "locking", "distributed", "metrics", "sources", "paper_results", "protocol", "data"}),
    ("record", {"methods", "record", "access", "memory"}),                     # no model library
    ("machinery", {"models", "translate", "pairs", "train", "evaluate", "xmixup", "adapters", "stage1",
                   "tracking", "stand_ins"}),
    ("run", {"setup", "stages"}),                                               # a run set up once, its stages
    ("report", {"report"}),                                                     # no model library
    ("commands", {"tables", "sensitivity", "plan", "sweep", "rehearse"}),       # no model library but rehearse
]
LAYER_OF = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}
MODEL_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The flare_exp modules ``path`` imports (anywhere in it, deferred imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import record`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else None
    if part is None:  # the package's own __init__
        return -1
    assert part in LAYER_OF, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return LAYER_OF[part]


def test_every_module_imports_only_its_layer_or_lower_ones():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {i} ({LAYERS[layer(i)][0]})"
              for m, targets in graph().items() for i in targets if layer(i) > layer(m)]
    assert not upward


def test_the_package_has_no_import_circle():
    edges, state, circles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles


def test_the_import_graph_is_read_from_the_code():
    edges = graph()  # a known edge of each kind: relative, from-package, deferred (inside a function)
    assert "flare_exp.record" in edges["flare_exp.stages"] and "flare_exp.adapters" in edges["flare_exp.stages"]
    assert "flare_exp.report.results" in edges["flare_exp.report.summary"]
    assert "flare_exp.distributed" in edges["flare_exp.setup"]


@pytest.mark.parametrize("modules", [
    ["flare_exp.tables"], ["flare_exp.plan"], ["flare_exp.sweep"], ["flare_exp.sensitivity"],
    ["flare_exp.record", "flare_exp.methods", "flare_exp.access", "flare_exp.memory", "flare_exp.settings", "flare_exp.report.summary",
     "hydra_plugins.flare_exp_launcher"],
])
def test_records_reports_and_orchestration_load_no_model_library(modules):
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", (modules, out.stdout, out.stderr[-2000:])
