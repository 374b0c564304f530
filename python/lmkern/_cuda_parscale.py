"""CUDA paths of lmkern.parscale: :func:`expand` and :func:`aggregate` (SPEC 5.1, 5.3).

Imported lazily by the ``_cuda_*`` route functions of :mod:`lmkern.parscale`
(``prefix_attention`` on the GPU is :func:`lmkern.cuda.attention` with its shared-prefix fields).

aggregate on the GPU
--------------------
The two GEMMs run in the caller's own framework (``torch.matmul`` / ``cupy.matmul``, i.e. cuBLAS),
feature-major as on the CPU; lmkern's kernels (kernels/cuda/parscale_aggregate.cu) do the rest::

    u  = the P streams of h concatenated per token       framework reshape: a view when the layout
                                                          allows (one token row, "concat"), else one copy
    x  = w1 @ u.T                                        (Hh, R) in h's dtype, cuBLAS accumulates in float32
    xs = silu(x + b1[:, None])                           lmkern kernel, float32 (in place for float32)
    z  = float32(w2) @ xs                                (P, R) float32 (cuBLAS)
    y, w = mix(h, z, b2)                                 lmkern kernel: softmax over P in float32
                                                          (max-stabilized), smoothing, and
                                                          y = sum_p w_p h_p accumulated in float32

Decisions where the SPEC is silent:

* **torch or CuPy arrays only.**  The GEMMs need a BLAS on the device, and lmkern uses the caller's
  (its caching allocator, its stream, its cuBLAS handle) rather than linking cuBLAS itself, so a
  :class:`lmkern.cuda.DeviceArray` or JAX caller gets a ``TypeError`` saying so.
* **Precision.**  The first GEMM's output ``x`` is rounded to h's dtype (as ``torch.nn.Linear``
  does); bias + SiLU and everything after it are float32: the second GEMM runs on the float32
  activations with float32 ``w2``, so the routing logits are not rounded to float16/bfloat16 (the
  released modeling code rounds them; lmkern's weights are therefore closer to the float32 twin).
  Under ``torch.backends.cuda.matmul.allow_tf32 = True`` the float32 GEMMs use TF32, as every torch
  matmul does.
* The bias + SiLU kernel is lmkern's own (one pass, float32 out) rather than the framework's
  ``silu(x.float() + b1)`` (three passes and two temporaries; CuPy has no SiLU).
* ``P`` is at most 8192 on the GPU (the weights of a token live in shared memory).
* ``P = 1`` returns ``h`` itself (a copy into ``out`` when given) and weights of ones, as on the CPU.
* Everything runs on the caller's current stream (or ``lmkern.cuda.use_stream``); framework
  temporaries are allocated on that stream, so freeing them is stream-ordered; nothing synchronizes.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import _dispatch, cuda

FN_EXPAND = "parscale.expand"
FN_AGGREGATE = "parscale.aggregate"
MAX_P = 8192  # LK_PARSCALE_CUDA_MAX_P


# ------------------------------------------------------------------------------------------------
# expand


def expand(x, P, *, stream=None):
    """``(B, ...) -> (P·B, ...)`` on the GPU, stream-major (row ``p·B + b`` is ``x[b]``): P
    device-to-device copies of the (C-contiguous) x into a new array of the caller's framework, on
    the caller's stream.  Any dtype (token ids as well as hidden states); any CUDA array type."""
    fn = FN_EXPAND
    cuda._require()
    st = cuda.stream_of(x, stream)
    xv = cuda.View.of(x, "x", fn, contiguous="full", stream=st)
    from .parscale import check_expand_args
    P = check_expand_args(fn, xv, P)
    shape = (P * xv.shape[0],) + tuple(xv.shape[1:])
    out = cuda.empty_like_caller(x, shape, xv.dtype)
    ov = cuda.View.of(out, "out", fn, contiguous="full")
    nbytes = xv.size * cuda.itemsize_of(fn, xv.dtype)
    cuda.enter_stream(x, st, xv.device)
    if nbytes:
        for p in range(P):   # out[p·B : (p+1)·B] = x
            cuda._cuda.memcpy_dtod(ov.ptr + p * nbytes, xv.ptr, nbytes, xv.device, st)
    cuda.release_scratch(x, out, st)
    cuda.release_temps(x, st, xv)
    return cuda.wrap_result(x, out, st)


