"""NumPy twins of lmkern.mor (SPEC 3): Mixture-of-Recursions routing.

Written for clarity, not speed: these are the tests' oracle and a readable statement of the math.
Same signatures, semantics and error behaviour as :mod:`lmkern.mor` (validation is shared with it).
"""
from __future__ import annotations

import numpy as np

from .. import _dispatch

__all__ = [
    "router_scores", "capacity", "expert_choice", "token_choice", "gather", "scatter_residual",
    "scatter_residual_", "balance_loss", "z_loss", "router_bce",
]


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def router_scores(h, w, *, activation="sigmoid", alpha=1.0, temperature=1.0):
    """alpha * act((h @ w) / temperature); h (B,T,Dm), w (Dm,) -> (B,T) or w (Dm,C) -> (B,T,C)."""
    from .. import mor
    dtype, h, w = mor._check_router_scores(h, w, activation, temperature)
    vector = w.ndim == 1
    z = (h.astype(np.float64) @ w.astype(np.float64).reshape(w.shape[0], 1 if vector else w.shape[1])) / float(temperature)
    if activation == "sigmoid":
        a = 1.0 / (1.0 + np.exp(-z))
    elif activation == "tanh":
        a = np.tanh(z)
    elif activation == "softmax":
        with np.errstate(invalid="ignore"):
            m = z.max(axis=-1, keepdims=True) if z.shape[-1] else z
            e = np.exp(z - m)
            a = e / e.sum(axis=-1, keepdims=True)
    else:
        a = z
    a = float(alpha) * a
    return (a[..., 0] if vector else a).astype(dtype)


def capacity(seq_len, step, n_recursions):
    """max(1, (seq_len * (n_recursions - step)) // n_recursions)."""
    from .. import mor
    return mor.capacity(seq_len, step, n_recursions)


def _rank_order(row):
    """Positions of one row from best to worst: larger first, NaN last, ties to the lower position."""
    n = row.shape[0]
    nan = np.isnan(row)
    neg = np.where(nan, 0.0, -row.astype(np.float64))
    return np.lexsort((np.arange(n), neg, nan))


def expert_choice(scores, k, *, candidates=None):
    """Per row the k best scores (ties to the lower position, NaN lowest); idx ascending, gate = scores[idx]."""
    from .. import mor
    dtype, s, k, cand = mor._check_expert_choice(scores, k, candidates)
    B, n = s.shape
    idx = np.zeros((B, k), np.int64)
    gate = np.zeros((B, k), dtype)
    for b in range(B):
        chosen = np.sort(_rank_order(s[b])[:k])
        idx[b] = chosen if cand is None else cand[b, chosen]
        gate[b] = s[b, chosen]
    return idx, gate


def token_choice(probs, *, bias=None):
    """choice = argmax_c(probs + bias) (ties lower, NaN lowest); depth = choice + 1; gate = probs[choice]."""
    from .. import mor
    dtype, p, bias = mor._check_token_choice(probs, bias)
    B, T, C = p.shape
    depth = np.zeros((B, T), np.int64)
    gate = np.zeros((B, T), dtype)
    for b in range(B):
        for t in range(T):
            sel = p[b, t] + (bias if bias is not None else 0)
            order = _rank_order(sel)
            c = int(order[0]) if C else 0
            depth[b, t] = c + 1
            gate[b, t] = p[b, t, c] if C else 0
    return depth, gate


def gather(h, idx):
    """out[b, j] = h[b, idx[b, j]]."""
    from .. import mor
    dtype, h, idx = mor._check_gather(h, idx)
    B, k = idx.shape
    out = np.zeros((B, k, h.shape[2]), dtype)
    for b in range(B):
        for j in range(k):
            out[b, j] = h[b, idx[b, j]]
    return out


def scatter_residual(h, idx, y, gate=None, *, out=None):
    """h' = h, then for j = 0, 1, ... in order: h'[b, idx[b,j]] += gate[b,j] * y[b,j]."""
    from .. import mor
    dtype, h, idx, y, gate = mor._check_scatter("mor.scatter_residual", h, idx, y, gate)
    res = h.copy()
    B, k = idx.shape
    for b in range(B):
        for j in range(k):
            g = gate[b, j] if gate is not None else dtype.type(1)
            res[b, idx[b, j]] = res[b, idx[b, j]] + g * y[b, j]
    if out is not None:
        out[...] = res
        return out
    return res


def scatter_residual_(h, idx, y, gate=None):
    """In-place scatter_residual: h is updated and returned."""
    h[...] = scatter_residual(h, idx, y, gate)
    return h


