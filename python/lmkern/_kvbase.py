"""Shared pieces of lmkern.kv and its NumPy twin: QuantizedTensor, argument checks, the KIVI
cache bookkeeping (SPEC 4.2 boundary rule) and the selection recipes (SPEC 4.6), written once over
whichever kernels (fast or twin) the caller passes in."""
from __future__ import annotations

import numpy as np

from . import _dispatch
from ._kvcache import RaggedRows, check_append

BITS = (2, 4, 8)


def check_bits(fn, bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise ValueError(f"{fn}: bits must be one of 2, 4, 8; got {bits!r}")
    return int(bits)


def check_group_size(fn, group_size, bits):
    """group_size >= 1 and a multiple of the codes per byte (8 / bits), so no byte spans two groups."""
    per = 8 // bits
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or int(group_size) < 1 \
            or int(group_size) % per or int(group_size) > _dispatch.MAX_COUNT:
        raise ValueError(f"{fn}: group_size must be a positive multiple of {per} (codes per byte at "
                         f"{bits} bits); got {group_size!r}")
    return int(group_size)


class QuantizedTensor:
    """A tensor ``x (B, T, H, D)`` quantized by :func:`lmkern.kv.quantize` (SPEC 4.1).

    Attributes: ``codes`` (uint8), ``scale`` and ``zero`` (float32, one per group), ``bits``,
    ``group_size`` (G), ``axis`` (``"token"`` or ``"channel"``), ``shape`` (of x), ``dtype`` (of x;
    float16 is recorded as float32), ``nbytes`` (codes + scale + zero).

    Exact layout, with ``per = 8 // bits`` codes per byte, packed LSB-first along the grouped axis:

    * ``axis="token"`` (KIVI values): groups are G consecutive features of one (b, t, h).
      ``codes (B, T, H, D // per)``: the code of feature d is bits ``[bits*(d % per), bits*(d % per) + bits)``
      of byte ``codes[b, t, h, d // per]``.  ``scale, zero (B, T, H, D // G)``: group ``d // G``.
    * ``axis="channel"`` (KIVI keys): groups are G consecutive tokens of one (b, h, d).
      ``codes (B, T // per, H, D)``: the code of token t is bits ``[bits*(t % per), ...)`` of byte
      ``codes[b, t // per, h, d]``.  ``scale, zero (B, T // G, H, D)``: group ``t // G``.

    ``x_hat = code * scale + zero`` (evaluated in float64, rounded once to ``dtype``).
    """

    __slots__ = ("codes", "scale", "zero", "bits", "group_size", "axis", "shape", "dtype")

    def __init__(self, codes, scale, zero, *, bits, group_size, axis, shape, dtype):
        self.codes, self.scale, self.zero = codes, scale, zero
        self.bits, self.group_size, self.axis = int(bits), int(group_size), axis
        self.shape = tuple(int(s) for s in shape)
        self.dtype = _as_dtype(dtype)

    @property
    def nbytes(self):
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)

    def __repr__(self):
        return (f"QuantizedTensor(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
                f"axis={self.axis!r}, nbytes={self.nbytes})")


def _as_dtype(dtype):
    """A NumPy dtype; GPU-only dtypes NumPy lacks (bfloat16) stay their name."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def check_quantize_args(fn, x, bits, group_size, axis):
    """Returns (x as a float array, bits, group_size, axis); raises the SPEC's errors."""
    dtype, a = _dispatch.float_arrays(fn, x=x)
    x = a["x"]
    bits, group_size, axis = check_quantize_shape(fn, x, bits, group_size, axis)
    return x, bits, group_size, axis


def check_quantize_shape(fn, x, bits, group_size, axis):
    """The checks of quantize after the dtype (shared with the GPU path: x needs only .shape / .ndim)."""
    bits = check_bits(fn, bits)
    group_size = check_group_size(fn, group_size, bits)
    _dispatch.check_choice(fn, "axis", axis, ("token", "channel"))
    _dispatch.Shapes(fn).check("x", x, "B,T,H,D")
    B, T, H, D = x.shape
    if axis == "token" and D % group_size:
        raise ValueError(f"{fn}: axis='token' needs D % group_size == 0; got D = {D}, group_size = {group_size}")
    if axis == "channel" and T % group_size:
        raise ValueError(f"{fn}: axis='channel' needs T % group_size == 0; got T = {T}, group_size = {group_size}")
    return bits, group_size, axis


