"""The pickle interpreter behind :mod:`._safe_pickle`: the opcodes plain data needs, bounded.

Every value on the interpreter's stack is a :class:`_Node` carrying the value, its weight (bytes
for strings, bytes and arrays; one for a scalar; one plus its items' weights for a container,
shared references counted at each use) and its depth (containers nested). The loop is flat: no
opcode recurses, so no input can drive Python's or C's stack. What is charged against the
file's budget, and when:

* a string, bytes or array read or built: its size;
* a value used (an item of a new tuple, list or dict, appended, set as a dict key or value):
  its whole weight, at each use (a call's arguments and a state are a tuple, charged so when
  built; what a stand-in builds from them is charged as built);

so a value referenced many times costs its weight each time, and the budget (linear in the file's
size) bounds both the bytes materialised and the work done. Lists and dicts may be filled only
until they are first used (as every pickler writes them), which keeps weights and depths exact
and rules out cycles. Names resolve only to the stand-ins given; everything else is refused.
"""

from __future__ import annotations

import codecs
import pickletools
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = (
    "ARRAY_NAME",
    "BUDGET_PER_BYTE",
    "BUDGET_SLACK",
    "MAX_DEPTH",
    "MAX_MEMO",
    "PickleOverBound",
    "PickleRefused",
    "PickleUnsupported",
    "StandIns",
    "run",
)

#: The deepest a value may nest (a CIFAR-10 batch nests 4 deep: dict, state tuple, shape tuple).
MAX_DEPTH = 32
#: The most memo entries, and the bound on a memo index (a CIFAR-10 batch memoises ~20,000).
MAX_MEMO = 1 << 20
#: Weight a file may spend per byte it holds (an honest batch spends about 4).
BUDGET_PER_BYTE = 8
#: Weight every file may spend beyond that (small pickles: a dtype state, a name table).
BUDGET_SLACK = 1 << 16
#: Longest line of a module or attribute name (GLOBAL) and of a text-encoded number.
_MAX_NAME = 256
_MAX_DIGITS = 64
#: Longest binary integer (LONG1 / LONG4) in bytes.
_MAX_LONG_BYTES = 32

_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


class PickleRefused(Exception):
    """The pickle names something the reader does not resolve, or calls a stand-in with
    arguments it does not take. ``str(exc)`` says what, briefly."""


class PickleUnsupported(PickleRefused):
    """The pickle uses an opcode or a structure outside plain data (a class, a set, a
    persistent id, an out-of-band buffer, a dict key that is not text)."""


class PickleOverBound(PickleRefused):
    """The pickle nests, memoises or materialises beyond the reader's bounds."""


class _ArrayName:
    """What ``numpy.ndarray`` resolves to: a name only ``_reconstruct`` takes."""

    __slots__ = ()


#: The stand-in for ``numpy.ndarray``.
ARRAY_NAME = _ArrayName()


@dataclass(frozen=True)
class StandIns:
    """What names resolve to.

    :ivar names: ``(module, name)`` → a stand-in function (or :data:`ARRAY_NAME`).
    :ivar ndarray_call: called in place of ``numpy.ndarray(...)`` (it refuses).
    :ivar stateful: the types BUILD may set a state on (through their ``set_state``, which may
        return the value that replaces them).
    """

    names: Mapping[tuple[str, str], Any]
    ndarray_call: Callable[..., Any]
    stateful: tuple[type, ...]


class _Node:
    __slots__ = ("depth", "obj", "used", "weight")

    def __init__(self, obj: Any, weight: int, depth: int) -> None:
        self.obj = obj
        self.weight = weight
        self.depth = depth
        self.used = False


