"""lmkern.mor: Mixture-of-Recursions routing kernels (SPEC 3).

Mixture-of-Recursions (MoR; arXiv 2507.10524) applies one shared block up to ``R`` times and lets a
router decide, per token, how many recursions it gets.  The reference code
(raymin0223/mixture_of_recursions) is training-only PyTorch; these are the same operations as
CPU kernels with NumPy twins (:mod:`lmkern.reference.mor`), plus a decode path.

Kernels
-------
* :func:`router_scores` - ``alpha * act((h @ w) / temperature)``, fused GEMV/small GEMM + activation.
* :func:`capacity` - the expert-choice top-k size at recursion ``step`` (2048, 3 -> 2048, 1365, 682).
* :func:`expert_choice` - per-row top-k by radix *selection* (O(n), no sort), idx ascending,
  hierarchical ``candidates``.
* :func:`token_choice` - argmax over recursion depths with a selection-only bias (loss-free balancing).
* :func:`gather`, :func:`scatter_residual`, :func:`scatter_residual_` - active tokens out and back,
  with a gated residual; repeated indices accumulate in a fixed order.
* :func:`balance_loss`, :func:`z_loss`, :func:`router_bce` - router losses (forward values).

Attention among active tokens (SPEC 3.6) is :func:`lmkern.attention` with positions:

* recursion-wise KV caching: ``attention(q, k, v, causal=True, q_pos=idx, kv_pos=idx)`` with q, k, v
  of the active tokens only: cost ``(k/N)^2`` of the dense step;
* recursive KV sharing: ``attention(q, k0, v0, causal=True, q_pos=idx, kv_pos=arange(T))`` with the
  first recursion's keys/values of all tokens: cost ``k/N`` of the dense step.

Recipe: a 3-recursion expert-choice model step
-----------------------------------------------
:class:`SharedBlock` is a small attention + MLP block whose weights all recursions share;
:func:`expert_choice_forward` runs ``R`` recursions over a prompt::

    block = mor.SharedBlock(dm=64, heads=4, head_dim=16, ffn=128, seed=0)
    router_w = np.random.default_rng(1).standard_normal(64).astype(np.float32) / 8
    h_out, trace = mor.expert_choice_forward(h, block, router_w, n_recursions=3, kv_mode="recursion")

Each recursion ``r``: scores of the current candidates (all tokens at ``r = 0``, the previous
survivors after), ``idx, gate = expert_choice(scores, capacity(T, r, R), candidates=prev)``,
``x = gather(h, idx)``, attention among the active tokens at their original positions (RoPE at
``idx``), ``y = block.residual(x, attn)``, ``h = scatter_residual(h, idx, y, gate)``.
``lmkern.reference.mor.expert_choice_forward_dense`` computes the same with dense masks over all
tokens (no gather/scatter, an explicit ``T x T`` mask); the tests check that the two agree, in both
KV modes.

Decode (the paper's recursion-wise cache, which the reference code does not ship):
:func:`expert_choice_prefill` fills one :class:`lmkern.KVCache` per recursion depth holding only the
tokens active at that depth, with their positions; :func:`expert_choice_decode` then runs one new
token per row: at depth 0 every token is active; at depth ``r >= 1`` a token stays active iff it was
active at ``r - 1`` and ``sigmoid(router logit) > threshold`` (0.5: the causal decision that
:func:`router_bce` trains the router for, since top-k over a sequence is not available while
decoding).  An active token appends its k, v (position ``pos``) to cache ``r`` and attends over it;
rows where the token is inactive append nothing (``lengths=0``).  With ``kv_mode="share"`` only the
depth-0 cache exists and every depth attends over it.  The dense reference over the prompt plus the
new token, with the same active sets, gives the same hidden state (tested).

GPU
---
CUDA arrays (torch, CuPy, DeviceArray, ...) run :func:`router_scores`, :func:`expert_choice`,
:func:`token_choice`, :func:`gather`, :func:`scatter_residual` and :func:`scatter_residual_` on the
GPU (float32/float16/bfloat16, float32 arithmetic; kernels and GPU decisions in
:mod:`lmkern._cuda_mor`): ``expert_choice`` is a per-row radix select plus a stable compaction (the
same results bit for bit as the CPU), the scatter accumulates repeated indices in ascending ``j``
without atomics.  Index arrays may be host arrays (checked, then uploaded) or device int64 arrays
(not read back: an out-of-range device ``idx`` gathers zeros and is skipped by the scatter).
The router losses return a Python float, which needs the values on the host anyway: for CUDA inputs
the (small) arrays are copied to the host and reduced by the CPU kernel, so the value is the CPU
path's (float64 arithmetic) for the same numbers.

Decisions where the SPEC is silent (also in each docstring)
-----------------------------------------------------------
* ``expert_choice``: ``candidates`` must be non-negative and strictly ascending (ValueError), so that
  ``idx`` is ascending without a sort.  ``-0.0`` and ``+0.0`` tie.
* ``token_choice``: NaN in ``probs + bias`` ranks below every number; an all-NaN row chooses depth 1.
* ``scatter_residual_`` computes in ``h``'s dtype (``y``/``gate`` are cast to it, like ``h += ...``).
* Losses return Python floats computed in float64; means over zero tokens are NaN (as ``np.mean``).
"""
from __future__ import annotations

