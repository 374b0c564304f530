"""CUDA side of lmkern: zero-copy interop with any CUDA array, :class:`DeviceArray`, and the GPU kernels.

Built only when nvcc was found at install time (``lmkern._cuda``); importing lmkern never fails
because a GPU, a driver or the extension is absent (``available()`` is then False).

Using it
--------
The public functions (``lmkern.attention``, ``lmkern.rope``, ``lmkern.rope_``, ``lmkern.KVCache(...,
device="cuda")``) route here by themselves when their arrays live on a GPU.  Accepted arrays: PyTorch
tensors, CuPy arrays, JAX arrays, :class:`DeviceArray`, and anything else exposing
``__cuda_array_interface__`` or ``__dlpack__``/``__dlpack_device__`` on a CUDA device.

* **Zero copy.**  Pointer, shape, strides, dtype and device are read from the array: torch tensors
  through their own attributes (``data_ptr()``, ``stride()``: the same numbers as
  ``__cuda_array_interface__``, but also for bfloat16 and ``requires_grad`` tensors, where torch
  refuses the interface), then ``__cuda_array_interface__`` (CuPy, Numba, ...), then the DLPack capsule
  (JAX, ...) parsed in C without consuming it.
* **dtypes.**  float32, float16, bfloat16; all float inputs of one call in one dtype (else
  ``TypeError``), float32 accumulation and softmax statistics.  ``lse`` is returned in float32 (as
  FlashAttention does).  float64 is a ``TypeError`` on the GPU.
* **Devices.**  All arrays of a call on one GPU (else ``ValueError``); the kernel runs on that GPU
  whatever the current device is.
* **Outputs and scratch** come from the caller's own framework (``torch.empty``, ``cupy.empty``) so its
  caching allocator serves them; never a ``cudaMalloc`` per call.  JAX arrays are immutable, so JAX
  results are written into a :class:`DeviceArray` and handed to JAX through DLPack (zero-copy).
* **Stream.**  The caller's current stream (``torch.cuda.current_stream()``,
  ``cupy.cuda.get_current_stream()``), the legacy default stream for DeviceArray / JAX / others, or
  ``stream=`` (an int handle, a ``torch.cuda.Stream`` or a ``cupy.cuda.Stream``), or the stream set by
  ``with lmkern.cuda.use_stream(s):`` for calls made through the public lmkern functions.  Nothing is
  synchronized with the host, except: JAX and other DLPack-only results (the importer cannot be told
  about our stream), and scratch released after a call on an explicit stream that is not the
  framework's current stream (torch: ``record_stream``, no sync; others: the stream is synchronized).
* **Strided inputs.**  The kernels take (batch, token, head) strides, so only the feature axis must be
  contiguous; otherwise the input is copied with the caller's framework (``.contiguous()`` /
  ``cupy.ascontiguousarray``).  ``out=`` must be an array of the caller's type; a non-contiguous feature
  axis in ``out`` is written through a temporary and copied back.
* Index arrays (``q_pos``, ``kv_pos``, ``kv_lens``, ``positions``) may be host arrays (checked on the
  host, then uploaded with the caller's framework) or device arrays (used in place when int64 and
  contiguous).  Device ``kv_lens`` are not range-checked on the host (that would synchronize); the
  kernel clamps them to ``[0, M]``, so a wrong value never reads out of bounds.

Decisions where the SPEC is silent
----------------------------------
* ``lse`` is float32 whatever the input dtype (FlashAttention's convention); ``out`` has the inputs' dtype,
  rounded once from the float32 accumulator.
* No autograd: results of torch inputs with ``requires_grad`` are plain tensors (these are inference
  kernels).
* Reproducibility: no atomics anywhere, so results are bitwise reproducible for fixed inputs on one GPU
  model; the split-KV count depends on the number of SMs, so decode results may differ in the last
  bits between GPU models.
* Head dimensions D, E <= 256 (``ValueError`` beyond), any value below (no multiple-of-8 requirement:
  tails are zero-padded in shared memory; 16-byte loads are used when sizes, strides and alignment allow).
* ``KVCache(..., device="cuda")`` keeps ``lengths``/``positions`` on the host (bookkeeping, needed for
  the host-side checks) and mirrors the positions on the device for the kernel.

How to add a CUDA op (recipe for the family engineers)
------------------------------------------------------
1. **Params + declaration**: the ``lk_<op>_params`` struct in ``kernels/include/lmkern/<family>.h`` is
   shared with the CPU kernel.  Declare the launcher in the same header under
   ``#include "lmkern/cuda.h"`` (for ``lk_stream``)::

       lk_status lk_<op>_cuda(const lk_<op>_params *p, /* scratch pointers, if any */ lk_stream stream);

2. **Kernel**: ``kernels/cuda/<op>.cu`` (same name as ``kernels/cpu/<op>.c``), ``#include "common.cuh"``
   for ``lk::to_f``/``lk::from_f`` (f32/f16/bf16 conversion), ``lk::warp_sum``/``warp_max``, and end
   every launch with ``return lk::check_launch();``.  The launcher is ``extern "C"``, only enqueues on
   ``stream`` (no cudaMalloc, no synchronize), bounds-checks every tail, uses 64-bit indexing, and
   returns ``LK_ERR_VALUE`` / ``LK_ERR_DTYPE`` for what it does not support.  ``setup.py`` picks up
   every ``kernels/cuda/*.cu`` by itself.
3. **Binding**: fill the (empty) method table ``lk_cuda_<family>_methods`` in ``csrc/cuda/<family>.c``
   (already registered by ``csrc/cuda/module.c``).  Take keyword arguments: ``device``, ``stream``
   (int handle), ``dtype`` (name), sizes, device pointers as ints (None = NULL), strides as 3-tuples,
   with the converters and helpers of ``csrc/cuda/bindings.h`` (``lk_cu_ptr_arg``, ``lk_cu_strides3``,
   ``lk_cu_parse_dtype``; the pattern is written out there and in ``py_attention`` of module.c):
   check sizes (ValueError), then launch between ``lk_cu_guard_enter``/``lk_cu_guard_exit`` with the
   GIL released, and map errors with ``lk_cu_raise_cuda`` / ``lk_cu_raise_status``.
4. **Python**: in ``python/lmkern/<family>.py``, the public function calls ``_dispatch.route`` and, for
   "cuda", ``_cuda_<op>(...)``, which does (``attention`` below is the complete worked example)::

       from . import cuda
       st = cuda.stream_of(x, stream)                      # caller's current stream (int) or stream=
       xv = cuda.View.of(x, "x", fn, stream=st)            # ptr, shape, strides (elements), dtype, device
       wv = cuda.View.of(w, "w", fn, stream=st)            # contiguous="full" if the kernel needs it
       dtype = cuda.same_float_dtype(fn, x=xv, w=wv)       # TypeError on mixed / unsupported dtypes
       dev = cuda.same_device(fn, x=xv, w=wv)              # ValueError on mixed devices
       sh = _dispatch.Shapes(fn); sh.check("x", xv, "B,T,D")   # Views have .shape / .ndim
       iv, ihost = cuda.index_view(x, idx, "idx", fn, st)  # host (uploaded) or device int64 index array
       out = cuda.empty_like_caller(x, shape, dtype)       # allocated by the caller's framework
       ov = cuda.View.of(out, "out", fn)
       cuda._cuda.<op>(device=dev, stream=st, dtype=dtype, ..., x=xv.ptr, x_stride=xv.strides[:3],
                       idx=iv.ptr, out=ov.ptr)
       cuda.release_temps(x, st, xv, wv, iv)              # copies / uploads dropped after the launch
       return cuda.wrap_result(x, out, st)                 # caller's array type (JAX: via DLPack)

   Scratch: ``buf = cuda.empty_like_caller(x, (n,), "float32")``, pass ``cuda.View.of(buf, ...).ptr``,
   then ``cuda.release_scratch(x, buf, st)``.  ``cuda.to_host(a)`` copies a CUDA array to NumPy.
5. **Tests**: ``tests/test_<family>.py``: ``@requires_gpu`` tests against the reference twin with
   ``conftest.GPU_TOL[dtype]`` (feed the twin the dtype-rounded inputs), and glue tests that run
   without a GPU by extending ``FakeCuda`` in ``tests/test_cuda.py`` (a host-memory stand-in for
   ``lmkern._cuda`` that computes with the twin).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref

import numpy as np

from . import _dispatch

try:
    from . import _cuda
except ImportError as exc:  # built without CUDA
    _cuda = None
    _import_error = exc
else:
    _import_error = None

__all__ = [
    "available", "device_count", "config", "DeviceArray", "View", "attention", "rope", "use_stream",
    "synchronize", "stream_of", "empty_like_caller", "wrap_result", "index_view", "same_float_dtype",
    "same_device", "release_scratch", "release_temps",
]

GPU_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8}
_TYPESTR = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "uint8": "|u1"}
KDL_CUDA, KDL_CUDA_MANAGED = 2, 13


# ------------------------------------------------------------------------------------------------
# availability and configuration

def available() -> bool:
    """True when the CUDA extension was built and a GPU is visible."""
    return _cuda is not None and device_count() > 0


def device_count() -> int:
    if _cuda is None:
        return 0
    try:
        return int(_cuda.device_count())
    except Exception:
        return 0


def config() -> dict:
    """CUDA part of ``lmkern.show_config()``: compiled in, runtime/driver versions, visible GPUs."""
    info = {"CUDA compiled": _cuda is not None, "GPUs": device_count()}
    if _cuda is None:
        return info
    try:
        v = _cuda.versions()
        info["CUDA runtime"] = _fmt_version(v["runtime"])
        info["CUDA driver"] = _fmt_version(v["driver"]) if v["driver"] else "none"
    except Exception:
        pass
    for i in range(info["GPUs"]):
        try:
            p = _cuda.device_properties(i)
            info[f"GPU {i}"] = (f"{p['name']} (sm_{p['major']}{p['minor']}, {p['multiprocessors']} SMs, "
                                f"{p['total_memory'] / 2**30:.1f} GiB)")
        except Exception as exc:  # pragma: no cover - needs a GPU
            info[f"GPU {i}"] = f"unavailable ({exc})"
    return info


def _fmt_version(v):
    return f"{v // 1000}.{(v % 1000) // 10}"


def _require():
    if _cuda is None:
        raise RuntimeError(f"lmkern was built without CUDA support ({_import_error}); rebuild with nvcc on PATH")


# ------------------------------------------------------------------------------------------------
# streams

_local = threading.local()


@contextlib.contextmanager
def use_stream(stream):
    """``with lmkern.cuda.use_stream(s):`` lmkern GPU calls made in this thread run on ``s``."""
    prev = getattr(_local, "stream", None)
    _local.stream = stream
    try:
        yield
    finally:
        _local.stream = prev


def _stream_handle(stream) -> int:
    if isinstance(stream, bool):
        raise TypeError("stream must be an int handle or a torch/cupy stream object")
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):  # torch.cuda.Stream, cupy.cuda.Stream, others
        h = getattr(stream, attr, None)
        if isinstance(h, int):
            return h
    raise TypeError(f"stream must be an int handle or a torch/cupy stream object; got {type(stream).__name__}")


def stream_of(ref, stream=None) -> int:
    """The stream handle (int) a call with reference array ``ref`` runs on: ``stream`` if given, else the
    ``use_stream`` stream, else the current stream of ref's framework (legacy default stream 0 for
    DeviceArray, JAX and other arrays)."""
    if stream is None:
        stream = getattr(_local, "stream", None)
    if stream is not None:
        return _stream_handle(stream)
    return _current_stream(ref)


def _current_stream(ref) -> int:
    """The current stream of ref's framework (0, the legacy default stream, for other arrays)."""
    kind = _kind(ref)
    if kind == "torch":
        import torch
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)   # one C call, no Stream object
        dev = ref.get_device()
        if raw is not None and dev >= 0:
            return int(raw(dev))
        return int(torch.cuda.current_stream(ref.device).cuda_stream)
    if kind == "cupy":
        import cupy
        with cupy.cuda.Device(_device_of(ref)):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def synchronize(device=0, stream=None):
    """Waits for ``stream`` (or the whole device when None)."""
    _require()
    if stream is None:
        _cuda.synchronize(int(device))
    else:
        _cuda.synchronize(int(device), _stream_handle(stream))


