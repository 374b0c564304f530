"""NumPy twins of lmkern.tpa (SPEC 2): Tensor Product Attention written for clarity.

Per token the factors are ``aq (H,Rq)``, ``bq (Rq,D)``, ``ak (H,Rk)``, ``bk (Rk,D)``, ``av (H,Rv)``,
``bv (Rv,E)`` and ``Q = (1/Rq) aq @ bq``, ``K = (1/Rk) ak @ bk``, ``V = (1/Rv) av @ bv``.  The twins
simply materialize Q, K and V and call the core attention twin: that *is* the definition the kernels
must meet.  (The kernels never materialize K or V.)
"""
from __future__ import annotations

import numpy as np

from .. import _dispatch
from .._tpa_cache import TPACacheBase
from .core import attention as _attention

__all__ = ["materialize", "attention", "decode", "KVCache"]


def _check(fn, aq, bq, ak, bk, av, bv, kv_lens, query_spec, q_pos=None, kv_pos=None):
    """The library's argument rules (tpa.check_factors), so the twins raise the same errors."""
    from ..tpa import check_factors
    _dispatch.require(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv)
    _, arr = _dispatch.float_arrays(fn, aq=aq, bq=bq, ak=ak, bk=bk, av=av, bv=bv)
    sh = _dispatch.Shapes(fn)
    check_factors(fn, sh, arr, _dispatch.index_array(fn, "kv_lens", kv_lens), query_spec)
    if q_pos is not None:
        sh.check_one_of("q_pos", _dispatch.index_array(fn, "q_pos", q_pos), "N", "B,N")
    if kv_pos is not None:
        sh.check_one_of("kv_pos", _dispatch.index_array(fn, "kv_pos", kv_pos), "M", "B,M")
    return [arr[n] for n in ("aq", "bq", "ak", "bk", "av", "bv")]   # all six in the one promoted dtype


def materialize(a, b, *, scale=None, out=None):
    """``a (...,H,R)``, ``b (...,R,D)`` -> ``scale * a @ b`` of shape ``(...,H,D)``; scale defaults to 1/R."""
    from ..tpa import check_materialize                # the library's shape and scale rules
    dtype, arr = _dispatch.float_arrays("tpa.materialize", a=a, b=b)
    a, b = arr["a"], arr["b"]
    _, scale, shape, _ = check_materialize("tpa.materialize", a, b, scale)   # scale: 1/R by default
    if out is not None:
        _dispatch.prepare_out("tpa.materialize", out, shape, dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    res = (scale * np.einsum("...hr,...rd->...hd", a.astype(acc), b.astype(acc))).astype(dtype)
    if out is not None:
        out[...] = res
        return out
    return res


def attention(aq, bq, ak, bk, av, bv, *, causal=False, scale=None, q_pos=None, kv_pos=None, kv_lens=None,
              return_lse=False, out=None):
    """``attention(materialize(aq,bq), materialize(ak,bk), materialize(av,bv), ...)`` with scale ``D**-0.5``."""
    aq, bq, ak, bk, av, bv = _check("tpa.attention", aq, bq, ak, bk, av, bv, kv_lens, ("B,N,H,Rq", "B,N,Rq,D"),
                                    q_pos, kv_pos)
    q = materialize(aq, bq)
    k = materialize(ak, bk)
    v = materialize(av, bv)
    D = q.shape[-1]
    if scale is None:
        scale = D ** -0.5 if D else 1.0   # D = 0: every score is 0
    return _attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, kv_pos=kv_pos, kv_lens=kv_lens,
                      return_lse=return_lse, out=out)


def decode(aq, bq, ak, bk, av, bv, *, kv_lens=None, scale=None, return_lse=False, out=None):
    """One query per row: ``aq (B,H,Rq)``, ``bq (B,Rq,D)`` against ``(B,M,...)`` factors -> ``(B,H,E)``.

    Every cached token ``j < kv_lens[b]`` is admissible (the query's own factors are already cached).
    """
    aq, bq, ak, bk, av, bv = _check("tpa.decode", aq, bq, ak, bk, av, bv, kv_lens, ("B,H,Rq", "B,Rq,D"))
    res = attention(np.asarray(aq)[:, None], np.asarray(bq)[:, None], ak, bk, av, bv, causal=False,
                    scale=scale, kv_lens=kv_lens, return_lse=True)
    o, lse = res[0][:, 0], res[1][:, 0]
    if out is not None:
        out[...] = o
        o = out
    return (o, lse) if return_lse else o


class KVCache(TPACacheBase):
    """The factor cache of lmkern.tpa.KVCache, decoding with the NumPy twin."""

    _decode = staticmethod(decode)
