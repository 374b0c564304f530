"""lmkern.attention, lmkern.rope / rope_ and lmkern.KVCache (SPEC 1)."""
from __future__ import annotations

import numpy as np

from . import _core, _dispatch
from ._kvcache import KVCacheBase


def check_attention_args(fn, q, k, v, q_pos=None, kv_pos=None, kv_lens=None, prefix_k=None, prefix_v=None, P=None):
    """Shape checks shared by attention, parscale.prefix_attention and their CUDA paths."""
    sh = _dispatch.Shapes(fn)
    sh.check("q", q, "B,N,Hq,D")
    sh.check("k", k, "B,M,Hkv,D")
    sh.check("v", v, "B,M,Hkv,E")
    if sh["Hkv"] == 0 and sh["Hq"] != 0 or sh["Hkv"] and sh["Hq"] % sh["Hkv"]:
        raise ValueError(f"{fn}: q has Hq = {sh['Hq']} heads and k has Hkv = {sh['Hkv']}; Hq must be a multiple of Hkv")
    if q_pos is not None:
        sh.check_one_of("q_pos", q_pos, "N", "B,N")
    if kv_pos is not None:
        sh.check_one_of("kv_pos", kv_pos, "M", "B,M")
    if kv_lens is not None:
        sh.check_lens("kv_lens", kv_lens)
    if prefix_k is not None:
        sh.bind("P", P)
        sh.check("prefix_k", prefix_k, "P,L,Hkv,D")
        sh.check("prefix_v", prefix_v, "P,L,Hkv,E")
    return sh