# ------------------------------------------------------------------------------------------------
# the caller's framework, as aggregate uses it

class _Ops:
    """What aggregate asks of the caller's framework, on stream ``stream`` (inside :meth:`on_stream`).

    ``ref`` is the caller's ``h``.  Subclasses: torch, CuPy (tests add a host stand-in)."""

    def __init__(self, ref, stream):
        self.ref, self.stream = ref, int(stream)

    def on_stream(self):
        """Context in which the framework's kernels and allocations use ``self.stream``."""
        raise NotImplementedError

    def permute(self, a, axes):
        return a.transpose(axes)

    def gemm_input(self, h, P, B, T, Hd, interleaved):
        """u (B·T, P·Hd): ``u[r, j·P + p]`` (interleaved) or ``u[r, p·Hd + j]`` = ``h[p·B + b, t, j]``;
        a view when the strides allow, else the framework's one copy."""
        h4 = h.reshape(P, B, T, Hd)
        axes = (1, 2, 3, 0) if interleaved else (1, 2, 0, 3)
        return self.permute(h4, axes).reshape(B * T, P * Hd)

    def mm(self, a, b, transpose_b=False):
        """``a @ b`` (``a @ b.T``): cuBLAS through the framework."""
        return a @ (b.T if transpose_b else b)

    def float32(self, a):
        raise NotImplementedError

    def empty(self, shape, dtype):
        return cuda.empty_like_caller(self.ref, shape, dtype)

    def ones_f32(self, shape):
        raise NotImplementedError

    def copy_(self, dst, src):
        cuda._copy_into(dst, src, self.stream)


class _TorchOps(_Ops):
    @contextlib.contextmanager
    def on_stream(self):
        import torch
        with torch.no_grad(), cuda._torch_stream(self.stream, self.ref):   # inference: no autograd graph
            yield

    def permute(self, a, axes):
        return a.permute(*axes)

    def float32(self, a):
        import torch
        return a.to(torch.float32)

    def ones_f32(self, shape):
        import torch
        return torch.ones(shape, dtype=torch.float32, device=self.ref.device)


class _CupyOps(_Ops):
    def on_stream(self):
        return cuda._cupy_stream(self.stream, self.ref)

    def float32(self, a):
        return a.astype("float32", copy=False)

    def ones_f32(self, shape):
        import cupy
        with cupy.cuda.Device(cuda._device_of(self.ref)):
            return cupy.ones(shape, dtype="float32")


# array kind (lmkern.cuda._kind) -> _Ops subclass; tests register a host stand-in here
_OPS = {"torch": _TorchOps, "cupy": _CupyOps}


def _ops_for(h, stream):
    kind = cuda._kind(h)
    cls = _OPS.get(kind)
    if cls is None:
        raise TypeError(f"{FN_AGGREGATE}: on CUDA, aggregate needs torch or CuPy arrays (its two GEMMs run in the "
                        f"caller's framework's matmul, i.e. cuBLAS); got h of type {type(h).__name__}")
    return cls(h, stream)




# ------------------------------------------------------------------------------------------------
# aggregate

