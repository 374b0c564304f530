"""The plain preallocated KV cache (SPEC 1.3), shared by lmkern.KVCache and its NumPy twin."""
from __future__ import annotations

import numpy as np

from . import _dispatch


def ragged_lengths(fn, lengths, B, T):
    """lengths (B,) in [0, T], default T: how many of each row's T new tokens are appended."""
    if lengths is None:
        return np.full(B, T, np.int64)
    lens = _dispatch.index_array(fn, "lengths", lengths)
    _dispatch.Shapes(fn, B=B).check("lengths", lens, "B")
    if lens.size and (lens.min() < 0 or lens.max() > T):
        raise ValueError(f"{fn}: lengths must be in [0, T = {T}]; got {lens.tolist()}")
    return lens


def check_room(fn, current, new, max_len):
    """Appending past max_len is a ValueError, raised before anything is written."""
    over = np.nonzero(current + new > max_len)[0]
    if over.size:
        b = int(over[0])
        raise ValueError(
            f"{fn}: appending {int(new[b])} tokens to row {b} holding {int(current[b])} exceeds max_len = {max_len}"
        )


def check_append(fn, cache, k, v, positions, lengths):
    """The checks of a KV cache append (shapes, ragged lengths, positions, room), before any write.

    Returns ``({"k": k, "v": v} as NumPy float arrays, lengths (B,) int64, positions (B,T) int64 or None)``."""
    _, a = _dispatch.float_arrays(fn, k=k, v=v)
    sh = _dispatch.Shapes(fn, B=cache.batch, Hkv=cache.kv_heads, D=cache.head_dim, E=cache.v_head_dim)
    sh.check("k", a["k"], "B,T,Hkv,D")
    sh.check("v", a["v"], "B,T,Hkv,E")
    lens = ragged_lengths(fn, lengths, cache.batch, sh["T"])
    if positions is not None:
        positions = _dispatch.index_array(fn, "positions", positions)
        sh.check("positions", positions, "B,T")
    check_room(fn, cache._len, lens, cache.max_len)
    return a, lens, positions


class RaggedRows:
    """What every cache of ragged batch rows shares: ``_len`` (B,) tokens per row and ``batch``."""

    @property
    def lengths(self):
        """(B,) int64: tokens held per row (a copy)."""
        return self._len.copy()

    def _filled(self):
        return _dispatch.min_max(self._len)[1] if self.batch else 0


