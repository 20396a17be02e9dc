"""The package's import graph: acyclic, and every import points down the layers the README draws.

Read from the source with ``ast`` (nothing is imported): every ``import`` of a ``qkvprobe`` module, at module
level or inside a function, is an edge; imports under ``if TYPE_CHECKING:`` are annotations only and are left
out. ``make lint`` runs this file too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "qkvprobe"

#: The layers, bottom first (the README's "Architecture" section). A module may import its own layer's modules
#: (without a cycle) and any lower layer's, never a higher one's. A name covers the module or the package and
#: everything in it; the most specific name wins (``backbones.base`` sits below ``taps``, the rest of
#: ``backbones`` above it: taps hook any backbone, the families are described with taps).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("qkvprobe", "errors", "vocab", "io"),
    ("tables",),
    ("spec", "results", "rundir", "feedback"),
    ("backbones.base",),
    ("taps",),
    ("backbones",),
    ("provenance",),
    ("data",),
    ("config",),
    ("features",),
    ("rules",),
    ("protocols",),
    ("pretrain",),
    ("report",),
    ("study",),
    ("commands",),
    ("cli", "__main__"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    subs = [f"{prefix}.{a.name}" for a in node.names if f"{prefix}.{a.name}" in MODULES]
    # ``from . import figures`` reads the submodule; ``from .x import name`` reads module x
    return subs if len(subs) == len(node.names) else [prefix, *subs]


def import_graph() -> dict[str, set[str]]:
    """module → the qkvprobe modules it imports (at run time)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in ast.walk(node)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in typing_only:
                continue
            for target in _targets(module, node, path.name == "__init__.py"):
                if target != "qkvprobe" and not target.startswith("qkvprobe."):
                    continue
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    edges[module].add(target)
    return edges


def layer_of(module: str) -> int:
    """The layer of a module: its most specific entry in :data:`LAYERS`."""
    name = module.removeprefix("qkvprobe.") if module != "qkvprobe" else "qkvprobe"
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = i, len(entry)
    if best is None:
        raise AssertionError(
            f"module {module} is in no layer of tests/test_layers.py; add it where it belongs"
        )
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_every_import_points_down_the_layers() -> None:
    upward = sorted(
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in import_graph().items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )
    assert upward == []


def test_the_checks_catch_a_planted_cycle_and_an_upward_import() -> None:
    edges = {k: set(v) for k, v in import_graph().items()}
    edges["qkvprobe.tables"].add("qkvprobe.protocols.driver")  # tables → driver → … → tables
    assert any("qkvprobe.tables" in c for c in cycles(edges))
    assert layer_of("qkvprobe.protocols.driver") > layer_of("qkvprobe.tables")


@pytest.mark.parametrize(
    "code",
    [
        "from qkvprobe.config import load_config; load_config()",
        "from qkvprobe.spec import EvalSpec; EvalSpec.build(setting='fewshot', shots=1)",
        "from qkvprobe.tables import rule_names; rule_names()",
    ],
)
def test_config_and_spec_import_no_heavy_library(code: str) -> None:
    """Validating a config or a spec imports neither torch, scikit-learn nor scipy (seconds each)."""
    heavy = "import sys; print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; {heavy}"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_help_imports_no_torch() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from qkvprobe.cli import get_app; "
        "r = CliRunner().invoke(get_app(), ['evaluate', '--help']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
