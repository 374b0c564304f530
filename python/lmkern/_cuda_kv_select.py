"""CUDA paths of lmkern.kv scoring and eviction (SPEC 4.3-4.5): attention_mass, pool1d, keep_topk, compact.

Called by the public functions of :mod:`lmkern.kv` when their arrays live on a GPU (``stream=``: see
:mod:`lmkern.cuda`; the public functions use ``lmkern.cuda.use_stream``).  Validation is the CPU path's
own (``_kvbase.check_*``), run on zero-strided host stand-ins of the device arrays, so both paths raise
the same errors with the same messages; host index arrays are checked there and uploaded, device index
arrays are used in place (their values are not checked on the host, which would synchronize: the
kernels clamp ``kv_lens`` to ``[0, M]`` and ``idx`` to ``[0, M - 1]``, so no value reads out of bounds).

Kernels: kernels/cuda/kv_mass.cu (attention_mass: two streaming passes, no N x M matrix) and
kernels/cuda/kv_select.cu (pool1d, keep_topk by radix select + stable compaction, compact).

Decisions where the SPEC is silent (GPU):
* ``attention_mass`` returns float32 whatever the input dtype (SPEC), accumulating in float32; head
  dimension D <= 256 (ValueError beyond, as lmkern.attention).
* ``pool1d`` returns the input dtype (float16/bfloat16 rounded once from a float32 accumulator).
* ``keep_topk`` ranks float16/bfloat16 scores by their exact values (ties, NaN: as the CPU path).
* ``compact`` copies rows of any dtype the device array has (float64 and integers included: it does
  no arithmetic); the result has x's dtype.
"""
from __future__ import annotations

import numpy as np

from . import _dispatch, cuda
from ._kvbase import check_compact_args, check_mass_args, check_pool_args, check_topk_args

_REDUCE = {"mean": 0, "sum": 1, "max": 2, "none": 3}


