"""lmkern.tpa: Tensor Product Attention (SPEC 2; T6, "Tensor Product Attention Is All You Need",
arXiv 2501.06425, reference code tensorgi/T6).

Per token the queries, keys and values are sums of ``R`` outer products (T6 layout, so checkpoints map
1:1: A head-major ``(..., H, R)``, B rank-major ``(..., R, D)``)::

    Q = (1/Rq) aq @ bq        K = (1/Rk) ak @ bk        V = (1/Rv) av @ bv

RoPE goes on ``bq`` and ``bk`` only (it commutes with the head factor), e.g. with
``lmkern.rope(bk, positions, style="half", inverse=True)`` for the sign of the T6 training code.  All
heads share the B factors, so a factor cache stores ``(Rk + Rv)(H + D)`` numbers per token instead
of MHA's ``2 H D``: 4-21x less memory.

Functions: :func:`materialize`, :func:`attention` (prefill), :func:`decode`, :class:`KVCache`.
NumPy twins: :mod:`lmkern.reference.tpa`.

How the kernels compute (see kernels/cpu/tpa_attention.c).  Scores use one of two exact rewrites of
``s[h,j] = scale/(Rq Rk) sum_{r,s} aq[h,r] ak[j,h,s] <bq[r], bk[j,s]>``: the *factor* contraction (the
``<bq_r, bk_s>`` products, shared by all heads, then head mixing with ``aq`` and ``ak``; T6 App. A) or
the *materialized-query* contraction (``Q`` formed once per query, contracted with each cached ``bk``
row, then ``ak``); the kernel takes the one with fewer vector FMAs per key for the ranks (the factor
one whenever ``Rq (D + H) < H D`` or so, e.g. every T6 configuration and the paper's decode ranks
16/1/1).  Values are folded in factor form in decode (``p * av / Rv`` per head, then accumulated
against ``bv``, shared by all heads), so K and V are never formed and each cached factor is read once
(FlashTPA, T6 Algorithm 2).  In prefill, tiles of 8 queries share each block of cached factors, and
when it is cheaper (``Rv >= 2``) the block's values are materialized once per tile (``V`` tile,
``H E`` per query and key instead of ``H Rv E``).  Long caches are split across threads; the partial
states (max, sum, accumulator; float32 for float32 input) are merged by the one max-stabilized
log-sum-exp combine (``kernels/include/lmkern/softmax.h``).  float64 runs the same SIMD engine on
vectors of doubles; with SIMD off, a generic path runs the same contractions one key at a time.

Where this does better than the reference FlashTPA Triton decode kernels
(``decode/flashtpa_decode_triton*.py`` of tensorgi/T6):

* the padded tail of the last key block is masked: a cache length ``M`` that is not a multiple of the
  block size attends to exactly ``M`` keys (the reference leaves the tail unmasked);
* the split-cache combine is stabilized by the *maximum* partial LSE (the reference uses the minimum,
  which can overflow ``exp`` when the partials' maxima differ by more than ~88);
* partial outputs and LSEs are kept in float32 (float64 for float64 input), not bf16;
* the head-shared ``bk . bq`` products stay in float32 (the reference rounds them to bf16 before the
  head mixing).

Decisions where the SPEC is silent:

* A rank of 0 is an empty sum (SPEC 0: zero-sized dimensions are never an error): ``materialize`` returns
  zeros whatever the scale (the default ``1/R`` is undefined there, and ``0 * inf`` would be NaN), and in
  ``attention`` / ``decode`` / ``KVCache`` ``Rq = 0`` or ``Rk = 0`` makes every score 0 (uniform
  attention over the admissible keys) and ``Rv = 0`` makes the output 0.  On the CPU; the CUDA path
  raises ValueError for a rank of 0.
* ``scale`` defaults to ``D**-0.5`` (``1.0`` when ``D = 0``), applied on top of the ``1/Rq``, ``1/Rk``
  factor scales, exactly as ``lmkern.attention`` on the materialized tensors.
* ``decode`` attends to every cached token ``j < kv_lens[b]`` (the query's own factors are already
  cached); rows with ``kv_lens[b] = 0`` give 0 and lse ``-inf``.
* ``KVCache.append`` casts factors to the cache's dtype; ``KVCache.decode`` also takes ``out=``.
* The private keyword ``_path`` (``"auto"``, ``"factor"``: factor scores and factor value fold,
  ``"materialized"``: materialized ``Q`` and, in prefill, value tiles) forces a contraction
  and ``_splits`` a split count; tests use them to check that every path agrees.
* Inadmissible keys contribute nothing, even when their factors hold inf or NaN; NaN in an admissible
  key's factors propagates to the queries that see it.
* ``KVCache(..., device="cuda")`` keeps the factors on the GPU (appends are device copies, ``decode``
  runs the CUDA kernel over the buffers in place); :func:`decode` also takes views of your own factor
  tensors (``ak[:, :M]`` is read in place).

On the GPU (CUDA arrays route there by themselves; float32, float16, bfloat16; see lmkern.cuda for
streams, outputs and scratch; kernels in kernels/cuda/tpa.cu):

* ``decode`` is the FlashTPA order on CUDA cores: one block per (batch row, head group, cache split),
  tiles of up to 32 tokens staged as float32, every product in float32.  A tensor-core kernel for
  float16 / bfloat16 (``_path="tensor_cores"``) is built but opt-in, because it has not run on a GPU yet;
  a lane-level NumPy model of it (tests/test_cuda_tpa_tc_model.py) agrees with the twin.
  It uses one block per (batch row, cache split) and tiles of up to 64 tokens.  ``bk . bq`` goes through
  ``mma.sync`` with float32 accumulation; the products are exact and no bf16 rounding happens, as it
  does in T6.  Head mixing and the online softmax stay in float32.  The weights ``p av`` are rounded to
  the input dtype for the ``bv`` product, as FlashAttention rounds P; ``1/Rv`` is applied at the end.  It takes at most
  64 accumulator tiles of 16 heads x 8 features.  The cache is
  split by the SM count; float32 partials per (row, head, split) are merged by the max-stabilized
  combine shared by every lmkern split kernel (``kernels/cuda/softmax.cuh``); lse is float32.  The
  cached factors are read with (batch, token) strides, so only each token's ``(H, R)`` / ``(R, D)``
  block must be contiguous (others are copied).  Device ``kv_lens`` are clamped to ``[0, M]`` on the
  device.  The four improvements over the T6 Triton kernels listed above hold on the GPU too.
  On the GPU ``_path`` picks the decode kernel: ``"tensor_cores"`` selects the tensor-core kernel
  (ValueError where it does not fit); the other values select the float32 CUDA-core kernel.
  ``_splits`` forces the split count.
* ``materialize``: one thread per output element, float32 accumulation, rounded once.
* ``attention`` (prefill) is the *materialized* path: ``Q``, ``K``, ``V`` are formed by the materialize
  kernel (temporaries from the caller's framework, rounded to the input dtype) and the core GPU
  attention (``lmkern.attention``'s kernels) runs on them; no ``N x M`` matrix is formed.
"""
from __future__ import annotations

