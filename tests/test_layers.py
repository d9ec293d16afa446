"""The package's layers, drawn from its imports: no circle between modules, no import that runs back up.

Every `import` in the source counts, including those inside functions (an import moved into a function
to dodge a circle is still the circle) and those under `if TYPE_CHECKING:`. Run as a script to print the
arrows between groups and every problem found:

    python tests/test_layers.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each package's files are (the command line is installed as mlx_xglm.cli from cli/).
SOURCES = {"mlx_xglm": ROOT / "mlx_xglm", "mlx_xglm.cli": ROOT / "cli"}

# The layers, lowest first: a group may import its own modules and groups of lower layers, never a group
# of a higher layer; groups of one layer may use each other as long as no circle forms. A group is a
# subpackage of mlx_xglm, or one of its top-level modules ("mlx_xglm" itself is the package's __init__).
LAYERS = [
    {"errors", "outputs", "settings", "world"},
    {"model"},
    {"tokenization"},
    {"checkpoints", "decoding"},
    {"evaluation", "serving", "tuning", "bench"},
    {"mlx_xglm"},
    {"cli"},
]
LAYER = {group: n for n, groups in enumerate(LAYERS) for group in groups}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for package, folder in SOURCES.items():
        for file in sorted(folder.rglob("*.py")):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = file
    return found


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its source."""
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`, the module.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known.keys()
            found.update(submodules or {base})
    return {module for module in found if module in known and module != name}


def group(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["mlx_xglm", "cli"]:
        return "cli"
    return parts[1] if len(parts) > 1 else "mlx_xglm"


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, file, known) for name, file in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer's module, as "importer -> imported (group layer -> group layer)"."""
    found = []
    for importer, imported in sorted(graph.items()):
        for module in sorted(imported):
            low, high = group(importer), group(module)
            if low in LAYER and high in LAYER and LAYER[high] > LAYER[low]:  # unplaced: test above
                layers = f"{low}, layer {LAYER[low]} -> {high}, layer {LAYER[high]}"
                found.append(f"{importer} -> {module} ({layers})")
    return found


def test_every_group_has_a_layer():
    unplaced = sorted({group(module) for module in modules()} - LAYER.keys())
    assert not unplaced, f"groups missing from LAYERS in {__file__}: {unplaced}"


def test_no_circle_between_modules():
    found = circles(import_graph())
    assert not found, "modules importing each other in a circle:\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def test_no_import_runs_back_up():
    found = arrows_up(import_graph())
    layers = " < ".join("{" + ", ".join(sorted(groups)) + "}" for groups in LAYERS)
    assert not found, f"imports from a lower layer into a higher one (layers: {layers}):\n" + "\n".join(found)


def main() -> None:
    graph = import_graph()
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for importer, imported in graph.items():
        for module in imported:
            if group(importer) != group(module):
                arrows[group(importer), group(module)] += 1
    for n, groups in reversed(list(enumerate(LAYERS))):
        for name in sorted(groups):
            uses = sorted((b, count) for (a, b), count in arrows.items() if a == name)
            print(f"layer {n} {name}: " + ", ".join(f"{b} ({count})" for b, count in uses))
    problems = [" <-> ".join(c) for c in circles(graph)] + arrows_up(graph)
    print("\ncircles and arrows back up:\n" + "\n".join(problems) if problems else "\nno circle, no arrow up")


if __name__ == "__main__":
    main()