import operator

import numpy as np

from . import _core, _dispatch

__all__ = [
    "router_scores", "capacity", "expert_choice", "token_choice", "gather", "scatter_residual",
    "scatter_residual_", "balance_loss", "z_loss", "router_bce",
    "SharedBlock", "expert_choice_forward", "expert_choice_prefill", "expert_choice_decode",
]

_ACTIVATIONS = {"none": 0, "sigmoid": 1, "tanh": 2, "softmax": 3}
# up to this many router outputs the fused C kernel computes h @ w itself; above it BLAS does
_FUSED_MAX_C = 16


def _route(fn, floats, indices):
    """"cuda" or "cpu" by where the float arrays live; index arrays may be host arrays for CUDA data
    (uploaded), but a CUDA index array with host data is a ValueError (different devices)."""
    where = _dispatch.route(fn, **floats)
    if where == "cpu" and any(_dispatch.is_cuda(x) for x in indices.values()):
        _dispatch.route(fn, **floats, **indices)  # raises the "different devices" message
    return where


def _on_host(*arrays):
    """Host copies of the losses' CUDA arguments (the losses return a Python float: the values come to
    the host anyway, and the CPU kernel reduces them in float64, the same value as the CPU path)."""
    from . import cuda
    return tuple(None if a is None else cuda.to_host(a) for a in arrays)


# ----------------------------------------------------------------------------------------------
# argument checks (shared with the NumPy twins in lmkern.reference.mor)

# The *_shapes helpers take anything with .shape (NumPy arrays, lmkern.cuda Views): the CPU and the
# CUDA paths run the same checks and raise the same messages.

def _router_shapes(h, w, activation, temperature):
    fn = "mor.router_scores"
    sh = _dispatch.Shapes(fn)
    sh.check("h", h, "B,T,Dm")
    sh.check_one_of("w", w, "Dm", "Dm,C")
    _dispatch.check_choice(fn, "activation", activation, tuple(_ACTIVATIONS))
    if not float(temperature) > 0:
        raise ValueError(f"{fn}: temperature must be positive; got {temperature}")
    return sh


def _check_router_scores(h, w, activation, temperature):
    fn = "mor.router_scores"
    dtype, a = _dispatch.float_arrays(fn, h=h, w=w)
    _router_shapes(a["h"], a["w"], activation, temperature)
    return dtype, a["h"], a["w"]


def _as_int(fn, name, value):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an integer; got {type(value).__name__}") from None


def _expert_choice_shapes(s, k, cand):
    """Shapes of scores (B,n) / candidates (B,n) and the range of k; returns (Shapes, k)."""
    fn = "mor.expert_choice"
    sh = _dispatch.Shapes(fn)
    sh.check("scores", s, "B,n")
    k = _as_int(fn, "k", k)
    if k < 0 or k > sh["n"]:
        raise ValueError(f"{fn}: k must be in [0, n = {sh['n']}]; got k = {k}")
    if cand is not None:
        sh.check("candidates", cand, "B,n")
    return sh, k


def _check_candidate_values(cand):
    """Host candidates (int64 ndarray): non-negative and strictly ascending per row."""
    if cand.size and (cand.min() < 0 or (cand.shape[1] > 1 and np.any(cand[:, 1:] <= cand[:, :-1]))):
        raise ValueError("mor.expert_choice: candidates must be non-negative and strictly ascending in every row "
                         "(global token positions, e.g. the previous step's idx)")


def _check_expert_choice(scores, k, candidates):
    fn = "mor.expert_choice"
    dtype, a = _dispatch.float_arrays(fn, scores=scores)
    s = a["scores"]
    cand = _dispatch.index_array(fn, "candidates", candidates)
    _, k = _expert_choice_shapes(s, k, cand)
    if cand is not None:
        _check_candidate_values(cand)
    return dtype, s, k, cand