# ------------------------------------------------------------------------------------------------
# DeviceArray: lmkern's own GPU array for NumPy-only users

class _Pool:
    """A small per-device free list of cudaMalloc blocks (sizes rounded up) for DeviceArray.

    Blocks are reused in allocation order; lmkern's own DeviceArray work runs on the legacy default
    stream, which orders it after work on every blocking stream, so reuse is safe there.  At most
    ``limit`` bytes are kept cached; ``empty_cache()`` frees them."""

    def __init__(self, limit=1 << 30):
        self.backend = _cuda  # the extension that allocated the cached blocks frees them
        self.lock = threading.Lock()
        self.free = {}
        self.cached = 0
        self.limit = limit

    @staticmethod
    def round(nbytes):
        if nbytes <= 512:
            return 512
        if nbytes <= 1 << 20:
            return 1 << (nbytes - 1).bit_length()
        return (nbytes + (1 << 20) - 1) & ~((1 << 20) - 1)

    def alloc(self, nbytes, device):
        size = self.round(nbytes)
        with self.lock:
            blocks = self.free.get((device, size))
            if blocks:
                self.cached -= size
                return blocks.pop(), size
        try:
            return self.backend.malloc(size, device), size
        except MemoryError:
            self.empty_cache()
            return self.backend.malloc(size, device), size

    def release(self, ptr, size, device):
        with self.lock:
            if self.cached + size <= self.limit:
                self.free.setdefault((device, size), []).append(ptr)
                self.cached += size
                return
        try:
            self.backend.free(ptr, device)
        except Exception:  # interpreter shutdown or a dead context: nothing useful to do
            pass

    def empty_cache(self):
        with self.lock:
            items, self.free, self.cached = self.free, {}, 0
        for (device, _), ptrs in items.items():
            for ptr in ptrs:
                try:
                    self.backend.free(ptr, device)
                except Exception:
                    pass


