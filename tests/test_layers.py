"""The package's layering: each module imports only from its own layer or the layers below, with no circle.

Read from the source (not by importing it), so the test also sees imports that never run in a test.
A module added to the package must be placed in LAYERS; the README's Layout shows the table.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from diffusionblocks import extras
from diffusionblocks.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusionblocks"

# Lowest first. A module may import from its own layer and from any layer before it.
LAYERS = [
    ("errors and seeds", ["errors", "seeding"]),
    ("configuration and utilities", ["config", "extras", "options", "precision", "memory", "metrics", "plotting",
                                     "distributed"]),
    ("the math", ["noise", "precond", "parameterizations", "sampling", "blocks"]),
    ("models", ["models", "models.layers", "models.dit", "models.diffusers_dit", "models.vit", "models.arlm",
                "models.mdlm", "models.recurrent",
                "models.hf_llama"]),
    ("data", ["image_folder", "hf_datasets", "data", "text", "reference", "latents", "generate", "diagnostics",
              "token_chain", "chain_likelihood"]),
    ("the run directory", ["changes", "rundir", "checkpoint"]),
    ("training", ["train"]),
    ("evaluation and reports", ["evaluation", "report"]),
    ("tasks", ["tasks.base", "tasks.text", "tasks.image_generation", "tasks.classification", "tasks.masked_diffusion",
               "tasks.autoregressive", "tasks.recurrent_depth", "tasks", "pretrained", "judge"]),
    ("the run's life and tools", ["pilot", "runs", "compare", "compose", "convert", "membench", "speedbench"]),
    ("the command line", ["cli", "__main__", ""]),
]
LAYER_OF = {m: i for i, (_, modules) in enumerate(LAYERS) for m in modules}

def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement reads (relative to the package, '' for the package itself)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level == 0:
            base = node.module or ""
        else:
            here = name.split(".") if name else []
            here = here if is_package else here[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(["diffusionblocks", *here, *([node.module] if node.module else [])])
        # `from . import checkpoint` reads a module; `from .config import RunConfig` reads .config.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}".removeprefix("diffusionblocks.") in LAYER_OF else base
                   for a in node.names]
    out = []
    for t in targets:
        if t == "diffusionblocks" or t.startswith("diffusionblocks."):
            out.append(t.removeprefix("diffusionblocks").removeprefix("."))
    return out


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, and whether it runs inside a function (a module-level `try` or `if`
    around an import, as for an optional extra, is still the module's top level)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports at its top level, the imports found inside functions)."""
    graph, inner = {}, []
    for name, tree in modules().items():
        is_package = (PACKAGE / Path(*name.split(".")) / "__init__.py").is_file() if name else True
        graph[name] = set()
        for node, in_function in _imports(tree):
            if in_function:
                inner.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
            else:
                graph[name] |= {t for t in imported(name, is_package, node) if t != name}
    return graph, inner


def test_every_module_has_a_layer():
    unplaced = sorted(set(modules()) - set(LAYER_OF))
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS: {unplaced}"


def test_no_upward_import():
    graph, _ = import_graph()
    upward = [f"{m or 'diffusionblocks'} ({LAYERS[LAYER_OF[m]][0]}) imports {t} ({LAYERS[LAYER_OF[t]][0]})"
              for m, targets in graph.items() for t in sorted(targets) if t in LAYER_OF and LAYER_OF[t] > LAYER_OF[m]]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph, _ = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_imports_sit_at_the_top_of_their_module():
    _, inner = import_graph()
    assert not inner, "imports inside functions:\n" + "\n".join(inner)


def test_only_the_registry_imports_by_name():
    """importlib.import_module of a package module hides an edge from the graph: the task registry alone may (a
    config names its task as 'package.module:Class'), and a call elsewhere must name a module outside the package."""
    dynamic = {"data": "the CIFAR unpickler resolves numpy's array reconstructors by their names",
               "extras": "the optional dependencies in its EXTRA_OF table, imported on first use"}
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            called = getattr(node, "func", None)
            if not isinstance(node, ast.Call) or getattr(called, "attr", getattr(called, "id", "")) not in (
                    "import_module", "__import__") or name == "tasks" or name in dynamic:
                continue
            arg = node.args[0] if node.args else None
            if not isinstance(arg, ast.Constant) or str(arg.value).startswith(("diffusionblocks", ".")):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_the_checker_sees_what_it_must():
    """The checker itself, on made-up source: relative imports resolve to the modules they read, and an import in a
    function is told from one in a module-level `try`."""
    tree = ast.parse("from .train import x\ntry:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n\n"
                     "def f():\n    from .tasks import get_task\n")
    found = _imports(tree)
    assert [in_function for _, in_function in found] == [False, False, True]
    nodes = [n for n, _ in found]
    assert imported("config", False, nodes[0]) == ["train"]
    assert imported("tasks.base", False, ast.parse("from .. import checkpoint").body[0]) == ["checkpoint"]
    assert imported("tasks", True, ast.parse("from .base import Task").body[0]) == ["tasks.base"]
    assert LAYER_OF["train"] > LAYER_OF["config"]


def test_a_plain_command_imports_no_optional_dependency(monkeypatch):
    """The CLI with our own models imports neither diffusers, transformers nor datasets (seconds of start-up);
    a missing one stops its user with a message naming the extra."""
    code = ("import sys, diffusionblocks.cli, diffusionblocks.tasks; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    monkeypatch.setitem(extras.EXTRA_OF, "no_such_package", "diffusers")
    with pytest.raises(ConfigError, match=r"data.vae needs no_such_package .*pip install -e '\.\[diffusers\]'"):
        extras.load("no_such_package", "data.vae")
    with pytest.raises(KeyError):  # only the listed dependencies, never a module of the package
        extras.load("diffusionblocks.train", "a test")
