"""GPU path of :mod:`lmkern.mor` (SPEC 3): the wrappers behind the ``_cuda_*`` route functions.

Each wrapper follows the recipe of :mod:`lmkern.cuda`: Views of the caller's arrays (zero-copy; the
feature axis must be contiguous, else the caller's framework copies), one float dtype and one device,
the shape checks shared with the CPU path (``mor._*_shapes``: same messages), outputs from the
caller's framework, the launch on the caller's stream, results as the caller's array type.

Kernels (kernels/cuda/mor_*.cu):

* ``expert_choice``: one block per batch row; a 4-pass most-significant-byte-first radix select over
  order-preserving uint32 keys of the scores (shared histograms, warp-aggregated integer atomics)
  finds the k-th key exactly, then one stable compaction in position order (block-wide scan of the
  > / == counts) writes idx ascending and the gates; ties go to the lower position, NaN lowest.
* ``gather``: one warp per output row, 16-byte copies when aligned.
* ``scatter_residual``: ``out = h`` (a row copy), then one thread per (batch row, feature pack) walks
  ``j = 0 .. k-1`` in order: repeated indices accumulate in ascending j with no atomics, every step
  ``out = round(fma(gate, y, out))`` as the CPU kernel (bitwise equal for float32).
* ``router_scores``: one warp per token row, float32 dot products, activation in float32.
* ``token_choice``: one thread per token row.

Decisions where the SPEC is silent (GPU)
----------------------------------------
* Index arrays (``idx``, ``candidates``) may be host arrays (checked on the host as on the CPU, then
  uploaded) or device arrays (int64 used in place).  Device index arrays are not read back (that
  would synchronize): their values are never trusted as addresses, so an out-of-range device ``idx``
  gathers a zero row and is skipped by the scatter (never a ValueError, never an out-of-bounds
  access), and device ``candidates`` are copied to ``idx`` without the ascending check.
* ``gate`` has the scores' dtype (the chosen scores, bit for bit); ``idx`` / ``depth`` are int64.
* ``scatter_residual_`` on the GPU needs ``y`` and ``gate`` in ``h``'s dtype (TypeError otherwise:
  one dtype per call); JAX arrays are immutable (TypeError; use ``scatter_residual``).
* ``out=`` of ``scatter_residual`` may be ``h`` itself (in place); an ``out`` that overlaps ``h``, ``y``
  or ``gate`` otherwise is written through a temporary.
* ``router_scores``: at most 1024 router outputs C on the GPU (ValueError beyond); float32 dot
  products, the activation and 1/temperature in double (as the CPU).
* The router losses (``balance_loss``, ``z_loss``, ``router_bce``) have no GPU kernel: CUDA inputs are
  copied to the host and reduced by the CPU kernel.
"""
from __future__ import annotations

from . import _dispatch, cuda
from . import mor as _mor


def _index(ref, x, name, fn, stream, device):
    """(view, host, shape_source) of an index argument: host arrays are uploaded (host kept for checks)."""
    if x is None:
        return None, None, None
    if not _dispatch.is_cuda(x):
        host = _dispatch.index_array(fn, name, x)
        if host.size == 0:  # nothing to read: no upload, a NULL pointer (the kernels have no work)
            return _Empty(host.shape), host, host
    view, host = cuda.index_view(ref, x, name, fn, stream)
    if view.device != device:
        raise ValueError(f"{fn}: arrays are on different devices: data on cuda:{device}, {name} on cuda:{view.device}")
    return view, host, (host if host is not None else cuda._ShapeOnly(view.shape))


class _Empty:
    """Stands in for an empty host index array that is not uploaded (NULL device pointer)."""

    ptr = None
    obj = None

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def _release(ref, st, outputs, *views):
    """After a launch on st: outputs allocated on the framework's current stream, and the copies and
    uploads behind ``views``, are safe to drop (see lmkern.cuda.release_scratch)."""
    for buf in outputs:
        cuda.release_scratch(ref, buf, st)
    cuda.release_temps(ref, st, *views)


def _same_kind(fn, ref_name, ref_view, **views):
    for name, v in views.items():
        if v is not None and v.kind != ref_view.kind:
            raise TypeError(f"{fn}: {name} is a {type(v.src).__name__} but {ref_name} is a "
                            f"{type(ref_view.src).__name__}; pass arrays of one framework")


