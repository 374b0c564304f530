"""NumPy twins of lmkern.kv (SPEC 4): quantization, the KIVI cache, attention mass, pooling,
top-k selection and the selection recipes.  Written for clarity: they materialize what the
kernels never do (dequantized caches, N x M score matrices)."""
from __future__ import annotations

import numpy as np

from .. import _dispatch, _kvbase
from .._kvbase import (check_mass_args, check_pool_args, check_topk_args, check_compact_args,  # noqa: F401
                       QuantizedTensor, streaming_indices, lazy_ratio, scalekv_budgets)
from .core import attention

__all__ = [
    "QuantizedTensor", "quantize", "dequantize", "QuantizedKVCache", "attention_mass", "pool1d",
    "keep_topk", "compact", "streaming_indices", "snapkv_select", "h2o_select", "lazy_ratio",
    "scalekv_budgets",
]


def _group_codes(xg, bits):
    """Per group (last axis): lo, hi, scale (float32), zero (float32), codes (uint8)."""
    n = 2 ** bits - 1
    lo = xg.min(axis=-1)
    hi = xg.max(axis=-1)
    scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / n).astype(np.float32)
    zero = lo.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = scale.astype(np.float64)[..., None]
        v = (xg.astype(np.float64) - zero.astype(np.float64)[..., None]) / np.where(s > 0, s, 1.0)
        v = np.where(s > 0, v, 0.0)
        code = np.where(np.isnan(v), 0.0, np.clip(np.rint(v), 0, n))
    return scale, zero, code.astype(np.uint8)


