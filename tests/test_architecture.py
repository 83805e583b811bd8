"""The shape of the code, checked: no import cycle (function-local and type-only imports included), imports that
go down the layers of the pipeline, the distributed package and the file formats free of product code through
any path, and the training code in short functions."""

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
    assert {"forge_qat.formats.checkpoint", "forge_qat.train", "forge_qat.distributed.zero"} <= trainer  # one is local


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


LAYERS: tuple[tuple[str, ...], ...] = (
    ("forge_qat", "forge_qat.errors", "forge_qat.hardware", "forge_qat.heap", "forge_qat.logs", "forge_qat.resources",
     "forge_qat.torchao_compat", "forge_qat.config_fields"),  # the base every stage uses
    ("forge_qat.formats", "forge_qat.models"),  # on-disk contracts, model loading
    ("forge_qat.qat",),  # registry, numerics, prepare, convert
    ("forge_qat.lora",),
    ("forge_qat.distill", "forge_qat.data"),
    ("forge_qat.distributed",),  # engines and launching
    ("forge_qat.finalize", "forge_qat.eval"),
    ("forge_qat.export",),
    ("forge_qat.config", "forge_qat.train"),  # the composed run config, and the loop that runs it
    ("forge_qat.demo", "forge_qat.templates", "forge_qat.cli"),
)
"""Lowest first: a module imports its own layer or lower ones. The one kind of arrow allowed upwards is config
composition: a config section (`<feature>.config`, plain option dataclasses importing no torch), which the
metadata a format records is read back into."""


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_architecture.py: place it"
    return max(matches)[1]


def _is_config_section(module: str) -> bool:
    return module.endswith(".config") and module != "forge_qat.config"


def _upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_imports_go_down_the_layers_but_for_config_sections():
    """Every forge_qat module is placed in a layer, and no import climbs back up except into a config section."""
    graph = _graph()
    sections = [(m, t) for m, t in _upward_arrows(graph)
                if _is_config_section(t) or f"{t}.config" in graph[m]]  # the section, or its package's __init__
    wrong = [f"{m} -> {t}" for m, t in _upward_arrows(graph) if (m, t) not in sections]
    assert not wrong, wrong
    assert {m for m, _ in sections} <= {"forge_qat.formats.checkpoint", "forge_qat.formats.adapters"}, sections


def test_the_layer_check_can_fail():
    graph = {"forge_qat.formats.weights": {"forge_qat.train.trainer"}, "forge_qat.train.trainer": set()}
    assert _upward_arrows(graph) == [("forge_qat.formats.weights", "forge_qat.train.trainer")]
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _reach(graph, "a") == {"b", "c"}


PRODUCT = ("forge_qat.formats.checkpoint", "forge_qat.formats.run_dir", "forge_qat.formats.artifact",
           "forge_qat.formats.artifact_meta", "forge_qat.formats.adapters", "forge_qat.finalize", "forge_qat.eval",
           "forge_qat.export", "forge_qat.train", "forge_qat.distill", "forge_qat.config", "forge_qat.cli",
           "forge_qat.demo")
"""What distributed/ must not reach: forge's own file formats, finalize, eval, export, training, distillation."""


def test_distributed_reaches_no_product_code_through_any_path():
    """The distributed package runs engines and launches ranks (its worker runs an entry module named on its
    command line); checkpoint formats, finalize, distillation and eval belong to the features that own them."""
    graph = _graph()
    wrong = {m: sorted(t for t in _reach(graph, m) if _within(t, PRODUCT))
             for m in graph if m.startswith("forge_qat.distributed")}
    wrong = {m: found for m, found in wrong.items() if found}
    assert not wrong, wrong


def test_formats_reach_no_training_code():
    """The on-disk contracts are read by finalize, eval and export without the trainer: formats/ reaches no
    train/ module (and no distributed, finalize or eval one) through any path."""
    graph = _graph()
    banned = ("forge_qat.train", "forge_qat.distributed", "forge_qat.finalize", "forge_qat.eval", "forge_qat.config")
    wrong = {m: sorted(t for t in _reach(graph, m) if _within(t, banned) and not _is_config_section(t))
             for m in graph if m.startswith("forge_qat.formats")}
    wrong = {m: found for m, found in wrong.items() if found}
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