def _token_choice_shapes(probs, bias):
    fn = "mor.token_choice"
    sh = _dispatch.Shapes(fn)
    sh.check("probs", probs, "B,T,C")
    if bias is not None:
        sh.check("bias", bias, "C")
    if sh["C"] == 0 and sh["B"] * sh["T"]:
        raise ValueError(f"{fn}: probs has C = 0 choices; expected at least one recursion depth")
    return sh


def _check_token_choice(probs, bias):
    fn = "mor.token_choice"
    dtype, a = _dispatch.float_arrays(fn, probs=probs, bias=bias)
    _token_choice_shapes(a["probs"], a["bias"])
    return dtype, a["probs"], a["bias"]


def _check_index_range(fn, idx, T):
    if idx.size and (idx.min() < 0 or idx.max() >= T):
        bad = np.argwhere((idx < 0) | (idx >= T))[0]
        raise ValueError(f"{fn}: idx holds {int(idx[tuple(bad)])} at {tuple(int(i) for i in bad)}; "
                         f"expected token positions in [0, T = {T})")


def _gather_shapes(h, idx, idx_host):
    """h (B,T,Dm), idx (B,k); idx_host (int64 ndarray or None: a device array) is range-checked."""
    fn = "mor.gather"
    if idx is None:
        raise ValueError(f"{fn}: idx is required")
    sh = _dispatch.Shapes(fn)
    sh.check("h", h, "B,T,Dm")
    sh.check("idx", idx, "B,k")
    if idx_host is not None:
        _check_index_range(fn, idx_host, sh["T"])
    return sh


def _check_gather(h, idx):
    fn = "mor.gather"
    dtype, a = _dispatch.float_arrays(fn, h=h)
    idx = _dispatch.index_array(fn, "idx", idx)
    _gather_shapes(a["h"], idx, idx)
    return dtype, a["h"], idx


def _check_scatter(fn, h, idx, y, gate, dtype=None):
    if dtype is None:
        dtype, a = _dispatch.float_arrays(fn, h=h, y=y, gate=gate)
    else:  # in place: h is used as it is, y and gate are cast to its dtype
        _, a = _dispatch.float_arrays(fn, y=y, gate=gate)
        a = {n: (None if v is None else v.astype(dtype, copy=False)) for n, v in a.items()}
        a["h"] = h
    idx = _dispatch.index_array(fn, "idx", idx)
    _scatter_shapes(fn, a["h"], idx, idx, a["y"], a["gate"])
    return np.dtype(dtype), a["h"], idx, a["y"], a["gate"]


def _scatter_shapes(fn, h, idx, idx_host, y, gate):
    """h (B,T,Dm), idx (B,k), y (B,k,Dm), gate (B,k) or None; idx_host range-checked when given."""
    if idx is None:
        raise ValueError(f"{fn}: idx is required")
    sh = _dispatch.Shapes(fn)
    sh.check("h", h, "B,T,Dm")
    sh.check("idx", idx, "B,k")
    sh.check("y", y, "B,k,Dm")
    if gate is not None:
        sh.check("gate", gate, "B,k")
    if idx_host is not None:
        _check_index_range(fn, idx_host, sh["T"])
    return sh


def _check_balance(probs, depth):
    fn = "mor.balance_loss"
    _, a = _dispatch.float_arrays(fn, probs=probs)
    depth = _dispatch.index_array(fn, "depth", depth)
    sh = _dispatch.Shapes(fn)
    sh.check("probs", a["probs"], "B,T,C")
    sh.check("depth", depth, "B,T")
    C = sh["C"]
    if depth.size and (depth.min() < 1 or depth.max() > C):
        raise ValueError(f"{fn}: depth must be in [1, C = {C}] (recursion counts); got values in "
                         f"[{int(depth.min())}, {int(depth.max())}]")
    return a["probs"], depth


def _check_z_loss(logits):
    fn = "mor.z_loss"
    _dispatch.require(fn, logits=logits)
    _, a = _dispatch.float_arrays(fn, logits=logits)
    x = a["logits"]
    if x.ndim not in (2, 3):
        _dispatch.Shapes(fn).check("logits", x, "B,T,C")
    return x