def _stand_in(shape, dtype=np.float32):
    """A read-only host array of ``shape`` holding zeros in one element (zero strides): lets the CPU
    path's checks see a device array's shape without copying it."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape),
                                           writeable=False)


def _view(x, name, fn, st):
    """View with a contiguous feature axis (copied by the caller's framework otherwise); zero-sized arrays
    as they are (NumPy-style producers give them zero strides, which no kernel reads)."""
    v = cuda.View.of(x, name, fn, contiguous=None, stream=st)
    if v.size == 0 or v.inner_contiguous():
        return v
    return cuda.View.of(x, name, fn, stream=st)


def _index(ref, idx, name, fn, st, dev):
    """(device View or None, what the host checks see, uploaded temporary or None) of an index argument."""
    if idx is None:
        return None, None, None
    if _dispatch.is_cuda(idx):
        view, _ = cuda.index_view(ref, idx, name, fn, st)
        if view.device != dev:
            raise ValueError(f"{fn}: arrays are on different devices: {name} on cuda:{view.device}, inputs on cuda:{dev}")
        return view, _stand_in(view.shape, np.int64), None
    host = _dispatch.index_array(fn, name, idx)  # TypeError for non-integer data, as the CPU path
    return None, host, host


def _upload(ref, host, name, fn, st):
    view, _ = cuda.index_view(ref, np.ascontiguousarray(host), name, fn, st)
    return view


def _same_kind(fn, first, **views):
    for name, v in views.items():
        if v.kind != first[1].kind:
            raise TypeError(f"{fn}: {name} is a {type(v.src).__name__} but {first[0]} is a "
                            f"{type(first[1].src).__name__}; pass arrays of one framework")


def attention_mass(q, k, *, scale=None, causal=False, q_pos=None, kv_pos=None, kv_lens=None, normalize=True,
                   group_reduce="mean", stream=None):
    """GPU attention_mass (SPEC 4.3): ``(B, M, Hkv)`` float32 (``(B, M, Hq)`` for ``"none"``) as q's
    array type.  Two streaming passes (per-row log-sum-exp, then per-key mass), no N x M matrix; the
    query heads of a GQA group share every key tile; deterministic (no atomics)."""
    fn = "kv.attention_mass"
    cuda._require()
    st = cuda.stream_of(q, stream)
    qv = _view(q, "q", fn, st)
    kv = _view(k, "k", fn, st)
    cuda.same_float_dtype(fn, q=qv, k=kv)
    dtype = qv.dtype
    dev = cuda.same_device(fn, q=qv, k=kv)
    _same_kind(fn, ("q", qv), k=kv)
    qpos_v, qpos_c, qpos_h = _index(q, q_pos, "q_pos", fn, st, dev)
    kvpos_v, kvpos_c, kvpos_h = _index(q, kv_pos, "kv_pos", fn, st, dev)
    lens_v, lens_c, lens_h = _index(q, kv_lens, "kv_lens", fn, st, dev)
    _, _, _, _, _, scale, sh = check_mass_args(fn, _stand_in(qv.shape), _stand_in(kv.shape), scale, qpos_c, kvpos_c,
                                               lens_c, group_reduce)
    B, N, M, Hq, Hkv, D = (sh[x] for x in ("B", "N", "M", "Hq", "Hkv", "D"))
    maxd = cuda._cuda.max_head_dim
    if D > maxd:
        raise ValueError(f"{fn}: head dimension D = {D} exceeds {maxd}, the largest the CUDA kernels support")
    if qpos_h is not None:
        qpos_v = _upload(q, qpos_h, "q_pos", fn, st)
    if kvpos_h is not None:
        kvpos_v = _upload(q, kvpos_h, "kv_pos", fn, st)
    if lens_h is not None:
        lens_v = _upload(q, lens_h, "kv_lens", fn, st)
    out = cuda.empty_like_caller(q, (B, M, Hq if group_reduce == "none" else Hkv), "float32")
    ov = cuda.View.of(out, "out", fn)
    kw = dict(device=dev, stream=st, dtype=dtype, B=B, N=N, M=M, Hq=Hq, Hkv=Hkv, D=D,
              q=qv.ptr, q_stride=qv.strides[:3], k=kv.ptr, k_stride=kv.strides[:3], out=ov.ptr,
              q_pos=qpos_v.ptr if qpos_v is not None else None,
              q_pos_bstride=qpos_v.shape[1] if qpos_v is not None and qpos_v.ndim == 2 else 0,
              kv_pos=kvpos_v.ptr if kvpos_v is not None else None,
              kv_pos_bstride=kvpos_v.shape[1] if kvpos_v is not None and kvpos_v.ndim == 2 else 0,
              kv_lens=lens_v.ptr if lens_v is not None else None,
              causal=bool(causal), normalize=bool(normalize), reduce=_REDUCE[group_reduce], scale=float(scale))
    splits, floats = cuda._cuda.kv_attention_mass_plan(**kw)
    scratch = cuda.empty_like_caller(q, (floats,), "float32") if floats > 0 else None
    sv = cuda.View.of(scratch, "scratch", fn) if scratch is not None else None
    cuda.enter_stream(q, st, dev)   # out / scratch come from the framework's current stream
    cuda._cuda.kv_attention_mass(**kw, num_splits=splits, scratch=sv.ptr if sv is not None else None)
    for buf in (out, scratch):
        cuda.release_scratch(q, buf, st)
    cuda.release_temps(q, st, qv, kv, qpos_v, kvpos_v, lens_v)
    return cuda.wrap_result(q, out, st)


def pool1d(scores, kernel_size, *, mode="avg", stream=None):
    """GPU pool1d (SPEC 4.4): same shape and dtype as ``scores``; float32 accumulation."""
    fn = "kv.pool1d"
    cuda._require()
    st = cuda.stream_of(scores, stream)
    sv = cuda.View.of(scores, "scores", fn, contiguous=None, stream=st)  # any strides: scalar reads
    dtype = cuda.same_float_dtype(fn, scores=sv)
    _, ks = check_pool_args(fn, _stand_in(sv.shape), kernel_size, mode)
    B, M, H = sv.shape
    out = cuda.empty_like_caller(scores, (B, M, H), dtype)
    ov = cuda.View.of(out, "out", fn)
    cuda.enter_stream(scores, st, sv.device)
    cuda._cuda.kv_pool1d(device=sv.device, stream=st, dtype=dtype, B=B, M=M, H=H, kernel_size=ks,
                         max_mode=mode == "max", scores=sv.ptr, s_stride=sv.strides[:3], out=ov.ptr)
    cuda.release_scratch(scores, out, st)
    return cuda.wrap_result(scores, out, st)


def keep_topk(scores, budget, *, sink=0, recent=0, stream=None):
    """GPU keep_topk (SPEC 4.5): ``idx (B, K, H)`` int64 as the scores' array type, the CPU path's
    selection exactly (radix select over order-preserving keys, stable compaction by position)."""
    fn = "kv.keep_topk"
    cuda._require()
    st = cuda.stream_of(scores, stream)
    sv = cuda.View.of(scores, "scores", fn, contiguous=None, stream=st)
    dtype = cuda.same_float_dtype(fn, scores=sv)
    _, budget, sink, recent = check_topk_args(fn, _stand_in(sv.shape), budget, sink, recent)
    B, M, H = sv.shape
    K = min(budget, M)
    idx = cuda.empty_like_caller(scores, (B, K, H), "int64")
    iv = cuda.View.of(idx, "idx", fn)
    cuda.enter_stream(scores, st, sv.device)
    cuda._cuda.kv_keep_topk(device=sv.device, stream=st, dtype=dtype, B=B, M=M, H=H, K=K, sink=sink, recent=recent,
                            scores=sv.ptr, s_stride=sv.strides[:3], idx=iv.ptr)
    cuda.release_scratch(scores, idx, st)
    return cuda.wrap_result(scores, idx, st)



def compact(x, idx, *, stream=None):
    """GPU compact (SPEC 4.5): ``out[b, k, h] = x[b, idx[b, k, h], h]`` as x's array type and dtype.
    Host idx is range-checked (ValueError, as the CPU path); device idx is clamped to ``[0, M - 1]``."""
    fn = "kv.compact"
    cuda._require()
    st = cuda.stream_of(x, stream)
    xv = _view(x, "x", fn, st)  # rows (the feature axis) contiguous
    itemsize = cuda.itemsize_of(fn, xv.dtype)
    idx_v, idx_c, idx_h = _index(x, idx, "idx", fn, st, xv.device)
    if idx_c is None:
        raise TypeError(f"{fn}: idx must be an integer array; got None")
    check_compact_args(fn, _stand_in(xv.shape), idx_c)
    B, M, H, D = xv.shape
    K = idx_c.shape[1]
    if idx_h is not None:
        idx_v = _upload(x, idx_h, "idx", fn, st)
    out = cuda.empty_like_caller(x, (B, K, H, D), xv.dtype)
    ov = cuda.View.of(out, "out", fn)
    cuda.enter_stream(x, st, xv.device)
    cuda._cuda.kv_compact(device=xv.device, stream=st, B=B, M=M, K=K, H=H, row_bytes=D * itemsize, x=xv.ptr,
                          x_stride_bytes=tuple(s * itemsize for s in xv.strides[:3]), idx=idx_v.ptr, out=ov.ptr)
    cuda.release_scratch(x, out, st)
    cuda.release_temps(x, st, xv, idx_v)
    return cuda.wrap_result(x, out, st)
