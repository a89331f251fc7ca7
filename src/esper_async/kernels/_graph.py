"""Rebuild a kernel's program from its archive's JSON as an ``fx.GraphModule``, on an allow-list.

torch's own deserialiser resolves any callable reachable from ``torch`` as a graph target, parses
shape expressions with ``sympy.sympify`` (``eval``), ``exec``\\ s guard code, and puts names from
the file into generated Python source. This builder reads only what a kernel needs and lets
nothing from the file become code:

* nodes call ``torch.ops.aten`` operators (plus ``operator`` arithmetic on sizes); an operator
  that returns nothing (``save``, ``_print``) or takes a string outside :data:`_STRING_ARGS`
  (``from_file``'s file name) is refused;
* arguments are literals of the schema's kinds (tensors by name, numbers, dtypes, devices...);
  subgraphs, custom objects, operators as values and symbolic booleans are refused;
* the program has one tensor input and one tensor output; its parameters and buffers are
  registered under their dotted names, which must be plain identifiers, and lifted constants as
  non-persistent buffers (so they move with ``.to(device)`` and stay out of ``state_dict``);
* node and value names from the file are only looked up, never emitted: FX names the nodes
  itself, and string arguments reach the generated source through ``repr``;
* shape expressions, guards, range constraints and node metadata are not read at all: the
  graph runs eagerly and the slot's contract was checked by the validator.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ._archive import DTYPES, ArchiveRefused, KernelArchive

__all__ = ("build_program",)

_MODEL = "models/model.json"
#: The export schema's major version this builder reads (torch 2.11 to 2.13 write 8).
_SCHEMA_MAJOR = 8
_ATEN = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
#: Size arithmetic torch.export writes as ``_operator.<name>`` nodes.
_SYM_OPS: dict[str, Callable[..., Any]] = {
    f"_operator.{fn.__name__}": fn
    for fn in (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
               operator.neg, operator.truediv, operator.getitem)
}
#: String arguments an operator may take: modes and formulas, never a path or a message to print.
_STRING_ARGS = frozenset(
    {
        "approximate", "rounding_mode", "reduce", "reduction", "mode", "padding_mode",
        "interpolation_mode", "interpolation", "equation", "indexing", "side", "pad_mode",
        "UPLO", "driver", "padding",
    }
)
#: Operators allowed although they return nothing: checks that raise on a mismatch.
_CHECK_OPS = frozenset({"_assert_tensor_metadata"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MEMORY_FORMATS = {
    1: torch.contiguous_format,
    2: torch.channels_last,
    3: torch.channels_last_3d,
    4: torch.preserve_format,
}
_DEVICE_TYPES = frozenset({"cpu", "cuda"})
_FLOAT_WORDS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
_SCALAR = int | float | bool | str


def build_program(archive: KernelArchive) -> fx.GraphModule:
    """Build the module that runs the program in ``archive``: ``forward(h) -> tensor``.

    :raises ArchiveRefused: naming ``models/model.json`` and what in it is not allowed.
    """
    model = archive.model
    version = model.get("schema_version")
    major = version.get("major") if isinstance(version, dict) else None
    if major != _SCHEMA_MAJOR:
        raise _refuse(f"export schema {major!r}; this loader reads schema {_SCHEMA_MAJOR}")
    gm_json = _dict(model.get("graph_module"), "graph_module")
    graph_json = _dict(gm_json.get("graph"), "graph_module.graph")
    signature = _dict(gm_json.get("signature"), "graph_module.signature")
    # Tensors are registered on the module itself (GraphModule(root, graph) would copy them and
    # make every buffer persistent); the graph is assigned last, which generates its code.
    module = fx.GraphModule(nn.Module(), fx.Graph(), class_name="KernelProgram")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    _inputs(signature, graph_json, archive, module, graph, env)
    for node in _list(graph_json.get("nodes"), "graph.nodes"):
        _node(_dict(node, "a node"), graph, env)
    graph.output(env[_output(signature, graph_json, env)])
    graph.lint()
    module.graph = graph
    return module


def _refuse(reason: str) -> ArchiveRefused:
    return ArchiveRefused(_MODEL, reason)


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _refuse(f"{what} is not a list")
    return value


def _union(value: Any, what: str) -> tuple[str, Any]:
    """A schema union: an object with exactly one field set."""
    if not isinstance(value, dict) or len(value) != 1:
        raise _refuse(f"{what} is not a one-field union")
    ((kind, body),) = value.items()
    return kind, body


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _refuse(f"{what} has no usable name")
    return value


def _inputs(
    signature: dict[str, Any],
    graph_json: dict[str, Any],
    archive: KernelArchive,
    root: nn.Module,
    graph: fx.Graph,
    env: dict[str, fx.Node],
) -> None:
    """Placeholder ``h`` for the one user input; ``get_attr`` for parameters, buffers, constants."""
    specs = [_union(s, "an input spec") for s in _list(signature.get("input_specs"), "inputs")]
    names = []
    for kind, body in specs:
        arg = _dict(_dict(body, kind).get("arg"), f"{kind} arg")
        if kind == "user_input":
            arg_kind, arg = _union(arg, "a user input")
            if arg_kind != "as_tensor":
                raise _refuse(f"a user input of kind {arg_kind}; kernels take one tensor")
            arg = _dict(arg, "a user input")
        names.append(_name(arg.get("name"), kind))
    graph_inputs = [_union(a, "a graph input") for a in _list(graph_json.get("inputs"), "inputs")]
    if [kind for kind, _ in graph_inputs] != ["as_tensor"] * len(specs) or [
        _dict(body, "a graph input").get("name") for _, body in graph_inputs
    ] != names:
        raise _refuse("graph inputs do not match the input specs")
    if [kind for kind, _ in specs].count("user_input") != 1:
        raise _refuse("a kernel takes exactly one user input")
    for (kind, _), name in zip(specs, names, strict=True):
        if kind == "user_input":
            env[name] = graph.placeholder("h")
    for (kind, body), name in zip(specs, names, strict=True):
        if kind == "user_input":
            continue
        if kind == "parameter":
            fqn = body.get("parameter_name")
            _attach(root, fqn, archive.weights, "parameter")
        elif kind == "buffer":
            fqn = _check_fqn(body.get("buffer_name"), "buffer")
            persistent = body.get("persistent", True) is not False
            source = archive.weights if fqn in archive.weights else archive.constants
            _attach(root, fqn, source, "buffer", persistent=persistent)
        elif kind == "tensor_constant":
            fqn = body.get("tensor_constant_name")
            _attach(root, fqn, archive.constants, "buffer", persistent=False)
        else:
            raise _refuse(f"an input of kind {kind!r}; kernels take parameters and one tensor")
        if name in env:
            raise _refuse(f"input {name[:40]!r} is bound twice")
        env[name] = graph.get_attr(fqn)


def _check_fqn(fqn: Any, kind: str) -> str:
    parts = fqn.split(".") if isinstance(fqn, str) else []
    if not parts or not all(_IDENT.fullmatch(p) and not p.startswith("__") for p in parts):
        raise _refuse(f"a {kind} named {str(fqn)[:60]!r}; names must be dotted identifiers")
    return str(fqn)


def _attach(
    root: nn.Module,
    fqn: Any,
    source: dict[str, torch.Tensor],
    kind: str,
    *,
    persistent: bool = True,
) -> None:
    """Register ``source[fqn]`` on ``root`` at the dotted path ``fqn``."""
    parts = _check_fqn(fqn, kind).split(".")
    if fqn not in source:
        raise _refuse(f"{kind} {fqn!r} has no payload")
    tensor = source[fqn]
    owner = root
    try:
        for part in parts[:-1]:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if kind == "parameter":
            if not isinstance(tensor, nn.Parameter):
                raise _refuse(f"parameter {fqn!r} is stored as a plain tensor")
            owner.register_parameter(parts[-1], tensor)
        else:
            owner.register_buffer(parts[-1], tensor.detach(), persistent=persistent)
    except (KeyError, TypeError, AttributeError) as exc:
        raise _refuse(f"{kind} {fqn!r} cannot be registered ({exc})") from None


def _node(node: dict[str, Any], graph: fx.Graph, env: dict[str, fx.Node]) -> None:
    target = node.get("target")
    inputs = [_dict(i, "a node input") for i in _list(node.get("inputs"), "node inputs")]
    if isinstance(target, str) and target in _SYM_OPS:
        op: Callable[..., Any] = _SYM_OPS[target]
        args: list[Any] = [_argument(i.get("arg"), env) for i in inputs]
        call = graph.call_function(op, tuple(args))
        returns = 1
    else:
        overload = _aten(target)
        args, kwargs = _call_args(overload, inputs, env)
        call = graph.call_function(overload, tuple(args), kwargs)
        returns = len(overload._schema.returns)
    _bind_outputs(_list(node.get("outputs"), "node outputs"), call, returns, graph, env)


def _aten(target: Any) -> torch._ops.OpOverload:
    """The ATen operator named ``target``, if the allow-list admits it."""
    match = _ATEN.fullmatch(target) if isinstance(target, str) else None
    if match is None:
        raise _refuse(f"calls {str(target)[:80]!r}; kernels may call ATen operators only")
    name, overload_name = match.groups()
    try:
        overload = getattr(getattr(torch.ops.aten, name), overload_name)
    except (AttributeError, RuntimeError):
        raise _refuse(f"calls {target}, which this torch does not have") from None
    schema = getattr(overload, "_schema", None)
    if not isinstance(overload, torch._ops.OpOverload) or schema is None:
        raise _refuse(f"calls {target}, which is not an ATen operator")
    if schema.name != f"aten::{name}" or schema.overload_name not in (overload_name, ""):
        raise _refuse(f"calls {target}, whose schema is {schema.name}")
    if not schema.returns and name not in _CHECK_OPS:
        raise _refuse(f"calls {target}, which returns nothing (side effects only)")
    for arg in schema.arguments:
        if "str" in str(arg.type) and arg.name not in _STRING_ARGS:
            raise _refuse(f"calls {target}, which takes a string {arg.name!r}")
    return overload


def _call_args(
    overload: torch._ops.OpOverload, inputs: list[dict[str, Any]], env: dict[str, fx.Node]
) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments in the operator schema's order."""
    given: dict[str, Any] = {}
    for item in inputs:
        name = item.get("name")
        if not isinstance(name, str) or name in given:
            raise _refuse(f"{overload} has an unnamed or repeated argument")
        given[name] = _argument(item.get("arg"), env)
    schema_args = overload._schema.arguments
    unknown = set(given) - {a.name for a in schema_args}
    if unknown:
        raise _refuse(f"{overload} has no argument {sorted(unknown)[0][:40]!r}")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    positional = True
    for arg in schema_args:
        if arg.name not in given:
            if not arg.has_default_value() and not isinstance(arg.type, torch._C.OptionalType):
                raise _refuse(f"{overload} is missing its argument {arg.name!r}")
            positional = False
            continue
        if positional and not arg.kwarg_only:
            args.append(given[arg.name])
        elif keyword.iskeyword(arg.name):
            raise _refuse(f"{overload} needs {arg.name!r} by keyword, which Python cannot spell")
        else:
            kwargs[arg.name] = given[arg.name]
    return args, kwargs