def _check_router_bce(logits, selected, eligible):
    fn = "mor.router_bce"
    _, a = _dispatch.float_arrays(fn, logits=logits)
    x = a["logits"]
    sh = _dispatch.Shapes(fn)
    sh.check("logits", x, "B,T")
    y = np.asarray(selected)
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{fn}: selected has dtype {y.dtype}; expected bool, integer or float targets")
    sh.check("selected", y, "B,T")
    if eligible is None:
        e = np.ones(x.shape, bool)
    else:
        e = np.asarray(eligible)
        if e.dtype.kind not in "biu":
            raise TypeError(f"{fn}: eligible has dtype {e.dtype}; expected a bool (or integer) mask")
        sh.check("eligible", e, "B,T")
        e = e.astype(bool)
    return x, y, e


# ----------------------------------------------------------------------------------------------
# kernels

def router_scores(h, w, *, activation="sigmoid", alpha=1.0, temperature=1.0):
    """Router scores ``alpha * act((h @ w) / temperature)`` (SPEC 3.1).

    ``h (B,T,Dm)``, ``w (Dm,)`` -> ``(B,T)``, or ``w (Dm,C)`` -> ``(B,T,C)``.  ``activation`` is
    ``"sigmoid"`` (MoR expert-choice, with ``alpha=0.1``), ``"tanh"``, ``"softmax"`` (over ``C``;
    MoR token-choice, ``alpha=1``) or ``"none"``.

    Up to 16 outputs the kernel is one fused pass over ``h`` (all C dot products of a row while it
    is in cache, then the activation); wider routers use BLAS for ``h @ w`` and the kernel for the
    activation, in place.  float32 accumulates in float32 (SPEC 0); the activation is evaluated in
    float64.
    """
    fn = "router_scores"
    if _dispatch.route(fn, h=h, w=w) == "cuda":
        return _cuda_router_scores(h, w, activation=activation, alpha=alpha, temperature=temperature)
    dtype, h, w = _check_router_scores(h, w, activation, temperature)
    B, T, Dm = h.shape
    vector = w.ndim == 1
    C = 1 if vector else w.shape[1]
    rows = B * T
    h2 = h.reshape(rows, Dm)
    if C <= _FUSED_MAX_C:
        z = np.empty((rows, C), dtype)
        wt = np.ascontiguousarray(w.reshape(Dm, C).T)
        _core.mor_router(np.ascontiguousarray(h2), wt, z, _ACTIVATIONS[activation], float(alpha), float(temperature))
    else:
        z = np.ascontiguousarray(h2 @ w, dtype=dtype)
        _core.mor_router(None, None, z, _ACTIVATIONS[activation], float(alpha), float(temperature))
    return z.reshape((B, T) if vector else (B, T, C))