def check_quantized(fn, qt, dtype_of=None):
    """Shapes and dtypes of qt's arrays; ``dtype_of(arr)`` gives a dtype name for GPU arrays (default:
    NumPy's view of the array)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{fn}: qt must be a QuantizedTensor; got {type(qt).__name__}")
    # a hand-built QuantizedTensor gets quantize's own checks of its bits, group size, axis and shape
    check_quantize_shape(fn, _dispatch.ShapeOnly(qt.shape), qt.bits, qt.group_size, qt.axis)
    B, T, H, D = qt.shape
    per, G = 8 // qt.bits, qt.group_size
    if qt.axis == "token":
        cshape, sshape = (B, T, H, D // per), (B, T, H, D // G)
    else:
        cshape, sshape = (B, T // per, H, D), (B, T // G, H, D)
    for name, arr, want, dt in (("codes", qt.codes, cshape, np.uint8), ("scale", qt.scale, sshape, np.float32),
                                ("zero", qt.zero, sshape, np.float32)):
        if tuple(np.shape(arr)) != want:
            raise ValueError(f"{fn}: qt.{name} has shape {tuple(np.shape(arr))}; expected {want}")
        got = np.asarray(arr).dtype if dtype_of is None else dtype_of(arr)
        if str(got) != np.dtype(dt).name:
            raise TypeError(f"{fn}: qt.{name} has dtype {got}; expected {np.dtype(dt)}")


# ----------------------------------------------------------------------------- the KIVI cache

class QuantizedKVCacheBase(RaggedRows):
    """Bookkeeping of the KIVI cache shared by lmkern.kv.QuantizedKVCache and its twin.

    Per row b holding ``L`` tokens: ``Qk = G * floor(max(0, L - residual) / G)`` keys quantized per
    channel (groups aligned to token 0) and ``Qv = max(0, L - residual)`` values quantized per token;
    a token is quantized once, when it crosses the boundary.  Subclasses implement
    ``_append_row(b, k, v, start, (qk_old, qk_new), (qv_old, qv_new))``: store the n new float32 tokens
    of row b at ``start`` and quantize keys ``[qk_old, qk_new)`` and values ``[qv_old, qv_new)``.
    """

    fn = "QuantizedKVCache"

    def __init__(self, batch, max_len, kv_heads, head_dim, v_head_dim=None, *, bits=2, group_size=32, residual=128):
        fn = self.fn
        for name, val in (("batch", batch), ("max_len", max_len), ("kv_heads", kv_heads), ("head_dim", head_dim),
                          ("residual", residual)) + ((("v_head_dim", v_head_dim),) if v_head_dim is not None else ()):
            _dispatch.check_count(fn, name, val)
        self.bits = check_bits(fn, bits)
        self.group_size = G = check_group_size(fn, group_size, self.bits)
        if int(residual) % G:
            raise ValueError(f"{fn}: residual must be a multiple of group_size = {G}; got {residual}")
        self.batch, self.max_len, self.kv_heads = int(batch), int(max_len), int(kv_heads)
        self.head_dim = int(head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else int(v_head_dim)
        if self.v_head_dim < 0:
            raise ValueError(f"{fn}: v_head_dim must be >= 0; got {v_head_dim}")
        if self.v_head_dim % G:
            raise ValueError(f"{fn}: v_head_dim = {self.v_head_dim} must be a multiple of group_size = {G} "
                             f"(values are quantized per token in groups of group_size features)")
        self.residual = int(residual)
        self._len = np.zeros(self.batch, np.int64)
        self._qk = np.zeros(self.batch, np.int64)
        self._qv = np.zeros(self.batch, np.int64)
        self._pos = np.zeros((self.batch, self.max_len), np.int64)

    def boundaries(self, L):
        """(Qk, Qv) for rows holding L tokens (SPEC 4.2)."""
        over = np.maximum(0, np.asarray(L, np.int64) - self.residual)
        return (over // self.group_size) * self.group_size, over

    def reset(self):
        self._len[:] = 0
        self._qk[:] = 0
        self._qv[:] = 0

    @property
    def nbytes(self):
        """Bytes of the stored tokens: codes + scales + zeros of the quantized part, float32 residual."""
        per, G = 8 // self.bits, self.group_size
        D, E, H = self.head_dim, self.v_head_dim, self.kv_heads
        qk, qv, L = self._qk.sum(), self._qv.sum(), self._len.sum()
        k_bytes = qk * H * D // per + (qk // G) * H * D * 8 + (L - qk) * H * D * 4
        v_bytes = qv * H * E // per + qv * H * (E // G) * 8 + (L - qv) * H * E * 4
        return int(k_bytes + v_bytes)

    def append(self, k, v, *, positions=None, lengths=None):
        """Appends the first ``lengths[b]`` (default T) tokens of ``k (B,T,Hkv,D)``, ``v (B,T,Hkv,E)``.

        ``positions (B,T)`` are stored for causal masking (default: the running index).  Appending
        past max_len is a ValueError and writes nothing.
        """
        fn = self.fn + ".append"
        a, lens, positions = check_append(fn, self, k, v, positions, lengths)
        kf = a["k"].astype(np.float32, copy=False)
        vf = a["v"].astype(np.float32, copy=False)
        new_len = self._len + lens
        new_qk, new_qv = self.boundaries(new_len)
        for b in range(self.batch):
            n, start = int(lens[b]), int(self._len[b])
            if n == 0:
                continue
            self._pos[b, start:start + n] = positions[b, :n] if positions is not None else np.arange(start, start + n)
            self._append_row(b, kf[b, :n], vf[b, :n], start, (int(self._qk[b]), int(new_qk[b])),
                             (int(self._qv[b]), int(new_qv[b])))
            self._len[b], self._qk[b], self._qv[b] = start + n, new_qk[b], new_qv[b]
        return self

    def default_q_pos(self, N):
        """attention's default query positions ``L_b - N + i`` (as :class:`lmkern.KVCache`, SPEC 1.3): the
        default counts the row's tokens; after appending custom positions, pass ``q_pos``."""
        return self._len[:, None] - N + np.arange(N)

    def check_attend(self, q, q_pos, scale):
        fn = self.fn + ".attend"
        dtype, a = _dispatch.float_arrays(fn, q=q)
        q = a["q"]
        q_pos, scale = self.check_attend_shapes(q, q_pos, scale)
        return dtype, q, q_pos, scale

    def check_attend_shapes(self, q, q_pos, scale):
        """The checks of attend after q's dtype (shared with the GPU path: q needs only .shape / .ndim;
        q_pos is a host array or None) -> (q_pos (B, N) int64, scale)."""
        fn = self.fn + ".attend"
        sh = _dispatch.Shapes(fn, B=self.batch, D=self.head_dim)
        sh.check("q", q, "B,N,Hq,D")
        Hq = sh["Hq"]
        if self.kv_heads == 0 and Hq or self.kv_heads and Hq % self.kv_heads:
            raise ValueError(f"{fn}: q has Hq = {Hq} heads; Hq must be a multiple of kv_heads = {self.kv_heads}")
        N = sh["N"]
        if q_pos is None:
            q_pos = self.default_q_pos(N)
        else:
            q_pos = _dispatch.index_array(fn, "q_pos", q_pos)
            sh.check_one_of("q_pos", q_pos, "N", "B,N")
            q_pos = np.ascontiguousarray(np.broadcast_to(q_pos, (self.batch, N)))
        scale = _dispatch.as_scale(fn, scale, self.head_dim ** -0.5 if self.head_dim else 1.0)
        return q_pos, scale


