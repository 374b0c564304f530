"""NumPy twins of lmkern.parscale (SPEC 5): expand, prefix_attention, aggregate, kv_cache_bytes.

Written for clarity, not speed: the tests' oracle and a readable statement of the math.
Rows are stream-major throughout: row ``p·B + b`` of a ``(P·B, ...)`` array is stream ``p`` of
batch element ``b``.
"""
from __future__ import annotations

import numpy as np

from .. import _dispatch
from .core import attention as _attention
from ..parscale import check_aggregate_args, check_expand_args, kv_cache_bytes  # noqa: F401  (pure Python)


def expand(x, P):
    """(B, ...) -> (P·B, ...): row p·B + b is x[b] (the P streams of one input, stream-major)."""
    x = np.asarray(x)
    P = check_expand_args("parscale.expand", x, P)
    return np.concatenate([x] * P, axis=0)


def prefix_attention(q, k, v, prefix_k, prefix_v, *, causal=False, scale=None, q_pos=None, kv_pos=None,
                     kv_lens=None, return_lse=False, out=None):
    """Row r attends over [prefix_k[r // B] | k[r]]: the L prefix keys always, its own keys as attention.

    ``q (P·B,N,Hq,D)``, ``k (P·B,M,Hkv,D)``, ``v (P·B,M,Hkv,E)``, ``prefix_k (P,L,Hkv,D)``,
    ``prefix_v (P,L,Hkv,E)``.  The twin concatenates the prefix per row (the kernel never does).
    """
    return _attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos, kv_lens=kv_lens,
                      return_lse=return_lse, out=out, prefix_k=prefix_k, prefix_v=prefix_v)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def aggregate(h, w1, b1, w2, b2, *, P, smoothing=0.1, layout="interleaved", return_weights=False, out=None):
    """y[b,t] = sum_p w[b,t,p] h[p·B+b, t] with w = smoothed softmax_P(silu(u w1^T + b1) w2^T + b2).

    ``u[b,t]`` is the concatenation of the P streams' hidden states: interleaved ``u[j·P + p]``
    (the released checkpoints) or concat ``u[p·Hd + j]``.  The softmax, the smoothing and the sum
    are in float32 (float64 for float64 inputs); ``w`` is returned as float32.
    """
    fn = "parscale.aggregate"
    hdtype, ha = _dispatch.float_arrays(fn, h=h)                   # y has h's dtype
    dtype, a = _dispatch.float_arrays(fn, h=ha["h"], w1=w1, b1=b1, w2=w2, b2=b2)
    P, B, T, Hd, Hh = check_aggregate_args(fn, a["h"], a["w1"], a["b1"], a["w2"], a["b2"], P, smoothing, layout)
    acc = np.float64 if dtype == np.float64 else np.float32
    if P == 1:                                                     # softmax over one stream is 1
        y = ha["h"]
        if out is not None:
            out[...] = y
            y = out
        return (y, np.ones((B, T, 1), np.float32)) if return_weights else y
    hs = a["h"].reshape(P, B, T, Hd)
    if layout == "interleaved":
        u = hs.transpose(1, 2, 3, 0).reshape(B, T, Hd * P)        # u[b,t,j*P+p] = h[p*B+b,t,j]
    else:
        u = hs.transpose(1, 2, 0, 3).reshape(B, T, P * Hd)        # u[b,t,p*Hd+j] = h[p*B+b,t,j]
    hidden = _silu(u @ a["w1"].T + a["b1"])                         # (B, T, Hh)
    z = (hidden @ a["w2"].T + a["b2"]).astype(acc)                  # (B, T, P)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    w = e / e.sum(axis=-1, keepdims=True)
    w = w * (1 - smoothing) + smoothing / P
    y = np.einsum("pbtj,btp->btj", hs.astype(acc), w).astype(hdtype)
    if out is not None:
        out[...] = y
        y = out
    return (y, w.astype(np.float32)) if return_weights else y
