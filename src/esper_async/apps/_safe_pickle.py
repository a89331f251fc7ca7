"""Read a pickle of plain data and numeric numpy arrays without running anything it names, within
hard bounds on depth, memory and work.

A pickle names functions for its reader to call, so a crafted one can run code (``os.system``),
and numpy's own rebuilders trust their input (numpy 2.4 crashes on an object array whose state is
shorter than its shape). The stdlib unpickler is not used at all: :func:`loads` runs its own
interpreter (:mod:`._pickle_machine`) over the few opcodes plain data needs, and resolves each
name a numpy or Python 3 pickle of plain data uses to a stand-in of ours that takes only the
calls those pickles make:

* ``numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")`` (``numpy._core`` in numpy 2), then
  its state ``(1, shape, dtype, fortran, bytes)``: an array of a plain numeric dtype built with
  ``np.frombuffer`` from exactly ``prod(shape) · itemsize`` bytes of the file;
* ``numpy.core.numeric._frombuffer(bytes, dtype, shape, order)`` (protocol 5): the same;
* ``numpy.dtype(code, align, copy)``, then its state: a plain numeric dtype (bool, integers,
  floats) and a byte order; object, structured and sub-array dtypes are refused;
* ``_codecs.encode(text, "latin1")`` and ``bytes()``: how Python 3 writes ``bytes`` in
  protocols 0-2.

Any other name is refused before it is called (:class:`PickleRefused`), and so is a stand-in
called with anything else, an opcode outside the subset (classes, sets, persistent ids,
out-of-band buffers: :class:`PickleUnsupported`) and a dict key that is not ``str`` or
``bytes``. The bounds (:class:`PickleOverBound`), all fixed before reading:

* **depth**: no value nests more than :data:`MAX_DEPTH` containers deep; the interpreter keeps
  its own stack, so nothing recurses on the input, and nothing it returns is deep enough to make
  a later ``repr``, hash or comparison recurse far;
* **memo**: at most :data:`MAX_MEMO` memo entries, at indices below it;
* **bytes and work**: every value has a weight (its bytes for strings, bytes and arrays, one for
  a scalar, one plus its items' weights for a container: shared references are counted at each
  use). Each value read or built is charged its size, and each time a value is used (placed in a
  tuple, list or dict, or set as a state) its whole weight is charged again, against a budget of
  :data:`BUDGET_PER_BYTE` per byte of the file plus :data:`BUDGET_SLACK`. So what a file
  materialises, and the time spent on it, are linear in its size: ``t = (t, t)`` 40 deep or one
  16 MiB string behind 256 arrays run out of budget after a few steps.

An honest CIFAR-10 batch spends about four times its size (the data string, the array built from
it, and each used once).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._pickle_machine import (
    ARRAY_NAME,
    BUDGET_PER_BYTE,
    BUDGET_SLACK,
    MAX_DEPTH,
    MAX_MEMO,
    PickleOverBound,
    PickleRefused,
    PickleUnsupported,
    StandIns,
    run,
)

__all__ = (
    "BUDGET_PER_BYTE",
    "BUDGET_SLACK",
    "MAX_DEPTH",
    "MAX_MEMO",
    "PickleOverBound",
    "PickleRefused",
    "PickleUnsupported",
    "loads",
)

#: The dtype codes an array may have: bool, integers and floats (numpy's pickled spelling).
_PLAIN_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})
#: The most dimensions an array may have.
_MAX_DIMS = 8


def _text(value: object) -> object:
    """``value`` as ``str`` if it is ASCII ``bytes`` (how Python 2's strings load)."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return value
    return value


class Dtype:
    """A plain numeric dtype named by a pickle (``numpy.dtype(code, align, copy)`` + state)."""

    def __init__(self, code: str) -> None:
        self.dtype = np.dtype(code)

    def set_state(self, state: object) -> None:
        """Take the byte order of numpy's dtype state ``(version, order, subarray, names,
        fields, ...)``.

        :raises PickleRefused: if the state describes anything but a plain dtype.
        """
        if not isinstance(state, tuple) or len(state) < 5:
            raise PickleRefused(f"numpy.dtype with the state {type(state).__name__}")
        order = _text(state[1])
        if order not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise PickleRefused("numpy.dtype of a structured or sub-array dtype")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)  # type: ignore[arg-type]


class ArrayState:
    """``_reconstruct``'s result: an array whose state the pickle sets next (BUILD)."""

    def set_state(self, state: object) -> np.ndarray:
        """The array numpy's state ``([1,] shape, dtype, fortran, data)`` describes.

        :raises PickleRefused: if the state is not of a plain numeric array.
        :raises ValueError: if the data is not the size the shape needs.
        """
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or not isinstance(state[2], bool):
            raise PickleRefused("numpy._reconstruct with an unknown array state")
        shape, dtype, fortran, raw = state
        return _array(raw, dtype, shape, fortran)


def _dtype(code: object, align: object = False, copy: object = False) -> Dtype:
    code = _text(code)
    if not isinstance(code, str) or code not in _PLAIN_CODES:
        raise PickleRefused(f"numpy.dtype of {code!r:.20} (only bool, integer and float dtypes)")
    return Dtype(code)


def _array(raw: object, dtype: object, shape: object, fortran: bool) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` from exactly the bytes it needs."""
    if not isinstance(dtype, Dtype):
        raise PickleRefused(f"an array of dtype {type(dtype).__name__}")
    if (
        not isinstance(shape, tuple)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise PickleRefused(f"an array of shape {shape!r:.40}")
    if not isinstance(raw, bytes | bytearray):
        raise PickleRefused(f"an array whose data is a {type(raw).__name__}")
    need = math.prod(shape) * dtype.dtype.itemsize
    if need != len(raw):
        raise ValueError(f"an array of shape {shape} needs {need} bytes, the file holds {len(raw)}")
    flat = np.frombuffer(raw, dtype=dtype.dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(subtype: object, shape: object, code: object) -> ArrayState:
    if subtype is not ARRAY_NAME or shape != (0,) or _text(code) != "b":
        raise PickleRefused("numpy._reconstruct of anything but an empty ndarray")
    return ArrayState()


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if order not in ("C", "F"):
        raise PickleRefused(f"numpy._frombuffer in order {order!r:.10}")
    return _array(buf, dtype, shape, order == "F")


def _latin1(text: object, encoding: object) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PickleRefused(f"_codecs.encode with {type(text).__name__}, {encoding!r:.20}")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    return b""


def _ndarray(*args: object) -> None:
    raise PickleRefused("numpy.ndarray called directly")


def _names() -> dict[tuple[str, str], Any]:
    names: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): ARRAY_NAME,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _latin1,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        names[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        names[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return names


_STAND_INS = StandIns(names=_names(), ndarray_call=_ndarray, stateful=(Dtype, ArrayState))


def loads(raw: bytes) -> Any:
    """The object pickled in ``raw``; numpy arrays come back as ``np.ndarray`` (read-write
    copies). Strings of Python 2 pickles load as ``bytes`` (as ``encoding="bytes"`` would).

    :param raw: the whole pickle; bytes after its end are an error.
    :raises PickleRefused: if it names anything outside the list above, or calls it otherwise.
    :raises PickleUnsupported: if it uses an opcode or a structure outside plain data.
    :raises PickleOverBound: if it nests, memoises or materialises beyond the bounds above.
    :raises ValueError: if it is truncated or malformed.
    """
    return run(raw, _STAND_INS)