def _size(obj: object) -> int:
    """The bytes a built value holds (what building it is charged)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    return 0


class _Machine:
    def __init__(self, raw: bytes, stand_ins: StandIns) -> None:
        self.raw = raw
        self.pos = 0
        self.stack: list[_Node] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Node] = {}
        self.budget = BUDGET_PER_BYTE * len(raw) + BUDGET_SLACK
        self.left = self.budget
        self.stand_ins = stand_ins
        self.calls = frozenset(id(v) for v in stand_ins.names.values())
        c = self._const
        self.dispatch: dict[int, Callable[[], None]] = {
            ord("("): self._mark,
            ord("0"): self._pop,
            ord("1"): self._pop_mark,
            ord("2"): self._dup,
            ord("N"): c(None),
            0x88: c(True),
            0x89: c(False),
            ord("I"): self._int,
            ord("L"): self._long,
            ord("J"): self._fixed("<i", 4),
            ord("K"): self._fixed("<B", 1),
            ord("M"): self._fixed("<H", 2),
            0x8A: self._long_bin(1),
            0x8B: self._long_bin(4),
            ord("F"): self._float,
            ord("G"): self._fixed(">d", 8),
            ord("S"): self._string,
            ord("V"): self._unicode,
            ord("T"): self._blob("<i", bytes),
            ord("U"): self._blob("<B", bytes),
            ord("B"): self._blob("<I", bytes),
            ord("C"): self._blob("<B", bytes),
            0x8E: self._blob("<Q", bytes),
            0x96: self._blob("<Q", bytearray),
            ord("X"): self._blob("<I", str),
            0x8C: self._blob("<B", str),
            0x8D: self._blob("<Q", str),
            ord(")"): self._tuple_of(0),
            0x85: self._tuple_of(1),
            0x86: self._tuple_of(2),
            0x87: self._tuple_of(3),
            ord("t"): self._tuple,
            ord("]"): c([], fresh=True),
            ord("}"): c({}, fresh=True),
            ord("l"): self._list,
            ord("d"): self._dict,
            ord("a"): self._append,
            ord("e"): self._appends,
            ord("s"): self._setitem,
            ord("u"): self._setitems,
            ord("p"): self._put_line,
            ord("q"): self._put("<B", 1),
            ord("r"): self._put("<I", 4),
            0x94: self._memoize,
            ord("g"): self._get_line,
            ord("h"): self._get("<B", 1),
            ord("j"): self._get("<I", 4),
            ord("c"): self._global,
            0x93: self._stack_global,
            ord("R"): self._reduce,
            ord("b"): self._build,
            0x80: self._proto,
            0x95: self._frame,
        }

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Any:
        raw, end = self.raw, len(self.raw)
        while True:
            if self.pos >= end:
                raise ValueError("the pickle ends before its STOP opcode")
            op = raw[self.pos]
            self.pos += 1
            if op == 0x2E:  # STOP
                break
            handler = self.dispatch.get(op)
            if handler is None:
                name = _OPCODE_NAMES.get(op)
                if name is None:
                    raise ValueError(f"byte {op:#04x} at offset {self.pos - 1} is no opcode")
                raise PickleUnsupported(f"uses the opcode {name}, which plain data never needs")
            handler()
        if not self.stack:
            raise ValueError("the pickle's STOP finds nothing to return")
        if self.pos != end:
            raise ValueError(f"{end - self.pos} bytes after the pickle's end")
        return self.stack[-1].obj

    # -- reading and charging ---------------------------------------------------------------

    def _charge(self, weight: int) -> None:
        self.left -= weight
        if self.left < 0:
            raise PickleOverBound(
                f"materialises more than its budget of {self.budget} bytes ({BUDGET_PER_BYTE} "
                f"per byte of the file, shared references counted at each use), at offset "
                f"{self.pos}"
            )

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise ValueError(f"the pickle is truncated: {n} bytes wanted at offset {self.pos}")
        data = self.raw[self.pos : self.pos + n]
        self.pos += n
        return data

    def _unpack(self, fmt: str, n: int) -> Any:
        return struct.unpack(fmt, self._take(n))[0]

    def _line(self, limit: int) -> bytes:
        end = self.raw.find(b"\n", self.pos, self.pos + limit + 1)
        if end < 0:
            raise ValueError(f"a text field at offset {self.pos} is unterminated or too long")
        line = self.raw[self.pos : end]
        self.pos = end + 1
        return line

    def _push(self, obj: Any, weight: int = 1, depth: int = 0) -> None:
        self.stack.append(_Node(obj, weight, depth))

    def _push_built(self, obj: Any) -> None:
        size = _size(obj)
        self._charge(size)
        self._push(obj, 1 + size)

    def _use(self, nodes: list[_Node], *, charge: bool = True) -> tuple[int, int]:
        """Mark ``nodes`` used and charge their weights (a call's or a state's items were charged
        when their tuple was built: ``charge=False``); the weight and depth of a container of
        them."""
        weight = 1
        depth = 0
        for node in nodes:
            node.used = True
            weight += node.weight
            depth = max(depth, node.depth)
        if charge:
            self._charge(weight - 1)
        if depth + 1 > MAX_DEPTH:
            raise PickleOverBound(f"nests values more than {MAX_DEPTH} deep")
        return weight, depth + 1

    def _pop(self) -> None:
        if not self.stack:
            raise ValueError(f"the pickle pops an empty stack at offset {self.pos - 1}")
        self.stack.pop()

    def _pop_node(self) -> _Node:
        if not self.stack:
            raise ValueError(f"the pickle pops an empty stack at offset {self.pos - 1}")
        return self.stack.pop()

    def _top(self) -> _Node:
        if not self.stack:
            raise ValueError(f"the pickle reads an empty stack at offset {self.pos - 1}")
        return self.stack[-1]

    def _pop_mark_items(self) -> list[_Node]:
        if not self.marks:
            raise ValueError(f"the pickle has no MARK for offset {self.pos - 1}")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # -- scalars and strings ----------------------------------------------------------------

    def _const(self, value: Any, *, fresh: bool = False) -> Callable[[], None]:
        if fresh:  # an empty list or dict: a new one each time
            return lambda: self._push(type(value)(), 1, 1)
        return lambda: self._push(value)

    def _fixed(self, fmt: str, n: int) -> Callable[[], None]:
        return lambda: self._push(self._unpack(fmt, n))

    def _digits(self) -> bytes:
        line = self._line(_MAX_DIGITS).strip()
        if not line.lstrip(b"+-").isdigit():
            raise ValueError(f"a text integer at offset {self.pos} is not digits")
        return line

    def _int(self) -> None:
        line = self._line(_MAX_DIGITS)
        if line in (b"00", b"01"):
            self._push(line == b"01")
            return
        self.pos -= len(line) + 1
        self._push(int(self._digits()))

    def _long(self) -> None:
        line = self._line(_MAX_DIGITS).strip().removesuffix(b"L")
        if not line.lstrip(b"+-").isdigit():
            raise ValueError(f"a text integer at offset {self.pos} is not digits")
        self._push(int(line))

    def _long_bin(self, width: int) -> Callable[[], None]:
        def handler() -> None:
            n = self._unpack("<B" if width == 1 else "<i", width)
            if n > _MAX_LONG_BYTES:
                raise PickleOverBound(f"holds an integer of {n} bytes (at most {_MAX_LONG_BYTES})")
            self._push(int.from_bytes(self._take(n), "little", signed=True))

        return handler

    def _float(self) -> None:
        self._push(float(self._line(_MAX_DIGITS)))

    def _blob(self, fmt: str, kind: type) -> Callable[[], None]:
        width = struct.calcsize(fmt)

        def handler() -> None:
            data = self._take(self._unpack(fmt, width))
            value: Any = data
            if kind is str:
                value = data.decode("utf-8", "surrogatepass")
            elif kind is bytearray:
                value = bytearray(data)
            self._push_built(value)

        return handler

    def _string(self) -> None:  # protocol 0's quoted byte string
        line = self._line(len(self.raw)).rstrip(b"\r")
        if len(line) < 2 or line[0] not in b"'\"" or line[-1] != line[0]:
            raise ValueError(f"a quoted string at offset {self.pos} is not quoted")
        self._push_built(codecs.escape_decode(line[1:-1])[0])

    def _unicode(self) -> None:  # protocol 0's text
        self._push_built(self._line(len(self.raw)).decode("raw-unicode-escape"))

    # -- containers -------------------------------------------------------------------------

    def _mark(self) -> None:
        self.marks.append(len(self.stack))

    def _pop_mark(self) -> None:
        self._pop_mark_items()

    def _dup(self) -> None:
        self.stack.append(self._top())

    def _tuple_items(self, items: list[_Node]) -> None:
        weight, depth = self._use(items)
        self._push(tuple(n.obj for n in items), weight, depth)

    def _tuple(self) -> None:
        self._tuple_items(self._pop_mark_items())

    def _tuple_of(self, n: int) -> Callable[[], None]:
        def handler() -> None:
            if len(self.stack) < n:
                raise ValueError(f"the pickle pops an empty stack at offset {self.pos - 1}")
            items = self.stack[len(self.stack) - n :]
            del self.stack[len(self.stack) - n :]
            self._tuple_items(items)

        return handler

    def _fill(self, target: _Node, items: list[_Node], kind: type) -> None:
        if not isinstance(target.obj, kind):
            raise PickleUnsupported(f"adds items to a {type(target.obj).__name__}")
        if target.used or any(n is target for n in items):
            raise PickleUnsupported(f"adds to a {kind.__name__} after using it (or to itself)")
        weight, depth = self._use(items)
        target.weight += weight - 1
        target.depth = max(target.depth, depth)
        container: Any = target.obj
        if kind is list:
            container.extend(n.obj for n in items)
            return
        if len(items) % 2:
            raise ValueError("a dict's items are not key, value pairs")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(key.obj, str | bytes):
                raise PickleUnsupported(
                    f"has a dict key of type {type(key.obj).__name__} (only str and bytes)"
                )
            container[key.obj] = value.obj

    def _list(self) -> None:
        items = self._pop_mark_items()
        self._push([], 1, 1)
        self._fill(self.stack[-1], items, list)

    def _dict(self) -> None:
        items = self._pop_mark_items()
        self._push({}, 1, 1)
        self._fill(self.stack[-1], items, dict)

    def _append(self) -> None:
        item = self._pop_node()
        self._fill(self._top(), [item], list)

    def _appends(self) -> None:
        items = self._pop_mark_items()
        self._fill(self._top(), items, list)

    def _setitem(self) -> None:
        value = self._pop_node()
        key = self._pop_node()
        self._fill(self._top(), [key, value], dict)

    def _setitems(self) -> None:
        items = self._pop_mark_items()
        self._fill(self._top(), items, dict)

    # -- memo -------------------------------------------------------------------------------

    def _store(self, index: int) -> None:
        if not 0 <= index < MAX_MEMO or (index not in self.memo and len(self.memo) >= MAX_MEMO):
            raise PickleOverBound(f"memoises at index {index} (at most {MAX_MEMO} entries)")
        self.memo[index] = self._top()

    def _load(self, index: int) -> None:
        node = self.memo.get(index)
        if node is None:
            raise ValueError(f"the pickle reads memo entry {index} before writing it")
        self.stack.append(node)

    def _put_line(self) -> None:
        self._store(int(self._digits()))

    def _put(self, fmt: str, n: int) -> Callable[[], None]:
        return lambda: self._store(self._unpack(fmt, n))

    def _memoize(self) -> None:
        self._store(len(self.memo))

    def _get_line(self) -> None:
        self._load(int(self._digits()))

    def _get(self, fmt: str, n: int) -> Callable[[], None]:
        return lambda: self._load(self._unpack(fmt, n))

    # -- names, calls and states ------------------------------------------------------------

    def _resolve(self, module: str, name: str) -> None:
        found = self.stand_ins.names.get((module, name))
        if found is None:
            raise PickleRefused(f"{module[:60]}.{name[:60]}")
        self._push(found)

    def _global(self) -> None:
        module = self._line(_MAX_NAME).decode("utf-8")
        name = self._line(_MAX_NAME).decode("utf-8")
        self._resolve(module, name)

    def _stack_global(self) -> None:
        name, module = self._pop_node().obj, self._pop_node().obj
        if not isinstance(module, str) or not isinstance(name, str):
            raise PickleUnsupported("names a global with something other than text")
        self._resolve(module, name)

    def _reduce(self) -> None:
        args, func = self._pop_node(), self._pop_node()
        if func.obj is ARRAY_NAME:
            self.stand_ins.ndarray_call()
        if id(func.obj) not in self.calls or not isinstance(args.obj, tuple):
            raise PickleUnsupported(
                f"calls a {type(func.obj).__name__} with a {type(args.obj).__name__}"
            )
        self._use([args], charge=False)
        try:
            result = func.obj(*args.obj)
        except TypeError as exc:
            raise PickleRefused(f"{func.obj.__name__.lstrip('_')} with {exc}") from None
        self._push_built(result)

    def _build(self) -> None:
        state = self._pop_node()
        target = self._top()
        if not isinstance(target.obj, self.stand_ins.stateful):
            raise PickleRefused(f"setting the state of {type(target.obj).__name__}")
        if target.used:
            raise PickleUnsupported("sets the state of a value after using it")
        self._use([state], charge=False)
        stateful: Any = target.obj
        built = stateful.set_state(state.obj)
        if built is not None:
            size = _size(built)
            self._charge(size)
            target.obj = built
            target.weight = 1 + size

    def _proto(self) -> None:
        version = self._unpack("<B", 1)
        if version > 5:
            raise ValueError(f"pickle protocol {version} is unknown")

    def _frame(self) -> None:
        size = self._unpack("<Q", 8)
        if self.pos + size > len(self.raw):
            raise ValueError(f"the pickle is truncated: a frame of {size} bytes")


def run(raw: bytes, stand_ins: StandIns) -> Any:
    """The value pickled in ``raw``, read within the module's bounds.

    :param raw: the whole pickle.
    :param stand_ins: what names resolve to.
    :raises PickleRefused: if it names or calls anything else (a subclass for the reasons below).
    :raises PickleUnsupported: if it uses an opcode or a structure outside plain data.
    :raises PickleOverBound: if it goes beyond a bound.
    :raises ValueError: if it is truncated or malformed (also ``UnicodeDecodeError``).
    """
    return _Machine(bytes(raw), stand_ins).run()