def _argument(arg: Any, env: dict[str, fx.Node]) -> Any:
    """A node argument: a value of the kinds kernels use, or a reference to an earlier value."""
    kind, value = _union(arg, "an argument")
    if kind == "as_none":
        return None
    if kind in ("as_tensor", "as_sym_int"):
        return _value(value, env)
    if kind in ("as_tensors", "as_optional_tensors", "as_sym_ints"):
        return [_value(v, env) for v in _list(value, kind)]
    if kind == "as_optional_tensor":
        return _value(value, env)
    if kind in _LITERALS:
        check = _LITERALS[kind]
        return check(value)
    if kind in _LITERAL_LISTS:
        check = _LITERAL_LISTS[kind]
        return [check(v) for v in _list(value, kind)]
    raise _refuse(f"an argument of kind {kind!r}, which kernels may not carry")


def _value(ref: Any, env: dict[str, fx.Node]) -> Any:
    """``{"name": n}``, ``{"as_name": n}``, ``{"as_tensor": {"name": n}}``, ``{"as_none": ...}``
    or ``{"as_int": i}``: an earlier value by name, None or a literal size."""
    if isinstance(ref, dict) and len(ref) == 1:
        ((key, inner),) = ref.items()
        if key in ("name", "as_name"):
            if not isinstance(inner, str) or inner not in env:
                raise _refuse(f"refers to {str(inner)[:40]!r} before it is defined")
            return env[inner]
        if key == "as_tensor":
            return _value(inner, env)
        if key == "as_none":
            return None
        if key == "as_int":
            return _int(inner)
    raise _refuse("an argument that is not a reference to an earlier value")


