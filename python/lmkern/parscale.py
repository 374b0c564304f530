"""lmkern.parscale: Parallel Scaling (SPEC 5; arXiv 2505.10475, reference code QwenLM/ParScale).

A ParScale model runs P copies ("streams") of every input through one backbone.  Stream ``p`` sees
its own learned key/value prefix (``L`` = 48 tokens per layer in the released checkpoints) in
every attention layer, and a small MLP mixes the P final hidden states back into one.  Rows are
stream-major throughout: row ``p·B + b`` of a ``(P·B, ...)`` array is stream ``p`` of input ``b``.

* :func:`expand` - ``(B, ...) -> (P·B, ...)``.
* :func:`prefix_attention` - attention where the P prefixes are shared by the B rows of their
  stream (read in place by the attention kernel, never copied per row).
* :func:`aggregate` - the dynamic output aggregation, with its two GEMMs in BLAS and the rest fused.
* :func:`kv_cache_bytes` - what the KV cache of a ParScale model costs beside the P = 1 model.
"""
from __future__ import annotations

import operator
import os

import numpy as np

from . import _core, _dispatch
from ._attention import attention_impl

__all__ = ["expand", "prefix_attention", "aggregate", "kv_cache_bytes"]

# aggregate's own kernels sit between multi-threaded BLAS calls.  libgomp keeps an OpenMP team
# spinning for a while after each parallel region, on the very cores the next GEMM needs (on 2
# cores that made the first GEMM twice as slow), so they run on the calling thread unless OpenMP
# threads sleep when idle (OMP_WAIT_POLICY=passive), in which case they use every thread.
_AGG_THREADS = 0 if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive" else 1


# ---------------------------------------------------------------- argument checks (shared with the twins)

def _as_P(fn, P, name="P"):
    try:
        P = operator.index(P)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an integer; got {type(P).__name__}") from None
    if P < 1:
        raise ValueError(f"{fn}: {name} must be >= 1; got {P}")
    return P


def check_expand_args(fn, x, P):
    P = _as_P(fn, P)
    if np.ndim(x) < 1:
        raise ValueError(f"{fn}: x must have a batch axis (B, ...); got a 0-d array")
    return P


def check_aggregate_args(fn, h, w1, b1, w2, b2, P, smoothing, layout):
    """Returns ``(P, B, T, Hd, Hh)``; ValueError naming the argument on any mismatch."""
    P = _as_P(fn, P)
    _dispatch.check_choice(fn, "layout", layout, ("interleaved", "concat"))
    try:
        s = float(smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: smoothing must be a real number; got {type(smoothing).__name__}") from None
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"{fn}: smoothing must be in [0, 1]; got {smoothing}")
    sh = _dispatch.Shapes(fn)
    sh.check("h", h, "P·B,T,Hd")
    if sh["P·B"] % P:
        raise ValueError(f"{fn}: h has P·B = {sh['P·B']} rows, which is not divisible by P = {P}")
    B, T, Hd = sh["P·B"] // P, sh["T"], sh["Hd"]
    sh.bind("P", P)
    sh.bind("P·Hd", P * Hd)
    sh.check("w1", w1, "Hh,P·Hd")
    sh.check("b1", b1, "Hh")
    sh.check("w2", w2, "P,Hh")
    sh.check("b2", b2, "P")
    return P, B, T, Hd, sh["Hh"]


# ---------------------------------------------------------------- expand

def expand(x, P):
    """``(B, ...) -> (P·B, ...)``, stream-major: row ``p·B + b`` is ``x[b]`` (SPEC 5.1).

    Works for any dtype (token ids as well as embeddings) and returns a new C-contiguous array
    (the streams diverge after their first layer, so they are written to, not broadcast views).
    CUDA arrays (any type, any dtype) are expanded on their GPU with P device-to-device copies.

    Example::

        >>> lmkern.parscale.expand(np.array([[1, 2], [3, 4]]), 2)
        array([[1, 2],
               [3, 4],
               [1, 2],
               [3, 4]])
    """
    fn = "parscale.expand"
    if _dispatch.route(fn, x=x) == "cuda":
        return _cuda_expand(x, P)
    x = np.asarray(x)
    P = check_expand_args(fn, x, P)
    out = np.empty((P,) + x.shape, x.dtype)
    out[...] = x                       # one broadcast copy: out[p] = x
    return out.reshape((P * x.shape[0],) + x.shape[1:])


# ---------------------------------------------------------------- prefix attention

