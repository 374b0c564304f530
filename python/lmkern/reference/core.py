"""NumPy twins of the core kernels (SPEC 1): attention, rope, KVCache.

Written for clarity, not speed: they are the tests' oracle and a readable statement of the math.
They materialize the N x M score matrix per batch row, which the kernels never do.
"""
from __future__ import annotations

import numpy as np

from .. import _dispatch
from .._kvcache import KVCacheBase


def _acc_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def default_q_pos(kv_lens, B, N):
    """Bottom-right alignment: q_pos[b, i] = kv_lens[b] - N + i."""
    return np.asarray(kv_lens, dtype=np.int64).reshape(B, 1) - N + np.arange(N, dtype=np.int64)


def _admissible_sum(p, admissible, v):
    """``sum_j p[i, j] v[j]`` over the keys row i admits: a masked key adds nothing even where its value
    is inf or NaN (``p @ v`` would add 0 * inf = NaN); an admissible one adds ``p v`` as IEEE says."""
    bad = ~np.isfinite(v).all(axis=-1)                  # keys with a non-finite value
    if not bad.any():
        return p @ v
    out = p @ np.where(bad[:, None], 0, v)
    for j in np.flatnonzero(bad):
        rows = admissible[:, j]
        out[rows] += p[rows, j, None] * v[j]
    return out


def attention(q, k, v, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None,
              return_lse=False, out=None, prefix_k=None, prefix_v=None):
    """out[b,i,h] = softmax over admissible j of scale <q[b,i,h], k[b,j,g]>, applied to v[b,j,g].

    ``prefix_k``/``prefix_v`` (P, L, Hkv, ·) are the ParScale shared prefix: row b also attends to the
    L keys of prefix b // (B / P), always admissible.  (Public in lmkern.reference.parscale.)
    """
    from .._attention import check_attention_args      # the library's shape rules, so the errors match
    fn = "attention" if prefix_k is None else "parscale.prefix_attention"
    P = None
    if prefix_k is not None:
        from ..parscale import _prefix_streams
        P, nrows = _prefix_streams(fn, q, prefix_k)
        if nrows == 0:
            prefix_k, prefix_v, P = np.asarray(prefix_k)[:0], np.asarray(prefix_v)[:0], 0
    dtype, a = _dispatch.float_arrays(fn, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    q_pos = _dispatch.index_array(fn, "q_pos", q_pos)
    kv_pos = _dispatch.index_array(fn, "kv_pos", kv_pos)
    kv_lens = _dispatch.index_array(fn, "kv_lens", kv_lens)
    check_attention_args(fn, a["q"], a["k"], a["v"], q_pos, kv_pos, kv_lens, a["prefix_k"], a["prefix_v"], P)
    q, k, v = a["q"], a["k"], a["v"]
    acc = _acc_dtype(dtype)
    B, N, Hq, D = q.shape
    M, Hkv, E = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv if Hkv else 1
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)
    if out is not None:
        _dispatch.prepare_out(fn, out, (B, N, Hq, E), dtype, letters="B,N,Hq,E")
    lens = np.full(B, M, np.int64) if kv_lens is None else np.asarray(kv_lens, np.int64).reshape(B)
    qp = default_q_pos(lens, B, N) if q_pos is None else np.broadcast_to(np.asarray(q_pos, np.int64), (B, N))
    kp = np.broadcast_to(np.arange(M, dtype=np.int64), (B, M)) if kv_pos is None else \
        np.broadcast_to(np.asarray(kv_pos, np.int64), (B, M))
    res = np.zeros((B, N, Hq, E), acc)
    lse = np.full((B, N, Hq), -np.inf, acc)
    L = 0 if a["prefix_k"] is None else a["prefix_k"].shape[1]
    rows = B // a["prefix_k"].shape[0] if L and a["prefix_k"].shape[0] else 1   # B = 0: no rows read it
    for b in range(B):
        admissible = np.arange(M)[None, :] < lens[b]                       # (1, M)
        if causal:
            admissible = admissible & (kp[b][None, :] <= qp[b][:, None])   # (N, M)
        admissible = np.broadcast_to(admissible, (N, M))
        kb = k[b].astype(acc)
        vb = v[b].astype(acc)
        if L:
            kb = np.concatenate([a["prefix_k"][b // rows].astype(acc), kb], axis=0)
            vb = np.concatenate([a["prefix_v"][b // rows].astype(acc), vb], axis=0)
            admissible = np.concatenate([np.ones((N, L), bool), admissible], axis=1)
        for h in range(Hq):
            g = h // group
            with np.errstate(invalid="ignore", over="ignore"):              # inf / NaN keys: IEEE, silently
                s = scale * (q[b, :, h].astype(acc) @ kb[:, g].T)          # (N, L + M)
            s = np.where(admissible, s, -np.inf)
            m = s.max(axis=1, initial=-np.inf, keepdims=True)
            m = np.where(m == -np.inf, 0, m)   # nothing admissible (or all -inf): weights 0; +inf: NaN
            p = np.where(admissible, np.exp(s - m), 0)
            l = p.sum(axis=1, keepdims=True)
            # l == 0: no admissible key (out 0, lse -inf); a NaN score makes l NaN and the row NaN
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                res[b, :, h] = np.where(l != 0, _admissible_sum(p, admissible, vb[:, g]) / np.where(l != 0, l, 1), 0)
                lse[b, :, h] = np.where(l[:, 0] != 0, np.log(np.where(l[:, 0] != 0, l[:, 0], 1)) + m[:, 0], -np.inf)
    res = res.astype(dtype)
    if out is not None:
        out[...] = res
        res = out
    return (res, lse.astype(dtype)) if return_lse else res


def rope(x, positions, *, base=10000.0, rotary_dim=None, style="half", inverse=False, out=None):
    """Rotates feature pairs of x (B, T, G, D) by theta = pos * base^(-2i/r)."""
    from .._attention import check_rope_args           # the library's argument rules
    dtype, a = _dispatch.float_arrays("rope", x=x)
    x = a["x"]
    positions = _dispatch.index_array("rope", "positions", positions)
    r = check_rope_args("rope", x, positions, rotary_dim, style)   # r = rotary_dim or D
    B, T, G, D = x.shape
    if out is not None:
        _dispatch.prepare_out("rope", out, x.shape, dtype, letters="B,T,G,D")
    pos = np.broadcast_to(np.asarray(positions, np.int64), (B, T)).astype(np.float64)
    inv_freq = base ** (-2.0 * np.arange(r // 2, dtype=np.float64) / r)
    theta = pos[:, :, None, None] * inv_freq                                 # (B, T, 1, r/2)
    cos, sin = np.cos(theta), np.sin(theta) * (-1.0 if inverse else 1.0)
    y = x.astype(np.float64).copy()
    if style == "half":
        ia, ib = np.arange(r // 2), np.arange(r // 2) + r // 2
    else:
        ia, ib = 2 * np.arange(r // 2), 2 * np.arange(r // 2) + 1
    xa, xb = y[..., ia].copy(), y[..., ib].copy()
    y[..., ia] = xa * cos - xb * sin
    y[..., ib] = xa * sin + xb * cos
    y = y.astype(dtype)
    if out is not None:
        out[...] = y
        return out
    return y


def rope_(x, positions, *, base=10000.0, rotary_dim=None, style="half", inverse=False):
    """In-place rope."""
    x[...] = rope(x, positions, base=base, rotary_dim=rotary_dim, style=style, inverse=inverse)
    return x


class KVCache(KVCacheBase):
    """The plain KV cache of lmkern.KVCache, attending with the NumPy attention twin."""

    _attention = staticmethod(attention)