_pool = _Pool()


def empty_cache():
    """Frees the DeviceArray blocks lmkern keeps cached."""
    if _cuda is not None:
        _pool.empty_cache()


def _release_block(pool, ptr, size, device, last):
    """DeviceArray finalizer: waits for the array's last writer stream (unless it is the legacy default
    stream, which orders every later DeviceArray use), then returns the block to the cache."""
    if last[0] not in (0, 1):
        try:
            pool.backend.synchronize(device, last[0])
        except Exception:  # a stream destroyed by its owner has no pending work left
            pass
    pool.release(ptr, size, device)


def _bf16_from_f32(a):
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def _f32_from_bf16(bits):
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class DeviceArray:
    """A C-contiguous array in GPU memory, for users without a GPU framework.

    ``DeviceArray.from_numpy(a, device=0, dtype=None)`` uploads (dtype: float32, float16, bfloat16,
    int64, ...; default: a's dtype, float64 becomes float32); ``.numpy()`` downloads (bfloat16 comes back
    as float32, NumPy having no bfloat16); ``DeviceArray.empty(shape, dtype, device)``.  It speaks
    ``__dlpack__``/``__dlpack_device__`` and ``__cuda_array_interface__`` (not for bfloat16, which
    that interface cannot describe), so torch / CuPy / JAX can wrap it zero-copy, and every lmkern
    function accepts it.  Memory comes from a small per-device cache of cudaMalloc blocks."""

    __slots__ = ("ptr", "shape", "dtype", "device", "nbytes", "_size", "_last", "_finalizer", "__weakref__")

    def __init__(self, shape, dtype="float32", device=0):
        _require()
        n_dev = device_count()
        if n_dev == 0:
            raise RuntimeError("DeviceArray: no CUDA GPU is visible (no driver or no device)")
        if not 0 <= int(device) < n_dev:
            raise ValueError(f"DeviceArray: device must be in [0, {n_dev}); got {device}")
        dtype = _dtype_name(dtype)
        if dtype not in _ITEMSIZE:
            raise TypeError(f"DeviceArray: unsupported dtype {dtype}")
        self.shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"DeviceArray: negative dimension in shape {self.shape}")
        self.dtype = dtype
        self.device = int(device)
        n = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.nbytes = n * _ITEMSIZE[dtype]
        self.ptr, self._size = _pool.alloc(self.nbytes, self.device)
        # the stream that last wrote it: consumers' DLPack handshake, and the finalizer waits for it
        # before the block can be reused
        self._last = [0]
        self._finalizer = weakref.finalize(self, _release_block, _pool, self.ptr, self._size, self.device, self._last)

    @property
    def _stream(self):
        return self._last[0]

    @_stream.setter
    def _stream(self, stream):
        self._last[0] = int(stream)

    @classmethod
    def empty(cls, shape, dtype="float32", device=0):
        return cls(shape, dtype, device)

    @classmethod
    def from_numpy(cls, a, device=0, dtype=None):
        a = np.asarray(a)
        if dtype is None:
            dtype = "float32" if a.dtype == np.float64 else a.dtype.name
        dtype = _dtype_name(dtype)
        out = cls(a.shape, dtype, device)
        if dtype == "bfloat16":
            host = _bf16_from_f32(a.astype(np.float32))
        else:
            host = np.ascontiguousarray(a, dtype=np.dtype(dtype))
        _cuda.memcpy_htod(out.ptr, host, out.device)
        return out

    def numpy(self):
        """A host copy (synchronous; waits for the legacy default stream, and for the writer's stream)."""
        if self._stream not in (0, 1):
            _cuda.synchronize(self.device, self._stream)
        if self.dtype == "bfloat16":
            bits = np.empty(self.shape, np.uint16)
            _cuda.memcpy_dtoh(bits, self.ptr, self.device)
            return _f32_from_bf16(bits)
        host = np.empty(self.shape, np.dtype(self.dtype))
        _cuda.memcpy_dtoh(host, self.ptr, self.device)
        return host

    def copy(self):
        out = DeviceArray(self.shape, self.dtype, self.device)
        _cuda.memcpy_dtod(out.ptr, self.ptr, self.nbytes, self.device, self._stream)
        out._stream = self._stream
        return out

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return _ITEMSIZE[self.dtype]

    @property
    def strides(self):
        """Byte strides (C order), as NumPy reports them."""
        st, acc = [], self.itemsize
        for s in reversed(self.shape):
            st.append(acc)
            acc *= max(s, 1)
        return tuple(reversed(st))

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device=cuda:{self.device})"

    def __dlpack_device__(self):
        return (KDL_CUDA, self.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """A legacy "dltensor" capsule (accepted by every DLPack consumer); the capsule keeps this array
        alive.  ``stream``: the consumer's stream, made to wait for our last writer (no host sync)."""
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError("DeviceArray: cannot export to another device")
        if copy:
            raise BufferError("DeviceArray: copy=True is not supported")
        if stream is not None and stream != -1:
            consumer = 0 if stream == 1 else int(stream)  # 1: the legacy default stream (handle 0)
            if consumer != self._stream and not (consumer == 0 and self._stream in (0, 1)):
                _cuda.stream_wait(consumer, self._stream, self.device)
        return _cuda.dlpack_capsule(self, self.ptr, self.shape, self.dtype, self.device)

    @property
    def __cuda_array_interface__(self):
        if self.dtype not in _TYPESTR:
            raise AttributeError(f"__cuda_array_interface__ cannot describe {self.dtype}; use __dlpack__")
        return {"shape": self.shape, "typestr": _TYPESTR[self.dtype], "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None if self._stream in (0, 1) else self._stream}


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> str:
    """'float32', 'float16', 'bfloat16', 'int64', ... from a NumPy / torch / string dtype (memoized: it
    runs for every array of every call)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        pass
    name = _dtype_name_uncached(dtype)
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:   # unhashable dtype object
        pass
    return name


def _dtype_name_uncached(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    elif hasattr(dtype, "is_floating_point"):  # torch.dtype: "torch.bfloat16"
        name = str(dtype)
    else:
        try:
            return np.dtype(dtype).name
        except TypeError:
            name = str(getattr(dtype, "name", dtype))
    name = name.rsplit(".", 1)[-1]
    try:
        return np.dtype(name).name
    except TypeError:
        return name  # bfloat16 and other non-NumPy dtypes


# ------------------------------------------------------------------------------------------------
# views of caller arrays

def _kind(x) -> str:
    if isinstance(x, DeviceArray):
        return "devicearray"
    mod = type(x).__module__ or ""
    top = mod.split(".", 1)[0]
    if top == "torch":
        return "torch"
    if top == "cupy":
        return "cupy"
    if top in ("jax", "jaxlib"):
        return "jax"
    return "other"


def _device_of(x) -> int:
    kind = _kind(x)
    if kind == "devicearray":
        return x.device
    if kind == "torch":
        return max(int(x.get_device()), 0)
    if kind == "cupy":
        return int(x.device.id)
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        return int(dev()[1])
    return int(_cuda.current_device())


class View:
    """What a kernel needs of one array argument: ``ptr`` (int), ``shape``, ``strides`` (elements),
    ``dtype`` (name), ``device`` (int), ``kind`` (framework), ``obj`` (the array actually read: the
    caller's array or a contiguous copy of it), ``src`` (the caller's array).  Holding the View keeps
    the memory alive."""

    __slots__ = ("ptr", "shape", "strides", "dtype", "device", "kind", "obj", "src", "_keep")

    def __init__(self, ptr, shape, strides, dtype, device, kind, obj, src, keep=None):
        self.ptr, self.shape, self.strides, self.dtype = int(ptr), tuple(shape), tuple(strides), dtype
        self.device, self.kind, self.obj, self.src, self._keep = int(device), kind, obj, src, keep

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    def inner_contiguous(self):
        return not self.shape or self.shape[-1] <= 1 or self.strides[-1] == 1

    def c_contiguous(self):
        if any(s == 0 for s in self.shape):
            return True   # an empty array has no layout to get wrong
        expect = 1
        for s, st in zip(reversed(self.shape), reversed(self.strides)):
            if s > 1 and st != expect:
                return False
            expect *= s
        return True

    def span(self):
        """[lo, hi) byte addresses this view touches (empty arrays: an empty range)."""
        if self.size == 0:
            return self.ptr, self.ptr
        item = _ITEMSIZE.get(self.dtype, 1)
        lo = sum(min(0, (n - 1) * s) for n, s in zip(self.shape, self.strides))
        hi = sum(max(0, (n - 1) * s) for n, s in zip(self.shape, self.strides)) + 1
        return self.ptr + lo * item, self.ptr + hi * item

    def overlaps(self, other):
        """True when the two views' byte ranges intersect (a conservative test: interleaved views that
        share no element count too); None never overlaps."""
        if other is None or self.device != other.device:
            return False
        a0, a1 = self.span()
        b0, b1 = other.span()
        return a0 < b1 and b0 < a1

    def has_repeats(self):
        """True when two indices reach one element (a zero stride over an axis longer than 1)."""
        return any(n > 1 and s == 0 for n, s in zip(self.shape, self.strides))

    @classmethod
    def of(cls, x, name, fn, *, contiguous="inner", stream=None):
        """View of CUDA array ``x`` (argument ``name`` of ``fn``).  ``contiguous``: "inner" (feature axis
        contiguous; the default), "full" (C-contiguous) or None; arrays that are not are copied with
        their framework.  Non-CUDA arrays are a ValueError naming the argument."""
        _require()
        v = cls._raw(x, name, fn, stream)
        need = {"inner": v.inner_contiguous, "full": v.c_contiguous, None: lambda: True}[contiguous]
        if not need():
            c = _contiguous_copy(x, name, fn)
            v = cls._raw(c, name, fn, stream)
            v.src = x
            cur = _current_stream(x)
            if stream is not None and int(stream) != cur:  # the copy ran on the framework's stream
                _cuda.stream_wait(int(stream), cur, v.device)
        return v

    @classmethod
    def _raw(cls, x, name, fn, stream):
        kind = _kind(x)
        if kind == "devicearray":
            if stream is not None:   # our stream waits for the array's last writer (event, no host sync)
                mine, theirs = int(stream), int(x._stream)
                if mine != theirs and not (mine in (0, 1) and theirs in (0, 1)):
                    _cuda.stream_wait(mine, theirs, x.device)
            st = x.strides
            return cls(x.ptr, x.shape, tuple(s // x.itemsize for s in st), x.dtype, x.device, kind, x, x)
        if kind == "torch":
            if not x.is_cuda:
                raise ValueError(f"{fn}: {name} is a CPU tensor; expected a CUDA tensor (or pass NumPy arrays)")
            return cls(x.data_ptr(), tuple(x.shape), x.stride(), _dtype_name(x.dtype), x.get_device(), kind, x, x)
        cai = None
        try:
            cai = x.__cuda_array_interface__
        except Exception:
            cai = None
        if cai is not None:
            dtype = np.dtype(cai["typestr"]).name
            shape = tuple(int(s) for s in cai["shape"])
            item = np.dtype(cai["typestr"]).itemsize
            if cai.get("strides") is None:
                strides = _c_strides(shape)
            else:
                bst = tuple(int(s) for s in cai["strides"])
                if any(s % item for s in bst):
                    raise ValueError(f"{fn}: {name} has strides {bst} bytes, not a multiple of its itemsize")
                strides = tuple(s // item for s in bst)
            ptr = int(cai["data"][0]) if cai["data"][0] else 0
            dev = _device_of(x) if kind == "cupy" or hasattr(x, "__dlpack_device__") else _cai_device(ptr)
            theirs = cai.get("stream")
            # 0 and 1 both name the legacy default stream here (CAI uses 1; lmkern and CuPy's null stream, 0)
            same = theirs is None or stream is None or (int(theirs) in (0, 1) and int(stream) in (0, 1))
            if not same and int(theirs) != int(stream):
                # CAI v3: the producer's stream; make ours wait for it (event, no host sync)
                _cuda.stream_wait(int(stream), int(theirs), dev)
            return cls(ptr, shape, strides, dtype, dev, kind, x, x)
        if hasattr(x, "__dlpack__"):
            if hasattr(x, "__dlpack_device__"):
                dt, _ = x.__dlpack_device__()
                if int(dt) not in (KDL_CUDA, KDL_CUDA_MANAGED):
                    raise ValueError(f"{fn}: {name} is not on a CUDA device (DLPack device type {int(dt)})")
            cap = _dlpack_capsule(x, stream)
            try:
                info = _cuda.dlpack_info(cap)
            except ValueError as exc:
                raise ValueError(f"{fn}: {name}: {exc}") from None
            shape = info["shape"]
            strides = info["strides"] if info["strides"] is not None else _c_strides(shape)
            return cls(info["ptr"], shape, strides, info["dtype"], info["device_id"], kind, x, x, keep=cap)
        raise TypeError(f"{fn}: {name} of type {type(x).__name__} is not a CUDA array "
                        "(no __cuda_array_interface__ or __dlpack__)")


def _c_strides(shape):
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(st))


def _cai_device(ptr):
    """Device of a __cuda_array_interface__ pointer (the interface does not say which)."""
    if not ptr:
        return int(_cuda.current_device())
    return int(_cuda.pointer_device(ptr))


def _dlpack_capsule(x, stream):
    s = None if stream is None else (1 if int(stream) == 0 else int(stream))
    try:
        return x.__dlpack__(stream=s)
    except TypeError:
        return x.__dlpack__()


def _contiguous_copy(x, name, fn):
    kind = _kind(x)
    if kind == "torch":
        return x.contiguous()
    if kind == "cupy":
        import cupy
        return cupy.ascontiguousarray(x)
    if kind == "jax":
        import jax.numpy as jnp
        return jnp.array(x, copy=True)
    raise ValueError(f"{fn}: {name} is not contiguous and lmkern cannot copy a {type(x).__name__}; "
                     "pass a contiguous array")


# ------------------------------------------------------------------------------------------------
# the small internal API for CUDA ops

def same_float_dtype(fn, **views):
    """The one float dtype of the given Views (None values skipped); TypeError names the argument."""
    dtype, first = None, None
    for name, v in views.items():
        if v is None:
            continue
        if v.dtype not in GPU_FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {v.dtype}; expected float32, float16 or bfloat16 on the GPU")
        if dtype is None:
            dtype, first = v.dtype, name
        elif v.dtype != dtype:
            raise TypeError(f"{fn}: {name} has dtype {v.dtype} but {first} has dtype {dtype}; all GPU float "
                            "inputs of one call must share one dtype")
    return dtype or "float32"


def same_device(fn, **views):
    """The one device id of the given Views; arrays on different GPUs are a ValueError."""
    dev, first = None, None
    for name, v in views.items():
        if v is None:
            continue
        if dev is None:
            dev, first = v.device, name
        elif v.device != dev:
            raise ValueError(f"{fn}: arrays are on different devices: {first} on cuda:{dev}, {name} on cuda:{v.device}")
    return 0 if dev is None else dev


def empty_like_caller(ref, shape, dtype):
    """An uninitialized C-contiguous array of ``shape``/``dtype`` on ref's device, allocated by ref's
    framework (torch / CuPy caching allocators); DeviceArray for DeviceArray, JAX and other callers."""
    shape = tuple(int(s) for s in shape)
    dtype = _dtype_name(dtype)
    kind = _kind(ref)
    if kind == "torch":
        import torch
        return torch.empty(shape, dtype=getattr(torch, dtype), device=ref.device)
    if kind == "cupy":
        import cupy
        with cupy.cuda.Device(_device_of(ref)):
            return cupy.empty(shape, dtype=dtype)
    return DeviceArray(shape, dtype, _device_of(ref))


def _from_host(ref, host, stream):
    """Uploads a host NumPy array to ref's device with ref's framework (stream-ordered for torch)."""
    kind = _kind(ref)
    if kind == "torch":
        import torch
        t = torch.from_numpy(np.require(host, requirements=("C", "W")))
        if t.numel() == 0 or not torch.cuda.is_available():
            return t.to(ref.device)
        # pinned + non_blocking: the copy is queued on the current stream without stalling the host (a
        # pageable copy synchronizes the stream: one per decode step serialized host and GPU); torch keeps
        # the pinned block until the copy has run.  A kernel on another stream waits for it by event.
        dev = t.pin_memory().to(ref.device, non_blocking=True)
        if stream is not None:
            enter_stream(ref, stream, _device_of(ref))
        return dev
    if kind == "cupy":
        import cupy
        with cupy.cuda.Device(_device_of(ref)):
            arr = cupy.asarray(host)
            if stream is not None and int(stream) != _current_stream(ref):
                cupy.cuda.get_current_stream().synchronize()  # the kernel runs on another stream
            return arr
    return DeviceArray.from_numpy(host, _device_of(ref), dtype=host.dtype.name)


def index_view(ref, idx, name, fn, stream=None):
    """``(view, host)`` of an index argument: a host array (any integer dtype; returned as int64 NumPy in
    ``host`` for range checks) is uploaded with ref's framework; a device array is used in place when
    int64 and contiguous, else converted by its framework (``host`` is None).  None gives (None, None)."""
    if idx is None:
        return None, None
    if _dispatch.is_cuda(idx):
        v = View.of(idx, name, fn, contiguous="full", stream=stream)
        if v.dtype != "int64":
            if not v.dtype.startswith(("int", "uint")):
                raise TypeError(f"{fn}: {name} has dtype {v.dtype}; expected an integer dtype")
            kind = _kind(idx)
            if kind == "torch":
                import torch
                conv = idx.to(torch.int64).contiguous()
            elif kind in ("cupy", "jax"):
                conv = idx.astype("int64")
            else:
                raise TypeError(f"{fn}: {name} on the GPU must be int64 for a {type(idx).__name__}")
            v = View.of(conv, name, fn, contiguous="full")
            if stream is not None:   # the conversion ran on the framework's current stream
                enter_stream(conv, stream, v.device)
            v.src = idx
        return v, None
    host = _dispatch.index_array(fn, name, idx)
    host = np.ascontiguousarray(host)
    dev = _from_host(ref, host, stream)
    v = View.of(dev, name, fn, contiguous="full")
    v.src = idx
    return v, host


def wrap_result(ref, arr, stream=None):
    """Hands ``arr`` (made by :func:`empty_like_caller`) back as ref's array type: torch/CuPy/DeviceArray
    as is; JAX (and other DLPack-only callers) through DLPack after synchronizing ``stream`` (their
    importers cannot wait on our stream)."""
    kind = _kind(ref)
    if kind in ("torch", "cupy", "devicearray"):
        if isinstance(arr, DeviceArray) and stream is not None:
            arr._stream = int(stream)
        return arr
    if stream is not None:
        _cuda.synchronize(_device_of(arr), int(stream))
    if not isinstance(arr, DeviceArray):  # the caller's own out=
        return arr
    if kind == "jax":
        import jax.dlpack
        try:
            return jax.dlpack.from_dlpack(arr)
        except TypeError:  # older JAX takes the capsule
            return jax.dlpack.from_dlpack(arr.__dlpack__())
    ns = getattr(ref, "__array_namespace__", None)
    if ns is not None:
        try:
            return ns().from_dlpack(arr)
        except Exception:
            pass
    return arr


def enter_stream(ref, stream, device):
    """Call before launching on ``stream`` into buffers that ref's framework allocated on its current
    stream (outputs, scratch): when they differ, ``stream`` waits for the current stream (an event, no
    host sync), so a block just freed there and still read by queued work is not overwritten early.
    Pair with :func:`release_scratch` on every such buffer after the launch."""
    cur = _current_stream(ref)
    if int(stream) != cur and not (int(stream) in (0, 1) and cur in (0, 1)):
        _cuda.stream_wait(int(stream), cur, device)


def release_temps(ref, stream, *views):
    """:func:`release_scratch` on every temporary behind ``views`` (None skipped): a contiguous copy made
    by :meth:`View.of`, an index array uploaded or converted by :func:`index_view` (``view.obj`` is not
    the caller's ``view.src``).  Call after the launches that read them."""
    for v in views:
        if v is not None and getattr(v, "obj", None) is not None and v.obj is not v.src:
            release_scratch(ref, v.obj, stream)


def release_scratch(ref, buf, stream):
    """Call after enqueueing work that reads/writes ``buf`` on ``stream``; makes dropping ``buf`` safe.

    On the framework's own current stream nothing is needed (caching allocators are stream-ordered).
    On another stream: torch marks the block busy on that stream (``record_stream``); otherwise the
    stream is synchronized."""
    if buf is None or int(stream) == _current_stream(ref):
        return
    if _kind(ref) == "torch":
        import torch
        buf.record_stream(torch.cuda.ExternalStream(int(stream), device=ref.device))
        return
    _cuda.synchronize(_device_of(ref), int(stream))


def _copy_into(dst, src, stream):
    """dst[...] = src with the framework of dst (both the same kind, same shape), on ``stream``."""
    kind = _kind(dst)
    if kind == "torch":
        with _torch_stream(stream, dst):
            dst.copy_(src)
    elif kind == "cupy":
        with _cupy_stream(stream, dst):
            dst[...] = src
    else:
        raise ValueError("out must have a contiguous last axis for this array type")


def to_host(x):
    """A NumPy copy of a CUDA array (torch / CuPy / DeviceArray / DLPack); other objects pass through."""
    if not _dispatch.is_cuda(x):
        return x
    kind = _kind(x)
    if kind == "devicearray":
        return x.numpy()
    if kind == "torch":
        import torch
        if x.dtype == torch.bfloat16:   # NumPy has no bfloat16: widen (exactly) to float32
            x = x.float()
        return x.detach().cpu().numpy()
    if kind == "cupy":
        return x.get()
    if kind == "jax":
        return np.asarray(x)
    raise TypeError(f"cannot copy a {type(x).__name__} to the host")


_ShapeOnly = _dispatch.ShapeOnly   # stands in for a device array in the host-side shape checks


# ------------------------------------------------------------------------------------------------
# attention

def check_out(fn, out, ref_view, shape, dtype, name="out", ref_name="q"):
    """View of a caller's ``out=`` (any strides; None for None): the array type of the inputs (JAX arrays
    are immutable: TypeError), ``shape``, ``dtype`` and the device of ``ref_view`` (argument ``ref_name``)."""
    if out is None:
        return None
    if _kind(out) != ref_view.kind:
        raise TypeError(f"{fn}: {name} is a {type(out).__name__}; expected the inputs' array type "
                        f"({type(ref_view.src).__name__})")
    if ref_view.kind == "jax":
        raise TypeError(f"{fn}: JAX arrays are immutable; call without {name}=")
    ov = View.of(out, name, fn, contiguous=None)
    if ov.shape != tuple(shape):
        _dispatch.Shapes(fn).fail(name, ov.shape, [str(s) for s in shape])
    if ov.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {ov.dtype}; expected {dtype}")
    if ov.device != ref_view.device:
        raise ValueError(f"{fn}: arrays are on different devices: {ref_name} on cuda:{ref_view.device}, "
                         f"{name} on cuda:{ov.device}")
    return ov


_check_out = check_out


def itemsize_of(fn, dtype, name="x"):
    """Bytes per element of a GPU array's dtype (any NumPy dtype: copies need no arithmetic)."""
    size = _ITEMSIZE.get(dtype)
    if size is None:
        try:
            size = np.dtype(dtype).itemsize
        except TypeError:
            raise TypeError(f"{fn}: {name} has dtype {dtype}, which lmkern cannot copy on the GPU") from None
    return size


def attention(q, k, v, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None, return_lse=False,
              out=None, stream=None, prefix_k=None, prefix_v=None, P=1, fn="attention"):
    """GPU attention (SPEC 1.1), called by ``lmkern.attention`` for CUDA arrays; same arguments plus
    ``stream=`` and the ParScale prefix (``prefix_k (P,L,Hkv,D)``, ``prefix_v (P,L,Hkv,E)``, rows per
    stream ``B // P``), used by ``lmkern.parscale.prefix_attention``.

    Kernels (kernels/cuda/attention.cu): f16/bf16 with N >= 16 on tensor cores (mma.sync m16n8k16,
    FlashAttention-2 tiling, P kept in registers); float32 with N >= 16 on CUDA cores with K/V tiles
    in shared memory (float32 throughout: no TF32); decode (N < 16, any dtype) one warp per query row,
    split over the keys (split-KV, float32 partials, max-stabilized merge) when B*N*Hq is too small
    to fill the GPU.  D, E <= 256 (ValueError beyond).
    ``lse`` is float32.  Returns ``out`` [and ``lse``] as the inputs' array type, on their device."""
    _require()
    if _dispatch.route(fn, q=q, k=k, v=v, out=out, prefix_k=prefix_k, prefix_v=prefix_v) != "cuda":
        raise ValueError(f"{fn}: lmkern.cuda.attention needs CUDA arrays; use lmkern.attention for host arrays")
    st = stream_of(q, stream)
    qv = View.of(q, "q", fn, stream=st)
    kv = View.of(k, "k", fn, stream=st)
    vv = View.of(v, "v", fn, stream=st)
    pkv = View.of(prefix_k, "prefix_k", fn, contiguous="full", stream=st) if prefix_k is not None else None
    pvv = View.of(prefix_v, "prefix_v", fn, contiguous="full", stream=st) if prefix_v is not None else None
    if (pkv is None) != (pvv is None):
        raise ValueError(f"{fn}: prefix_k and prefix_v must be given together")
    dtype = same_float_dtype(fn, q=qv, k=kv, v=vv, prefix_k=pkv, prefix_v=pvv)
    dev = same_device(fn, q=qv, k=kv, v=vv, prefix_k=pkv, prefix_v=pvv)
    for name, vw in (("k", kv), ("v", vv)):
        if vw.kind != qv.kind:
            raise TypeError(f"{fn}: {name} is a {type(vw.src).__name__} but q is a {type(qv.src).__name__}; "
                            "pass arrays of one framework")

    def host_or_proxy(idx, name):
        view, host = index_view(q, idx, name, fn, st)
        if view is None:
            return None, None
        if view.device != dev:
            raise ValueError(f"{fn}: arrays are on different devices: q on cuda:{dev}, {name} on cuda:{view.device}")
        return view, (host if host is not None else _ShapeOnly(view.shape))

    qpos_v, qpos_c = host_or_proxy(q_pos, "q_pos")
    kvpos_v, kvpos_c = host_or_proxy(kv_pos, "kv_pos")
    lens_v, lens_c = host_or_proxy(kv_lens, "kv_lens")
    from ._attention import check_attention_args
    sh = check_attention_args(fn, qv, kv, vv, qpos_c, kvpos_c,
                              lens_c if not isinstance(lens_c, _ShapeOnly) else None,
                              pkv, pvv, P if pkv is not None else None)
    if isinstance(lens_c, _ShapeOnly):
        sh.check("kv_lens", lens_c, "B")
    B, N, M, Hq, Hkv, D, E = (sh[x] for x in ("B", "N", "M", "Hq", "Hkv", "D", "E"))
    maxd = _cuda.max_head_dim
    if D > maxd or E > maxd:
        raise ValueError(f"{fn}: head dimensions D = {D}, E = {E} exceed {maxd}, the largest the CUDA kernels "
                         "support")
    L = sh.get("L", 0) if pkv is not None else 0
    if pkv is not None and (P < 1 or B % P):
        raise ValueError(f"{fn}: the batch P*B = {B} is not divisible by P = {P}")
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)

    ov = _check_out(fn, out, qv, (B, N, Hq, E), dtype)
    if ov is not None and ov.inner_contiguous():
        res = out
        resv = ov
    else:
        res = empty_like_caller(q, (B, N, Hq, E), dtype)
        resv = View.of(res, "out", fn)
    lse = empty_like_caller(q, (B, N, Hq), "float32") if return_lse else None
    lsev = View.of(lse, "lse", fn) if lse is not None else None

    kw = dict(device=dev, stream=st, dtype=dtype, B=B, N=N, M=M, Hq=Hq, Hkv=Hkv, D=D, E=E,
              q=qv.ptr, q_stride=qv.strides[:3], k=kv.ptr, k_stride=kv.strides[:3], v=vv.ptr,
              v_stride=vv.strides[:3], out=resv.ptr, out_stride=resv.strides[:3],
              lse=lsev.ptr if lsev is not None else None,
              q_pos=qpos_v.ptr if qpos_v is not None else None,
              q_pos_bstride=N if qpos_v is not None and qpos_v.ndim == 2 else 0,
              kv_pos=kvpos_v.ptr if kvpos_v is not None else None,
              kv_pos_bstride=M if kvpos_v is not None and kvpos_v.ndim == 2 else 0,
              kv_lens=lens_v.ptr if lens_v is not None else None, causal=bool(causal), scale=scale,
              prefix_k=pkv.ptr if pkv is not None else None, prefix_v=pvv.ptr if pvv is not None else None,
              prefix_len=L, prefix_rows=max(B // P, 1) if pkv is not None else 1)
    splits, scratch_floats = _cuda.attention_plan(**kw)
    scratch = empty_like_caller(q, (scratch_floats,), "float32") if splits > 1 else None
    kw["num_splits"] = splits
    kw["scratch"] = View.of(scratch, "scratch", fn).ptr if scratch is not None else None
    enter_stream(q, st, dev)
    _cuda.attention(**kw)
    for buf in (scratch, lse, res if res is not out else None):
        release_scratch(q, buf, st)
    # copies of the inputs and uploaded index arrays are dropped when this call returns: stream-safe too
    release_temps(q, st, qv, kv, vv, pkv, pvv, qpos_v, kvpos_v, lens_v)
    if res is not out and out is not None:
        _copy_into(out, res, st)
        res = out
    res = wrap_result(q, res, st)
    if return_lse:
        return res, wrap_result(q, lse, st)
    return res


# ------------------------------------------------------------------------------------------------
# rope

def rope(x, positions, *, base=10000.0, rotary_dim=None, style="half", inverse=False, out=None, stream=None,
         fn="rope"):
    """GPU RoPE (SPEC 1.2), called by ``lmkern.rope`` / ``lmkern.rope_`` (``out=x``) for CUDA arrays.

    Angles in double precision on the device; rotation in float32, rounded once to x's dtype.
    ``out`` may be ``x`` (in place).  Returns ``out`` as x's array type."""
    _require()
    if _dispatch.route(fn, x=x, out=out) != "cuda":
        raise ValueError(f"{fn}: lmkern.cuda.rope needs CUDA arrays; use lmkern.rope for host arrays")
    if out is not None and _kind(out) == "jax":
        raise TypeError(f"{fn}: JAX arrays are immutable; use lmkern.rope (not rope_ or out=) with JAX")
    st = stream_of(x, stream)
    xv = View.of(x, "x", fn, contiguous=None, stream=st)
    dtype = same_float_dtype(fn, x=xv)
    pos_v, pos_host = index_view(x, positions, "positions", fn, st)
    if pos_v is None:
        raise ValueError(f"{fn}: positions is required")
    if pos_v.device != xv.device:
        raise ValueError(f"{fn}: arrays are on different devices: x on cuda:{xv.device}, positions on cuda:{pos_v.device}")
    from ._attention import check_rope_args
    r = check_rope_args(fn, xv, pos_host if pos_host is not None else _ShapeOnly(pos_v.shape), rotary_dim, style)
    B, T, G, D = xv.shape
    # x copied to a contiguous feature axis when it is not (on the framework's stream; View.of makes st wait)
    src = xv if xv.inner_contiguous() else View.of(x, "x", fn, stream=st)
    enter_stream(x, st, xv.device)   # the copies below and the kernel write on st
    if out is None:
        target = empty_like_caller(x, xv.shape, dtype)
        tv = View.of(target, "out", fn)
        _copy_rows(src, tv, st, fn)
        res = target
    else:
        ov = _check_out(fn, out, xv, xv.shape, dtype)
        if ov.inner_contiguous():
            target, tv = out, ov
            if ov.ptr != xv.ptr or ov.strides != xv.strides:
                _copy_rows(src, tv, st, fn)
        else:
            target = empty_like_caller(x, xv.shape, dtype)
            tv = View.of(target, "out", fn)
            _copy_rows(src, tv, st, fn)
        res = target
    _cuda.rope(device=xv.device, stream=st, dtype=dtype, B=B, T=T, G=G, D=D, x=tv.ptr, x_stride=tv.strides[:3],
               positions=pos_v.ptr, pos_bstride=T if pos_v.ndim == 2 else 0, rotary_dim=r, base=float(base),
               interleaved=style == "interleaved", inverse=bool(inverse))
    release_temps(x, st, src, pos_v)
    if res is not out and res is not x:
        release_scratch(x, res, st)
    if out is not None and res is not out:
        _copy_into(out, res, st)
        res = out
    return wrap_result(x, res, st)


def _copy_rows(src, dst, stream, fn):
    """dst[...] = src for two Views of one shape (any rank) whose last axes are contiguous (row by row
    when strided; one copy when both are C-contiguous)."""
    if src.size == 0:
        return
    item = _ITEMSIZE[src.dtype]
    if src.c_contiguous() and dst.c_contiguous():
        _cuda.memcpy_dtod(dst.ptr, src.ptr, src.size * item, dst.device, stream)
        return
    if src.kind == dst.kind and src.kind in ("torch", "cupy"):
        _copy_into(dst.obj, src.obj, stream)
        return
    D = src.shape[-1]
    for lead in np.ndindex(*src.shape[:-1]):   # one copy per row of the feature axis
        so = sum(i * st for i, st in zip(lead, src.strides)) * item
        do = sum(i * st for i, st in zip(lead, dst.strides)) * item
        _cuda.memcpy_dtod(dst.ptr + do, src.ptr + so, D * item, dst.device, stream)


@contextlib.contextmanager
def _cupy_stream(stream, ref):
    import cupy
    with cupy.cuda.Device(_device_of(ref)):
        if int(cupy.cuda.get_current_stream().ptr) == int(stream):
            yield
            return
        with cupy.cuda.ExternalStream(int(stream)):
            yield


@contextlib.contextmanager
def _torch_stream(stream, ref):
    import torch
    cur = torch.cuda.current_stream(ref.device)
    if int(cur.cuda_stream) == int(stream):
        yield
        return
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream), device=ref.device)):
        yield