import numpy as np

from . import _core, _dispatch
from ._tpa_cache import TPACacheBase

__all__ = ["materialize", "attention", "decode", "KVCache"]

_PATHS = {"auto": 0, "factor": 1, "materialized": 2}


def _check_ranks(fn, sh, pairs):
    for letter, arg in pairs:
        if sh[letter] < 1:
            raise ValueError(f"{fn}: {arg} has rank {letter} = {sh[letter]}; ranks must be >= 1 on CUDA "
                             "(a rank of 0 is supported on the CPU)")


def _fill_zero_ranks(a, sh, dtype):
    """A rank of 0 makes its materialized tensor an empty sum, 0: the pair becomes a rank-1 pair of zeros,
    which the kernels read as that same zero tensor (Q = 0 or K = 0: every score 0; V = 0: output 0)."""
    for A, Bf, letter in (("aq", "bq", "Rq"), ("ak", "bk", "Rk"), ("av", "bv", "Rv")):
        if sh[letter] == 0:
            a[A] = np.zeros(a[A].shape[:-1] + (1,), dtype)
            a[Bf] = np.zeros(a[Bf].shape[:-2] + (1,) + a[Bf].shape[-1:], dtype)


def materialize(a, b, *, scale=None, out=None):
    """``scale * a @ b``: ``a (..., H, R)``, ``b (..., R, D)`` -> ``(..., H, D)`` (SPEC 2.1).

    ``scale`` defaults to ``1/R`` (T6's ``Q = (1/Rq) aq @ bq``).  The leading axes of ``a`` and ``b``
    must be equal (no broadcasting).

    Example::

        >>> aq = np.random.randn(2, 5, 34, 6).astype(np.float32)   # (B, T, H, Rq)
        >>> bq = np.random.randn(2, 5, 6, 64).astype(np.float32)   # (B, T, Rq, D)
        >>> lmkern.tpa.materialize(aq, bq).shape
        (2, 5, 34, 64)
    """
    fn = "tpa.materialize"
    if _dispatch.route(fn, a=a, b=b, out=out) == "cuda":
        from . import _cuda_tpa
        return _cuda_tpa.materialize(a, b, scale=scale, out=out)
    dtype, arr = _dispatch.float_arrays(fn, a=a, b=b)
    a, b = arr["a"], arr["b"]
    sh, scale, shape, rows = check_materialize(fn, a, b, scale)
    R = sh["R"]
    lead = "".join(f"L{i}," for i in range(len(shape) - 2))
    buf = _dispatch.prepare_out(fn, out, shape, dtype, letters=lead + "H,D", inputs=(a, b))
    _core.tpa_materialize(a.reshape(rows, sh["H"], R), b.reshape(rows, R, sh["D"]),
                          buf.reshape(rows, sh["H"], sh["D"]), scale)
    return _dispatch.finish_out(buf, out)


