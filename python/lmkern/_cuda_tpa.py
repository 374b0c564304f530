"""The CUDA side of lmkern.tpa: wrappers of the lmkern._cuda tpa kernels (kernels/cuda/tpa.cu).

Imported lazily by lmkern.tpa when its arrays live on a GPU; follows the recipe of lmkern.cuda
(caller's stream, outputs and scratch from the caller's framework, results as the caller's array type).

* ``decode``: the FlashTPA decode kernel (one block per batch row, head group and cache split; float32
  partials merged by the max-stabilized combine when the cache is split).  The factors are read with
  (batch, token) strides: only each token's ``(H, R)`` / ``(R, D)`` block must be contiguous, so views
  of a larger cache (``ak[:, :M]``) are read in place; other layouts are copied.
* ``materialize``: ``scale * a @ b`` with one thread per output element; inputs made C-contiguous.
* ``attention`` (prefill): Q, K and V are materialized with the materialize kernel into temporaries
  from the caller's framework, then the core GPU attention (``lmkern.cuda.attention``) runs on them.
  On the GPU this is the materialized path: it forms Q, K, V (``(B, T, H, D)`` each) but never an
  ``N x M`` matrix; the factor-space contraction is the decode kernel's.
"""
from __future__ import annotations

from . import _dispatch, cuda


def _normalized(v):
    """Strides with 0 for axes of length 1 (their stride is arbitrary and never multiplied by an index)."""
    return tuple(0 if n == 1 else s for n, s in zip(v.shape, v.strides))


def _block_contiguous(v):
    """True when the two trailing axes of View v form one contiguous block (the kernel's token rows)."""
    if v.size == 0:
        return True
    A, R = v.shape[-2], v.shape[-1]
    sA, sR = v.strides[-2], v.strides[-1]
    return (R <= 1 or sR == 1) and (A <= 1 or sA == R)


def _view(x, name, fn, st, contiguous):
    """View of x; "inner", "full" or "block" (the two trailing axes one contiguous block) contiguity,
    copied by the caller's framework when needed.  Empty arrays are never copied (nothing is read)."""
    v = cuda.View.of(x, name, fn, contiguous=None, stream=st)
    if v.size == 0:
        return v
    ok = {"inner": v.inner_contiguous, "full": v.c_contiguous,
          "block": lambda: v.inner_contiguous() and (v.ndim < 2 or _block_contiguous(v))}[contiguous]
    if ok() and min(_normalized(v), default=0) >= 0:   # reversed views (CuPy x[::-1]) are copied too
        return v
    return cuda.View.of(x, name, fn, contiguous="full", stream=st)


def _index(ref, idx, name, fn, st, dev):
    """(view, host array or a shape-only proxy) of an index argument, on the device of the call."""
    view, host = cuda.index_view(ref, idx, name, fn, st)
    if view is None:
        return None, None
    if view.device != dev:
        raise ValueError(f"{fn}: arrays are on different devices: aq on cuda:{dev}, {name} on cuda:{view.device}")
    return view, host


# kernel choice of GPU decode (lk_tpa_path): "tensor_cores" the tensor-core kernel (float16 / bfloat16; not
# yet run on a GPU, so opt-in), "auto", "factor" and "materialized" the float32 CUDA-core kernel
DECODE_PATHS = {"auto": 0, "factor": 1, "materialized": 1, "tensor_cores": 3}