# ------------------------------------------------------------------------------------------------
# KVCache on the GPU

def parse_device(device):
    """None/'cpu' -> None; 'cuda', 'cuda:1', 1, torch.device('cuda', 1) -> the GPU index."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cpu":
        return None
    if text == "cuda":
        return 0 if isinstance(device, str) else int(getattr(device, "index", None) or 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


def cache_buffer(shape, dtype, device):
    """A device buffer for a cache that lives across calls and streams: a zero-filled torch tensor when
    torch sees the GPU (the fill is waited for here, so work on any stream finds it done), else an
    uninitialized :class:`DeviceArray` (the kernels never read a slot that was not written)."""
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError
    except ImportError:
        return DeviceArray(shape, dtype, device)
    t = torch.zeros(shape, dtype=getattr(torch, dtype), device=torch.device("cuda", device))
    torch.cuda.current_stream(t.device).synchronize()
    return t


class RowStorage:
    """Preallocated token-major GPU buffers ``(batch, max_len, *tail)`` of one float dtype, filled row by
    row: the GPU half of the caches (``lmkern.KVCache``, ``lmkern.tpa.KVCache`` with ``device="cuda"``).
    Buffers are torch tensors when torch sees the GPU, else :class:`DeviceArray`; lengths (and positions)
    stay host bookkeeping in the cache.  ``write`` copies new tokens device to device on the inputs'
    stream, only into slots past every row's previous length, so kernels still reading the old contents
    are never disturbed."""

    def __init__(self, fn, batch, max_len, tails, device, dtype):
        _require()
        if device >= device_count():
            raise ValueError(f"{fn}: device cuda:{device} is not visible ({device_count()} GPUs)")
        self.fn, self.device, self.batch, self.max_len = fn, device, int(batch), int(max_len)
        self.dtype = _dtype_name(dtype) if dtype is not None else "float32"
        if self.dtype not in GPU_FLOAT_DTYPES:
            raise TypeError(f"{fn}: dtype must be float32, float16 or bfloat16 on the GPU; got {self.dtype}")
        self.buf = {name: cache_buffer((self.batch, self.max_len) + tuple(tail), self.dtype, device)
                    for name, tail in tails.items()}

    @property
    def itemsize(self):
        return _ITEMSIZE[self.dtype]

    def check_new(self, fn, arrays, specs, **bound):
        """C-contiguous views of the new tokens ``arrays`` (name -> CUDA array, shapes ``specs`` with
        letters B, T and ``bound``) after device / dtype / shape checks; returns (T, views)."""
        if not all(_dispatch.is_cuda(a) for a in arrays.values()):
            raise ValueError(f"{fn}: arrays are on different devices: the cache is on cuda:{self.device}, "
                             f"{', '.join(arrays)} must be CUDA arrays too")
        views = {name: View.of(a, name, fn, contiguous="full") for name, a in arrays.items()}
        dtype = same_float_dtype(fn, **views)
        if dtype != self.dtype:
            raise TypeError(f"{fn}: {next(iter(arrays))} has dtype {dtype}; the cache holds {self.dtype}")
        dev = same_device(fn, **views)
        if dev != self.device:
            raise ValueError(f"{fn}: arrays are on different devices: {next(iter(arrays))} on cuda:{dev}, "
                             f"the cache on cuda:{self.device}")
        sh = _dispatch.Shapes(fn, B=self.batch, **bound)
        for name, v in views.items():
            sh.check(name, v, specs[name])
        return sh["T"], views

    def write(self, views, lens, starts, st):
        """Row b's first lens[b] new tokens of every buffer to slots [starts[b], starts[b] + lens[b])."""
        if views:   # contiguous copies of the inputs were made on the framework's current stream
            enter_stream(next(iter(views.values())).src, st, self.device)
        for name, src in views.items():
            dst = View.of(self.buf[name], name, self.fn, contiguous="full")
            row = int(np.prod(src.shape[2:], dtype=np.int64)) * self.itemsize
            T = src.shape[1]
            for b in range(self.batch):
                n, start = int(lens[b]), int(starts[b])
                if n and row:
                    _cuda.memcpy_dtod(dst.ptr + (b * self.max_len + start) * row, src.ptr + b * T * row,
                                      n * row, self.device, st)

    def finish(self, src, st):
        """After the copies: the caller may drop its inputs now (their allocator is ordered on the
        framework's current stream; another stream is synchronized)."""
        if st != _current_stream(src):
            _cuda.synchronize(self.device, st)

    def filled(self, name, n):
        """buffer[:, :n]: a view for torch, a copy for DeviceArray."""
        a = self.buf[name]
        return _slice_tokens(a, n) if isinstance(a, DeviceArray) else a[:, :n]