def check_materialize(fn, a, b, scale):
    """Shape and scale checks of materialize (CPU and CUDA): ``(Shapes, scale, out shape, rows)``; ``a``
    and ``b`` need only ``.shape`` and ``.ndim``."""
    _dispatch.require(fn, a=a, b=b)
    if a.ndim < 2:
        raise ValueError(f"{fn}: a has shape {tuple(a.shape)}; expected (..., H, R) with at least 2 dimensions")
    lead = ",".join(f"L{i}" for i in range(a.ndim - 2))
    sh = _dispatch.Shapes(fn)
    sh.check("a", a, (lead + "," if lead else "") + "H,R")
    sh.check("b", b, (lead + "," if lead else "") + "R,D")
    R = sh["R"]
    scale = _dispatch.as_scale(fn, scale, 1.0 / R if R else 1.0)   # R = 0: an empty sum, 0 whatever the scale
    shape = tuple(a.shape[:-1]) + (sh["D"],)
    rows = int(np.prod(a.shape[:-2], dtype=np.int64))
    return sh, scale, shape, rows


def check_factors(fn, sh, a, kv_lens, query_spec, zero_ranks=True):
    """The cached factors bind the letters first (so a wrong query names the query), then aq, bq.
    ``zero_ranks=False`` (CUDA): a rank of 0 is a ValueError."""
    sh.check("ak", a["ak"], "B,M,H,Rk")
    sh.check("bk", a["bk"], "B,M,Rk,D")
    sh.check("av", a["av"], "B,M,H,Rv")
    sh.check("bv", a["bv"], "B,M,Rv,E")
    sh.check("aq", a["aq"], query_spec[0])
    sh.check("bq", a["bq"], query_spec[1])
    if not zero_ranks:
        _check_ranks(fn, sh, (("Rq", "aq"), ("Rk", "ak"), ("Rv", "av")))
    if kv_lens is not None:
        sh.check_lens("kv_lens", kv_lens)


def attention(aq, bq, ak, bk, av, bv, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None,
              return_lse=False, out=None, _path="auto", _splits=0):
    """Tensor Product Attention over factors (SPEC 2.2): prefill, or any number of queries.

    ``aq (B,N,H,Rq)``, ``bq (B,N,Rq,D)``, ``ak (B,M,H,Rk)``, ``bk (B,M,Rk,D)``, ``av (B,M,H,Rv)``,
    ``bv (B,M,Rv,E)`` -> ``out (B,N,H,E)`` [and ``lse (B,N,H)``].  Equals
    ``lmkern.attention(materialize(aq,bq), materialize(ak,bk), materialize(av,bv), causal=..., ...)``
    with the same masking rules: key ``j`` is admissible for query ``i`` iff ``j < kv_lens[b]`` and,
    when ``causal``, ``kv_pos[b,j] <= q_pos[b,i]`` (defaults ``kv_pos = j``,
    ``q_pos = kv_lens[b] - N + i``).  ``scale`` defaults to ``D**-0.5``.  No ``N x M`` matrix and no
    K or V tensor is formed (see the module docstring for the two contractions).

    Example (T6-small ranks, causal prefill of 128 tokens)::

        >>> B, T, H, D = 1, 128, 34, 64
        >>> f = lambda *s: np.random.randn(*s).astype(np.float32)
        >>> out = lmkern.tpa.attention(f(B,T,H,6), f(B,T,6,D), f(B,T,H,2), f(B,T,2,D),
        ...                            f(B,T,H,2), f(B,T,2,D), causal=True)
        >>> out.shape
        (1, 128, 34, 64)
    """
    fn = "tpa.attention"
    if _dispatch.route(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv, out=out) == "cuda":
        from . import _cuda_tpa
        return _cuda_tpa.attention(aq, bq, ak, bk, av, bv, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos,
                                   kv_lens=kv_lens, return_lse=return_lse, out=out)
    dtype, a = _dispatch.float_arrays(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv)
    q_pos = _dispatch.index_array(fn, "q_pos", q_pos)
    kv_pos = _dispatch.index_array(fn, "kv_pos", kv_pos)
    kv_lens = _dispatch.index_array(fn, "kv_lens", kv_lens)
    sh = _dispatch.Shapes(fn)
    check_factors(fn, sh, a, kv_lens, ("B,N,H,Rq", "B,N,Rq,D"))
    _fill_zero_ranks(a, sh, dtype)
    if q_pos is not None:
        sh.check_one_of("q_pos", q_pos, "N", "B,N")
    if kv_pos is not None:
        sh.check_one_of("kv_pos", kv_pos, "M", "B,M")
    path = _dispatch.check_choice(fn, "_path", _path, tuple(_PATHS))
    B, N, H, E, D = sh["B"], sh["N"], sh["H"], sh["E"], sh["D"]
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)
    buf = _dispatch.prepare_out(fn, out, (B, N, H, E), dtype, letters="B,N,H,E", inputs=tuple(a.values()))
    lse = np.empty((B, N, H), dtype) if return_lse else None
    if buf.size == 0 and lse is None:   # nothing to compute
        return _dispatch.finish_out(buf, out)
    _core.tpa_attention(a["aq"], a["bq"], a["ak"], a["bk"], a["av"], a["bv"], buf, lse, q_pos, kv_pos, kv_lens,
                        bool(causal), scale, _PATHS[path], int(_splits), False)
    res = _dispatch.finish_out(buf, out)
    return (res, lse) if return_lse else res