def decode(aq, bq, ak, bk, av, bv, *, kv_lens=None, scale=None, return_lse=False, out=None, splits=0, stream=None,
           path="auto"):
    """GPU ``tpa.decode`` (SPEC 2.4); ``splits > 0`` forces the cache split count and ``path`` the kernel
    (``DECODE_PATHS``; tests)."""
    from .tpa import check_factors
    fn = "tpa.decode"
    path = _dispatch.check_choice(fn, "_path", path, tuple(DECODE_PATHS))
    cuda._require()
    st = cuda.stream_of(aq, stream)
    # aq, bq: (batch, second axis) strides; cached factors: (batch, token) strides over contiguous token blocks
    views = {name: _view(x, name, fn, st, "inner" if name in ("aq", "bq") else "block")
             for name, x in (("aq", aq), ("bq", bq), ("ak", ak), ("bk", bk), ("av", av), ("bv", bv))}
    dtype = cuda.same_float_dtype(fn, **views)
    dev = cuda.same_device(fn, **views)
    for name, vw in views.items():
        if vw.kind != views["aq"].kind:
            raise TypeError(f"{fn}: {name} is a {type(vw.src).__name__} but aq is a {type(views['aq'].src).__name__}; "
                            "pass arrays of one framework")
    lens_v, lens_host = _index(aq, kv_lens, "kv_lens", fn, st, dev)
    sh = _dispatch.Shapes(fn)
    check_factors(fn, sh, views, lens_host, ("B,H,Rq", "B,Rq,D"), zero_ranks=False)
    if lens_v is not None and lens_host is None:
        sh.check("kv_lens", cuda._ShapeOnly(lens_v.shape), "B")
    B, M, H, Rq, Rk, Rv, D, E = (sh[x] for x in ("B", "M", "H", "Rq", "Rk", "Rv", "D", "E"))
    maxd = cuda._cuda.max_head_dim
    if D > maxd or E > maxd:
        raise ValueError(f"{fn}: head dimensions D = {D}, E = {E} exceed {maxd}, the largest the CUDA kernels support")
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)

    ov = cuda._check_out(fn, out, views["aq"], (B, H, E), dtype)
    if ov is not None and ov.inner_contiguous():
        res, resv = out, ov
    else:
        res = cuda.empty_like_caller(aq, (B, H, E), dtype)
        resv = cuda.View.of(res, "out", fn)
    lse = cuda.empty_like_caller(aq, (B, H), "float32") if return_lse else None

    kw = dict(device=dev, stream=st, dtype=dtype, B=B, M=M, H=H, Rq=Rq, Rk=Rk, Rv=Rv, D=D, E=E,
              out=resv.ptr, out_stride=_normalized(resv)[:2] + (1,),
              lse=cuda.View.of(lse, "lse", fn).ptr if lse is not None else None,
              kv_lens=lens_v.ptr if lens_v is not None else None, scale=scale, path=DECODE_PATHS[path])
    for name, vw in views.items():
        kw[name] = vw.ptr
        kw[name + "_stride"] = _normalized(vw)[:2] + (1,)
    num_splits, scratch_floats = cuda._cuda.tpa_decode_plan(**kw)
    if splits > 0:
        num_splits = min(int(splits), 4096)
        scratch_floats = B * H * num_splits * (E + 2) if num_splits > 1 else 0
    scratch = cuda.empty_like_caller(aq, (scratch_floats,), "float32") if num_splits > 1 else None
    kw["num_splits"] = num_splits
    kw["scratch"] = cuda.View.of(scratch, "scratch", fn).ptr if scratch is not None else None
    cuda.enter_stream(aq, st, dev)   # res / lse / scratch come from the framework's current stream
    cuda._cuda.tpa_decode(**kw)
    for buf in (scratch, lse, res if res is not out else None):
        cuda.release_scratch(aq, buf, st)
    cuda.release_temps(aq, st, *views.values(), lens_v)
    if out is not None and res is not out:
        cuda._copy_into(out, res, st)
        res = out
    res = cuda.wrap_result(aq, res, st)
    if return_lse:
        return res, cuda.wrap_result(aq, lse, st)
    return res


def materialize(a, b, *, scale=None, out=None, stream=None):
    """GPU ``tpa.materialize`` (SPEC 2.1): ``scale * a @ b`` over any leading axes."""
    fn = "tpa.materialize"
    cuda._require()
    st = cuda.stream_of(a, stream)
    res = _materialize(a, b, scale, st, fn, out)
    if out is not None and res is not out:
        cuda._copy_into(out, res, st)
        res = out
    return cuda.wrap_result(a, res, st)


