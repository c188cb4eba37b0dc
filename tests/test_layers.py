"""The package's layers are a checked contract: no import circles and no upward imports.

Every `import` of a `stitchnet_tf` module (module level and inside functions) is an edge.
Layers, lowest first: foundations (errors, files, the likelihood's math, option constants),
data, metrics and run folders, models, inference and evaluation, commands (training,
prediction, export, figures, demo), and the CLI on top. A module may import its own layer or
lower ones only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOUNDATIONS = {
    "errors", "precision", "fileio", "likelihood", "options", "shipped", "progress", "native",
}  # fmt: skip
INFERENCE = {"inference", "exported", "distribute", "evaluation"}
COMMANDS = {"training", "predict", "figures", "export", "threshold_fit", "demo"}


def layer(module: str) -> int:
    """0 foundations, 1 data, 2 metrics and runs, 3 models, 4 inference, 5 commands, 6 CLI."""
    if module.startswith("cli"):
        return 6
    name = module.removeprefix("stitchnet_tf").lstrip(".")
    if name == "" or name in FOUNDATIONS:
        return 0
    if name == "data" or name.startswith("data."):
        return 1
    if name in ("metrics", "volume_metrics", "run", "clinical"):
        return 2
    if name == "models" or name.startswith("models."):
        return 3
    if name in INFERENCE:
        return 4
    if name in COMMANDS:
        return 5
    raise AssertionError(f"{module}: not assigned to a layer (add it to tests/test_layers.py)")


def modules() -> dict[str, Path]:
    found = {}
    for top, package in (("stitchnet_tf", "stitchnet_tf"), ("cli", "cli")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts).removesuffix(".__init__")
            found[name.replace(top, package, 1)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its file)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module.replace("stitchnet_tf_cli", "cli", 1)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in known else base)
            elif isinstance(node, ast.Import):
                targets |= {a.name.replace("stitchnet_tf_cli", "cli", 1) for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    assert "stitchnet_tf.models.stitchnet" in graph and "cli.main" in graph
    upward = [
        f"{u} (layer {layer(u)}) imports {v} (layer {layer(v)})"
        for u, targets in graph.items()
        for v in targets
        if layer(v) > layer(u)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle():
    assert not cycles(import_graph()), cycles(import_graph())


def test_the_checker_sees_circles_and_upward_imports():
    """The contract can fail: a made-up circle and a made-up upward import are found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert layer("stitchnet_tf.data.io") < layer("stitchnet_tf.models.stitchnet")
    assert layer("stitchnet_tf.errors") < layer("stitchnet_tf.data.io") < layer("cli.main")
