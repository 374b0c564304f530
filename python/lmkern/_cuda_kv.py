"""CUDA side of lmkern.kv quantization (SPEC 4.1) and the GPU KIVI cache (SPEC 4.2).

Imported lazily by the CUDA routes of :mod:`lmkern.kv` (``quantize``, ``dequantize``,
``QuantizedKVCache(..., device="cuda")``); kernels in ``kernels/cuda/kv_quant.cu`` and ``kv_attend.cu``.

* ``quantize(x)`` of a CUDA array returns a :class:`~lmkern.kv.QuantizedTensor` whose ``codes`` (uint8),
  ``scale`` and ``zero`` (float32) are device arrays of the caller's framework, laid out exactly as on
  the CPU; ``qt.dtype`` is x's dtype (float32, float16 or ``"bfloat16"``).  Codes, scales and zeros are
  computed with the CPU kernel's double-precision formula, so for float32 input they equal the CPU's
  bit for bit (float16/bfloat16 input: the CPU's result for the exactly widened values).
* ``dequantize(qt)`` of such a tensor returns ``x_hat`` in ``qt.dtype`` (float32 for a dtype the GPU
  does not take), rounded once from the double-precision ``code * scale + zero`` (bitwise the CPU's for
  float32).
* The GPU cache keeps every buffer on the device (torch tensors when torch sees a GPU, else
  :class:`lmkern.cuda.DeviceArray`): codes, scales and zeros as on the CPU, and the full-precision
  tokens in float32 rings (token j in slot ``j % capacity``, so no token is ever moved); its length,
  boundary and position bookkeeping stays on the host (as ``lmkern.KVCache(device="cuda")``), with a
  device mirror of the positions.  ``append`` takes CUDA k, v (float32/float16/bfloat16, stored as
  float32) and enqueues three kernels on the inputs' stream; ``attend`` takes a CUDA q and returns
  ``out`` in q's dtype and ``lse`` in float32 (the GPU convention of :func:`lmkern.cuda.attention`).
  Append and attend calls on one cache are ordered by their streams: use one stream per cache (or
  synchronize) when several are involved.
"""
from __future__ import annotations

import numpy as np

from . import _dispatch, cuda
from ._kvbase import QuantizedTensor, check_quantize_shape, check_quantized
from ._kvcache import check_room, ragged_lengths


def _full_view(x, name, fn, st):
    """View of a C-contiguous x (copied when it is not); zero-sized arrays are taken as they are (they may
    report any strides and are never read)."""
    v = cuda.View.of(x, name, fn, contiguous=None, stream=st)
    if v.size and not v.c_contiguous():
        v = cuda.View.of(x, name, fn, contiguous="full", stream=st)
    return v


# ------------------------------------------------------------------------------------------------ 4.1