# ----------------------------------------------------------------------------- argument checks (SPEC 4.3-4.5)

def check_mass_args(fn, q, k, scale, q_pos, kv_pos, kv_lens, group_reduce):
    """Shared by attention_mass and its twin: float32 q, k; int64 (B,N) q_pos, (B,M) kv_pos, (B,) kv_lens."""
    _dispatch.require(fn, q=q, k=k)
    _, a = _dispatch.float_arrays(fn, q=q, k=k)
    q, k = a["q"].astype(np.float32, copy=False), a["k"].astype(np.float32, copy=False)
    sh = _dispatch.Shapes(fn)
    sh.check("q", q, "B,N,Hq,D")
    sh.check("k", k, "B,M,Hkv,D")
    B, N, Hq, M, Hkv = sh["B"], sh["N"], sh["Hq"], sh["M"], sh["Hkv"]
    if Hkv == 0 and Hq or Hkv and Hq % Hkv:
        raise ValueError(f"{fn}: q has Hq = {Hq} heads and k has Hkv = {Hkv}; Hq must be a multiple of Hkv")
    _dispatch.check_choice(fn, "group_reduce", group_reduce, ("mean", "sum", "max", "none"))
    lens = _dispatch.index_array(fn, "kv_lens", kv_lens)
    if lens is None:
        lens = np.full(B, M, np.int64)
    else:
        sh.check_lens("kv_lens", lens)
    qp = _dispatch.index_array(fn, "q_pos", q_pos)
    if qp is None:
        qp = lens[:, None] - N + np.arange(N, dtype=np.int64)
    else:
        sh.check_one_of("q_pos", qp, "N", "B,N")
    kp = _dispatch.index_array(fn, "kv_pos", kv_pos)
    if kp is None:
        kp = np.arange(M, dtype=np.int64)
    else:
        sh.check_one_of("kv_pos", kp, "M", "B,M")
    qp = np.ascontiguousarray(np.broadcast_to(qp, (B, N)))
    kp = np.ascontiguousarray(np.broadcast_to(kp, (B, M)))
    scale = _dispatch.as_scale(fn, scale, sh["D"] ** -0.5 if sh["D"] else 1.0)
    return q, k, qp, kp, np.ascontiguousarray(lens), scale, sh


