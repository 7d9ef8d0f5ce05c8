"""The package's shape: no import cycles (imports inside functions count too), small files,
a torch-only ``import opendelta``, and the layering of ARCHITECTURE.md."""
import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "opendelta")
MAX_LINES = 400


def _modules() -> Dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: str, known: Set[str]) -> Set[str]:
    """Our modules imported by ``module`` anywhere in its code (functions included),
    except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            found.update(c for c in candidates if c in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        deps = _imports(name, path, known)
        # Importing a submodule imports its package first: only count real edges between
        # modules, not "package -> its own submodule" re-exports.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_even_inside_functions():
    graph = _graph()
    assert len(graph) > 30
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: what each part of the package may import (besides itself); see ARCHITECTURE.md.
LAYERS = {
    "opendelta.core": ("opendelta.core", "opendelta.version"),
    "opendelta.io": ("opendelta.core", "opendelta.io", "opendelta.version", "opendelta.integrations.distributed"),
    "opendelta.methods": ("opendelta.core", "opendelta.methods", "opendelta.integrations.transformers"),
    "opendelta.integrations.transformers": ("opendelta.core", "opendelta.integrations.transformers"),
    "opendelta.tools": ("opendelta.core", "opendelta.tools"),
}
#: the facades that compose features on the engine
FACADES = {
    "opendelta.core.base": ("opendelta.io", "opendelta.tools.inspect", "opendelta.tools.interactive"),
    "opendelta.core.auto": ("opendelta.io",),
}


def test_layering():
    for name, deps in _graph().items():
        rule = next((v for k, v in sorted(LAYERS.items(), key=lambda kv: -len(kv[0]))
                     if name == k or name.startswith(k + ".")), None)
        if rule is None:
            continue
        allowed = rule + FACADES.get(name, ())
        for dep in deps:
            assert dep.startswith(allowed), f"{name} imports {dep}; allowed: {allowed}"


def test_no_file_is_over_the_limit():
    too_long = {path: n for path in _modules().values()
                if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert too_long == {}


def test_import_opendelta_needs_torch_only():
    code = ("import sys, opendelta, bigmodelvis; "
            "heavy = [m for m in ('transformers', 'safetensors', 'huggingface_hub', 'rich', 'peft') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("path", ["opendelta.basemodel", "opendelta.delta_configs", "opendelta.auto_delta",
                                  "opendelta.delta_models.lora", "opendelta.utils.structure_mapping",
                                  "opendelta.utils.name_based_addressing", "opendelta.utils.visualization",
                                  "opendelta.utils.inspect"])
def test_documented_module_paths_are_thin_re_exports(path):
    file = _modules()[path]
    code = [line for line in open(file, encoding="utf-8") if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 25, f"{path} should only re-export"