class KVCacheBase(RaggedRows):
    """KVCache(batch, max_len, kv_heads, head_dim, v_head_dim=None, *, dtype=float32, device=None)

    Preallocated ``k (B, max_len, Hkv, D)``, ``v (B, max_len, Hkv, E)`` and ``positions (B, max_len)``.
    ``append`` copies the first ``lengths[b]`` tokens of row b after the row's current end;
    ``attend`` runs attention over the filled part with ``kv_lens = lengths`` and ``kv_pos = positions``.

    ``attend(q, q_pos=None)`` is exactly ``attention(q, k, v, causal=causal, q_pos=q_pos, kv_pos=positions,
    kv_lens=lengths)`` (SPEC 1.3), so ``q_pos=None`` is attention's default ``L_b - N + i``.  After
    appending custom ``positions``, pass the queries' positions too (e.g. the positions just appended):
    the default counts tokens, not stored positions.

    ``device="cuda"`` (or ``"cuda:N"``, an int, a ``torch.device``; lmkern.KVCache only, the NumPy twin
    stays on the host): ``k``/``v`` live on the GPU as torch tensors when torch is installed, else as
    :class:`lmkern.cuda.DeviceArray`; ``dtype`` may then be float32, float16 or bfloat16 (default
    float32).  ``append`` takes CUDA arrays and copies on the GPU, ``attend`` runs the CUDA attention
    and returns the query's array type.  ``lengths`` and ``positions`` stay host (NumPy) bookkeeping
    (a device copy of the positions feeds the kernel); ``.k``/``.v`` are views for torch, copies for
    DeviceArray.
    """

    _attention = None  # set by subclasses: the attention function used by attend
    _gpu_ok = False    # lmkern.KVCache sets True: device="cuda" puts the buffers on the GPU
    _gpu = None        # lmkern.cuda.KVCacheStorage of a GPU cache

    def __init__(self, batch, max_len, kv_heads, head_dim, v_head_dim=None, *, dtype=np.float32, device=None):
        fn = "KVCache"
        for name, val in (("batch", batch), ("max_len", max_len), ("kv_heads", kv_heads), ("head_dim", head_dim)) \
                + ((("v_head_dim", v_head_dim),) if v_head_dim is not None else ()):
            _dispatch.check_count(fn, name, val)
        if type(self)._gpu_ok and device not in (None, "cpu"):
            return self._init_gpu(batch, max_len, kv_heads, head_dim, v_head_dim, dtype, device)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{fn}: dtype must be float32 or float64 on the CPU; got {dtype}")
        if device not in (None, "cpu"):
            raise ValueError(f"{fn}: device must be None or 'cpu' for this cache; use lmkern.cuda for GPU caches")
        self.batch, self.max_len, self.kv_heads = int(batch), int(max_len), int(kv_heads)
        self.head_dim = int(head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else int(v_head_dim)
        self.dtype = dtype
        B, S, H = self.batch, self.max_len, self.kv_heads
        self._k = np.zeros((B, S, H, self.head_dim), dtype)
        self._v = np.zeros((B, S, H, self.v_head_dim), dtype)
        self._pos = np.zeros((B, S), np.int64)
        self._len = np.zeros(B, np.int64)

    def _init_gpu(self, batch, max_len, kv_heads, head_dim, v_head_dim, dtype, device):
        from . import cuda
        gpu = cuda.parse_device(device)
        self.batch, self.max_len, self.kv_heads = int(batch), int(max_len), int(kv_heads)
        self.head_dim = int(head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else int(v_head_dim)
        if gpu is None:
            raise ValueError(f"KVCache: device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
        self._gpu = cuda.KVCacheStorage(self, gpu, dtype)
        self.dtype = self._gpu.dtype
        self._k, self._v = self._gpu.k, self._gpu.v
        self._pos = np.zeros((self.batch, self.max_len), np.int64)
        self._len = np.zeros(self.batch, np.int64)

    # views over the filled capacity
    @property
    def k(self):
        if self._gpu is not None:
            return self._gpu.filled(self._filled())[0]
        return self._k[:, : self._filled()]

    @property
    def v(self):
        if self._gpu is not None:
            return self._gpu.filled(self._filled())[1]
        return self._v[:, : self._filled()]

    @property
    def positions(self):
        return self._pos[:, : self._filled()]

    @property
    def nbytes(self):
        """Bytes of the stored tokens (keys and values)."""
        itemsize = self._gpu.itemsize if self._gpu is not None else self.dtype.itemsize
        per_token = self.kv_heads * (self.head_dim + self.v_head_dim) * itemsize
        return int(self._len.sum()) * per_token

    def reset(self):
        self._len[:] = 0

    def append(self, k, v, *, positions=None, lengths=None):
        fn = "KVCache.append"
        if self._gpu is not None:
            return self._append_gpu(k, v, positions, lengths)
        a, lens, positions = check_append(fn, self, k, v, positions, lengths)
        for b in range(self.batch):
            n, start = int(lens[b]), int(self._len[b])
            self._k[b, start:start + n] = a["k"][b, :n]
            self._v[b, start:start + n] = a["v"][b, :n]
            self._pos[b, start:start + n] = positions[b, :n] if positions is not None else np.arange(start, start + n)
        self._len += lens
        return self

    def _append_gpu(self, k, v, positions, lengths):
        fn = "KVCache.append"
        from . import cuda
        T, views = self._gpu.check_append(k, v)
        lens = ragged_lengths(fn, lengths, self.batch, T)
        if positions is not None:
            positions = _dispatch.index_array(fn, "positions", cuda.to_host(positions))
            _dispatch.Shapes(fn, B=self.batch, T=T).check("positions", positions, "B,T")
        check_room(fn, self._len, lens, self.max_len)
        for b in range(self.batch):
            n, start = int(lens[b]), int(self._len[b])
            self._pos[b, start:start + n] = positions[b, :n] if positions is not None else np.arange(start, start + n)
        self._gpu.commit(views, lens, self._len, self._pos)
        self._len += lens
        return self

    def attend(self, q, *, causal=True, q_pos=None, scale=None, return_lse=False):
        # the query is checked against the cache here, so errors name KVCache.attend and q (the cached
        # k/v are right by construction); q_pos=None stays attention's default L_b - N + i (SPEC 1.3)
        fn = "KVCache.attend"
        sh = _dispatch.Shapes(fn, B=self.batch, D=self.head_dim)
        sh.check("q", q if hasattr(q, "shape") else np.asarray(q), "B,N,Hq,D")
        if self.kv_heads and sh["Hq"] % self.kv_heads or not self.kv_heads and sh["Hq"]:
            raise ValueError(f"{fn}: q has Hq = {sh['Hq']} heads; Hq must be a multiple of kv_heads = {self.kv_heads}")
        if q_pos is not None and not _dispatch.is_cuda(q_pos):
            sh.check_one_of("q_pos", _dispatch.index_array(fn, "q_pos", q_pos), "N", "B,N")
        kv_pos = self._pos if self._gpu is None else self._gpu.pos
        return type(self)._attention(q, self._k, self._v, causal=causal, scale=scale, q_pos=q_pos,
                                     kv_pos=kv_pos, kv_lens=self._len, return_lse=return_lse)