def decode(aq, bq, ak, bk, av, bv, *, kv_lens=None, scale=None, return_lse=False, out=None, _path="auto",
           _splits=0):
    """One new query token per sequence against cached factors (SPEC 2.4, FlashTPA).

    ``aq (B,H,Rq)``, ``bq (B,Rq,D)`` (rotated) against ``ak (B,M,H,Rk)``, ``bk (B,M,Rk,D)`` (rotated),
    ``av (B,M,H,Rv)``, ``bv (B,M,Rv,E)`` -> ``out (B,H,E)`` [and ``lse (B,H)``]; every cached token
    ``j < kv_lens[b]`` (default ``M``) is admissible.  Same result as :func:`attention` with ``N = 1``.

    Order per block of cached tokens: ``bk . bq`` (shared by all heads) -> mix with ``aq`` -> multiply
    by ``ak`` -> online softmax -> fold ``av`` into the probabilities -> multiply by ``bv``; the cache is
    split across threads with float32 partials and the max-stabilized combine.

    Example (the T6 paper's decode configuration)::

        >>> cache = lmkern.tpa.KVCache(1, 32768, 32, 1, 1, 64)   # heads, Rk, Rv, D
        >>> cache.append(ak, bk, av, bv)
        >>> out = cache.decode(aq, bq)                          # aq (1, 32, 16), bq (1, 16, 64)
    """
    fn = "tpa.decode"
    if _dispatch.route(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv, out=out) == "cuda":
        from . import _cuda_tpa
        return _cuda_tpa.decode(aq, bq, ak, bk, av, bv, kv_lens=kv_lens, scale=scale, return_lse=return_lse, out=out,
                                splits=int(_splits), path=_path)
    dtype, a = _dispatch.float_arrays(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv)
    kv_lens = _dispatch.index_array(fn, "kv_lens", kv_lens)
    sh = _dispatch.Shapes(fn)
    check_factors(fn, sh, a, kv_lens, ("B,H,Rq", "B,Rq,D"))
    _fill_zero_ranks(a, sh, dtype)
    path = _dispatch.check_choice(fn, "_path", _path, tuple(_PATHS))
    B, H, E, D = sh["B"], sh["H"], sh["E"], sh["D"]
    scale = _dispatch.as_scale(fn, scale, D ** -0.5 if D else 1.0)
    buf = _dispatch.prepare_out(fn, out, (B, H, E), dtype, letters="B,H,E", inputs=tuple(a.values()))
    lse = np.empty((B, H), dtype) if return_lse else None
    if buf.size == 0 and lse is None:   # nothing to compute
        return _dispatch.finish_out(buf, out)
    _core.tpa_attention(a["aq"], a["bq"], a["ak"], a["bk"], a["av"], a["bv"], buf, lse, None, None, kv_lens,
                        False, scale, _PATHS[path], int(_splits), True)
    res = _dispatch.finish_out(buf, out)
    return (res, lse) if return_lse else res


class KVCache(TPACacheBase):
    __doc__ = TPACacheBase.__doc__
    _decode = staticmethod(decode)
    _gpu_ok = True
