"""lmkern.kv: KV-cache compression (SPEC 4).

* KIVI quantization (:func:`quantize`, :func:`dequantize`, :class:`QuantizedTensor`) and the KIVI cache
  :class:`QuantizedKVCache`, whose ``attend`` computes attention straight from the packed codes.
* Scores and selection: :func:`attention_mass` (one streaming kernel behind H2O, SnapKV,
  LightTransfer and ScaleKV), :func:`pool1d`, :func:`keep_topk`, :func:`compact`,
  :func:`streaming_indices`.
* Recipes in plain Python over those kernels: :func:`snapkv_select`, :func:`h2o_select`,
  :func:`lazy_ratio`, :func:`scalekv_budgets`.

Where we do better than the reference implementations:

* KIVI (jy-yuan/KIVI) divides by ``max - min`` and produces NaN for a constant group; here a constant
  group stores ``scale = 0`` and reconstructs its value exactly, and nothing is NaN for finite input.
  KIVI dequantizes the whole quantized cache before every attention call; ``QuantizedKVCache.attend``
  folds the scales into the query (keys) and the probabilities (values) and reads only the codes.
* NVIDIA/kvpress keeps per-head budgets by masking evicted keys, so no memory is freed, and scores by
  materializing the full attention weights; :func:`compact` gathers the kept rows per head into a
  smaller array, and :func:`attention_mass` never forms an N x M matrix (two streaming passes).

Every function has a NumPy twin in :mod:`lmkern.reference.kv`.
"""
from __future__ import annotations

import numpy as np

from . import _core, _dispatch, _kvbase
from ._kvbase import (QuantizedTensor, check_compact_args, check_mass_args, check_pool_args, check_quantize_args,
                      check_quantized, check_topk_args)

__all__ = [
    "QuantizedTensor", "quantize", "dequantize", "QuantizedKVCache", "attention_mass", "pool1d",
    "keep_topk", "compact", "streaming_indices", "snapkv_select", "h2o_select", "lazy_ratio",
    "scalekv_budgets",
]



# --------------------------------------------------------------------------------- quantization