def prefix_attention(q, k, v, prefix_k, prefix_v, *, causal=False, scale=None, q_pos=None, kv_pos=None,
                     kv_lens=None, return_lse=False, out=None):
    """Attention of P streams, each with its own shared key/value prefix (SPEC 5.2).

    ``q (P·B,N,Hq,D)``, ``k (P·B,M,Hkv,D)``, ``v (P·B,M,Hkv,E)``, ``prefix_k (P,L,Hkv,D)``,
    ``prefix_v (P,L,Hkv,E)`` -> ``out (P·B,N,Hq,E)`` [and ``lse (P·B,N,Hq)``].

    Row ``r`` attends over ``[prefix_k[r // B] | k[r]]``: the ``L`` prefix keys are always
    admissible (they have no position and no RoPE; ``causal``, ``q_pos``, ``kv_pos`` and
    ``kv_lens`` apply to the real keys only, exactly as in :func:`lmkern.attention`).  GQA as in
    attention (query head ``h`` reads KV head ``h // (Hq // Hkv)``, also in the prefix).
    ``L = 0`` is plain attention.  ``P`` is ``prefix_k.shape[0]``; ``q.shape[0]`` must be a multiple.

    Better than the reference code: ParScale's modeling code (``modeling_qwen2_parscale.py``)
    expands the prefix to every row of the batch and concatenates it in front of the cache
    (``P·B·L`` keys per layer, copied every step); here the attention kernel reads the ``P·L``
    prefix keys in place, so the prefix costs ``P·L`` instead of ``P·B·L`` keys of memory and no
    copy per step (``benchmarks/bench_parscale.py`` measures both).
    """
    fn = "parscale.prefix_attention"
    if _dispatch.route(fn, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, out=out) == "cuda":
        return _cuda_prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale, q_pos=q_pos,
                                      kv_pos=kv_pos, kv_lens=kv_lens, return_lse=return_lse, out=out)
    P, rows = _prefix_streams(fn, q, prefix_k)
    if rows == 0:
        # no rows: nothing reads a prefix, and prefix_rows = B / P would be 0 (its shape is still checked)
        prefix_k, prefix_v, P = np.asarray(prefix_k)[:0], None if prefix_v is None else np.asarray(prefix_v)[:0], 0
    return attention_impl(fn, q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos, kv_lens=kv_lens,
                          return_lse=return_lse, out=out, prefix_k=prefix_k, prefix_v=prefix_v, P=P)


def _prefix_streams(fn, q, prefix_k):
    """(P, P·B) from prefix_k's and q's leading axes; ValueError when P·B is not a multiple of P."""
    if prefix_k is None or np.ndim(prefix_k) != 4:
        raise ValueError(f"{fn}: prefix_k has shape {np.shape(prefix_k)}; expected (P, L, Hkv, D) (4 dimensions)")
    if np.ndim(q) < 1:
        raise ValueError(f"{fn}: q has shape (); expected (P·B, N, Hq, D)")
    P, rows = int(np.shape(prefix_k)[0]), int(np.shape(q)[0])
    if rows == 0:
        return P, 0
    if P == 0 or rows % P:
        raise ValueError(f"{fn}: q has P·B = {rows} rows, which is not divisible by P = {P} "
                         f"(the streams of prefix_k)")
    return P, rows


# ---------------------------------------------------------------- aggregate