def balance_loss(probs, depth):
    """sum_i f_i P_i; P_i = mean of probs[..., i], f_i = C * fraction of tokens with depth == i + 1."""
    from .. import mor
    p, depth = mor._check_balance(probs, depth)
    C = p.shape[-1]
    n = p.shape[0] * p.shape[1]
    if n == 0:
        return float("nan")   # no tokens (as the kernel), whatever C
    total = 0.0
    for i in range(C):
        P_i = float(np.mean(p[..., i].astype(np.float64))) if n else float("nan")
        f_i = C * float(np.count_nonzero(depth == i + 1)) / n if n else float("nan")
        total += f_i * P_i
    return total


def z_loss(logits):
    """mean over tokens of logsumexp(logits, -1)^2; (B,T) logits: mean of logit^2."""
    from .. import mor
    x = mor._check_z_loss(logits).astype(np.float64)
    if x.ndim == 2:
        return float(np.mean(x * x)) if x.size else float("nan")
    vals = []
    for row in x.reshape(-1, x.shape[-1]):
        m = row.max() if row.size else -np.inf
        lse = m + np.log(np.sum(np.exp(row - m))) if np.isfinite(m) else m
        vals.append(lse * lse)
    return float(np.mean(vals)) if vals else float("nan")


def router_bce(logits, selected, *, eligible=None):
    """mean over eligible tokens of -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))."""
    from .. import mor
    x, y, e = mor._check_router_bce(logits, selected, eligible)
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    losses = []
    for xi, yi, ei in zip(x.ravel(), y.ravel(), e.ravel()):
        if ei:
            # -(y log s + (1-y) log(1-s)) = max(x, 0) - x y + log(1 + e^-|x|)
            losses.append(max(xi, 0.0) - xi * yi + np.log1p(np.exp(-abs(xi))))
    return float(np.mean(losses)) if losses else float("nan")


def expert_choice_forward_dense(h, block, router_w, *, n_recursions=3, kv_mode="recursion", alpha=0.1,
                                active=None):
    """Brute-force twin of :func:`lmkern.mor.expert_choice_forward`: no gather, no scatter, no
    positions; every recursion computes the block on all T tokens with an explicit T x T mask and
    updates only the active ones.

    Active sets: recursion 0 keeps the ``capacity(T, 0, R)`` best of all tokens, recursion ``r``
    the ``capacity(T, r, R)`` best of the previous active set (Python ``sorted`` by
    ``(-score, position)``), unless ``active`` (a list of R boolean ``(B, T)`` masks) fixes them
    (used to check a decode step).  ``kv_mode="recursion"``: query i sees key j iff both are active
    and ``j <= i``; ``"share"``: keys/values of recursion 0 for all tokens, ``j <= i``.
    Returns ``(h_out, masks)``.
    """
    from .core import rope
    h = np.asarray(h)
    dtype = h.dtype
    acc = np.float64
    B, T, Dm = h.shape
    H, D = block.heads, block.head_dim
    pos = np.broadcast_to(np.arange(T), (B, T))
    w = np.asarray(router_w, acc)
    masks = []
    prev = np.ones((B, T), bool)
    k0 = v0 = None
    for r in range(n_recursions):
        score = (alpha / (1.0 + np.exp(-(h.astype(acc) @ w)))).astype(dtype)          # (B, T)
        if active is not None:
            cur = np.asarray(active[r], bool)
        else:
            kr = capacity(T, r, n_recursions) if T else 0
            cur = np.zeros((B, T), bool)
            for b in range(B):
                cands = [t for t in range(T) if prev[b, t]]
                best = sorted(cands, key=lambda t: (-float(score[b, t]), t))[:kr]
                cur[b, best] = True
        q = rope((h @ block.wq).reshape(B, T, H, D), pos)
        k = rope((h @ block.wk).reshape(B, T, H, D), pos)
        v = (h @ block.wv).reshape(B, T, H, D)
        if kv_mode == "share" and r == 0:
            k0, v0 = k, v
        kk, vv = (k0, v0) if kv_mode == "share" else (k, v)
        attn = np.zeros((B, T, H, D), acc)
        causal = np.tril(np.ones((T, T), bool))
        for b in range(B):
            allowed = causal & cur[b][:, None]
            if kv_mode == "recursion":
                allowed = allowed & cur[b][None, :]
            for hh in range(H):
                s = (q[b, :, hh].astype(acc) @ kk[b, :, hh].astype(acc).T) / np.sqrt(D)
                s = np.where(allowed, s, -np.inf)
                for i in range(T):
                    if allowed[i].any():
                        p = np.exp(s[i] - s[i].max())
                        attn[b, i, hh] = (p / p.sum()) @ vv[b, :, hh].astype(acc)
        y = block.residual(h, attn.astype(dtype))
        h = np.where(cur[..., None], h + score[..., None] * y, h).astype(dtype)
        masks.append(cur)
        prev = cur
    return h, masks