def check_pool_args(fn, scores, kernel_size, mode):
    dtype, a = _dispatch.float_arrays(fn, scores=scores)
    s = a["scores"]
    _dispatch.Shapes(fn).check("scores", s, "B,M,H")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"{fn}: kernel_size must be a positive odd integer; got {kernel_size!r}")
    _dispatch.check_choice(fn, "mode", mode, ("avg", "max"))
    return s, int(kernel_size)



def check_budget(fn, budget):
    return _dispatch.check_count(fn, "budget", budget)


def check_topk_args(fn, scores, budget, sink, recent):
    dtype, a = _dispatch.float_arrays(fn, scores=scores)
    s = a["scores"]
    _dispatch.Shapes(fn).check("scores", s, "B,M,H")
    for name, val in (("budget", budget), ("sink", sink), ("recent", recent)):
        _dispatch.check_count(fn, name, val)
    if int(sink) + int(recent) > int(budget):
        raise ValueError(f"{fn}: sink + recent = {int(sink) + int(recent)} exceeds budget = {int(budget)}")
    return s, int(budget), int(sink), int(recent)


def check_compact_args(fn, x, idx):
    x = np.asarray(x)
    idx = _dispatch.index_array(fn, "idx", idx)
    sh = _dispatch.Shapes(fn)
    sh.check("x", x, "B,M,H,D")
    sh.check("idx", idx, "B,K,H")
    if idx.size and (idx.min() < 0 or idx.max() >= sh["M"]):
        raise ValueError(f"{fn}: idx must be in [0, M = {sh['M']}); got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return x, idx


# ----------------------------------------------------------------------------- recipes (SPEC 4.6)

def streaming_indices(length, *, sink=4, recent):
    fn = "kv.streaming_indices"
    for name, val in (("length", length), ("sink", sink), ("recent", recent)):
        _dispatch.check_count(fn, name, val)
    length, sink, recent = int(length), int(sink), int(recent)
    head = np.arange(min(sink, length), dtype=np.int64)
    tail = np.arange(max(min(sink, length), length - recent), length, dtype=np.int64)
    return np.concatenate([head, tail])


def snapkv_select(ops, q_window, k, budget, *, kernel_size=5, pool="avg"):
    fn = "kv.snapkv_select"
    gpu = _dispatch.route(fn, q_window=q_window, k=k) == "cuda"
    if gpu:   # the kernels below run on the GPU; the index bookkeeping (window, concatenation) on the host
        from . import cuda
        a = {"q_window": q_window, "k": k}
    else:
        _, a = _dispatch.float_arrays(fn, q_window=q_window, k=k)
    sh = _dispatch.Shapes(fn)
    sh.check("q_window", a["q_window"], "B,W,Hq,D")
    sh.check("k", a["k"], "B,M,Hkv,D")
    W, M = sh["W"], sh["M"]
    budget = check_budget(fn, budget)
    if W > M:
        raise ValueError(f"{fn}: the window (W = {W} queries) must not be longer than the keys (M = {M})")
    if budget < W:
        raise ValueError(f"{fn}: budget = {budget} must be at least the window length W = {W}")
    B, Hkv = sh["B"], sh["Hkv"]
    if budget >= M:
        idx = np.ascontiguousarray(np.broadcast_to(np.arange(M, dtype=np.int64)[None, :, None], (B, M, Hkv)))
        return cuda._from_host(k, idx, cuda.stream_of(k)) if gpu else idx
    # votes of the window queries (at the last W positions, causal) for every key, mean over the group
    mass = ops.attention_mass(a["q_window"], a["k"], causal=True, group_reduce="mean")
    votes = ops.pool1d(mass[:, :M - W], kernel_size, mode=pool)
    idx = ops.keep_topk(votes, budget - W)
    window = np.broadcast_to(np.arange(M - W, M, dtype=np.int64)[None, :, None], (B, W, Hkv))
    if gpu:   # once per prompt and layer: a small host round trip for the (B, budget, Hkv) indices
        out = np.ascontiguousarray(np.concatenate([cuda.to_host(idx), window], axis=1))
        return cuda._from_host(k, out, cuda.stream_of(k))
    return np.ascontiguousarray(np.concatenate([idx, window], axis=1))


def h2o_select(ops, mass, budget, *, recent):
    return ops.keep_topk(mass, budget, sink=0, recent=recent)


def lazy_ratio(mass, *, sink=4, recent=1024):
    fn = "kv.lazy_ratio"
    dtype, a = _dispatch.float_arrays(fn, mass=mass)
    m = a["mass"]
    _dispatch.Shapes(fn).check("mass", m, "B,M,H")
    M = m.shape[1]
    keep = streaming_indices(M, sink=sink, recent=recent)
    total = m.sum(axis=1, dtype=np.float64)
    part = m[:, keep].sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total > 0, part / np.where(total > 0, total, 1), 0.0)
    return ratio.astype(np.float32)


def scalekv_budgets(n_layers, drafters, *, per_layer, max_budget):
    fn = "kv.scalekv_budgets"
    n_layers, per_layer, max_budget = (_dispatch.check_count(fn, name, val) for name, val in
                                       (("n_layers", n_layers), ("per_layer", per_layer), ("max_budget", max_budget)))
    drafters = sorted({int(d) for d in drafters})
    if any(d < 0 or d >= n_layers for d in drafters):
        raise ValueError(f"{fn}: drafters must be layer indices in [0, n_layers = {n_layers}); got {drafters}")
    budgets = np.zeros(n_layers, np.int64)
    budgets[drafters] = max_budget
    refiners = [i for i in range(n_layers) if i not in set(drafters)]
    rest = n_layers * per_layer - len(drafters) * max_budget
    if rest < 0 or (not refiners and rest != 0):
        raise ValueError(f"{fn}: {len(drafters)} drafters at max_budget = {max_budget} cannot meet the total "
                         f"n_layers * per_layer = {n_layers * per_layer}")
    if refiners:
        share, extra = divmod(rest, len(refiners))
        budgets[refiners] = share
        budgets[refiners[:extra]] += 1
    return budgets