def aggregate(h, w1, b1, w2, b2, *, P, smoothing=0.1, layout="interleaved", return_weights=False, out=None):
    """Dynamic weighted sum of the P streams' hidden states (SPEC 5.3).

    ``h (P·B,T,Hd)`` stream-major; ``w1 (Hh,P·Hd)``, ``b1 (Hh,)``, ``w2 (P,Hh)``, ``b2 (P,)`` in
    PyTorch ``Linear`` layout (out x in) -> ``y (B,T,Hd)`` [and ``w (B,T,P)`` float32]::

        u[b,t]  = interleaved: u[j·P + p] = h[p·B+b, t, j]   (released checkpoints)
                  concat:      u[p·Hd + j] = h[p·B+b, t, j]
        z       = silu(u @ w1.T + b1) @ w2.T + b2
        w       = softmax_P(z) · (1 - smoothing) + smoothing / P
        y[b,t]  = sum_p w[b,t,p] · h[p·B+b, t]

    The two GEMMs run in NumPy's BLAS (feature-major, ``w1 @ u.T``: OpenBLAS runs the few-row
    decode shapes up to 1.7x faster that way round; 2 or 3 rows walk ``w1`` once in L2-sized
    blocks); one kernel builds ``u`` in one pass, one adds
    ``b1`` and applies SiLU in place on the GEMM output, and one fuses the softmax over P (in
    double precision, max-subtracted, so logits like 1e30 stay finite), the smoothing, and the
    weighted sum of the P streams (accumulated in float32 for float32, float64 for float64) - the
    (P·B,T,Hd) product the reference code materializes before summing is never formed.

    Decisions where the SPEC is silent:

    * ``P = 1`` returns ``h`` itself (no copy; a copy into ``out`` when given), and the weights,
      when asked for, are ones of shape ``(B,T,1)`` (a softmax over one stream is 1).
    * ``smoothing`` must be in ``[0, 1]`` (ValueError otherwise).
    * The weights are float32 for every input dtype (SPEC), though computed in double.
    * Decoding aggregates the last position only; slice before the call, which reads T times less::

          y = aggregate(h[:, -1:], w1, b1, w2, b2, P=P)      # (B, 1, Hd)

    The released checkpoints use ``smoothing=0.1`` and ``layout="interleaved"`` (the modeling code
    rearranges ``(n b) s h -> b s (h n)``).

    On the GPU (torch or CuPy CUDA tensors; f32/f16/bf16): the two GEMMs are the caller's framework's
    matmul (cuBLAS, float32 accumulation), bias + SiLU and the fused softmax / smoothing / weighted
    sum are lmkern kernels (float32 throughout, the weighted sum rounded once to h's dtype); a
    :class:`lmkern.cuda.DeviceArray` or JAX ``h`` is a ``TypeError`` (no framework to run the GEMMs
    in).  Details in ``lmkern._cuda_parscale``.
    """
    fn = "parscale.aggregate"
    if _dispatch.route(fn, h=h, w1=w1, b1=b1, w2=w2, b2=b2, out=out) == "cuda":
        return _cuda_aggregate(h, w1, b1, w2, b2, P=P, smoothing=smoothing, layout=layout,
                               return_weights=return_weights, out=out)
    # y has h's dtype (SPEC 5.3); the computation runs in the promoted dtype of all the inputs
    hdtype, ha = _dispatch.float_arrays(fn, h=h)
    dtype, a = _dispatch.float_arrays(fn, h=ha["h"], w1=w1, b1=b1, w2=w2, b2=b2)
    P, B, T, Hd, Hh = check_aggregate_args(fn, a["h"], a["w1"], a["b1"], a["w2"], a["b2"], P, smoothing, layout)
    if P == 1:
        y = ha["h"]
        if out is not None:
            buf = _dispatch.prepare_out(fn, out, (B, T, Hd), hdtype, letters="B,T,Hd")
            np.copyto(buf, y)
            y = _dispatch.finish_out(buf, out)
        return (y, np.ones((B, T, 1), np.float32)) if return_weights else y
    R = B * T
    hc = np.ascontiguousarray(a["h"]).reshape(P * R, Hd)
    u = np.empty((R, P * Hd), dtype)
    _core.parscale_gather(hc, u, P, layout == "interleaved", _AGG_THREADS)
    x = _w_times_ut(a["w1"], u)                                  # (Hh, R), BLAS
    del u
    _core.parscale_bias_silu_(x, np.ascontiguousarray(a["b1"]), _AGG_THREADS)
    z = a["w2"] @ x                                              # (P, R), BLAS
    buf = _dispatch.prepare_out(fn, out, (B, T, Hd), hdtype, letters="B,T,Hd", inputs=(hc,))
    mixed = buf if dtype == hdtype else np.empty((B, T, Hd), dtype)   # wider weights: round once at the end
    wts = np.empty((B, T, P), np.float32) if return_weights else None
    _core.parscale_mix(hc, z, np.ascontiguousarray(a["b2"]), mixed.reshape(R, Hd),
                       None if wts is None else wts.reshape(R, P), P, float(smoothing), _AGG_THREADS)
    if mixed is not buf:
        np.copyto(buf, mixed, casting="same_kind")
    y = _dispatch.finish_out(buf, out)
    return (y, wts) if return_weights else y


