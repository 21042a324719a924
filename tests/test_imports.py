"""The package boundaries, read from the source with ast (every import, at the top or inside a function):
runtime/ imports nothing of export/, bench/, train/ or tests/; runtime/kernels/ imports nothing else of runtime/;
the runtime's core imports no serving framework; and no import circle inside runtime/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module name an import statement in the file names (relative imports resolved)."""
    name, package = module_name(path), path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}    # `from pkg import module`
    return found


def runtime_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "runtime").rglob("*.py")}
    return {name: imports(path) for name, path in files.items()}


def test_runtime_imports_no_export_bench_train_or_tests():
    bad = {name: sorted(t for t in targets if t.split(".")[0] in ("export", "bench", "train", "tests"))
           for name, targets in runtime_graph().items()}
    assert not {k: v for k, v in bad.items() if v}, bad


SERVING = {"fastapi", "starlette", "uvicorn", "aiortc", "aiohttp", "httpx", "prometheus_client", "livekit", "pipecat",
           "ray"}


def test_runtime_core_imports_no_serving_framework():
    """Web frameworks, WebRTC, LiveKit, Pipecat and Ray are optional extras imported only by runtime/serve/ and
    runtime/integrations/."""
    core = {n: t for n, t in runtime_graph().items() if not n.startswith(("runtime.serve", "runtime.integrations"))}
    bad = {name: sorted(t for t in targets if t.split(".")[0] in SERVING) for name, targets in core.items()}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_kernels_import_nothing_else_of_the_runtime():
    bad = {name: sorted(t for t in targets if t.split(".")[0] == "runtime" and not t.startswith("runtime.kernels"))
           for name, targets in runtime_graph().items() if name.startswith("runtime.kernels")}
    assert not {k: v for k, v in bad.items() if v}, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search over the modules of `graph`)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_inside_the_runtime():
    graph = runtime_graph()
    graph = {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