def _quantize_cpu(x, bits, G, axis):
    B, T, H, D = x.shape
    per = 8 // bits
    if axis == "token":
        codes = np.empty((B, T, H, D // per), np.uint8)
        scale = np.empty((B, T, H, D // G), np.float32)
    else:
        codes = np.empty((B, T // per, H, D), np.uint8)
        scale = np.empty((B, T // G, H, D), np.float32)
    zero = np.empty_like(scale)
    _core.kv_quantize(x, codes, scale, zero, bits, G, axis == "channel")
    return codes, scale, zero


def quantize(x, *, bits, group_size, axis):
    """KIVI asymmetric quantization of ``x (B, T, H, D)`` (SPEC 4.1) -> :class:`QuantizedTensor`.

    ``bits`` in {2, 4, 8}.  ``axis="token"`` (KIVI values): groups of ``group_size`` consecutive
    features of one token and head (``D % group_size == 0``).  ``axis="channel"`` (KIVI keys): groups
    of ``group_size`` consecutive tokens of one head and feature (``T % group_size == 0``).
    Per group: ``lo = min``, ``hi = max``, ``scale = (hi - lo) / (2**bits - 1)`` (float32),
    ``zero = lo`` (float32), ``code = clip(round_half_even((x - zero) / scale), 0, 2**bits - 1)`` with the
    quotient taken in float64 from the stored float32 scale and zero; ``x_hat = code * scale + zero``.
    Hence ``|x - x_hat| <= scale / 2`` (+ one final rounding) and the group minimum is exact; the
    maximum is exact up to the rounding of ``(2**bits - 1) * scale + zero`` (it cannot be exact in
    general once scale is rounded to float32).

    Decisions where the SPEC is silent: ``group_size`` must be a multiple of the codes per byte
    (``8 // bits``) so no byte straddles two groups (ValueError naming group_size otherwise); a group
    holding NaN gets NaN scale and zero and codes 0; float16 input is recorded as float32.
    Better than KIVI: a constant group stores ``scale = 0``, codes 0 and reconstructs exactly (KIVI's
    PyTorch code and CUDA kernels divide by ``max - min`` and give NaN).

    CUDA arrays (float32, float16, bfloat16) run on the GPU (kernels/cuda/kv_quant.cu): ``codes``,
    ``scale``, ``zero`` are device arrays of the caller's framework with the layout above, computed with
    the same double-precision formula, so for float32 input they equal the CPU's bit for bit (float16 /
    bfloat16: the CPU's result for the exactly widened values); ``qt.dtype`` is x's dtype
    (``"bfloat16"`` as a name) and :func:`dequantize` returns that dtype on the GPU.

    Example::

        >>> qt = lmkern.kv.quantize(k, bits=2, group_size=32, axis="channel")
        >>> k_hat = lmkern.kv.dequantize(qt)
    """
    fn = "kv.quantize"
    if _dispatch.route(fn, x=x) == "cuda":
        from . import _cuda_kv
        return _cuda_kv.quantize(x, bits, group_size, axis, fn=fn)
    x, bits, G, axis = check_quantize_args(fn, x, bits, group_size, axis)
    codes, scale, zero = _quantize_cpu(np.ascontiguousarray(x), bits, G, axis)
    return QuantizedTensor(codes, scale, zero, bits=bits, group_size=G, axis=axis, shape=x.shape, dtype=x.dtype)


def dequantize(qt):
    """``x_hat = code * scale + zero`` of a :class:`QuantizedTensor`, computed in float64 and rounded
    once to ``qt.dtype`` (float32 or float64), shape ``qt.shape``.  A tensor whose arrays live on a GPU
    is dequantized there into ``qt.dtype`` (float32, float16, bfloat16; float32 otherwise), bitwise the
    CPU's result for float32."""
    fn = "kv.dequantize"
    if _dispatch.route(fn, codes=getattr(qt, "codes", None)) == "cuda":
        from . import _cuda_kv
        return _cuda_kv.dequantize(qt, fn=fn)
    check_quantized(fn, qt)
    out = np.empty(qt.shape, qt.dtype if qt.dtype == np.float64 else np.float32)
    _core.kv_dequantize(np.ascontiguousarray(qt.codes), np.ascontiguousarray(qt.scale), np.ascontiguousarray(qt.zero),
                        out, qt.bits, qt.group_size, qt.axis == "channel")
    return out


# --------------------------------------------------------------------------------- KIVI cache

class QuantizedKVCache(_kvbase.QuantizedKVCacheBase):
    """QuantizedKVCache(batch, max_len, kv_heads, head_dim, v_head_dim=None, *, bits=2, group_size=32, residual=128,
    device=None)

    KIVI's cache (SPEC 4.2).  After every ``append(k, v)`` a row holding ``L`` tokens stores the first
    ``Qk = G * floor(max(0, L - residual) / G)`` keys quantized per channel (groups of G tokens aligned to
    token 0) and the first ``Qv = max(0, L - residual)`` values quantized per token (groups of G
    features); the rest stays in float32.  A token is quantized once, when it crosses the boundary.
    ``residual % group_size == 0`` and ``v_head_dim % group_size == 0`` (ValueError otherwise).

    ``append(k, v, *, positions=None, lengths=None)``: as :class:`lmkern.KVCache` (ragged rows via
    ``lengths``; positions stored for causal masking; overflow is a ValueError that writes nothing).
    Inputs are stored as float32 (as are the scales: SPEC 4.1).

    ``attend(q, *, causal=True, q_pos=None, scale=None, return_lse=False)`` with ``q (B, N, Hq, D)``:
    attention over ``[dequantized | full-precision]`` keys and values computed straight from the packed
    codes: for each key group the query is multiplied by the group's per-channel scales once
    (``s = sum_d (q_d scale_d) code_d + sum_d q_d zero_d``) and the inner loop is codes x vector; for
    values ``code * scale + zero`` is formed in registers once per decoded vector and FMA'd into every
    query row.  All query heads of a GQA group (and all N queries) share every decoded byte; long caches
    are split over threads and merged with the one log-sum-exp combine.
    No dequantized copy is made (KIVI and kvpress dequantize the whole cache per call).
    Default ``q_pos``: attention's ``L_b - N + i`` (as :class:`lmkern.KVCache`, SPEC 1.3); after appending
    custom ``positions``, pass the queries' positions.
    Decision: the computation is float32 (the cache holds float32 data); a float64 ``q`` gives a
    float64 result of float32 accuracy.

    ``.lengths``, ``.nbytes`` (codes + scales + zeros + float32 residual), ``.reset()``.

    ``device="cuda"`` (``"cuda:N"``, an int, a ``torch.device``): every buffer lives on the GPU (torch
    tensors when torch sees a GPU, else :class:`lmkern.cuda.DeviceArray`); ``append`` takes CUDA k, v
    (float32/float16/bfloat16, stored as float32) and quantizes on the GPU (codes bitwise the CPU's);
    ``attend`` takes a CUDA q and returns q's array type and dtype (``lse`` float32), computed by
    kernels/cuda/kv_attend.cu: one block per (batch row, KV head, tile of up to 16 query rows = queries x
    GQA heads, split of the keys); each thread dequantizes its key (code * scale + zero, in registers)
    feature by feature and scores every row of the tile with it, then dequantizes its value features
    once per key and FMAs them into every row's accumulator; splits merge float32 partials
    [m, l, acc] with the shared softmax combine.  Nothing is ever dequantized to memory.  The
    full-precision tokens live in rings (token j at slot ``j % capacity``) so no token moves; lengths and
    positions are host bookkeeping (as :class:`lmkern.KVCache`).  Append and attend are ordered by the
    stream of each call: use one stream per cache, or synchronize.

    Storage, per (b, KV head), head-major so each head's cache streams contiguously
    (``per = 8 // bits``; documented for the kernel, not a public API):
    keys ``(ceil(max_len / G), D, G / per)`` bytes (byte ``[grp, d, t // per]`` holds token
    ``grp * G + t`` of channel d, LSB-first), scales/zeros ``(ceil(max_len / G), D)``, residual
    ``(min(max_len, residual + G), D)``; values ``(max_len, E / per)`` bytes, scales/zeros
    ``(max_len, E / G)``, residual ``(min(max_len, residual), E)``.
    """

    _gpu = None  # lmkern._cuda_kv.QuantizedCacheStorage of a GPU cache

    def __init__(self, batch, max_len, kv_heads, head_dim, v_head_dim=None, *, bits=2, group_size=32, residual=128,
                 device=None):
        super().__init__(batch, max_len, kv_heads, head_dim, v_head_dim, bits=bits, group_size=group_size,
                         residual=residual)
        if device not in (None, "cpu"):
            from . import _cuda_kv, cuda
            gpu = cuda.parse_device(device)
            if gpu is None:
                raise ValueError(f"{self.fn}: device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
            self._gpu = _cuda_kv.QuantizedCacheStorage(self, gpu)
            return
        B, S, H, D, E, G = self.batch, self.max_len, self.kv_heads, self.head_dim, self.v_head_dim, self.group_size
        per = 8 // self.bits
        KG = -(-S // G)
        self._kc = np.zeros((B, H, KG, D, G // per), np.uint8)
        self._ks = np.zeros((B, H, KG, D), np.float32)
        self._kz = np.zeros((B, H, KG, D), np.float32)
        self._kr = np.zeros((B, H, min(S, self.residual + G), D), np.float32)
        self._vc = np.zeros((B, H, S, E // per), np.uint8)
        self._vs = np.zeros((B, H, S, E // G), np.float32)
        self._vz = np.zeros((B, H, S, E // G), np.float32)
        self._vr = np.zeros((B, H, min(S, self.residual), E), np.float32)

    def _append_row(self, b, k, v, start, qk, qv):
        G, bits = self.group_size, self.bits
        # keys: the full-precision range [qk_old, L) = residual + new tokens, as (tokens, H, D)
        kfull = np.concatenate([self._kr[b, :, :start - qk[0]].transpose(1, 0, 2), k], axis=0)
        nq = qk[1] - qk[0]
        if nq:
            codes, scale, zero = _quantize_cpu(np.ascontiguousarray(kfull[None, :nq]), bits, G, "channel")
            g0, g1 = qk[0] // G, qk[1] // G
            # (1, nq/per, H, D) -> (H, groups, D, G/per)
            c = codes[0].reshape(g1 - g0, G // (8 // bits), self.kv_heads, self.head_dim)
            self._kc[b, :, g0:g1] = c.transpose(2, 0, 3, 1)
            self._ks[b, :, g0:g1] = scale[0].transpose(1, 0, 2)
            self._kz[b, :, g0:g1] = zero[0].transpose(1, 0, 2)
        rest = kfull[nq:]
        self._kr[b, :, :rest.shape[0]] = rest.transpose(1, 0, 2)
        # values: [qv_old, L) = residual + new tokens
        vfull = np.concatenate([self._vr[b, :, :start - qv[0]].transpose(1, 0, 2), v], axis=0)
        nq = qv[1] - qv[0]
        if nq:
            codes, scale, zero = _quantize_cpu(np.ascontiguousarray(vfull[None, :nq]), bits, G, "token")
            self._vc[b, :, qv[0]:qv[1]] = codes[0].transpose(1, 0, 2)
            self._vs[b, :, qv[0]:qv[1]] = scale[0].transpose(1, 0, 2)
            self._vz[b, :, qv[0]:qv[1]] = zero[0].transpose(1, 0, 2)
        rest = vfull[nq:]
        self._vr[b, :, :rest.shape[0]] = rest.transpose(1, 0, 2)

    def append(self, k, v, *, positions=None, lengths=None):
        if self._gpu is not None:
            return self._gpu.append(k, v, positions, lengths)
        return super().append(k, v, positions=positions, lengths=lengths)

    def attend(self, q, *, causal=True, q_pos=None, scale=None, return_lse=False):
        fn = self.fn + ".attend"
        if self._gpu is not None:
            return self._gpu.attend(q, causal=causal, q_pos=q_pos, scale=scale, return_lse=return_lse)
        if _dispatch.route(fn, q=q) == "cuda":
            raise ValueError(f"{fn}: arrays are on different devices: q is a CUDA array, the cache is on the CPU "
                             "(create it with device='cuda')")
        dtype, q, q_pos, scale = self.check_attend(q, q_pos, scale)
        B, N, Hq, _ = q.shape
        out = np.zeros((B, N, Hq, self.v_head_dim), np.float32)
        lse = np.full((B, N, Hq), -np.inf, np.float32) if return_lse else None
        if B and N and Hq and self.kv_heads:
            _core.kv_attend(np.ascontiguousarray(q, np.float32), out, lse, self._kc, self._ks, self._kz, self._kr,
                            self._vc, self._vs, self._vz, self._vr, self._len, self._qk, self._qv,
                            np.ascontiguousarray(q_pos, np.int64), self._pos, self.bits, self.group_size,
                            bool(causal), scale)
        if return_lse:
            return out.astype(dtype, copy=False), lse.astype(dtype, copy=False)
        return out.astype(dtype, copy=False)


# --------------------------------------------------------------------------------- scores

_REDUCE = {"mean": 0, "sum": 1, "max": 2, "none": 3}


def attention_mass(q, k, *, scale=None, causal=False, q_pos=None, kv_pos=None, kv_lens=None, normalize=True,
                   group_reduce="mean"):
    """How much attention each key receives (SPEC 4.3): ``(B, M, Hkv)`` float32 (``(B, M, Hq)`` for
    ``group_reduce="none"``).

    ``mass[b, j, h] = sum_i softmax_j(s_ij)`` over the queries i with the masking of
    :func:`lmkern.attention` (``kv_lens``, ``causal`` with ``q_pos``/``kv_pos``, bottom-right default
    ``q_pos``), reduced over the query heads of each KV head by ``"mean"``, ``"sum"`` or ``"max"``.
    ``normalize=False`` sums the raw scaled logits of admissible pairs instead (ScaleKV).
    Keys no query may see get 0.

    Computed in two streaming passes over key chunks: pass 1 the per-query log-sum-exp (split states
    merged by the one softmax combine), pass 2 ``exp(s - lse)`` summed straight into the per-key mass.
    Extra memory is O(threads x chunk x D + B x N x Hq x splits) floats, with
    ``ceil(8 threads / (B Hkv))`` splits at most (8 MiB at N = 16384, Hq = 32, Hkv = 8 on 2 threads); no
    N x M matrix is formed (kvpress and the SnapKV/H2O reference code materialize the full attention
    weights to score them).
    Decision: computed in float32 (the result is float32 by the SPEC), also for float64 inputs.

    Scores for H2O (all queries, accumulated), SnapKV (the last W queries), LightTransfer and ScaleKV.

    On the GPU (CUDA arrays in, float32 ``(B, M, H)`` of the same array type out; f32/f16/bf16 inputs,
    float32 arithmetic, ``D <= 256``): the same two passes as three kernels (per-row split statistics,
    their log-sum-exp combine, per-key mass), with key and query tiles in shared memory and the query
    heads of a GQA group sharing every key tile.  Extra memory is ``B x Hq x N x (2 x splits + 1)``
    floats; every output element is summed by one thread in a fixed order (no atomics), so results are
    bitwise reproducible.  NVIDIA/kvpress instead materializes the attention weights (``N x M`` per
    head, in the model's attention call or recomputed for the window) and reduces them with PyTorch.
    Index arrays may be host arrays (checked, then uploaded) or device arrays (used in place; device
    ``kv_lens`` values are clamped to ``[0, M]``).
    """
    fn = "kv.attention_mass"
    if _dispatch.route(fn, q=q, k=k) == "cuda":
        from . import _cuda_kv_select
        return _cuda_kv_select.attention_mass(q, k, scale=scale, causal=causal, q_pos=q_pos, kv_pos=kv_pos,
                                              kv_lens=kv_lens, normalize=normalize, group_reduce=group_reduce)
    q, k, qp, kp, lens, scale, sh = check_mass_args(fn, q, k, scale, q_pos, kv_pos, kv_lens, group_reduce)
    B, M = sh["B"], sh["M"]
    out = np.zeros((B, M, sh["Hq"] if group_reduce == "none" else sh["Hkv"]), np.float32)
    if out.size and sh["N"] and sh["Hq"]:
        _core.kv_attention_mass(np.ascontiguousarray(q), np.ascontiguousarray(k), out, qp, kp, lens, bool(causal),
                                bool(normalize), _REDUCE[group_reduce], scale)
    return out


def pool1d(scores, kernel_size, *, mode="avg"):
    """Pooling of ``scores (B, M, H)`` along M (SPEC 4.4): odd ``kernel_size``, padding
    ``kernel_size // 2``, output of the same shape and dtype.  ``"avg"`` counts the padding as zeros
    (PyTorch ``avg_pool1d`` default, ``count_include_pad=True``); ``"max"`` ignores it.  NaN propagates.
    SnapKV smooths its votes with ``kernel_size=5`` (avg).  Vectorized NumPy (memory-bound).
    On the GPU: one thread per output, float32 sums, result in the input dtype (f32/f16/bf16)."""
    fn = "kv.pool1d"
    if _dispatch.route(fn, scores=scores) == "cuda":
        from . import _cuda_kv_select
        return _cuda_kv_select.pool1d(scores, kernel_size, mode=mode)
    s, ks = check_pool_args(fn, scores, kernel_size, mode)
    r = ks // 2
    if s.shape[1] == 0:
        return s.copy()
    pad = [(0, 0), (r, r), (0, 0)]
    padded = np.pad(s, pad, constant_values=0 if mode == "avg" else -np.inf)
    win = np.lib.stride_tricks.sliding_window_view(padded, ks, axis=1)     # (B, M, H, ks)
    if mode == "avg":
        return (win.sum(axis=-1) / ks).astype(s.dtype, copy=False)
    return win.max(axis=-1)


def keep_topk(scores, budget, *, sink=0, recent=0):
    """Positions to keep per head (SPEC 4.5): ``scores (B, M, H)`` -> ``idx (B, K, H)`` int64,
    ``K = min(budget, M)``, ascending per head.  The first ``sink`` and last ``recent`` positions are
    always kept; the remaining slots go to the highest scores, ties to the lower position, NaN below
    every number.  ``sink + recent > budget`` is a ValueError.  Per-head budgets are real: pair with
    :func:`compact` to free the evicted rows (kvpress masks them and keeps the memory).
    On the GPU (f32/f16/bf16 scores, int64 ``idx`` of the same array type): one block per (b, h), a
    radix select over order-preserving 32-bit keys then a stable compaction by position; the same
    selection as the CPU path, bit for bit, without sorting or a host round trip."""
    fn = "kv.keep_topk"
    if _dispatch.route(fn, scores=scores) == "cuda":
        from . import _cuda_kv_select
        return _cuda_kv_select.keep_topk(scores, budget, sink=sink, recent=recent)
    s, budget, sink, recent = check_topk_args(fn, scores, budget, sink, recent)
    B, M, H = s.shape
    idx = np.empty((B, min(budget, M), H), np.int64)
    _core.kv_keep_topk(np.ascontiguousarray(s), idx, sink, recent)
    return idx


def compact(x, idx):
    """Per-head gather (SPEC 4.5): ``out[b, k, h] = x[b, idx[b, k, h], h]``, ``x (B, M, H, D)``,
    ``idx (B, K, H)`` -> ``(B, K, H, D)`` in x's dtype (any dtype: it copies rows; arrays of Python
    objects are gathered by NumPy, which counts their references).  Indices outside
    ``[0, M)`` are a ValueError.  The result is a new, smaller array: evicted tokens free memory.
    On the GPU: any dtype, vectorized row copies; a host ``idx`` is range-checked (ValueError) and
    uploaded, a device ``idx`` is used in place and its values are clamped to ``[0, M - 1]`` (checking
    them would synchronize with the host), so no index ever reads outside ``x``."""
    fn = "kv.compact"
    if _dispatch.route(fn, x=x) == "cuda":  # idx may be a host array (uploaded) or a device array
        from . import _cuda_kv_select
        return _cuda_kv_select.compact(x, idx)
    _dispatch.route(fn, x=x, idx=idx)  # host x with a device idx: ValueError (different devices)
    x, idx = check_compact_args(fn, x, idx)
    if x.dtype.hasobject:
        # Python objects need their references counted: NumPy copies them (the kernel copies raw bytes)
        return np.take_along_axis(x, idx[..., None], axis=1)
    out = np.empty(idx.shape + x.shape[3:], x.dtype)
    _core.kv_compact(np.ascontiguousarray(x), np.ascontiguousarray(idx), out)
    return out


def streaming_indices(length, *, sink=4, recent):
    """StreamingLLM's kept positions ``(K,)`` int64: the first ``sink`` (attention sinks, paper default 4)
    and the last ``recent`` positions of a sequence of ``length`` tokens, ascending, without duplicates."""
    return _kvbase.streaming_indices(length, sink=sink, recent=recent)


# --------------------------------------------------------------------------------- recipes

class _Ops:
    attention_mass = staticmethod(attention_mass)
    pool1d = staticmethod(pool1d)
    keep_topk = staticmethod(keep_topk)


def snapkv_select(q_window, k, budget, *, kernel_size=5, pool="avg"):
    """SnapKV (Li et al. 2024): ``q_window (B, W, Hq, D)`` are the queries of the last W prompt tokens
    (the observation window; paper default W = 32), ``k (B, M, Hkv, D)`` all prompt keys (the window's
    own keys last).  Votes = :func:`attention_mass` of the window queries (causal, bottom-right
    positions, mean over the GQA group) on the prefix keys ``[0, M - W)``, smoothed by :func:`pool1d`
    (paper defaults ``kernel_size=5``, ``pool="avg"``; the paper's max capacity is 1024-4096 tokens),
    then :func:`keep_topk` of ``budget - W`` prefix positions per KV head, plus the window.
    Returns ``idx (B, min(budget, M), Hkv)`` ascending; ``budget < W`` is a ValueError."""
    return _kvbase.snapkv_select(_Ops, q_window, k, budget, kernel_size=kernel_size, pool=pool)


def h2o_select(mass, budget, *, recent):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention ``mass (B, M, H)`` (e.g. the
    running sum of :func:`attention_mass` over decoding steps) plus the last ``recent`` positions.
    Paper default: half of the budget heavy, half recent (``recent = budget // 2``; 20% total cache).
    Returns ``idx (B, min(budget, M), H)``."""
    return _kvbase.h2o_select(_Ops, mass, budget, recent=recent)


def lazy_ratio(mass, *, sink=4, recent=1024):
    """LightTransfer: the share of attention ``mass (B, M, H)`` on the ``sink`` first and ``recent``
    last keys, ``(B, H)`` float32 (0 where a row holds no mass).  A layer whose ratio (averaged over
    heads and rows) exceeds its threshold (0.9 for Llama-3, 0.65 for Llama-2 in the paper) is "lazy"
    and becomes a streaming layer (sink + recent window, :func:`streaming_indices`)."""
    return _kvbase.lazy_ratio(mass, sink=sink, recent=recent)


def scalekv_budgets(n_layers, drafters, *, per_layer, max_budget):
    """ScaleKV: per-layer cache budgets ``(n_layers,)`` int64.  The ``drafters`` (layer indices whose
    attention is spread, identified by :func:`attention_mass` with ``normalize=False``) get
    ``max_budget``; the refiners split the rest evenly (the first ones get the remainder) so that the
    total is ``n_layers * per_layer``.  ValueError when that total cannot be met."""
    return _kvbase.scalekv_budgets(n_layers, drafters, per_layer=per_layer, max_budget=max_budget)