def _int(value: Any) -> int:
    if type(value) is not int:
        raise _refuse(f"expected an integer, found {type(value).__name__}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, str) and value in _FLOAT_WORDS:
        return _FLOAT_WORDS[value]
    if type(value) not in (int, float):
        raise _refuse(f"expected a number, found {type(value).__name__}")
    return float(value)


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _refuse(f"expected a boolean, found {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise _refuse("expected a short string")
    return value


def _dtype(value: Any) -> torch.dtype:
    if type(value) is not int or value not in DTYPES:
        raise _refuse(f"dtype {value!r}, not one a kernel may use")
    return DTYPES[value]


def _memory_format(value: Any) -> torch.memory_format:
    if type(value) is not int or value not in _MEMORY_FORMATS:
        raise _refuse(f"memory format {value!r}, not one a kernel may use")
    return _MEMORY_FORMATS[value]


def _layout(value: Any) -> torch.layout:
    if value != 7:  # the schema's Layout.Strided
        raise _refuse(f"layout {value!r}; kernels use strided tensors only")
    return torch.strided


def _device(value: Any) -> torch.device:
    if not isinstance(value, dict) or value.get("type") not in _DEVICE_TYPES:
        raise _refuse("a device that is neither cpu nor cuda")
    index = value.get("index")
    if index is not None and type(index) is not int:
        raise _refuse("a device index that is not an integer")
    return torch.device(value["type"]) if index is None else torch.device(value["type"], index)


_LITERALS: dict[str, Callable[[Any], Any]] = {
    "as_int": _int,
    "as_float": _float,
    "as_bool": _bool,
    "as_string": _str,
    "as_scalar_type": _dtype,
    "as_memory_format": _memory_format,
    "as_layout": _layout,
    "as_device": _device,
}
_LITERAL_LISTS: dict[str, Callable[[Any], Any]] = {
    "as_ints": _int,
    "as_floats": _float,
    "as_bools": _bool,
    "as_strings": _str,
}


def _bind_outputs(
    outputs: list[Any], call: fx.Node, returns: int, graph: fx.Graph, env: dict[str, fx.Node]
) -> None:
    """Name the values a call produces; several values are taken out with ``getitem``."""

    def bind(ref: Any, node: fx.Node) -> None:
        name = _name(_dict(ref, "an output").get("name", ref.get("as_name")), "an output")
        if name in env:
            raise _refuse(f"value {name[:40]!r} is defined twice")
        env[name] = node

    def item(i: int) -> fx.Node:
        return graph.call_function(operator.getitem, (call, i))

    single = returns == 1 and len(outputs) == 1
    for i, out in enumerate(outputs):
        kind, body = _union(out, "an output")
        if kind == "as_none":
            continue
        if kind in ("as_tensor", "as_sym_int"):
            bind(body, call if single else item(i))
        elif kind == "as_tensors":
            listed = call if single else item(i)
            for j, ref in enumerate(_list(body, kind)):
                bind(ref, graph.call_function(operator.getitem, (listed, j)))
        else:
            raise _refuse(f"an output of kind {kind!r}, which kernels may not produce")


def _output(signature: dict[str, Any], graph_json: dict[str, Any], env: dict[str, fx.Node]) -> str:
    """The name of the program's one tensor output."""
    specs = [_union(s, "an output spec") for s in _list(signature.get("output_specs"), "outputs")]
    if [kind for kind, _ in specs] != ["user_output"]:
        raise _refuse(
            f"outputs {[kind for kind, _ in specs][:4]}; a kernel returns one tensor and "
            "mutates nothing"
        )
    kind, ref = _union(_dict(specs[0][1], "user_output").get("arg"), "the output")
    outputs = _list(graph_json.get("outputs"), "graph outputs")
    if kind != "as_tensor" or outputs != [{"as_tensor": ref}]:
        raise _refuse("the graph output does not match its output spec")
    name = _name(_dict(ref, "the output").get("name"), "the output")
    if name not in env:
        raise _refuse(f"the output {name[:40]!r} is never computed")
    return name