class KVCacheStorage(RowStorage):
    """The GPU half of ``lmkern.KVCache(..., device="cuda")``: k/v buffers (:class:`RowStorage`) and a
    device mirror of the host positions for the kernel; ``attend`` is :func:`attention` with
    ``kv_lens``/``kv_pos`` of the cache."""

    def __init__(self, cache, device, dtype):
        c = self.cache = cache
        super().__init__("KVCache", c.batch, c.max_len, {"k": (c.kv_heads, c.head_dim),
                                                          "v": (c.kv_heads, c.v_head_dim)}, device, dtype)
        self.k, self.v = self.buf["k"], self.buf["v"]
        self.pos = cache_buffer((c.batch, c.max_len), "int64", device)

    def check_append(self, k, v):
        """Views of the new k (B,T,Hkv,D) and v (B,T,Hkv,E) after dtype / device / shape checks; (T, views)."""
        c = self.cache
        T, views = self.check_new("KVCache.append", {"k": k, "v": v}, {"k": "B,T,Hkv,D", "v": "B,T,Hkv,E"},
                                  Hkv=c.kv_heads, D=c.head_dim, E=c.v_head_dim)
        return T, (views["k"], views["v"])

    def commit(self, views, lens, starts, host_pos, stream=None):
        """Copies row b's first lens[b] tokens to [starts[b], starts[b] + lens[b]) (device to device, on the
        inputs' stream) and the positions of those tokens (host_pos, already updated) to the device mirror
        (ordered on the same stream)."""
        c = self.cache
        kv_, vv_ = views
        st = stream_of(kv_.src, stream)
        self.write({"k": kv_, "v": vv_}, lens, starts, st)
        pdst = View.of(self.pos, "positions", "KVCache.append", contiguous="full")
        for b in range(c.batch):
            n, start = int(lens[b]), int(starts[b])
            if n:
                row = np.ascontiguousarray(host_pos[b, start:start + n], dtype=np.int64)
                _cuda.memcpy_htod(pdst.ptr + (b * c.max_len + start) * 8, row, self.device, st)
        self.finish(kv_.src, st)

    def filled(self, n):
        """k, v views over the first n tokens (torch: views; DeviceArray: copies)."""
        return super().filled("k", n), super().filled("v", n)


def _slice_tokens(a, n):
    """A DeviceArray copy of a[:, :n] for a (B, S, ...) DeviceArray."""
    B, S = a.shape[0], a.shape[1]
    out = DeviceArray((B, n) + a.shape[2:], a.dtype, a.device)
    row = int(np.prod(a.shape[2:], dtype=np.int64)) * a.itemsize
    for b in range(B):
        if n and row:
            _cuda.memcpy_dtod(out.ptr + b * n * row, a.ptr + b * S * row, n * row, a.device, a._stream)
    out._stream = a._stream
    return out