def _pack(codes, bits, axis):
    """Packs uint8 codes LSB-first along `axis` (8 // bits codes per byte)."""
    per = 8 // bits
    c = np.moveaxis(codes, axis, -1)
    c = c.reshape(c.shape[:-1] + (c.shape[-1] // per, per)).astype(np.uint8)
    packed = np.zeros(c.shape[:-1], np.uint8)
    for k in range(per):
        packed |= (c[..., k] << (bits * k)).astype(np.uint8)
    return np.moveaxis(packed, -1, axis)


def _unpack(packed, bits, axis):
    per = 8 // bits
    p = np.moveaxis(packed, axis, -1)
    parts = [(p >> (bits * k)) & (2 ** bits - 1) for k in range(per)]
    c = np.stack(parts, axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * per,))
    return np.moveaxis(c, -1, axis)


def quantize(x, *, bits, group_size, axis):
    """KIVI asymmetric quantization of ``x (B,T,H,D)`` (SPEC 4.1); see :class:`QuantizedTensor`."""
    x, bits, G, axis = _kvbase.check_quantize_args("kv.quantize", x, bits, group_size, axis)
    B, T, H, D = x.shape
    if axis == "token":
        xg = x.reshape(B, T, H, D // G, G)                          # groups along D
        scale, zero, code = _group_codes(xg, bits)                  # (B,T,H,D/G), (B,T,H,D/G,G)
        codes = _pack(code.reshape(B, T, H, D), bits, 3)
    else:
        xg = np.moveaxis(x.reshape(B, T // G, G, H, D), 2, -1)      # (B,T/G,H,D,G): groups along T
        scale, zero, code = _group_codes(xg, bits)
        codes = _pack(np.moveaxis(code, -1, 2).reshape(B, T, H, D), bits, 1)
    return QuantizedTensor(codes, scale, zero, bits=bits, group_size=G, axis=axis, shape=x.shape, dtype=x.dtype)


def dequantize(qt):
    """``x_hat = code * scale + zero`` in float64, rounded once to ``qt.dtype``."""
    _kvbase.check_quantized("kv.dequantize", qt)
    B, T, H, D = qt.shape
    G = qt.group_size
    if qt.axis == "token":
        code = _unpack(qt.codes, qt.bits, 3).astype(np.float64)
        s = np.repeat(qt.scale.astype(np.float64), G, axis=3)
        z = np.repeat(qt.zero.astype(np.float64), G, axis=3)
    else:
        code = _unpack(qt.codes, qt.bits, 1).astype(np.float64)
        s = np.repeat(qt.scale.astype(np.float64), G, axis=1)
        z = np.repeat(qt.zero.astype(np.float64), G, axis=1)
    return (code * s + z).astype(qt.dtype).reshape(qt.shape)


class QuantizedKVCache(_kvbase.QuantizedKVCacheBase):
    """Twin of lmkern.kv.QuantizedKVCache: keeps the full-precision tokens and a dequantized copy
    of the quantized ones; ``attend`` runs the reference attention over ``[dequantized | full]``."""

    def __init__(self, batch, max_len, kv_heads, head_dim, v_head_dim=None, *, bits=2, group_size=32, residual=128):
        super().__init__(batch, max_len, kv_heads, head_dim, v_head_dim, bits=bits, group_size=group_size,
                         residual=residual)
        B, S, H = self.batch, self.max_len, self.kv_heads
        self._k = np.zeros((B, S, H, self.head_dim), np.float32)
        self._v = np.zeros((B, S, H, self.v_head_dim), np.float32)

    def _append_row(self, b, k, v, start, qk, qv):
        n = k.shape[0]
        self._k[b, start:start + n] = k
        self._v[b, start:start + n] = v
        if qk[1] > qk[0]:   # keys: whole groups of G tokens, per channel
            qt = quantize(self._k[b:b + 1, qk[0]:qk[1]], bits=self.bits, group_size=self.group_size, axis="channel")
            self._k[b, qk[0]:qk[1]] = dequantize(qt)[0]
        if qv[1] > qv[0]:   # values: per token
            qt = quantize(self._v[b:b + 1, qv[0]:qv[1]], bits=self.bits, group_size=self.group_size, axis="token")
            self._v[b, qv[0]:qv[1]] = dequantize(qt)[0]

    def attend(self, q, *, causal=True, q_pos=None, scale=None, return_lse=False):
        dtype, q, q_pos, scale = self.check_attend(q, q_pos, scale)
        res = attention(q.astype(np.float32), self._k, self._v, causal=causal, scale=scale, q_pos=q_pos,
                        kv_pos=self._pos, kv_lens=self._len, return_lse=return_lse)
        if return_lse:
            return res[0].astype(dtype), res[1].astype(dtype)
        return res.astype(dtype)


def attention_mass(q, k, *, scale=None, causal=False, q_pos=None, kv_pos=None, kv_lens=None, normalize=True,
                   group_reduce="mean"):
    """Attention each key receives, ``(B,M,Hkv)`` float32 (``(B,M,Hq)`` for ``group_reduce="none"``)."""
    fn = "kv.attention_mass"
    q, k, qp, kp, lens, scale, sh = check_mass_args(fn, q, k, scale, q_pos, kv_pos, kv_lens, group_reduce)
    B, N, Hq, M, Hkv = sh["B"], sh["N"], sh["Hq"], sh["M"], sh["Hkv"]
    group = Hq // Hkv if Hkv else 1
    per_head = np.zeros((B, M, Hq), np.float64)
    for b in range(B):
        adm = np.broadcast_to(np.arange(M)[None, :] < lens[b], (N, M))
        if causal:
            adm = adm & (kp[b][None, :] <= qp[b][:, None])
        for h in range(Hq):
            with np.errstate(invalid="ignore", over="ignore"):   # NaN / inf inputs give NaN / inf scores
                s = scale * (q[b, :, h].astype(np.float64) @ k[b, :, h // group].astype(np.float64).T)   # (N, M)
            if normalize:
                s = np.where(adm, s, -np.inf)
                m = s.max(axis=1, initial=-np.inf, keepdims=True)   # NaN when a NaN score is admissible
                p = np.where(adm, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
                l = p.sum(axis=1, keepdims=True)
                p = np.where(adm, p / np.where(l > 0, l, 1), 0.0)
                # a row with a NaN or +inf admissible score is NaN on its admissible keys (as softmax)
                p = np.where(adm & (np.isnan(m) | (m == np.inf)), np.nan, p)
                per_head[b, :, h] = p.sum(axis=0)
            else:
                per_head[b, :, h] = np.where(adm, s, 0.0).sum(axis=0)
    if group_reduce == "none":
        return per_head.astype(np.float32)
    grouped = per_head.reshape(B, M, Hkv, group)
    red = {"mean": np.mean, "sum": np.sum, "max": np.max}[group_reduce]
    if group == 0 or grouped.size == 0:
        return np.zeros((B, M, Hkv), np.float32)
    return red(grouped, axis=3).astype(np.float32)


def pool1d(scores, kernel_size, *, mode="avg"):
    """Pooling along M of ``(B,M,H)``, padding ``kernel_size // 2``: ``"avg"`` counts the padding as
    zeros (PyTorch avg_pool1d default), ``"max"`` ignores it."""
    s, ks = check_pool_args("kv.pool1d", scores, kernel_size, mode)
    B, M, H = s.shape
    r = ks // 2
    out = np.empty_like(s)
    for j in range(M):
        window = s[:, max(0, j - r):min(M, j + r + 1)]
        out[:, j] = window.sum(axis=1) / ks if mode == "avg" else window.max(axis=1)
    return out


def keep_topk(scores, budget, *, sink=0, recent=0):
    """Kept positions ``(B,K,H)`` int64, ``K = min(budget, M)``, ascending per head: the first ``sink``
    and last ``recent`` always, the rest by score (ties to the lower position, NaN lowest)."""
    s, budget, sink, recent = check_topk_args("kv.keep_topk", scores, budget, sink, recent)
    B, M, H = s.shape
    K = min(budget, M)
    out = np.empty((B, K, H), np.int64)
    pos = np.arange(M)
    protected = (pos < sink) | (pos >= M - recent)
    for b in range(B):
        for h in range(H):
            col = s[b, :, h].astype(np.float64)
            nan = np.isnan(col)
            order = np.lexsort((pos, -np.where(nan, 0, col), nan))          # best first
            order = [j for j in order if not protected[j]]
            chosen = np.concatenate([pos[protected], np.asarray(order[:K - protected.sum()], np.int64)])
            out[b, :, h] = np.sort(chosen)
    return out


def compact(x, idx):
    """``out[b,k,h] = x[b, idx[b,k,h], h]``: ``x (B,M,H,D)``, ``idx (B,K,H)`` -> ``(B,K,H,D)``."""
    x, idx = check_compact_args("kv.compact", x, idx)
    B, K, H = idx.shape
    out = np.empty((B, K, H) + x.shape[3:], x.dtype)
    for b in range(B):
        for h in range(H):
            out[b, :, h] = x[b, idx[b, :, h], h]
    return out


class _Ops:
    attention_mass = staticmethod(attention_mass)
    pool1d = staticmethod(pool1d)
    keep_topk = staticmethod(keep_topk)


def snapkv_select(q_window, k, budget, *, kernel_size=5, pool="avg"):
    """SnapKV: window votes over the prefix, pooled, top-(budget - W), plus the window."""
    return _kvbase.snapkv_select(_Ops, q_window, k, budget, kernel_size=kernel_size, pool=pool)


def h2o_select(mass, budget, *, recent):
    """H2O: heavy hitters by accumulated mass plus the last ``recent`` positions."""
    return _kvbase.h2o_select(_Ops, mass, budget, recent=recent)