def _materialize(a, b, scale, st, fn, out=None):
    """Enqueues ``scale * a @ b``; returns the array written: ``out`` when it is C-contiguous, else a new
    array of the caller's framework (DeviceArray for callers without one), stream-safe to drop."""
    from .tpa import check_materialize
    av = _view(a, "a", fn, st, "full")
    bv = _view(b, "b", fn, st, "full")
    dtype = cuda.same_float_dtype(fn, a=av, b=bv)
    dev = cuda.same_device(fn, a=av, b=bv)
    if bv.kind != av.kind:
        raise TypeError(f"{fn}: b is a {type(b).__name__} but a is a {type(a).__name__}; pass arrays of one framework")
    sh, scale, shape, rows = check_materialize(fn, av, bv, scale)
    ov = cuda._check_out(fn, out, av, shape, dtype)
    if ov is not None and ov.c_contiguous():
        res, resv = out, ov
    else:
        res = cuda.empty_like_caller(a, shape, dtype)
        resv = cuda.View.of(res, "out", fn)
    cuda.enter_stream(a, st, dev)
    cuda._cuda.tpa_materialize(device=dev, stream=st, dtype=dtype, rows=rows, H=sh["H"], R=sh["R"], D=sh["D"],
                               a=av.ptr, b=bv.ptr, out=resv.ptr, scale=scale)
    if res is not out:
        cuda.release_scratch(a, res, st)
    cuda.release_temps(a, st, av, bv)
    return res


def attention(aq, bq, ak, bk, av, bv, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None,
              return_lse=False, out=None, stream=None):
    """GPU ``tpa.attention`` (SPEC 2.2): Q, K, V materialized by the materialize kernel into temporaries
    from the caller's framework, then the core GPU attention."""
    from .tpa import check_factors
    fn = "tpa.attention"
    cuda._require()
    st = cuda.stream_of(aq, stream)
    views = {name: _view(x, name, fn, st, "inner")
             for name, x in (("aq", aq), ("bq", bq), ("ak", ak), ("bk", bk), ("av", av), ("bv", bv))}
    dtype = cuda.same_float_dtype(fn, **views)
    cuda.same_device(fn, **views)
    # the factors named in shape errors; kv_lens range-checked here when on the host
    lens_host = None
    if kv_lens is not None and not _dispatch.is_cuda(kv_lens):
        lens_host = _dispatch.index_array(fn, "kv_lens", kv_lens)
    sh = _dispatch.Shapes(fn)
    check_factors(fn, sh, views, lens_host, ("B,N,H,Rq", "B,N,Rq,D"), zero_ranks=False)
    B, N, H, D, E = (sh[x] for x in ("B", "N", "H", "D", "E"))
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)
    # temporaries of torch / CuPy callers are their own tensors; of others, DeviceArrays (then the result
    # is handed back as the caller's type, and out= written by a device copy)
    own = views["aq"].kind in ("torch", "cupy", "devicearray")
    ov = None
    if out is not None and not own:
        ov = cuda._check_out(fn, out, views["aq"], (B, N, H, E), dtype)
        if not ov.inner_contiguous():
            raise ValueError(f"{fn}: out must have a contiguous last axis for this array type")
    q = _materialize(aq, bq, None, st, fn)
    k = _materialize(ak, bk, None, st, fn)
    v = _materialize(av, bv, None, st, fn)
    res = cuda.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos, kv_lens=kv_lens,
                         return_lse=return_lse, out=out if own else None, stream=st, fn=fn)
    if own:
        return res
    o, lse = res if return_lse else (res, None)
    if ov is not None:
        cuda._copy_rows(cuda.View.of(o, "out", fn), ov, st, fn)
        o = out
    o = cuda.wrap_result(aq, o, st)
    return (o, cuda.wrap_result(aq, lse, st)) if return_lse else o
