"""The TPA factor KV cache (SPEC 2.3), shared by lmkern.tpa.KVCache and its NumPy twin."""
from __future__ import annotations

import numpy as np

from . import _dispatch
from ._kvcache import RaggedRows, check_room, ragged_lengths


class TPACacheBase(RaggedRows):
    """KVCache(batch, max_len, heads, k_rank, v_rank, head_dim, v_head_dim=None, *, dtype=float32, device=None)

    Stores the key/value factors of each token, token-major and preallocated:
    ``ak (B, max_len, H, Rk)``, ``bk (B, max_len, Rk, D)``, ``av (B, max_len, H, Rv)``,
    ``bv (B, max_len, Rv, E)``.  ``bk`` is stored as given (already rotated by RoPE).

    * ``append(ak, bk, av, bv, *, lengths=None)`` copies the first ``lengths[b]`` (default ``T``) of
      the ``T`` new tokens of row ``b`` after the row's current end.  Appending past ``max_len`` is a
      ValueError raised before anything is written; inputs of another float dtype are cast to the
      cache's dtype.
    * ``decode(aq, bq, *, scale=None, return_lse=False)`` = ``tpa.decode`` over the cached factors with
      ``kv_lens = lengths``.
    * ``nbytes``: bytes holding the stored tokens, ``((Rk + Rv) H + Rk D + Rv E) * itemsize`` per token
      (``(Rk+Rv)(H+D)`` elements when ``E = D``); ``mha_nbytes``: what a plain MHA cache of the same
      tokens would take, ``H (D + E) * itemsize`` per token (``2 H D`` elements when ``E = D``).
    * ``ak``, ``bk``, ``av``, ``bv``: views over the filled capacity (``max(lengths)`` tokens);
      ``lengths`` (``(B,)`` int64, a copy); ``reset()`` empties every row (capacity is kept).
    * ``device="cuda"`` (or ``"cuda:N"``; lmkern.tpa.KVCache only, the twin stays on the host): the
      factors live on the GPU (torch tensors when torch sees it, else :class:`lmkern.cuda.DeviceArray`),
      ``dtype`` float32 (default), float16 or bfloat16; ``append`` takes CUDA arrays of that dtype and
      copies them on the GPU, ``decode`` runs the CUDA FlashTPA kernel over the cached factors in place
      (``kv_lens = lengths``).  ``lengths`` stay host bookkeeping; the factor properties are views for
      torch and copies for DeviceArray.

    Example (T6-small ranks: 34 heads, Rq = 6, Rk = Rv = 2, D = 64)::

        >>> cache = lmkern.tpa.KVCache(1, 4096, 34, 2, 2, 64)
        >>> cache.append(ak, bk, av, bv)          # (1, T, 34, 2), (1, T, 2, 64), ...
        >>> cache.mha_nbytes / cache.nbytes       # 2*34*64 / (4*(34+64)) = 11.1
    """

    _decode = None    # set by subclasses: the decode function used by decode()
    _gpu_ok = False   # lmkern.tpa.KVCache sets True: device="cuda" puts the factors on the GPU
    _gpu = None       # lmkern.cuda.RowStorage of a GPU cache

    def __init__(self, batch, max_len, heads, k_rank, v_rank, head_dim, v_head_dim=None, *, dtype=np.float32,
                 device=None):
        fn = "tpa.KVCache"
        for name, val in (("batch", batch), ("max_len", max_len), ("heads", heads), ("head_dim", head_dim),
                          ("k_rank", k_rank), ("v_rank", v_rank)) \
                + ((("v_head_dim", v_head_dim),) if v_head_dim is not None else ()):
            _dispatch.check_count(fn, name, val)
        on_gpu = device not in (None, "cpu")
        for name, val in (("k_rank", k_rank), ("v_rank", v_rank)):
            if int(val) < (1 if on_gpu else 0):
                raise ValueError(f"{fn}: {name} must be >= {1 if on_gpu else 0}; got {val}"
                                 + (" (a rank of 0 is supported on the CPU only)" if on_gpu and int(val) == 0 else ""))
        if v_head_dim is not None and int(v_head_dim) < 0:
            raise ValueError(f"{fn}: v_head_dim must be >= 0; got {v_head_dim}")
        self.batch, self.max_len, self.heads = int(batch), int(max_len), int(heads)
        self.k_rank, self.v_rank, self.head_dim = int(k_rank), int(v_rank), int(head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else int(v_head_dim)
        self._len = np.zeros(self.batch, np.int64)
        if device not in (None, "cpu"):
            if not type(self)._gpu_ok:
                raise ValueError(f"{fn}: device must be None or 'cpu' for this cache (the NumPy twin); "
                                 "use lmkern.tpa.KVCache for a GPU cache")
            from . import cuda
            gpu = cuda.parse_device(device)
            if gpu is None:
                raise ValueError(f"{fn}: device must be None, 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
            self._gpu = cuda.RowStorage(fn, self.batch, self.max_len, self._tails(), gpu, dtype)
            self.dtype = self._gpu.dtype
            self._ak, self._bk, self._av, self._bv = (self._gpu.buf[n] for n in ("ak", "bk", "av", "bv"))
            return
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{fn}: dtype must be float32 or float64 on the CPU; got {dtype}")
        self.dtype = dtype
        B, S, H = self.batch, self.max_len, self.heads
        self._ak = np.zeros((B, S, H, self.k_rank), dtype)
        self._bk = np.zeros((B, S, self.k_rank, self.head_dim), dtype)
        self._av = np.zeros((B, S, H, self.v_rank), dtype)
        self._bv = np.zeros((B, S, self.v_rank, self.v_head_dim), dtype)

    def _tails(self):
        H, Rk, Rv = self.heads, self.k_rank, self.v_rank
        return {"ak": (H, Rk), "bk": (Rk, self.head_dim), "av": (H, Rv), "bv": (Rv, self.v_head_dim)}

    def _view(self, name):
        if self._gpu is not None:
            return self._gpu.filled(name, self._filled())
        return getattr(self, "_" + name)[:, : self._filled()]

    @property
    def ak(self):
        return self._view("ak")

    @property
    def bk(self):
        return self._view("bk")

    @property
    def av(self):
        return self._view("av")

    @property
    def bv(self):
        return self._view("bv")

    @property
    def _itemsize(self):
        return self._gpu.itemsize if self._gpu is not None else self.dtype.itemsize

    def _per_token(self):
        H, Rk, Rv = self.heads, self.k_rank, self.v_rank
        return (Rk + Rv) * H + Rk * self.head_dim + Rv * self.v_head_dim

    @property
    def nbytes(self):
        """Bytes of the stored factors: ``((Rk+Rv) H + Rk D + Rv E) * itemsize`` per stored token."""
        return int(self._len.sum()) * self._per_token() * self._itemsize

    @property
    def mha_nbytes(self):
        """Bytes a plain MHA cache of the same tokens would take: ``H (D + E) * itemsize`` per token."""
        return int(self._len.sum()) * self.heads * (self.head_dim + self.v_head_dim) * self._itemsize

    def reset(self):
        self._len[:] = 0

    def append(self, ak, bk, av, bv, *, lengths=None):
        fn = "tpa.KVCache.append"
        if self._gpu is not None:
            return self._append_gpu(fn, dict(ak=ak, bk=bk, av=av, bv=bv), lengths)
        _, a = _dispatch.float_arrays(fn, ak=ak, bk=bk, av=av, bv=bv)
        sh = _dispatch.Shapes(fn, B=self.batch, H=self.heads, Rk=self.k_rank, Rv=self.v_rank, D=self.head_dim,
                              E=self.v_head_dim)
        sh.check("ak", a["ak"], "B,T,H,Rk")
        sh.check("bk", a["bk"], "B,T,Rk,D")
        sh.check("av", a["av"], "B,T,H,Rv")
        sh.check("bv", a["bv"], "B,T,Rv,E")
        T = sh["T"]
        lens = ragged_lengths(fn, lengths, self.batch, T)
        check_room(fn, self._len, lens, self.max_len)
        for b in range(self.batch):
            n, start = int(lens[b]), int(self._len[b])
            self._ak[b, start:start + n] = a["ak"][b, :n]
            self._bk[b, start:start + n] = a["bk"][b, :n]
            self._av[b, start:start + n] = a["av"][b, :n]
            self._bv[b, start:start + n] = a["bv"][b, :n]
        self._len += lens
        return self

    def _append_gpu(self, fn, arrays, lengths):
        from . import cuda
        T, views = self._gpu.check_new(fn, arrays, {"ak": "B,T,H,Rk", "bk": "B,T,Rk,D", "av": "B,T,H,Rv",
                                                    "bv": "B,T,Rv,E"}, H=self.heads, Rk=self.k_rank,
                                       Rv=self.v_rank, D=self.head_dim, E=self.v_head_dim)
        lens = ragged_lengths(fn, lengths, self.batch, T)
        check_room(fn, self._len, lens, self.max_len)
        src = views["ak"].src
        st = cuda.stream_of(src)
        self._gpu.write(views, lens, self._len, st)
        self._gpu.finish(src, st)
        self._len += lens
        return self

    def decode(self, aq, bq, *, scale=None, return_lse=False, out=None):
        """``tpa.decode(aq, bq, *cached factors, kv_lens=lengths)``: ``aq (B,H,Rq)``, ``bq (B,Rq,D)`` -> ``(B,H,E)``."""
        return type(self)._decode(aq, bq, self._ak, self._bk, self._av, self._bv, kv_lens=self._len,
                                  scale=scale, return_lse=return_lse, out=out)