def quantize(x, bits, group_size, axis, fn="kv.quantize"):
    """GPU :func:`lmkern.kv.quantize` (same arguments and errors)."""
    cuda._require()
    st = cuda.stream_of(x)
    xv = _full_view(x, "x", fn, st)
    dtype = cuda.same_float_dtype(fn, x=xv)
    bits, G, axis = check_quantize_shape(fn, xv, bits, group_size, axis)
    B, T, H, D = xv.shape
    per = 8 // bits
    if axis == "token":
        cshape, sshape = (B, T, H, D // per), (B, T, H, D // G)
    else:
        cshape, sshape = (B, T // per, H, D), (B, T // G, H, D)
    codes = cuda.empty_like_caller(x, cshape, "uint8")
    scale = cuda.empty_like_caller(x, sshape, "float32")
    zero = cuda.empty_like_caller(x, sshape, "float32")
    if xv.size:
        cuda.enter_stream(x, st, xv.device)   # codes / scale / zero come from the framework's current stream
        cuda._cuda.kv_quantize(device=xv.device, stream=st, dtype=dtype, B=B, T=T, H=H, D=D, G=G, bits=bits,
                               channel=axis == "channel", x=xv.ptr, codes=cuda.View.of(codes, "codes", fn).ptr,
                               scale=cuda.View.of(scale, "scale", fn).ptr, zero=cuda.View.of(zero, "zero", fn).ptr)
    for buf in (codes, scale, zero):
        cuda.release_scratch(x, buf, st)
    cuda.release_temps(x, st, xv)
    return QuantizedTensor(cuda.wrap_result(x, codes, st), cuda.wrap_result(x, scale, st),
                           cuda.wrap_result(x, zero, st), bits=bits, group_size=G, axis=axis, shape=xv.shape,
                           dtype=dtype)


def dequantize(qt, fn="kv.dequantize"):
    """GPU :func:`lmkern.kv.dequantize` of a QuantizedTensor whose arrays live on one GPU."""
    cuda._require()
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{fn}: qt must be a QuantizedTensor; got {type(qt).__name__}")
    _dispatch.route(fn, codes=qt.codes, scale=qt.scale, zero=qt.zero)  # ValueError when some are on the host
    check_quantized(fn, qt, dtype_of=lambda a: cuda._dtype_name(a.dtype))
    ref = qt.codes
    st = cuda.stream_of(ref)
    cv = _full_view(qt.codes, "qt.codes", fn, st)
    sv = _full_view(qt.scale, "qt.scale", fn, st)
    zv = _full_view(qt.zero, "qt.zero", fn, st)
    dev = cuda.same_device(fn, codes=cv, scale=sv, zero=zv)
    name = cuda._dtype_name(qt.dtype)
    dtype = name if name in cuda.GPU_FLOAT_DTYPES else "float32"
    B, T, H, D = qt.shape
    out = cuda.empty_like_caller(ref, qt.shape, dtype)
    if B * T * H * D:
        cuda.enter_stream(ref, st, dev)
        cuda._cuda.kv_dequantize(device=dev, stream=st, dtype=dtype, B=B, T=T, H=H, D=D, G=qt.group_size,
                                 bits=qt.bits, channel=qt.axis == "channel", x=cuda.View.of(out, "out", fn).ptr,
                                 codes=cv.ptr, scale=sv.ptr, zero=zv.ptr)
    cuda.release_scratch(ref, out, st)
    cuda.release_temps(ref, st, cv, sv, zv)
    return cuda.wrap_result(ref, out, st)


# ------------------------------------------------------------------------------------------------ 4.2

class QuantizedCacheStorage:
    """The GPU half of ``lmkern.kv.QuantizedKVCache(..., device="cuda")`` (layout in lmkern/kv.h)."""

    def __init__(self, cache, device):
        cuda._require()
        fn = cache.fn
        if device >= cuda.device_count():
            raise ValueError(f"{fn}: device cuda:{device} is not visible ({cuda.device_count()} GPUs)")
        c = cache
        B, S, H, D, E, G = c.batch, c.max_len, c.kv_heads, c.head_dim, c.v_head_dim, c.group_size
        maxd = cuda._cuda.max_head_dim
        if D > maxd or E > maxd:
            raise ValueError(f"{fn}: head dimensions D = {D}, E = {E} exceed {maxd}, the largest the CUDA kernels "
                             "support")
        per = 8 // c.bits
        self.cache, self.device = c, int(device)
        self.k_groups = -(-S // G)
        self.k_res_cap = min(S, c.residual + G)
        self.v_res_cap = min(S, c.residual)
        z = lambda shape, dt="float32": cuda.cache_buffer(shape, dt, self.device)  # noqa: E731
        self.k_codes = z((B, H, self.k_groups, D, G // per), "uint8")
        self.k_scale = z((B, H, self.k_groups, D))
        self.k_zero = z((B, H, self.k_groups, D))
        self.k_res = z((B, H, self.k_res_cap, D))
        self.v_codes = z((B, H, S, E // per), "uint8")
        self.v_scale = z((B, H, S, E // G))
        self.v_zero = z((B, H, S, E // G))
        self.v_res = z((B, H, self.v_res_cap, E))
        self.pos = z((B, S), "int64")

    def _ptrs(self, fn):
        names = ("k_codes", "k_scale", "k_zero", "k_res", "v_codes", "v_scale", "v_zero", "v_res")
        # our own C-contiguous buffers (no contiguity check: zero-sized ones may report odd strides)
        return {n: cuda.View.of(getattr(self, n), n, fn, contiguous=None).ptr for n in names}

    def _geometry(self):
        c = self.cache
        return dict(G=c.group_size, S=c.max_len, k_groups=self.k_groups, k_res_cap=self.k_res_cap,
                    v_res_cap=self.v_res_cap, bits=c.bits, D=c.head_dim, E=c.v_head_dim)

    def append(self, k, v, positions=None, lengths=None):
        fn = self.cache.fn + ".append"
        c = self.cache
        if not (_dispatch.is_cuda(k) and _dispatch.is_cuda(v)):
            raise ValueError(f"{fn}: arrays are on different devices: the cache is on cuda:{self.device}, "
                             "k and v must be CUDA arrays too")
        st = cuda.stream_of(k)
        kv_ = cuda.View.of(k, "k", fn, stream=st)
        vv_ = cuda.View.of(v, "v", fn, stream=st)
        dtype = cuda.same_float_dtype(fn, k=kv_, v=vv_)
        cuda.same_device(fn, k=kv_, v=vv_)
        if kv_.device != self.device:
            raise ValueError(f"{fn}: arrays are on different devices: k on cuda:{kv_.device}, the cache on "
                             f"cuda:{self.device}")
        sh = _dispatch.Shapes(fn, B=c.batch, Hkv=c.kv_heads, D=c.head_dim, E=c.v_head_dim)
        sh.check("k", kv_, "B,T,Hkv,D")
        sh.check("v", vv_, "B,T,Hkv,E")
        T = sh["T"]
        lens = ragged_lengths(fn, lengths, c.batch, T)
        if positions is not None:
            positions = _dispatch.index_array(fn, "positions", cuda.to_host(positions))
            _dispatch.Shapes(fn, B=c.batch, T=T).check("positions", positions, "B,T")
        check_room(fn, c._len, lens, c.max_len)

        start = c._len.copy()
        new_len = start + lens
        new_qk, new_qv = c.boundaries(new_len)
        for b in range(c.batch):
            n, s0 = int(lens[b]), int(start[b])
            c._pos[b, s0:s0 + n] = positions[b, :n] if positions is not None else np.arange(s0, s0 + n)
        G = c.group_size
        max_kgroups = int(((new_qk - c._qk) // G).max()) if c.batch else 0
        max_vtokens = int((new_qv - c._qv).max()) if c.batch else 0
        max_new = int(lens.max()) if c.batch else 0
        if c.batch and c.kv_heads and c.max_len and (max_kgroups or max_vtokens or max_new):
            rows = np.ascontiguousarray(np.stack([start, lens, c._qk, new_qk, c._qv, new_qv], axis=1), np.int64)
            rv, _ = cuda.index_view(k, rows, "rows", fn, st)
            cuda.enter_stream(k, st, self.device)
            cuda._cuda.kv_cache_append(device=self.device, stream=st, dtype=dtype, B=c.batch, T=T, H=c.kv_heads,
                                       k=kv_.ptr, k_stride=kv_.strides[:3], v=vv_.ptr, v_stride=vv_.strides[:3],
                                       rows=rv.ptr, max_kgroups=max_kgroups, max_vtokens=max_vtokens,
                                       max_new=max_new, **self._geometry(), **self._ptrs(fn))
            cuda.release_temps(k, st, rv)
        # the positions of the new tokens (slots past every row's old length: never read by queued work)
        pv = cuda.View.of(self.pos, "positions", fn, contiguous=None)
        for b in range(c.batch):
            n, s0 = int(lens[b]), int(start[b])
            if n:
                row = np.ascontiguousarray(c._pos[b, s0:s0 + n], dtype=np.int64)
                cuda._cuda.memcpy_htod(pv.ptr + (b * c.max_len + s0) * 8, row, self.device, st)
        c._len[:], c._qk[:], c._qv[:] = new_len, new_qk, new_qv
        cuda.release_temps(k, st, kv_, vv_)
        # the caller may drop k / v now: their allocator is ordered on its current stream, not on stream=
        if st != cuda._current_stream(k):
            cuda._cuda.synchronize(self.device, st)
        return c

    def attend(self, q, causal=True, q_pos=None, scale=None, return_lse=False):
        fn = self.cache.fn + ".attend"
        c = self.cache
        if not _dispatch.is_cuda(q):
            raise ValueError(f"{fn}: arrays are on different devices: the cache is on cuda:{self.device}, "
                             "q must be a CUDA array too")
        st = cuda.stream_of(q)
        qv = cuda.View.of(q, "q", fn, stream=st)
        dtype = cuda.same_float_dtype(fn, q=qv)
        if qv.device != self.device:
            raise ValueError(f"{fn}: arrays are on different devices: q on cuda:{qv.device}, the cache on "
                             f"cuda:{self.device}")
        if q_pos is not None and _dispatch.is_cuda(q_pos):
            q_pos = cuda.to_host(q_pos)
        q_pos, scale = c.check_attend_shapes(qv, q_pos, scale)
        B, N, Hq, D = qv.shape
        E = c.v_head_dim
        out = cuda.empty_like_caller(q, (B, N, Hq, E), dtype)
        lse = cuda.empty_like_caller(q, (B, N, Hq), "float32") if return_lse else None
        if B and N and Hq:
            ov = cuda.View.of(out, "out", fn)
            rows = np.ascontiguousarray(np.stack([c._len, c._qk, c._qv], axis=1), np.int64)
            rv, _ = cuda.index_view(q, rows, "rows", fn, st)
            pv, _ = cuda.index_view(q, np.ascontiguousarray(q_pos, np.int64), "q_pos", fn, st)
            kw = dict(device=self.device, stream=st, dtype=dtype, B=B, N=N, Hq=Hq, Hkv=c.kv_heads, causal=bool(causal),
                      scale=float(scale), q=qv.ptr, q_stride=qv.strides[:3], out=ov.ptr, out_stride=ov.strides[:3],
                      lse=cuda.View.of(lse, "lse", fn).ptr if lse is not None else None, rows=rv.ptr, q_pos=pv.ptr,
                      kv_pos=cuda.View.of(self.pos, "positions", fn, contiguous=None).ptr,
                      max_len=int(c._len.max()), **self._geometry(), **self._ptrs(fn))
            splits, scratch_floats = cuda._cuda.kv_attend_plan(**kw)
            scratch = cuda.empty_like_caller(q, (scratch_floats,), "float32") if splits > 1 else None
            cuda.enter_stream(q, st, self.device)   # out / lse / scratch: the framework's current stream
            cuda._cuda.kv_attend(**kw, num_splits=splits,
                                 scratch=cuda.View.of(scratch, "scratch", fn).ptr if scratch is not None else None)
            for buf in (scratch, out, lse):
                cuda.release_scratch(q, buf, st)
            cuda.release_temps(q, st, qv, rv, pv)
        res = cuda.wrap_result(q, out, st)
        if return_lse:
            return res, cuda.wrap_result(q, lse, st)
        return res
