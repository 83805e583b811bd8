"""The shape of the code, checked: no import cycle (function-local and type-only imports included), the
distributed package free of product code, and the training code in short functions."""

import ast
from pathlib import Path

import forge_qat

PACKAGE = Path(forge_qat.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every forge_qat module `path` imports anywhere in its body (function bodies and TYPE_CHECKING
    blocks included), with the packages whose __init__ such an import runs."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import forge_qat.x.y` names a module or a package
                target = target.rpartition(".")[0]
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # the packages it runs too
    return {m for m in found if m in modules and m != this}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_reads_function_local_and_type_only_imports():
    """The checker sees what it must: a cycle hidden in a function body or a TYPE_CHECKING block."""
    graph = {"a": {"b"}, "b": set()}
    assert _cycle(graph) is None
    graph["b"].add("a")
    assert _cycle(graph) == ["a", "b", "a"]
    modules = _modules()
    trainer = _imports(PACKAGE / "train" / "trainer.py", modules)
    assert {"forge_qat.checkpoint", "forge_qat.train", "forge_qat.distributed.zero"} <= trainer  # one is local


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_distributed_imports_no_product_code():
    """The distributed package runs engines and launches ranks; checkpoint formats, finalize, distillation and
    eval belong to the features that own them."""
    product = {"forge_qat.checkpoint", "forge_qat.finalize", "forge_qat.stream_convert", "forge_qat.artifact",
               "forge_qat.distill", "forge_qat.evaluate"}
    graph = _graph()
    wrong = {m: sorted(graph[m] & product) for m in graph
             if m.startswith("forge_qat.distributed") and graph[m] & product}
    assert not wrong, wrong


def test_training_and_distributed_code_is_in_short_functions():
    long = []
    for package in ("train", "distributed"):
        for path in (PACKAGE / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 60:
                        long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def test_private_torchao_use_lives_in_the_compat_module():
    """torchao's internal paths (underscored names, `quantize_.workflows`, `prototype`) are imported in
    forge_qat/torchao_compat.py only."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "torchao_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchao"):
                private = any(part.startswith("_") or part in ("workflows", "prototype")
                              for part in node.module.split(".")) or any(a.name.startswith("_") for a in node.names)
                if private:
                    offenders.append(f"{path.name}: from {node.module} import ...")
    assert not offenders, offenders