def capacity(seq_len, step, n_recursions):
    """Expert-choice top-k size at recursion ``step`` (from 0): ``max(1, seq_len*(R - step) // R)``.

    ``capacity(2048, s, 3)`` for ``s = 0, 1, 2`` is 2048, 1365, 682 (SPEC 3.2).  Negative
    ``seq_len``, ``n_recursions < 1`` or ``step`` outside ``[0, n_recursions)`` is a ValueError.
    """
    fn = "mor.capacity"
    seq_len = _as_int(fn, "seq_len", seq_len)
    step = _as_int(fn, "step", step)
    n_recursions = _as_int(fn, "n_recursions", n_recursions)
    if seq_len < 0:
        raise ValueError(f"{fn}: seq_len must be >= 0; got {seq_len}")
    if n_recursions < 1:
        raise ValueError(f"{fn}: n_recursions must be >= 1; got {n_recursions}")
    if not 0 <= step < n_recursions:
        raise ValueError(f"{fn}: step must be in [0, n_recursions = {n_recursions}); got {step}")
    return max(1, (seq_len * (n_recursions - step)) // n_recursions)


def expert_choice(scores, k, *, candidates=None):
    """Expert-choice routing: per row, the ``k`` best scores (SPEC 3.3) -> ``(idx, gate)``.

    ``scores (B,n)``; ``idx (B,k)`` int64 ascending, ``gate (B,k)`` = the chosen scores in the order
    of ``idx``.  Order: larger first; ties go to the lower position; NaN ranks below every number
    (also below ``-inf``); ``-0.0`` ties with ``+0.0``.  ``k == 0`` gives empty results; ``k > n``
    or ``k < 0`` is a ValueError.

    ``candidates (B,n)``: hierarchical filtering (recursion ``r`` chooses among the survivors of
    ``r - 1``): ``scores[b, i]`` belongs to token ``candidates[b, i]`` and ``idx`` holds the chosen
    candidates' global positions.  Decision: candidates must be non-negative and strictly
    ascending per row (ValueError otherwise), so ``idx`` comes out ascending with no sort.

    The kernel selects instead of sorting (PyTorch's recipe is ``topk`` then ``sort`` of the
    indices): scores become order-preserving integer keys, a most-significant-byte-first radix
    select finds the k-th key in O(n), and one scan in position order emits the winners already
    ascending (ties resolved by that scan).
    """
    fn = "expert_choice"
    if _route(fn, dict(scores=scores), dict(candidates=candidates)) == "cuda":
        return _cuda_expert_choice(scores, k, candidates=candidates)
    dtype, s, k, cand = _check_expert_choice(scores, k, candidates)
    B = s.shape[0]
    idx = np.empty((B, k), np.int64)
    gate = np.empty((B, k), dtype)
    _core.mor_topk(s, k, cand, idx, gate)
    return idx, gate


def token_choice(probs, *, bias=None):
    """Token-choice routing (SPEC 3.4) -> ``(depth, gate)``.

    ``probs (B,T,C)``; ``choice = argmax_c(probs + bias)`` with ``bias (C,)`` steering the choice
    only (loss-free balancing); ``depth = choice + 1`` (int64, 1..C recursions); ``gate =
    probs[..., choice]`` (unbiased).  Ties go to the lower depth; NaN ranks below every number, and
    an all-NaN token gets depth 1 (decision; ``np.argmax`` would pick the first NaN).
    """
    fn = "token_choice"
    if _dispatch.route(fn, probs=probs, bias=bias) == "cuda":
        return _cuda_token_choice(probs, bias=bias)
    dtype, p, b = _check_token_choice(probs, bias)
    B, T, C = p.shape
    depth = np.empty(B * T, np.int64)
    gate = np.empty(B * T, dtype)
    _core.mor_token_choice(np.ascontiguousarray(p).reshape(B * T, C), b, depth, gate)
    return depth.reshape(B, T), gate.reshape(B, T)


def gather(h, idx):
    """Active tokens: ``out[b, j] = h[b, idx[b, j]]``; ``h (B,T,Dm)``, ``idx (B,k)`` -> ``(B,k,Dm)``.

    Indices outside ``[0, T)`` are a ValueError (nothing is read out of bounds).
    """
    fn = "gather"
    if _route(fn, dict(h=h), dict(idx=idx)) == "cuda":
        return _cuda_gather(h, idx)
    dtype, h, idx = _check_gather(h, idx)
    out = np.empty((idx.shape[0], idx.shape[1], h.shape[2]), dtype)
    _core.mor_gather(h, idx, out)
    return out


def scatter_residual(h, idx, y, gate=None, *, out=None):
    """Gated residual scatter (SPEC 3.5): ``h'`` = ``h`` with ``h'[b, idx[b,j]] += gate[b,j] * y[b,j]``.

    ``h (B,T,Dm)``, ``idx (B,k)``, ``y (B,k,Dm)``, ``gate (B,k)`` (omitted: 1) -> ``(B,T,Dm)``.
    Repeated indices accumulate, always in ascending ``j`` (deterministic, independent of the thread
    count).  Indices outside ``[0, T)`` are a ValueError raised before anything is written.

    The copy of ``h`` and the update are one fused pass: every output row is written once (read h,
    read y, write out: the minimum traffic).  ``out=`` may be ``h`` itself (then it is in place); an
    ``out`` that partly overlaps ``h`` is written from a copy.  On the GPU in float16/bfloat16 a token
    named m times in ``idx`` is rounded after each of its m updates (float32 math per update); indices
    from ``expert_choice`` never repeat.
    """
    fn = "scatter_residual"
    if _route(fn, dict(h=h, y=y, gate=gate, out=out), dict(idx=idx)) == "cuda":
        return _cuda_scatter_residual(h, idx, y, gate, out=out)
    dtype, h_a, idx, y, gate = _check_scatter("mor.scatter_residual", h, idx, y, gate)
    buf = _dispatch.prepare_out("mor.scatter_residual", out, h_a.shape, dtype, letters="B,T,Dm", inputs=(y, gate))
    if buf is out and np.shares_memory(out, h_a):
        if out is h_a:  # out is h: update in place
            _core.mor_scatter(None, idx, y, gate, buf)
            return out
        h_a = h_a.copy()  # partial overlap: read from a copy
    _core.mor_scatter(h_a, idx, y, gate, buf)
    return _dispatch.finish_out(buf, out)


def scatter_residual_(h, idx, y, gate=None):
    """In-place :func:`scatter_residual`: ``h`` (a writable float32/float64 ndarray) is updated and
    returned.  Only the rows named by ``idx`` are touched.  Computed in ``h``'s dtype (``y`` and
    ``gate`` are cast to it, as ``h += ...`` would)."""
    fn = "scatter_residual_"
    if _route(fn, dict(h=h, y=y, gate=gate), dict(idx=idx)) == "cuda":
        return _cuda_scatter_residual(h, idx, y, gate, out=h, fn=f"mor.{fn}")
    if not isinstance(h, np.ndarray):
        raise TypeError(f"mor.{fn}: h must be a numpy.ndarray (it is modified in place); got {type(h).__name__}")
    if h.dtype not in (np.float32, np.float64):
        raise TypeError(f"mor.{fn}: h has dtype {h.dtype}; expected float32 or float64 (in place)")
    if not h.flags.writeable:
        raise ValueError(f"mor.{fn}: h is read-only")
    dtype, h_a, idx, y, gate = _check_scatter(f"mor.{fn}", h, idx, y, gate, dtype=h.dtype)
    # y or gate viewing h's memory: read them from copies, since h changes under the kernel
    y = y.copy() if np.may_share_memory(y, h) else y
    gate = gate.copy() if gate is not None and np.may_share_memory(gate, h) else gate
    if h.flags.c_contiguous and h.flags.aligned:
        _core.mor_scatter(None, idx, y, gate, h)
    else:
        buf = np.ascontiguousarray(h)
        _core.mor_scatter(None, idx, y, gate, buf)
        h[...] = buf
    return h


# ----------------------------------------------------------------------------------------------
# router losses (forward values)

_LOSS_BALANCE, _LOSS_Z, _LOSS_BCE = 0, 1, 2


def balance_loss(probs, depth):
    """Load-balancing loss ``sum_i f_i P_i`` (SPEC 3.7).

    ``probs (B,T,C)``, ``depth (B,T)`` in ``[1, C]`` (ValueError otherwise): ``P_i`` = mean of
    ``probs[..., i]``, ``f_i = C *`` fraction of tokens with ``depth == i + 1``.  A uniform router
    with uniform depths gives 1.  Returns a float, reduced in float64 over fixed token blocks (the
    same value for every thread count); no tokens gives NaN.
    """
    if _dispatch.route("balance_loss", probs=probs, depth=depth) == "cuda":
        probs, depth = _on_host(probs, depth)
    p, depth = _check_balance(probs, depth)
    B, T, C = p.shape
    return _core.mor_loss(_LOSS_BALANCE, p.reshape(B * T, C), depth.reshape(B * T), None, None)


def z_loss(logits):
    """Router z-loss: mean over tokens of ``logsumexp(logits, -1)^2`` for ``(B,T,C)`` logits, and
    of ``logit^2`` for ``(B,T)`` logits (one sigmoid router output per token) (SPEC 3.7).
    Returns a float (float64 arithmetic, max-stabilized logsumexp, so logits of 1000 are fine);
    no tokens gives NaN."""
    if _dispatch.route("z_loss", logits=logits) == "cuda":
        (logits,) = _on_host(logits)
    x = _check_z_loss(logits)
    x2 = x.reshape(-1, 1) if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    if x.ndim == 3 and x.shape[-1] == 0:
        return float("nan") if x2.shape[0] == 0 else float("-inf") ** 2
    return _core.mor_loss(_LOSS_Z, x2, None, None, None)


def router_bce(logits, selected, *, eligible=None):
    """Auxiliary router loss: mean binary cross-entropy with logits over eligible tokens (SPEC 3.7).

    ``logits (B,T)`` (pre-sigmoid router outputs), ``selected (B,T)`` targets (bool, 0/1 or floats
    in [0, 1]: was the token chosen by top-k), ``eligible (B,T)`` bool mask (default: all; at
    recursion ``r`` the survivors of ``r - 1``).  Per token
    ``max(x, 0) - x y + log(1 + exp(-|x|))``, which never overflows (the naive
    ``-y log sigmoid(x) - (1-y) log(1-sigmoid(x))`` gives inf at |x| > ~17 in float32).
    This is what keeps expert-choice routing causal at decode time: the router learns to output
    ``sigmoid > 0.5`` exactly for the tokens top-k would choose.  No eligible token gives NaN.
    """
    if _dispatch.route("router_bce", logits=logits, selected=selected, eligible=eligible) == "cuda":
        logits, selected, eligible = _on_host(logits, selected, eligible)
    x, y, e = _check_router_bce(logits, selected, eligible)
    n = x.size
    return _core.mor_loss(_LOSS_BCE, x.reshape(n, 1), None, np.ascontiguousarray(y, np.float64).reshape(n),
                          None if eligible is None else np.ascontiguousarray(e).reshape(n))


# ----------------------------------------------------------------------------------------------
# CUDA route (lmkern._cuda_mor; imported lazily so that importing lmkern.mor never needs CUDA)

def _cuda_router_scores(h, w, *, activation, alpha, temperature):
    from . import _cuda_mor
    return _cuda_mor.router_scores(h, w, activation=activation, alpha=alpha, temperature=temperature)


def _cuda_expert_choice(scores, k, *, candidates=None):
    from . import _cuda_mor
    return _cuda_mor.expert_choice(scores, k, candidates=candidates)


def _cuda_token_choice(probs, *, bias=None):
    from . import _cuda_mor
    return _cuda_mor.token_choice(probs, bias=bias)


def _cuda_gather(h, idx):
    from . import _cuda_mor
    return _cuda_mor.gather(h, idx)


def _cuda_scatter_residual(h, idx, y, gate=None, *, out=None, fn="mor.scatter_residual"):
    from . import _cuda_mor
    return _cuda_mor.scatter_residual(h, idx, y, gate, out=out, fn=fn)


# ----------------------------------------------------------------------------------------------
# recipe: a shared block applied recursively with expert-choice routing (module docstring)

class SharedBlock:
    """A small transformer block ``f`` whose weights every recursion shares (NumPy weights).

    ``qkv(x, positions)``: ``q = rope(x wq)``, ``k = rope(x wk)``, ``v = x wv`` per head, RoPE at the
    tokens' original positions.  ``residual(x, attn)``: ``a = attn wo``, ``f(x) = a + mlp(x + a)``
    with ``mlp(u) = silu(u w1) w2``.  A recursion updates the active tokens by
    ``h += gate * f(h)`` (:func:`scatter_residual`).  Pure functions of the weights: reused by the
    dense reference and by ``python -m lmkern demo``.
    """

    def __init__(self, dm, heads, head_dim, ffn, *, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.dm, self.heads, self.head_dim, self.ffn = int(dm), int(heads), int(head_dim), int(ffn)
        self.dtype = np.dtype(dtype)

        def mat(m, n):
            return (rng.standard_normal((m, n)) / np.sqrt(m)).astype(self.dtype)

        hd = self.heads * self.head_dim
        self.wq, self.wk, self.wv, self.wo = mat(dm, hd), mat(dm, hd), mat(dm, hd), mat(hd, dm)
        self.w1, self.w2 = mat(dm, ffn), mat(ffn, dm)

    def qkv(self, x, positions, *, rope=None):
        """x (B,n,Dm), positions (B,n) -> q, k, v (B,n,H,D); ``rope`` defaults to :func:`lmkern.rope`."""
        if rope is None:
            from . import rope
        B, n, _ = x.shape
        shape = (B, n, self.heads, self.head_dim)
        q = rope((x @ self.wq).reshape(shape), positions)
        k = rope((x @ self.wk).reshape(shape), positions)
        v = (x @ self.wv).reshape(shape)
        return q, k, v

    def residual(self, x, attn):
        """x (B,n,Dm), attn (B,n,H,D) -> f(x) (B,n,Dm)."""
        B, n, _ = x.shape
        a = attn.reshape(B, n, -1) @ self.wo
        u = (x + a) @ self.w1
        return (a + (u / (1.0 + np.exp(-u))) @ self.w2).astype(x.dtype)


def _check_kv_mode(fn, kv_mode):
    return _dispatch.check_choice(fn, "kv_mode", kv_mode, ("recursion", "share"))


def expert_choice_forward(h, block, router_w, *, n_recursions=3, kv_mode="recursion", alpha=0.1,
                          caches=None):
    """``n_recursions`` expert-choice recursions of ``block`` over ``h (B,T,Dm)`` (module docstring).

    Recursion ``r`` keeps ``capacity(T, r, R)`` tokens, chosen among the survivors of ``r - 1`` by
    ``router_scores(h, router_w, activation="sigmoid", alpha=alpha)``; the gate is that score.
    ``kv_mode="recursion"``: active tokens attend among themselves (``q_pos = kv_pos = idx``);
    ``"share"``: they attend over the keys/values of all tokens from the first recursion.
    ``caches``: optional list of :class:`lmkern.KVCache` (one per depth for ``"recursion"``, one for
    ``"share"``) that receive the keys/values with their positions (prefill).
    Returns ``(h_out, trace)`` with ``trace = [(idx, gate), ...]`` per recursion.
    """
    from . import attention
    fn = "mor.expert_choice_forward"
    _check_kv_mode(fn, kv_mode)
    h = np.asarray(h)
    B, T, Dm = h.shape
    trace = []
    cand = None
    k0 = v0 = None
    all_pos = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    for r in range(n_recursions):
        kr = capacity(T, r, n_recursions) if T else 0
        x_cand = h if cand is None else gather(h, cand)
        scores = router_scores(x_cand, router_w, activation="sigmoid", alpha=alpha)
        idx, gate = expert_choice(scores, kr, candidates=cand)
        x = gather(h, idx)
        q, k, v = block.qkv(x, idx)
        if kv_mode == "recursion":
            a = attention(q, k, v, causal=True, q_pos=idx, kv_pos=idx)
            if caches is not None:
                caches[r].append(k, v, positions=idx)
        else:
            if r == 0:
                _, k0, v0 = block.qkv(h, all_pos)
                if caches is not None:
                    caches[0].append(k0, v0, positions=all_pos)
            a = attention(q, k0, v0, causal=True, q_pos=idx, kv_pos=all_pos)
        y = block.residual(x, a)
        h = scatter_residual(h, idx, y, gate)
        trace.append((idx, gate))
        cand = idx
    return h, trace


def expert_choice_prefill(h, block, router_w, *, n_recursions=3, kv_mode="recursion", alpha=0.1,
                          max_len=None):
    """:func:`expert_choice_forward` that also builds the decode caches.

    Returns ``(h_out, caches, trace)``: ``caches[r]`` is a :class:`lmkern.KVCache` holding the keys
    and values of exactly the tokens active at depth ``r`` (positions stored), ``max_len`` slots
    (default ``T + 64``); with ``kv_mode="share"`` a single cache of all tokens' first-recursion keys.
    """
    from . import KVCache
    h = np.asarray(h)
    B, T, _ = h.shape
    max_len = T + 64 if max_len is None else int(max_len)
    n_caches = n_recursions if kv_mode == "recursion" else 1
    caches = [KVCache(B, max_len, block.heads, block.head_dim, dtype=h.dtype) for _ in range(n_caches)]
    h_out, trace = expert_choice_forward(h, block, router_w, n_recursions=n_recursions, kv_mode=kv_mode,
                                         alpha=alpha, caches=caches)
    return h_out, caches, trace


def expert_choice_decode(h, pos, block, router_w, caches, *, n_recursions=3, kv_mode="recursion",
                         alpha=0.1, threshold=0.5):
    """One decode step: ``h (B,1,Dm)`` new tokens at positions ``pos (B,)`` through the recursions.

    Depth 0: every row is active.  Depth ``r >= 1``: a row stays active iff it was active at
    ``r - 1`` and ``sigmoid(router logit) > threshold``, i.e. ``score > alpha * threshold`` (the
    causal rule :func:`router_bce` trains).  An active token appends its k, v at ``pos`` to
    ``caches[r]`` (rows that are not active append nothing: ``lengths = 0``), attends over that cache
    and gets ``h += gate * f(h)``.  ``kv_mode="share"``: keys/values go to ``caches[0]`` at depth 0
    only and every depth attends over it.
    Returns ``(h_out, depth)`` with ``depth (B,)`` the number of recursions each token received.
    """
    fn = "mor.expert_choice_decode"
    _check_kv_mode(fn, kv_mode)
    h = np.array(h, copy=True)
    B = h.shape[0]
    pos = np.asarray(pos, np.int64).reshape(B, 1)
    active = np.ones(B, bool)
    depth = np.zeros(B, np.int64)
    for r in range(n_recursions):
        score = router_scores(h, router_w, activation="sigmoid", alpha=alpha)[:, 0]     # (B,)
        if r > 0:
            active = active & (score > alpha * threshold)
        if not active.any():
            break
        q, k, v = block.qkv(h, pos)
        if kv_mode == "recursion":
            caches[r].append(k, v, positions=pos, lengths=active.astype(np.int64))
            a = caches[r].attend(q, q_pos=pos)
        else:
            if r == 0:
                caches[0].append(k, v, positions=pos)
            a = caches[0].attend(q, q_pos=pos)
        y = block.residual(h, a)
        rows = np.nonzero(active)[0]
        h[rows] = scatter_residual(h[rows], np.zeros((rows.size, 1), np.int64), y[rows], score[rows, None])
        depth += active
    return h, depth