def expert_choice(scores, k, *, candidates=None, stream=None):
    fn = "mor.expert_choice"
    cuda._require()
    st = cuda.stream_of(scores, stream)
    sv = cuda.View.of(scores, "scores", fn, stream=st)
    dtype = cuda.same_float_dtype(fn, scores=sv)
    cv, chost, cshape = _index(scores, candidates, "candidates", fn, st, sv.device)
    sh, k = _mor._expert_choice_shapes(sv, k, cshape)
    if chost is not None:
        _mor._check_candidate_values(chost)
    B, n = sh["B"], sh["n"]
    idx = cuda.empty_like_caller(scores, (B, k), "int64")
    gate = cuda.empty_like_caller(scores, (B, k), dtype)
    iv, gv = cuda.View.of(idx, "idx", fn), cuda.View.of(gate, "gate", fn)
    cuda.enter_stream(scores, st, sv.device)   # outputs come from the framework's current stream
    cuda._cuda.mor_topk(device=sv.device, stream=st, dtype=dtype, B=B, n=n, k=k, scores=sv.ptr,
                        scores_stride=sv.strides[0], candidates=cv.ptr if cv is not None else None,
                        idx=iv.ptr, gate=gv.ptr)
    _release(scores, st, (idx, gate), sv, cv)
    return cuda.wrap_result(scores, idx, st), cuda.wrap_result(scores, gate, st)


def router_scores(h, w, *, activation="sigmoid", alpha=1.0, temperature=1.0, stream=None):
    fn = "mor.router_scores"
    cuda._require()
    st = cuda.stream_of(h, stream)
    hv = cuda.View.of(h, "h", fn, stream=st)
    wv = cuda.View.of(w, "w", fn, contiguous=None, stream=st)  # read through its strides
    dtype = cuda.same_float_dtype(fn, h=hv, w=wv)
    dev = cuda.same_device(fn, h=hv, w=wv)
    sh = _mor._router_shapes(hv, wv, activation, temperature)
    B, T, Dm = sh["B"], sh["T"], sh["Dm"]
    vector = wv.ndim == 1
    C = 1 if vector else wv.shape[1]
    w_stride = (wv.strides[0], 0) if vector else wv.strides[:2]
    z = cuda.empty_like_caller(h, (B, T) if vector else (B, T, C), dtype)
    zv = cuda.View.of(z, "z", fn)
    cuda.enter_stream(h, st, dev)
    cuda._cuda.mor_router(device=dev, stream=st, dtype=dtype, B=B, T=T, Dm=Dm, C=C, h=hv.ptr,
                          h_stride=hv.strides[:2], w=wv.ptr, w_stride=w_stride, z=zv.ptr,
                          activation=_mor._ACTIVATIONS[activation], alpha=float(alpha),
                          temperature=float(temperature))
    _release(h, st, (z,), hv, wv)
    return cuda.wrap_result(h, z, st)


def token_choice(probs, *, bias=None, stream=None):
    fn = "mor.token_choice"
    cuda._require()
    st = cuda.stream_of(probs, stream)
    pv = cuda.View.of(probs, "probs", fn, stream=st)
    bv = cuda.View.of(bias, "bias", fn, contiguous="full", stream=st) if bias is not None else None
    dtype = cuda.same_float_dtype(fn, probs=pv, bias=bv)
    dev = cuda.same_device(fn, probs=pv, bias=bv)
    sh = _mor._token_choice_shapes(pv, bv)
    B, T, C = sh["B"], sh["T"], sh["C"]
    depth = cuda.empty_like_caller(probs, (B, T), "int64")
    gate = cuda.empty_like_caller(probs, (B, T), dtype)
    dv, gv = cuda.View.of(depth, "depth", fn), cuda.View.of(gate, "gate", fn)
    cuda.enter_stream(probs, st, dev)
    cuda._cuda.mor_token_choice(device=dev, stream=st, dtype=dtype, B=B, T=T, C=C, probs=pv.ptr,
                                probs_stride=pv.strides[:2], bias=bv.ptr if bv is not None else None,
                                depth=dv.ptr, gate=gv.ptr)
    _release(probs, st, (depth, gate), pv, bv)
    return cuda.wrap_result(probs, depth, st), cuda.wrap_result(probs, gate, st)