def aggregate(h, w1, b1, w2, b2, *, P, smoothing=0.1, layout="interleaved", return_weights=False, out=None,
              stream=None):
    """GPU :func:`lmkern.parscale.aggregate` (SPEC 5.3) for torch / CuPy CUDA arrays: see the module
    docstring for the pipeline and the decisions.  Returns ``y (B,T,Hd)`` in h's dtype [and ``w
    (B,T,P)`` float32] as the caller's array type."""
    fn = FN_AGGREGATE
    cuda._require()
    st = cuda.stream_of(h, stream)
    ops = _ops_for(h, st)
    views = {name: cuda.View.of(a, name, fn, contiguous=None, stream=st)
             for name, a in (("h", h), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))}
    dtype = cuda.same_float_dtype(fn, **views)
    dev = cuda.same_device(fn, **views)
    hv = views["h"]
    for name, v in views.items():
        if v.kind != hv.kind:
            raise TypeError(f"{fn}: {name} is a {type(v.src).__name__} but h is a {type(hv.src).__name__}; "
                            "pass arrays of one framework")
    from .parscale import check_aggregate_args
    P, B, T, Hd, Hh = check_aggregate_args(fn, hv, views["w1"], views["b1"], views["w2"], views["b2"], P,
                                           smoothing, layout)
    if P > MAX_P:
        raise ValueError(f"{fn}: P = {P} exceeds {MAX_P}, the most streams the CUDA kernel supports")
    smoothing = float(smoothing)
    ov = cuda.check_out(fn, out, hv, (B, T, Hd), dtype, ref_name="h") if out is not None else None
    R = B * T

    if P == 1:   # a softmax over one stream is 1: y = h, as on the CPU
        with ops.on_stream():
            wts = ops.ones_f32((B, T, 1)) if return_weights else None
            if out is not None:
                ops.copy_(out, h)
        y = h if out is None else out
        return (y, wts) if return_weights else y

    # results handed back are allocated like every lmkern output (the framework's current stream)
    y = cuda.empty_like_caller(h, (B, T, Hd), dtype) if out is None else out
    wts = cuda.empty_like_caller(h, (B, T, P), "float32") if return_weights else None
    if R > 0:
        cuda.enter_stream(h, st, dev)   # y / wts come from the framework's current stream
        handed_back = (y if out is None else None, wts)
        with ops.on_stream():
            # framework temporaries below are allocated on st: freeing them is ordered after our kernels
            if out is not None and not ov.inner_contiguous():
                y = ops.empty((B, T, Hd), dtype)        # written by the kernel, then copied into out
            yv = cuda.View.of(y, "out", fn, stream=st)
            u = ops.gemm_input(h, P, B, T, Hd, layout == "interleaved")
            x = ops.mm(w1, u, transpose_b=True)                     # (Hh, R), cuBLAS
            del u
            xv = cuda.View.of(x, "x", fn, contiguous="full", stream=st)
            xs, xsv = (xv.obj, xv) if dtype == "float32" else (None, None)   # in place on what was written
            if xs is None:
                xs = ops.empty((Hh, R), "float32")
                xsv = cuda.View.of(xs, "x", fn, contiguous="full", stream=st)
            b1v = cuda.View.of(b1, "b1", fn, contiguous="full", stream=st)
            cuda._cuda.parscale_bias_silu(device=dev, stream=st, dtype=dtype, Hh=Hh, R=R, x=xv.ptr, bias=b1v.ptr,
                                          out=xsv.ptr)
            del x, xv
            z = ops.mm(ops.float32(w2), xs)                           # (P, R) float32, cuBLAS
            zv = cuda.View.of(z, "z", fn, contiguous="full", stream=st)
            b2v = cuda.View.of(b2, "b2", fn, contiguous="full", stream=st)
            hk = cuda.View.of(h, "h", fn, stream=st)                  # feature axis contiguous
            cuda._cuda.parscale_mix(device=dev, stream=st, dtype=dtype, P=P, B=B, T=T, Hd=Hd, h=hk.ptr,
                                    h_stride=hk.strides[:3], z=zv.ptr, b2=b2v.ptr, smoothing=smoothing,
                                    y=yv.ptr, y_stride=yv.strides[:3],
                                    weights=cuda.View.of(wts, "weights", fn).ptr if wts is not None else None)
            if y is not out and out is not None:
                ops.copy_(out, y)
                y = out
        for buf in handed_back:   # after the launches: stream-safe for the caller to drop
            cuda.release_scratch(h, buf, st)
    y = cuda.wrap_result(h, y, st)
    if return_weights:
        return y, cuda.wrap_result(h, wts, st)
    return y
