"""Argument checking and CPU/CUDA routing shared by every lmkern function.

The one place that produces the SPEC's error messages, e.g.
``tpa.decode: bq has shape (2, 6, 64); expected (B, Rq, D) = (2, 6, 128)``.

Shape specs are comma-separated axis letters (``"B,N,Hq,D"``); a letter is bound to the size it
first meets and every later use must agree.  Integers in a spec are fixed sizes.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "Shapes", "float_arrays", "index_array", "is_cuda", "route", "prepare_out", "finish_out",
    "check_choice", "check_count", "as_scale", "min_max", "require",
]

_FLOAT_KINDS = "f"
KDL_CUDA, KDL_CUDA_MANAGED = 2, 13


class Shapes:
    """Binds shape letters across the arguments of one call and reports mismatches."""

    def __init__(self, fn: str, **bound: int):
        self.fn = fn
        self.dims: dict[str, int] = dict(bound)

    def __getitem__(self, letter: str) -> int:
        return self.dims[letter]

    def get(self, letter, default=None):
        return self.dims.get(letter, default)

    def bind(self, letter: str, value: int) -> None:
        self.dims[letter] = int(value)

    def _expected(self, letters, shape):
        """The sizes the letters stand for: bound sizes, digits, and (when the rank matches) the sizes
        given for free letters; a free letter of a wrong-rank argument stays a letter."""
        rank_ok = len(shape) == len(letters)
        vals = []
        for i, letter in enumerate(letters):
            if letter.isdigit():
                vals.append(int(letter))
            elif letter in self.dims:
                vals.append(self.dims[letter])
            else:
                vals.append(shape[i] if rank_ok else letter)
        return vals

    def check(self, arg: str, x, spec: str) -> None:
        """Checks ``x.shape`` against ``spec`` and binds its free letters."""
        parsed = _parsed(spec)
        if x is None:
            raise TypeError(f"{self.fn}: {arg} is None; expected an array of shape ({', '.join(_letters(spec))})")
        shape = x.shape
        if type(shape) is not tuple:   # torch.Size, CuPy or array-interface shapes
            shape = tuple(int(s) for s in shape)
        dims = self.dims
        if len(shape) == len(parsed):
            # one pass: a free letter binds as it is met (a mismatch later in the same shape reports the
            # same expected sizes either way: _expected shows a free letter as the size given)
            for (letter, fixed), size in zip(parsed, shape):
                want = fixed if fixed is not None else dims.get(letter)
                if want is None:
                    dims[letter] = size
                elif want != size:
                    break
            else:
                return
        self.fail(arg, tuple(int(s) for s in shape), _letters(spec))

    def check_lens(self, arg: str, lens, letter: str = "M") -> None:
        """``lens`` (an integer array, e.g. kv_lens) has shape ``(B,)`` and values in ``[0, letter]``."""
        self.check(arg, lens, "B")
        lo, hi = min_max(np.asarray(lens)) if np.size(lens) else (0, 0)
        if lo < 0 or hi > self.dims[letter]:
            raise ValueError(f"{self.fn}: {arg} must be in [0, {letter} = {self.dims[letter]}]; "
                             f"got {np.asarray(lens).tolist()}")

    def fail(self, arg, shape, letters):
        def tup(vals):
            return "(" + ", ".join(str(v) for v in vals) + ("," if len(vals) == 1 else "") + ")"
        lt, wt, got = tup(letters), tup(self._expected(letters, shape)), tup(shape)
        expect = lt if lt == wt else f"{lt} = {wt}"   # (1, 2) for sizes given as numbers, not "(1, 2) = (1, 2)"
        extra = "" if len(shape) == len(letters) else f" ({len(letters)} dimensions, got {len(shape)})"
        raise ValueError(f"{self.fn}: {arg} has shape {got}; expected {expect}{extra}")

    def check_one_of(self, arg: str, x, *specs: str) -> str:
        """Checks x against the first spec with the same rank (e.g. ``"N"`` or ``"B,N"``); returns it."""
        for spec in specs:
            if len(spec.split(",")) == np.ndim(x):
                self.check(arg, x, spec)
                return spec
        self.check(arg, x, specs[-1])  # raises with the last form
        return specs[-1]


@functools.lru_cache(maxsize=None)
def _letters(spec: str) -> tuple:
    return tuple(s.strip() for s in spec.split(",") if s.strip())


@functools.lru_cache(maxsize=None)
def _parsed(spec: str) -> tuple:
    """``(letter, fixed size or None)`` per axis of a spec."""
    return tuple((letter, int(letter) if letter.isdigit() else None) for letter in _letters(spec))


class ShapeOnly:
    """Stands for an array where only its shape is checked."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _dtype_name(x) -> str:
    dt = getattr(x, "dtype", None)
    return str(dt) if dt is not None else type(x).__name__