def gather(h, idx, *, stream=None):
    fn = "mor.gather"
    cuda._require()
    st = cuda.stream_of(h, stream)
    hv = cuda.View.of(h, "h", fn, stream=st)
    dtype = cuda.same_float_dtype(fn, h=hv)
    iv, ihost, ishape = _index(h, idx, "idx", fn, st, hv.device)
    sh = _mor._gather_shapes(hv, ishape, ihost)
    B, T, k, Dm = sh["B"], sh["T"], sh["k"], sh["Dm"]
    out = cuda.empty_like_caller(h, (B, k, Dm), dtype)
    ov = cuda.View.of(out, "out", fn)
    cuda.enter_stream(h, st, hv.device)
    cuda._cuda.mor_gather(device=hv.device, stream=st, dtype=dtype, B=B, T=T, k=k, Dm=Dm, h=hv.ptr,
                          h_stride=hv.strides[:2], idx=iv.ptr, out=ov.ptr, out_stride=ov.strides[:2])
    _release(h, st, (out,), hv, iv)
    return cuda.wrap_result(h, out, st)




def scatter_residual(h, idx, y, gate=None, *, out=None, stream=None, fn="mor.scatter_residual"):
    """``out=h`` updates h in place (``scatter_residual_``)."""
    cuda._require()
    st = cuda.stream_of(h, stream)
    hv = cuda.View.of(h, "h", fn, stream=st)
    yv = cuda.View.of(y, "y", fn, stream=st)
    gv = cuda.View.of(gate, "gate", fn, contiguous="full", stream=st) if gate is not None else None
    dtype = cuda.same_float_dtype(fn, h=hv, y=yv, gate=gv)
    dev = cuda.same_device(fn, h=hv, y=yv, gate=gv)
    _same_kind(fn, "h", hv, y=yv, gate=gv)
    iv, ihost, ishape = _index(h, idx, "idx", fn, st, dev)
    sh = _mor._scatter_shapes(fn, hv, ishape, ihost, yv, gv)
    B, T, k, Dm = sh["B"], sh["T"], sh["k"], sh["Dm"]
    in_place = out is h
    if in_place and hv.kind == "jax":
        raise TypeError(f"{fn}: JAX arrays are immutable; use mor.scatter_residual (not scatter_residual_)")
    ov = None if out is None else (hv if in_place else cuda.check_out(fn, out, hv, (B, T, Dm), dtype, ref_name="h"))
    out_v = ov   # the caller's out, for the copy back from a temporary
    if ov is not None and (ov.obj is not ov.src or not ov.inner_contiguous()):
        ov = None  # strided feature axis: compute into a temporary, then copy it into the caller's array
    if ov is not None and ov.ptr == hv.ptr and ov.strides == hv.strides:
        in_place = True
    if ov is not None and not in_place and (ov.has_repeats() or any(ov.overlaps(v) for v in (hv, yv, gv))):
        ov = None  # out shares memory with an input (or repeats elements): write a temporary, then copy
    if ov is None:
        target = cuda.empty_like_caller(h, (B, T, Dm), dtype)
        tv = cuda.View.of(target, "out", fn)
        src = hv.ptr  # out = h, then the updates
    else:
        target, tv = ov.obj, ov
        src = None if in_place else hv.ptr
    cuda.enter_stream(h, st, dev)
    cuda._cuda.mor_scatter(device=dev, stream=st, dtype=dtype, B=B, T=T, k=k, Dm=Dm, h=src,
                           h_stride=hv.strides[:2], idx=iv.ptr, y=yv.ptr, y_stride=yv.strides[:2],
                           gate=gv.ptr if gv is not None else None, out=tv.ptr, out_stride=tv.strides[:2])
    _release(h, st, (target,) if ov is None else (), hv, yv, gv, iv)
    if out is not None and target is not out:
        if out_v.obj is out_v.src and out_v.inner_contiguous() and not out_v.has_repeats():
            cuda._copy_rows(tv, out_v, st, fn)   # rows (torch / CuPy: their own copy)
        else:
            cuda._copy_into(out, target, st)     # the framework's copy (others: a clear ValueError)
        target = out
    return cuda.wrap_result(h, target, st)
