"""The package keeps DESIGN.md's one-way import order: every import in llmkit/ (top level, inside functions, under
TYPE_CHECKING) is read from the source, and one that runs against the order, or closes a cycle between packages on
one level or between modules, fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmkit

PACKAGE_DIR = Path(llmkit.__file__).parent

# Low to high; a module may import from its own level (without a cycle) or from lower levels, never from higher.
# DESIGN.md: config -> nn -> models -> tokenizer -> (data, checkpoints) -> (train, peft, quant, distill, generate,
# eval) -> (align, serve, apps) -> commands -> cli. Below config sit the leaf helpers every layer may use.
LAYERS: list[set[str]] = [
    {"errors", "io", "memory", "device", "extensions", "gguf_file"},  # leaf helpers: errors, atomic files, process
    # memory, device/dtype names, building C++ kernels, reading a GGUF file's header
    {"config", "config_checks", "config_types", "presets", ""},  # "" is the root package, which exports Config
    {"nn"},
    {"models"},
    {"tokenizer", "chat_template"},
    {"data", "checkpoints"},
    {"train", "peft", "quant", "distill", "generate", "eval", "estimate"},
    {"align", "serve", "apps"},
    {"commands"},
    {"cli"},
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(llmkit module, line) for every import in a file; `from llmkit.x import y` names llmkit.x.y when y is a
    module of its own, else llmkit.x."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if is_module(candidate) else base, node.lineno))
    return [(module, line) for module, line in found if module == "llmkit" or module.startswith("llmkit.")]


def is_module(name: str) -> bool:
    path = PACKAGE_DIR.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit(module: str) -> str:
    """The layering unit of a module: its top-level package or module under llmkit ("" for llmkit itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_package_and_module_has_a_level():
    units = {unit(module) for module in import_graph()}
    assert units <= set(LEVEL), f"add {sorted(units - set(LEVEL))} to LAYERS (and to DESIGN.md's order)"


def test_imports_follow_the_layer_order():
    upward = [
        f"{module} (line {line}) imports {target}: level {LEVEL[unit(module)]} may not import level {LEVEL[unit(target)]}"
        for module, targets in import_graph().items()
        for target, line in targets
        if LEVEL.get(unit(target), -1) > LEVEL.get(unit(module), -1)
    ]
    assert not upward, "\n".join(upward)


def test_no_cycle_between_packages():
    edges: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target, _ in targets:
            if unit(target) != unit(module):
                edges.setdefault(unit(module), set()).add(unit(target))
    assert find_cycle(edges) is None, f"package cycle: {' -> '.join(find_cycle(edges))}"


def test_no_cycle_between_modules():
    """A package's __init__ may re-export its modules, so edges into a package from its own modules are left out."""
    edges: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target, _ in targets:
            if target != module and not module.startswith(target + "."):
                edges.setdefault(module, set()).add(target)
    assert find_cycle(edges) is None, f"module cycle: {' -> '.join(find_cycle(edges))}"


def test_only_the_cli_imports_commands():
    offenders = [f"{module} (line {line})" for module, targets in import_graph().items() for target, line in targets
                 if unit(target) == "commands" and unit(module) not in ("commands", "cli")]
    assert not offenders, f"{offenders} import llmkit.commands; move the shared code below it"


@pytest.mark.parametrize("source, expected", [
    ("from llmkit.nn.mlp import MLP_CLASSES", ["llmkit.nn.mlp"]),
    ("from llmkit.nn import mlp", ["llmkit.nn.mlp"]),
    ("from llmkit import Config", ["llmkit"]),
    ("def f():\n    import llmkit.train.loop", ["llmkit.train.loop"]),
    ("from . import attention", ["llmkit.nn.attention"]),
    ("from .mlp import MLP_CLASSES", ["llmkit.nn.mlp"]),
])
def test_the_reader_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    fake = PACKAGE_DIR / "nn" / "block.py"  # resolve relative imports as if the source sat in llmkit/nn/
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source if self == fake else "")
    assert [module for module, _ in imported_modules(fake)] == expected


def test_an_upward_import_is_caught():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