def attention_impl(fn, q, k, v, *, causal, scale, q_pos, kv_pos, kv_lens, return_lse, out,
                   prefix_k=None, prefix_v=None, P=1):
    """CPU path of attention with an optional shared prefix (ParScale); arguments already routed."""
    dtype, a = _dispatch.float_arrays(fn, q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    q_pos = _dispatch.index_array(fn, "q_pos", q_pos)
    kv_pos = _dispatch.index_array(fn, "kv_pos", kv_pos)
    kv_lens = _dispatch.index_array(fn, "kv_lens", kv_lens)
    sh = check_attention_args(fn, a["q"], a["k"], a["v"], q_pos, kv_pos, kv_lens, a["prefix_k"], a["prefix_v"], P)
    B, N, Hq, E = sh["B"], sh["N"], sh["Hq"], sh["E"]
    scale = _dispatch.as_scale(fn, scale, sh["D"] ** -0.5 if sh["D"] else 1.0)
    buf = _dispatch.prepare_out(fn, out, (B, N, Hq, E), dtype, letters="B,N,Hq,E",
                                  inputs=tuple(a.values()))
    lse = np.empty((B, N, Hq), dtype) if return_lse else None
    if buf.size == 0 and lse is None:   # nothing to compute (E = 0 with a long M would still walk M)
        return _dispatch.finish_out(buf, out)
    _core.attention(a["q"], a["k"], a["v"], buf, lse, q_pos, kv_pos, kv_lens, bool(causal), scale,
                    a["prefix_k"], a["prefix_v"], max(B // P, 1) if P else 1)
    res = _dispatch.finish_out(buf, out)
    return (res, lse) if return_lse else res


def attention(q, k, v, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None,
              return_lse=False, out=None):
    """Scaled dot-product attention with GQA, explicit positions and ragged lengths (SPEC 1.1).

    ``q (B,N,Hq,D)``, ``k (B,M,Hkv,D)``, ``v (B,M,Hkv,E)`` -> ``out (B,N,Hq,E)`` [and ``lse (B,N,Hq)``].
    ``out[b,i,h] = sum_j softmax_j(scale <q[b,i,h], k[b,j,g]>) v[b,j,g]`` with ``g = h // (Hq//Hkv)``,
    over the admissible keys: ``j < kv_lens[b]`` and, when ``causal``, ``kv_pos[b,j] <= q_pos[b,i]``;
    defaults ``kv_pos = j``, ``q_pos = kv_lens[b] - N + i`` (bottom-right, as FlashAttention >= 2.1);
    ``q_pos`` may be ``(N,)`` or ``(B,N)``, ``kv_pos`` ``(M,)`` or ``(B,M)``.  ``lse = log sum_j e^(s_ij)``.
    ``scale`` defaults to ``D**-0.5``.  No ``N x M`` matrix or mask is ever formed.

    Decisions where the SPEC is silent:

    * a query with no admissible key gives ``out = 0``, ``lse = -inf`` (no NaN);
    * a NaN score (NaN in ``q`` or an admissible key) makes that query's whole output row and lse NaN,
      as IEEE arithmetic over the row would; inf in ``v`` propagates linearly.  A key a query does
      not admit (beyond ``kv_lens``, or causally masked) adds nothing to it, even where its key or
      value is inf or NaN (no ``0 * inf``); the queries that admit it get IEEE's inf / NaN.  (The CUDA
      kernels do not yet guarantee this for a masked key that shares a key tile with admissible ones.);
    * float16 computes and returns float32; float32 accumulates in float32 (statistics too),
      float64 in float64;
    * results are bitwise reproducible for a fixed ``lmkern.set_num_threads``; changing the thread
      count can change the last bits of decode-shaped calls (the key split follows the thread count).

    How (CPU, float32): prefill runs flash-style tiles of (row, KV head, query block) holding all
    ``Hq/Hkv`` query heads of the group, so K and V are read once per group (torch's SDPA repeats
    K/V per query head for GQA), a register-blocked ``Q K^T`` (AVX-512 or AVX2 tiles, each sized to
    its register file) on a once-transposed K, the online softmax fused into it, and causal blocks
    above the diagonal skipped (by the positions' per-block min/max, so explicit MoR positions skip
    too).  Decode and other few-row calls split the
    keys of every row across all threads and merge the partial ``(max, sum, acc)`` states with the
    one log-sum-exp combine, so a single long sequence uses every core.  float64 runs the same SIMD
    kernels on vectors of doubles (with a double-precision exponential); ``lmkern._core._set_simd(False)``
    selects the scalar generic kernel for both.

    Example::

        >>> q = np.random.randn(1, 4, 8, 64).astype(np.float32)
        >>> k = v = np.random.randn(1, 16, 2, 64).astype(np.float32)
        >>> lmkern.attention(q, k, v, causal=True).shape
        (1, 4, 8, 64)
    """
    fn = "attention"
    if _dispatch.route(fn, q=q, k=k, v=v, out=out) == "cuda":
        from . import cuda
        return cuda.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos,
                              kv_lens=kv_lens, return_lse=return_lse, out=out)
    return attention_impl(fn, q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos,
                          kv_lens=kv_lens, return_lse=return_lse, out=out)


def check_rope_args(fn, x, positions, rotary_dim, style):
    sh = _dispatch.Shapes(fn)
    sh.check("x", x, "B,T,G,D")
    sh.check_one_of("positions", positions, "T", "B,T")
    D = sh["D"]
    if rotary_dim is not None:
        _dispatch.check_count(fn, "rotary_dim", rotary_dim)
    r = int(rotary_dim) if rotary_dim else D      # SPEC 1.2: r = rotary_dim or D (0 and None mean D)
    if r < 0 or r > D or r % 2:
        raise ValueError(f"{fn}: rotary_dim must be even and in [0, D = {D}]; got {rotary_dim}")
    _dispatch.check_choice(fn, "style", style, ("half", "interleaved"))
    return r


def rope(x, positions, *, base=10000.0, rotary_dim=None, style="half", inverse=False, out=None):
    """Rotary position embedding of ``x (B,T,G,D)`` at ``positions (T,)`` or ``(B,T)`` (SPEC 1.2).

    ``style="half"`` pairs ``(x[i], x[i + r/2])`` (GPT-NeoX, T6); ``"interleaved"`` pairs
    ``(x[2i], x[2i+1])`` (GPT-J, Llama).  Each pair ``(a, b) -> (a cos - b sin, a sin + b cos)`` with
    ``theta = pos * base**(-2i/r)`` computed in double precision; ``inverse=True`` rotates by
    ``-theta`` (the T6 training code is ``style="half", inverse=True``).  Features ``>= r`` pass through.
    """
    fn = "rope"
    if _dispatch.route(fn, x=x, out=out) == "cuda":
        from . import cuda
        return cuda.rope(x, positions, base=base, rotary_dim=rotary_dim, style=style, inverse=inverse, out=out)
    dtype, a = _dispatch.float_arrays(fn, x=x)
    pos = _dispatch.index_array(fn, "positions", positions)
    r = check_rope_args(fn, a["x"], pos, rotary_dim, style)
    buf = _dispatch.prepare_out(fn, out, a["x"].shape, dtype, letters="B,T,G,D")
    np.copyto(buf, a["x"])
    if buf.size:
        _core.rope_(buf, pos, float(base), r, style == "interleaved", bool(inverse))
    return _dispatch.finish_out(buf, out)


def rope_(x, positions, *, base=10000.0, rotary_dim=None, style="half", inverse=False):
    """In-place :func:`rope`: ``x`` (a writable float32/float64 array) is rotated and returned."""
    fn = "rope_"
    if _dispatch.route(fn, x=x) == "cuda":
        from . import cuda
        return cuda.rope(x, positions, base=base, rotary_dim=rotary_dim, style=style, inverse=inverse, out=x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: x must be a numpy.ndarray (it is modified in place); got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{fn}: x has dtype {x.dtype}; expected float32 or float64 (in place)")
    return rope(x, positions, base=base, rotary_dim=rotary_dim, style=style, inverse=inverse, out=x)


class KVCache(KVCacheBase):
    __doc__ = KVCacheBase.__doc__
    _attention = staticmethod(attention)
    _gpu_ok = True