def _w_times_ut(w, u):
    """``w @ u.T`` through NumPy's BLAS, C-contiguous ``(Hh, R)``.

    Feature-major (``w @ u.T`` rather than ``u @ w.T``): OpenBLAS runs the few-row (decode) shapes
    up to 1.7x faster this way round and the many-row ones no slower.  For R = 2 or 3 rows its
    sgemm still makes three passes over ``w`` (it packs it), so there ``w`` is walked once in
    blocks of about 1 MiB that stay in L2, each block times every row by sgemv (1.5-1.8x faster).
    """
    R = u.shape[0]
    if R not in (2, 3) or not w.flags.c_contiguous:
        return w @ u.T
    Hh, K = w.shape
    rows = max(16, (1 << 20) // max(K * w.itemsize, 1))
    xt = np.empty((R, Hh), np.result_type(w, u))
    for o in range(0, Hh, rows):
        wb = w[o:o + rows]
        for r in range(R):
            np.matmul(wb, u[r], out=xt[r, o:o + rows])
    return np.ascontiguousarray(xt.T)


# ---------------------------------------------------------------- KV-cache memory

def kv_cache_bytes(n_layers, kv_heads, head_dim, seq_len, batch=1, P=1, *, prefix_len=48, v_head_dim=None,
                   dtype=np.float32):
    """Bytes of a ParScale model's KV cache beside the P = 1 model (plain Python, no arrays).

    Per layer, a token stores ``kv_heads · (head_dim + v_head_dim)`` values of ``dtype``:

    * ``streams``: the P streams' own tokens, ``P · batch · seq_len`` tokens per layer;
    * ``prefix``: the learned prefixes, ``P · prefix_len`` tokens per layer - counted once per
      stream, not once per row, because :func:`prefix_attention` shares them across the batch
      (0 when ``P = 1``: the P = 1 model is the plain model and has no prefix);
    * ``prefix_per_row``: what the prefix would cost copied into every row, ``P · batch ·
      prefix_len`` tokens per layer (the reference modeling code's layout), for comparison;
    * ``total`` = ``streams + prefix``; ``p1``: the plain model's cache (``batch · seq_len``
      tokens per layer); ``ratio`` = ``total / p1`` (``nan`` when ``p1`` is 0).

    ``prefix_len`` defaults to 48, the released checkpoints' value.  Example::

        >>> lmkern.parscale.kv_cache_bytes(24, 2, 64, 1024, batch=1, P=8)["ratio"]
        8.375
    """
    fn = "parscale.kv_cache_bytes"
    P = _as_P(fn, P)
    vals = {}
    for name, val in (("n_layers", n_layers), ("kv_heads", kv_heads), ("head_dim", head_dim), ("seq_len", seq_len),
                      ("batch", batch), ("prefix_len", prefix_len),
                      ("v_head_dim", head_dim if v_head_dim is None else v_head_dim)):
        try:
            vals[name] = operator.index(val)
        except TypeError:
            raise TypeError(f"{fn}: {name} must be an integer; got {type(val).__name__}") from None
        if vals[name] < 0:
            raise ValueError(f"{fn}: {name} must be >= 0; got {val}")
    per_token = vals["n_layers"] * vals["kv_heads"] * (vals["head_dim"] + vals["v_head_dim"]) * np.dtype(dtype).itemsize
    streams = P * vals["batch"] * vals["seq_len"] * per_token
    prefix = P * vals["prefix_len"] * per_token if P > 1 else 0
    p1 = vals["batch"] * vals["seq_len"] * per_token
    total = streams + prefix
    return {
        "streams": streams,
        "prefix": prefix,
        "prefix_per_row": P * vals["batch"] * vals["prefix_len"] * per_token if P > 1 else 0,
        "total": total,
        "p1": p1,
        "ratio": total / p1 if p1 else float("nan"),
    }


# ---------------------------------------------------------------- CUDA routes

def _cuda_expand(x, P):
    """GPU path: P device-to-device copies into an array of the caller's framework (any CUDA array type)."""
    from . import _cuda_parscale
    return _cuda_parscale.expand(x, P)


def _cuda_prefix_attention(q, k, v, prefix_k, prefix_v, **kwargs):
    """GPU path: the core CUDA attention kernel with its shared-prefix fields (the prefix is read in place)."""
    from . import cuda
    fn = "parscale.prefix_attention"
    P, _ = _prefix_streams(fn, q, prefix_k)
    return cuda.attention(q, k, v, prefix_k=prefix_k, prefix_v=prefix_v, P=max(P, 1), fn=fn, **kwargs)


def _cuda_aggregate(h, w1, b1, w2, b2, **kwargs):
    """GPU path (torch / CuPy arrays): the GEMMs in the caller's framework (cuBLAS), bias + SiLU and the
    fused softmax-smoothing-weighted-sum in lmkern's kernels; see lmkern._cuda_parscale."""
    from . import _cuda_parscale
    return _cuda_parscale.aggregate(h, w1, b1, w2, b2, **kwargs)
