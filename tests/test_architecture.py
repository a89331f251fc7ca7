"""The package's layers: each imports only the layers below it, and no module imports itself
back through others; a package's private modules are imported only inside it (others import its
``__init__``'s public names), and no module touches another object's private fields (see
``docs/architecture.md``).

Read from the source with ``ast`` (nothing is imported). Imports under ``if TYPE_CHECKING:`` are
left out: they are annotations, not dependencies at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "esper_async"

#: Bottom to top. A module may import its own layer's packages and the layers below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "_files", "_seal"),
    ("blueprints",),
    ("kernels",),
    ("seeds",),
    ("runtime",),
    ("compiler", "store", "telemetry", "reliability"),
    ("selection", "control"),
    ("surgery", "distributed"),
    ("training",),
    ("apps",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_imports(path: Path) -> set[str]:
    """The ``esper_async`` modules ``path`` imports when it runs."""
    me = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: None if is_package else -1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != me}
    return found


GRAPH = {name: _runtime_imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_has_a_layer() -> None:
    top = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert top <= set(LAYER_OF), f"put {sorted(top - set(LAYER_OF))} in LAYERS"


def test_no_module_imports_a_higher_layer() -> None:
    violations = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if (a := _layer(module)) is not None and (b := _layer(target)) is not None and b > a
    ]
    assert not violations, "\n".join(sorted(violations))


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []



def _private_imports(path: Path) -> list[str]:
    """``from ..pkg._module import ...`` in ``path`` where ``pkg`` is not ``path``'s package."""
    me = _module_name(path).split(".")
    base_of = me if path.name == "__init__.py" else me[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = base_of[: len(base_of) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = (node.module or "").split(".")
            if target[0] != "esper_async" or len(target) < 3 or not target[2].startswith("_"):
                continue
            if len(me) < 2 or me[1] != target[1]:
                found.append(f"{'.'.join(me)}:{node.lineno} imports {'.'.join(target)}")
    return found


#: The one exception, and why: the store validates an imported kernel with the compiler's
#: validator, but the compiler package imports the store, so the store cannot import the
#: compiler's ``__init__`` without a cycle (the validator itself needs only blueprints and
#: kernels).
PRIVATE_IMPORTS_ALLOWED = {"esper_async.store._import imports esper_async.compiler._validator"}


def test_no_module_imports_another_packages_private_module() -> None:
    violations = [
        v for path in MODULES.values() for v in _private_imports(path)
        if v.split(":")[0] + " " + v.split(" ", 1)[1] not in PRIVATE_IMPORTS_ALLOWED
    ]
    assert not violations, "import these through the package's __init__:\n" + "\n".join(
        sorted(violations))


def _self_fields(tree: ast.AST) -> set[str]:
    """The private fields a module's classes set on ``self``."""
    return {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
        and node.attr.startswith("_") and not node.attr.startswith("__")
    }


def test_no_module_touches_another_objects_private_fields() -> None:
    """A private field (``obj._x``) an esper_async class sets on itself is read or written only
    through ``self`` (or ``cls``, ``super()``), or in the module that defines it. ``nn.Module``'s
    own fields (``_modules``, ``_buffers``, ...) are torch's API for module surgery: not ours."""
    import torch

    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    owners: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for field in _self_fields(tree):
            owners.setdefault(field, set()).add(name)
    torch_fields = set(vars(torch.nn.Module()))
    violations = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in owners:
                continue
            if node.attr in torch_fields or name in owners[node.attr]:
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and ast.unparse(base.func) == "super":
                continue
            violations.append(f"{name}:{node.lineno} touches {ast.unparse(node)} (a field of "
                              f"{sorted(owners[node.attr])})")
    assert not violations, "\n".join(sorted(violations))