def float_arrays(fn: str, **arrays):
    """NumPy views of the float arguments, promoted to one dtype as NumPy does.

    float16 computes as float32; integer, bool, complex or object data is a TypeError naming the
    argument.  ``None`` values pass through.  Returns ``(dtype, dict)``.
    """
    out = {}
    first = None
    mixed = False
    for name, x in arrays.items():
        if x is None:
            out[name] = None
            continue
        a = x if type(x) is np.ndarray else np.asarray(x)
        dt = a.dtype
        if dt.kind not in _FLOAT_KINDS or dt.itemsize > 8:
            raise TypeError(f"{fn}: {name} has dtype {dt}; expected float32 or float64")
        out[name] = a
        if first is None:
            first = dt
        elif dt != first:
            mixed = True
    if first is None:
        return np.dtype(np.float32), out
    if not mixed and first.itemsize >= 4:   # the common case: one dtype, nothing to promote
        return first, out
    dtype = np.result_type(*[a.dtype for a in out.values() if a is not None])
    if dtype.itemsize < 4:
        dtype = np.dtype(np.float32)
    for name, a in out.items():
        if a is not None and a.dtype != dtype:
            out[name] = a.astype(dtype)
    return dtype, out


def require(fn: str, **arrays) -> None:
    """TypeError for a required array argument given as None (before anything reads its shape)."""
    for name, x in arrays.items():
        if x is None:
            raise TypeError(f"{fn}: {name} is None; expected an array")


def index_array(fn: str, name: str, x):
    """int64 NumPy array of an index argument (any integer dtype); None passes through."""
    if x is None:
        return None
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "O" and a.size == 0:
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{fn}: {name} has dtype {a.dtype}; expected an integer dtype")
    return a.astype(np.int64, copy=False)


def is_cuda(x) -> bool:
    """True for objects that live on a CUDA device (DLPack or __cuda_array_interface__)."""
    if x is None or isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        return False
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in (KDL_CUDA, KDL_CUDA_MANAGED)
        except Exception:
            return False
    return hasattr(x, "__cuda_array_interface__")


def route(fn: str, **arrays) -> str:
    """'cuda' when the arrays live on a GPU, 'cpu' otherwise; mixing is a ValueError."""
    where = {name: is_cuda(x) for name, x in arrays.items() if x is not None}
    if any(where.values()):
        host = [n for n, c in where.items() if not c]
        if host:
            dev = [n for n, c in where.items() if c]
            raise ValueError(
                f"{fn}: arrays are on different devices: {', '.join(dev)} on CUDA, {', '.join(host)} on the CPU"
            )
        return "cuda"
    return "cpu"


def prepare_out(fn: str, out, shape, dtype, name: str = "out", letters: str | None = None, inputs=()):
    """A C-contiguous buffer of ``shape``/``dtype`` for a kernel to write.

    ``out=None`` allocates.  A given ``out`` must have the shape (ValueError, naming the axes by
    ``letters``, e.g. ``"B,N,Hq,E"``, when given) and dtype (TypeError); when it is not C-contiguous, or
    may share memory with one of ``inputs`` (which the kernel still reads while it writes), the kernel
    writes a temporary that :func:`finish_out` copies back, as NumPy does for overlapping operands.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    shape = tuple(int(s) for s in shape)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray for CPU inputs; got {type(out).__name__}")
    if out.shape != shape:
        if letters:
            ls = _letters(letters)
            Shapes(fn, **dict(zip(ls, shape))).fail(name, out.shape, ls)
        Shapes(fn).fail(name, out.shape, [str(s) for s in shape])
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {out.dtype}; expected {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    if out.flags.c_contiguous and out.flags.aligned and \
            not any(x is not None and np.may_share_memory(out, x) for x in inputs):
        return out
    return np.empty(shape, dtype=dtype)


def finish_out(buf, out):
    """Copies a temporary result into the caller's non-contiguous ``out``; returns what to hand back."""
    if out is None or buf is out:
        return buf
    out[...] = buf
    return out


def check_choice(fn: str, name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def min_max(a):
    """(min, max) of a non-empty integer array.  For a short one (a decode step's (B,) kv_lens), Python's
    min and max over its list are several times faster than two NumPy reductions."""
    if a.size <= 32:
        v = a.ravel().tolist()
        return min(v), max(v)
    return int(a.min()), int(a.max())


MAX_COUNT = 1 << 62   # sizes and counts past this overflow the kernels' int64 arithmetic


def check_count(fn, name, val):
    """A non-negative integer argument: TypeError for another type (2.0, True), ValueError below 0 or
    above MAX_COUNT."""
    if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be a non-negative integer; got {type(val).__name__} {val!r}")
    if int(val) < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative integer; got {val!r}")
    if int(val) > MAX_COUNT:
        raise ValueError(f"{fn}: {name} must be at most 2**62; got {val!r}")
    return int(val)


def as_scale(fn: str, scale, default: float) -> float:
    if scale is None:
        return float(default)
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: scale must be a real number; got {type(scale).__name__}") from None
