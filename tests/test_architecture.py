"""The checks a newcomer makes: the layers point one way, no import cycles (deferred imports
inside functions counted), one job per engine module, no module over MAX_LINES lines, and no
test or benchmark reading a Conversation's private state."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("app", "engine", "storage", "training", "ui")
# what each layer may import from the others (ui -> app -> (engine, storage, training);
# training -> engine: the chat's runtime never imports training)
ALLOWED = {"ui": {"app"}, "app": {"engine", "storage", "training"}, "engine": set(),
           "storage": set(), "training": {"engine"}}
MAX_LINES = 500
# modules still over MAX_LINES, being split now (issue 27): the check below names them


def modules() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[f"ccm_chat.{name}"] = path  # the name it is imported by
    return found


def top_level_imports(path: Path) -> set[str]:
    """Imports run when the module loads (not inside functions or `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try | ast.With):
                visit(node.body)

    visit(tree.body)
    return names


def all_imports(path: Path) -> set[str]:
    """Every import the module may run: at load time and deferred inside functions alike;
    only those under `if TYPE_CHECKING` (never run) are left out."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text()))
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in all_imports(path) if m in mods and m != name}
            for name, path in mods.items()}


def test_layers_point_one_way() -> None:
    for name, path in modules().items():
        layer = _layer(name)
        for imported in top_level_imports(path) | _lazy_imports(path):
            other = _layer(imported)
            if other in LAYERS and other != layer:
                assert other in ALLOWED[layer], f"{name} imports {imported}"


def _layer(module: str) -> str:
    """`ccm_chat.engine.x` -> `engine`; a module outside the namespace -> its top name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "ccm_chat" and len(parts) > 1 else parts[0]


def test_every_import_of_the_project_goes_through_its_namespace() -> None:
    # a bare `from engine import ...` works from the repository root but not once installed
    for name, path in modules().items():
        for imported in top_level_imports(path) | _lazy_imports(path):
            assert imported.split(".")[0] not in LAYERS, f"{name} imports {imported}"


def _lazy_imports(path: Path) -> set[str]:
    return {node.module for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and not node.level}


def test_no_import_cycles() -> None:
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            assert seen.get(nxt) != 1, " -> ".join([*stack, node, nxt])
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [])


def test_the_cycle_check_sees_deferred_imports(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ccm_chat.engine.x import y\n"
                    "if TYPE_CHECKING:\n    import z\n")
    assert all_imports(path) == {"ccm_chat.engine.x", "ccm_chat.engine.x.y"}


def over_max_lines() -> list[str]:
    over = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                over.append(f"{path.relative_to(ROOT)} ({lines})")
    return over


def test_no_module_is_over_max_lines() -> None:
    over = over_max_lines()
    assert not over, f"over {MAX_LINES} lines: {', '.join(over)}"


def test_each_engine_module_says_its_job_first() -> None:
    for path in (ROOT / "engine").rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, path


def test_a_reply_drives_only_the_conversations_public_steps() -> None:
    assert not re.findall(r"_conv\._\w+", (ROOT / "engine" / "reply.py").read_text())


def test_no_caller_matches_a_memory_policy_by_name() -> None:
    """What a policy needs and how it rebuilds, it declares (engine.memory.MemoryPolicy);
    only the level table (engine.config) names methods."""
    by_name = re.compile(r"""method["'\])]*\s*[!=]=\s*["']|method\.startswith\(""")
    for layer in ("app", "engine", "ui"):
        for path in (ROOT / layer).rglob("*.py"):
            if path.relative_to(ROOT).parts[:2] in {("engine", "config.py"),
                                                     ("engine", "memory"), ("engine", "ccm")}:
                continue
            assert not by_name.findall(path.read_text()), path


def test_no_test_or_benchmark_reads_private_conversation_state() -> None:
    private = re.compile(r"\b(conv|copy|live|restored|rebuilt|reader|probe|twin|c|h|hv)\."
                         r"_(kv|rendered|sync|ctx|evicted|slots|frozen|bounds|groups|parked)\b")
    for folder in ("tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            hits = private.findall(path.read_text())
            assert not hits, f"{path} reads {hits}"
