"""Read a pickle of plain data and numeric numpy arrays without running anything it names.

A pickle names functions for its reader to call, so a crafted one can run code (``os.system``),
and numpy's own rebuilders trust their input: ``ndarray.__setstate__`` given an object dtype and a
list shorter than the shape reads past the list (numpy 2.4 crashes on it). So nothing numpy
pickles arrays with is resolved to numpy. :func:`loads` resolves each name a numpy or Python 3
pickle of plain data uses to a stand-in of ours that takes only the calls those pickles make:

* ``numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")`` (``numpy._core`` in numpy 2), then
  its state ``(1, shape, dtype, fortran, bytes)``: an array of a plain numeric dtype built with
  ``np.frombuffer`` from exactly ``prod(shape) · itemsize`` bytes of the file;
* ``numpy.core.numeric._frombuffer(bytes, dtype, shape, order)`` (protocol 5): the same;
* ``numpy.dtype(code, align, copy)``, then its state: a plain numeric dtype (bool, integers,
  floats) and a byte order; object, structured and sub-array dtypes are refused;
* ``_codecs.encode(text, "latin1")`` and ``bytes()``: how Python 3 writes ``bytes`` in
  protocols 0-2.

Any other name is refused before it is called (:class:`PickleRefused`), and so is a stand-in
called with anything else. No array is larger than the bytes the file holds.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

__all__ = ("PickleRefused", "loads")

#: The dtype codes an array may have: bool, integers and floats (numpy's pickled spelling).
_PLAIN_CODES = frozenset(
    {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}
)
#: The most dimensions an array may have.
_MAX_DIMS = 8


class PickleRefused(Exception):
    """The pickle names something :func:`loads` does not resolve, or calls a stand-in with
    arguments it does not take. ``str(exc)`` says what, briefly."""


def _text(value: object) -> object:
    """``value`` as ``str`` if it is ASCII ``bytes`` (how Python 2's strings load)."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return value
    return value


class _Dtype:
    """A plain numeric dtype named by a pickle (``numpy.dtype(code, align, copy)`` + state)."""

    def __init__(self, code: str) -> None:
        self.dtype = np.dtype(code)

    def __setstate__(self, state: object) -> None:
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


def _dtype(code: object, align: object = False, copy: object = False) -> _Dtype:
    code = _text(code)
    if not isinstance(code, str) or code not in _PLAIN_CODES:
        raise PickleRefused(f"numpy.dtype of {code!r:.20} (only bool, integer and float dtypes)")
    return _Dtype(code)


def _array(raw: object, dtype: object, shape: object, fortran: bool) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` from exactly the bytes it needs."""
    if not isinstance(dtype, _Dtype):
        raise PickleRefused(f"an array of dtype {type(dtype).__name__}")
    if (
        not isinstance(shape, tuple) or len(shape) > _MAX_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise PickleRefused(f"an array of shape {shape!r:.40}")
    if not isinstance(raw, bytes | bytearray):
        raise PickleRefused(f"an array whose data is a {type(raw).__name__}")
    need = math.prod(shape) * dtype.dtype.itemsize
    if need != len(raw):
        raise ValueError(f"an array of shape {shape} needs {need} bytes, the file holds {len(raw)}")
    flat = np.frombuffer(bytes(raw), dtype=dtype.dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


class _Sealed:
    """A stand-in every load shares: a pickle's BUILD may not set its attributes (it would change
    how every later file in the process loads)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        """:raises PickleRefused: always."""
        raise PickleRefused(f"setting the state of {type(self).__name__}")


class _NdarrayName(_Sealed):
    """What ``numpy.ndarray`` resolves to: a name only :func:`_reconstruct` takes."""

    __slots__ = ()

    def __call__(self, *args: object, **kwargs: object) -> None:
        """:raises PickleRefused: always (a pickle may not make arrays of any size it names)."""
        raise PickleRefused("numpy.ndarray called directly")


class _Call(_Sealed):
    """A stand-in function, sealed (see :class:`_Sealed`)."""

    __slots__ = ("_fn",)
    _fn: Any

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: object) -> Any:
        return self._fn(*args)


_NDARRAY = _NdarrayName()


class _ArrayState:
    """``_reconstruct``'s result: the array is built when the pickle sets its state."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        """Build the array from numpy's state ``([1,] shape, dtype, fortran, data)``.

        :raises PickleRefused: if the state is not of a plain numeric array.
        :raises ValueError: if the data is not the size the shape needs.
        """
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or not isinstance(state[2], bool):
            raise PickleRefused("numpy._reconstruct with an unknown array state")
        shape, dtype, fortran, raw = state
        self.array = _array(raw, dtype, shape, fortran)


def _reconstruct(subtype: object, shape: object, code: object) -> _ArrayState:
    if subtype is not _NDARRAY or shape != (0,) or _text(code) != "b":
        raise PickleRefused("numpy._reconstruct of anything but an empty ndarray")
    return _ArrayState()


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


def _names() -> dict[tuple[str, str], Any]:
    names: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Call(_dtype),
        ("_codecs", "encode"): _Call(_latin1),
        ("__builtin__", "bytes"): _Call(_empty_bytes),
        ("builtins", "bytes"): _Call(_empty_bytes),
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        names[(f"{core}.multiarray", "_reconstruct")] = _Call(_reconstruct)
        names[(f"{core}.numeric", "_frombuffer")] = _Call(_frombuffer)
    return names


_NAMES = _names()


class _Unpickler(pickle.Unpickler):
    """Resolves :data:`_NAMES` and nothing else; persistent ids are refused by default."""

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for ``module.name``.

        :raises PickleRefused: if there is none.
        """
        found = _NAMES.get((module, name))
        if found is None:
            raise PickleRefused(f"{module[:60]}.{name[:60]}")
        return found


def loads(raw: bytes) -> Any:
    """The object pickled in ``raw``; the values of a top-level dict that are numpy arrays come
    back as ``np.ndarray`` (read-write copies), other arrays stay unbuilt stand-ins.

    Strings of Python 2 pickles load as ``bytes`` (``encoding="bytes"``).

    :param raw: the whole pickle; bytes after its end are an error.
    :raises PickleRefused: if it names anything outside the list above, or calls it otherwise.
    :raises Exception: whatever ``pickle`` raises on a truncated or malformed stream
        (``UnpicklingError``, ``EOFError``, ``ValueError``, ...).
    """
    stream = io.BytesIO(raw)
    obj = _Unpickler(stream, encoding="bytes").load()
    if stream.tell() != len(raw):
        raise ValueError(f"{len(raw) - stream.tell()} bytes after the pickle's end")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, _ArrayState) and value.array is not None:
                obj[key] = value.array
    return obj
