"""``python -m lmkern demo``: a small decoder language model generating with lmkern's kernels.

A 4-layer, width-256, vocab-512 decoder with deterministic random weights, written in NumPy over
lmkern kernels, prefills a 512-token prompt and generates tokens greedily in each configuration:

==============  ==================================================================================
``mha``          baseline: ``lmkern.attention`` prefill, ``lmkern.KVCache`` decode
``tpa``          Tensor Product Attention (ranks 6/2/2): ``tpa.attention`` prefill, factor cache decode
``mor-cache``    Mixture-of-Recursions, 3 recursions of a shared block, expert-choice routing,
                 recursion-wise KV caching (one ``KVCache`` per depth, holding only its tokens)
``mor-share``    the same routing with recursive KV sharing (all depths read the first recursion's KV)
``kivi2``        KIVI 2-bit cache (group 32, residual 128), attention straight from the codes
``snapkv25``     SnapKV eviction of the prompt cache to 25%
``streaming25``  StreamingLLM: 4 sink tokens + a recent window, 25% of the prompt
``parscale4``    ParScale with P=4 streams, learned per-layer prefixes, fused output aggregation
==============  ==================================================================================

Each configuration's fast run (kernels + caches) is compared with its own reference: one full causal
forward of the same model over the same tokens, computed by the NumPy twins in ``lmkern.reference``
without any cache or compression (for MoR, with the routing decisions of the fast run).  The table
prints KV-cache bytes, generated tokens/s and the largest absolute deviation of the logits over the
generated steps.  Lossless configurations deviate by float32 rounding only; the compressed caches
(KIVI, SnapKV, StreamingLLM) show their approximation error.
"""
from __future__ import annotations

import time

import numpy as np

import lmkern
from lmkern import reference as ref

VOCAB, WIDTH, HEADS, LAYERS, MLP = 512, 256, 4, 4, 512
HEAD_DIM = WIDTH // HEADS
PROMPT = 512
SEED = 0
# bounds on the largest logit deviation, checked by the test suite (and printed as ok/FAIL)
# (logits have a standard deviation near 1).  Lossless runs differ by float32 rounding only; the lossy
# bounds are sanity bounds on the approximation error of random-weight attention, which is diffuse
# (no heavy hitters), the hard case for eviction.
LOSSLESS_BOUND = 1e-4
LOSSY_BOUND = {"kivi2": 0.5, "snapkv25": 3.0, "streaming25": 3.0}


# ---------------------------------------------------------------------------------------------
# where the fast run's arrays live: NumPy on the CPU, torch tensors on the GPU (--device cuda)

class NumpyBackend:
    """The CPU run: NumPy arrays throughout (the references always run here)."""

    device = "cpu"
    cache_device = None

    def put(self, a):
        return a

    def host(self, a):
        return np.asarray(a)

    def take(self, a, idx, axis):
        return np.take(a, idx, axis=axis)

    def cat(self, arrays, axis):
        return np.concatenate(arrays, axis=axis)

    def contiguous(self, a):
        return np.ascontiguousarray(a)

    def rmsnorm(self, x):
        return rmsnorm(x)

    def silu(self, x):
        return silu(x)


class TorchCudaBackend(NumpyBackend):
    """The GPU run: weights and activations are torch CUDA tensors, every lmkern call takes and returns
    them zero-copy; index bookkeeping (positions, routing decisions) stays on the host."""

    def __init__(self):
        try:
            import torch
        except ImportError:
            raise SystemExit("demo: --device cuda needs PyTorch with CUDA (the demo model's matmuls run in torch)") from None
        if not torch.cuda.is_available():
            raise SystemExit("demo: --device cuda needs a CUDA GPU visible to PyTorch; none is available")
        self.torch = torch
        self.device = self.cache_device = "cuda"

    def put(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to("cuda")

    def host(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def take(self, a, idx, axis):
        return self.torch.index_select(a, axis, self.torch.as_tensor(np.asarray(idx), device=a.device))

    def cat(self, arrays, axis):
        return self.torch.cat(arrays, dim=axis)

    def contiguous(self, a):
        return a.contiguous()

    def rmsnorm(self, x):
        return x * self.torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + 1e-6)

    def silu(self, x):
        return self.torch.nn.functional.silu(x)


NP = NumpyBackend()
BACKEND = NP   # the fast runs' backend: main() sets a TorchCudaBackend for --device cuda


# ---------------------------------------------------------------------------------------------
# model pieces shared by every configuration

def rmsnorm(x):
    return x / np.sqrt(np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True) + 1e-6)


def silu(x):
    return x / (1.0 + np.exp(-x))


class Weights:
    """Deterministic random weights for every configuration (seeded per name)."""

    def __init__(self, seed=SEED):
        self.rng = np.random.default_rng(seed)
        self.embed = self.normal((VOCAB, WIDTH), 1.0)
        self.layers = [self.layer() for _ in range(LAYERS)]

    def normal(self, shape, std):
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def on(self, xb):
        """These weights as the backend's arrays (the same objects on the CPU)."""
        if xb is NP:
            return self
        dev = Weights.__new__(Weights)
        dev.embed = xb.put(self.embed)
        dev.layers = [{name: xb.put(a) for name, a in layer.items()} for layer in self.layers]
        return dev

    def layer(self):
        s = WIDTH ** -0.5
        return {
            "wq": self.normal((WIDTH, WIDTH), s), "wk": self.normal((WIDTH, WIDTH), s),
            "wv": self.normal((WIDTH, WIDTH), s), "wo": self.normal((WIDTH, WIDTH), s),
            "w1": self.normal((WIDTH, MLP), s), "w2": self.normal((MLP, WIDTH), MLP ** -0.5),
        }


def mlp(x, w, xb=NP):
    return xb.silu(xb.rmsnorm(x) @ w["w1"]) @ w["w2"]


def qkv(x, w, positions, B, T, xb=NP):
    """q, k, v (B, T, H, Dh) of a pre-norm layer, RoPE applied to q and k."""
    xn = xb.rmsnorm(x)
    q = (xn @ w["wq"]).reshape(B, T, HEADS, HEAD_DIM)
    k = (xn @ w["wk"]).reshape(B, T, HEADS, HEAD_DIM)
    v = (xn @ w["wv"]).reshape(B, T, HEADS, HEAD_DIM)
    return lmkern.rope(q, positions), lmkern.rope(k, positions), v


def ref_qkv(x, w, positions, B, T):
    xn = rmsnorm(x)
    q = (xn @ w["wq"]).reshape(B, T, HEADS, HEAD_DIM)
    k = (xn @ w["wk"]).reshape(B, T, HEADS, HEAD_DIM)
    v = (xn @ w["wv"]).reshape(B, T, HEADS, HEAD_DIM)
    return ref.rope(q, positions), ref.rope(k, positions), v


def logits_of(x, weights, xb=NP):
    """Tied LM head, scaled by width**-0.5 so that logits have a standard deviation near 1."""
    return (xb.rmsnorm(x) @ weights.embed.T) * float(np.float32(WIDTH ** -0.5))


# ---------------------------------------------------------------------------------------------
# MHA-shaped models whose configurations differ only in how they cache K/V

class PlainCache:
    """lmkern.KVCache per layer."""

    def __init__(self, max_len):
        self.caches = [lmkern.KVCache(1, max_len, HEADS, HEAD_DIM, device=BACKEND.cache_device) for _ in range(LAYERS)]

    def prefill(self, l, q, k, v):
        self.caches[l].append(k, v)
        return self.caches[l].attend(q)

    def decode(self, l, q, k, v):
        return self.prefill(l, q, k, v)

    def nbytes(self):
        return sum(c.nbytes for c in self.caches)


class KiviCache:
    """KIVI 2-bit: full-precision prefill attention, then a quantized cache for decoding."""

    def __init__(self, max_len, bits=2):
        self.caches = [lmkern.kv.QuantizedKVCache(1, max_len, HEADS, HEAD_DIM, bits=bits, group_size=32, residual=128,
                                                  device=BACKEND.cache_device)
                       for _ in range(LAYERS)]

    def prefill(self, l, q, k, v):
        self.caches[l].append(k, v)
        return lmkern.attention(q, k, v, causal=True)

    def decode(self, l, q, k, v):
        self.caches[l].append(k, v)
        return self.caches[l].attend(q)

    def nbytes(self):
        return sum(c.nbytes for c in self.caches)


class EvictingCache:
    """Keeps per-head selections of the prompt's K/V (SnapKV) or a sink + recent window
    (StreamingLLM); decoding attends non-causally over what is kept plus the new tokens."""

    def __init__(self, mode, budget, window=32):
        self.mode, self.budget, self.window = mode, budget, window
        self.k = [None] * LAYERS
        self.v = [None] * LAYERS

    def prefill(self, l, q, k, v):
        T = k.shape[1]
        if self.mode == "snapkv":
            idx = lmkern.kv.snapkv_select(q[:, -self.window:], k, self.budget)
            self.k[l], self.v[l] = lmkern.kv.compact(k, idx), lmkern.kv.compact(v, idx)
        else:
            keep = lmkern.kv.streaming_indices(T, sink=4, recent=self.budget - 4)
            self.k[l], self.v[l] = BACKEND.take(k, keep, 1), BACKEND.take(v, keep, 1)
        return lmkern.attention(q, k, v, causal=True)

    def decode(self, l, q, k, v):
        K = BACKEND.cat([self.k[l], k], axis=1)
        V = BACKEND.cat([self.v[l], v], axis=1)
        if self.mode == "streaming" and K.shape[1] > self.budget:
            keep = np.r_[0:4, K.shape[1] - (self.budget - 4):K.shape[1]]   # sink + recent window
            K, V = BACKEND.take(K, keep, 1), BACKEND.take(V, keep, 1)
        self.k[l], self.v[l] = BACKEND.contiguous(K), BACKEND.contiguous(V)
        return lmkern.attention(q, self.k[l], self.v[l])

    def nbytes(self):
        return sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v) if k is not None)


class MHAModel:
    def __init__(self, weights):
        self.w = weights                 # NumPy (the reference)
        self.d = weights.on(BACKEND)     # the fast run's arrays

    def forward(self, tokens, pos0, cache, prefill):
        B, T, xb = 1, len(tokens), BACKEND
        x = xb.take(self.d.embed, tokens, 0)[None]
        positions = np.arange(pos0, pos0 + T)
        for l, w in enumerate(self.d.layers):
            q, k, v = qkv(x, w, positions, B, T, xb)
            o = (cache.prefill if prefill else cache.decode)(l, q, k, v)
            x = x + o.reshape(B, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w, xb)
        return logits_of(x[0], self.d, xb)

    def reference(self, tokens):
        B, T = 1, len(tokens)
        x = self.w.embed[tokens][None]
        for w in self.w.layers:
            q, k, v = ref_qkv(x, w, np.arange(T), B, T)
            x = x + ref.attention(q, k, v, causal=True).reshape(B, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w)
        return logits_of(x[0], self.w)


# ---------------------------------------------------------------------------------------------
# Tensor Product Attention (T6): factor projections, a factor cache

class TPAModel:
    RQ, RK, RV = 6, 2, 2

    def __init__(self, weights):
        self.w = weights
        self.d = weights.on(BACKEND)
        s = WIDTH ** -0.5
        self.f = [{name: weights.normal((WIDTH, n), s) for name, n in (
            ("aq", HEADS * self.RQ), ("bq", self.RQ * HEAD_DIM), ("ak", HEADS * self.RK),
            ("bk", self.RK * HEAD_DIM), ("av", HEADS * self.RV), ("bv", self.RV * HEAD_DIM))}
            for _ in range(LAYERS)]
        self.fd = [{name: BACKEND.put(a) for name, a in f.items()} for f in self.f]

    def factors(self, x, l, positions, rope, xb=NP):
        B, T = x.shape[:2]
        xn = xb.rmsnorm(x)
        f = (self.f if xb is NP else self.fd)[l]
        aq = (xn @ f["aq"]).reshape(B, T, HEADS, self.RQ)
        bq = rope((xn @ f["bq"]).reshape(B, T, self.RQ, HEAD_DIM), positions)
        ak = (xn @ f["ak"]).reshape(B, T, HEADS, self.RK)
        bk = rope((xn @ f["bk"]).reshape(B, T, self.RK, HEAD_DIM), positions)
        av = (xn @ f["av"]).reshape(B, T, HEADS, self.RV)
        bv = (xn @ f["bv"]).reshape(B, T, self.RV, HEAD_DIM)
        return aq, bq, ak, bk, av, bv

    def new_cache(self, max_len):
        return [lmkern.tpa.KVCache(1, max_len, HEADS, self.RK, self.RV, HEAD_DIM, device=BACKEND.cache_device)
                for _ in range(LAYERS)]

    def forward(self, tokens, pos0, cache, prefill):
        B, T, xb = 1, len(tokens), BACKEND
        x = xb.take(self.d.embed, tokens, 0)[None]
        positions = np.arange(pos0, pos0 + T)
        for l, w in enumerate(self.d.layers):
            aq, bq, ak, bk, av, bv = self.factors(x, l, positions, lmkern.rope, xb)
            cache[l].append(ak, bk, av, bv)
            if prefill:
                o = lmkern.tpa.attention(aq, bq, ak, bk, av, bv, causal=True)
            else:
                o = cache[l].decode(aq[:, 0], bq[:, 0])[:, None]
            x = x + o.reshape(B, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w, xb)
        return logits_of(x[0], self.d, xb)

    def reference(self, tokens):
        B, T = 1, len(tokens)
        x = self.w.embed[tokens][None]
        for l, w in enumerate(self.w.layers):
            fs = self.factors(x, l, np.arange(T), ref.rope)
            x = x + ref.tpa.attention(*fs, causal=True).reshape(B, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w)
        return logits_of(x[0], self.w)


# ---------------------------------------------------------------------------------------------
# Mixture-of-Recursions: first layer, a shared block applied up to 3 times, last layer

class MoRModel:
    """Layer 0, then the shared layer 1 applied for up to ``R`` recursions to the tokens the router
    keeps (expert-choice over the prompt with the capacity schedule; a sigmoid threshold of 0.5 for
    generated tokens, the causal decode rule), then layers 2 and 3.  The shared block adds
    ``gate * (attention + MLP update)`` to the routed tokens (``mor.scatter_residual``)."""

    R = 3
    ALPHA = 0.1

    def __init__(self, weights, share):
        self.w = weights
        self.d = weights.on(BACKEND)
        self.share = share
        self.router = weights.normal((WIDTH,), 1.0)
        self.router_d = BACKEND.put(self.router)
        self.depths = []   # recursion depth of every token seen (for the reference)

    def block_update(self, h, w, o, xb=NP):
        """The shared block's residual update for hidden states h given attention output o."""
        y = o.reshape(h.shape) @ w["wo"]
        return y + mlp(h + y, w, xb)

    def new_cache(self, max_len):
        dev = BACKEND.cache_device
        plain = [lmkern.KVCache(1, max_len, HEADS, HEAD_DIM, device=dev) for _ in range(LAYERS)]
        depth = [lmkern.KVCache(1, max_len, HEADS, HEAD_DIM, device=dev) for _ in range(self.R)]
        return {"plain": plain, "depth": depth}

    def forward(self, tokens, pos0, cache, prefill):
        B, T, xb = 1, len(tokens), BACKEND
        x = xb.take(self.d.embed, tokens, 0)[None]
        positions = np.arange(pos0, pos0 + T)
        shared = self.d.layers[1]
        x = self._plain(x, 0, positions, cache, B, T)
        # recursions of the shared block over the routed tokens; routing decisions are kept on the
        # host (cand, idx_h), the routed data on the backend
        cand = np.arange(T)[None]
        depth = np.zeros(T, np.int64)
        for r in range(self.R):
            h_cand = xb.take(x, cand[0], 1)
            s = lmkern.mor.router_scores(h_cand, self.router_d, activation="sigmoid", alpha=1.0)   # (1, n)
            if prefill:
                k_sel = lmkern.mor.capacity(T, r, self.R)
                idx, gate = lmkern.mor.expert_choice(s, min(k_sel, cand.shape[1]), candidates=xb.put(cand))
                idx_h = xb.host(idx)
            else:
                keep = xb.host(s)[0] > 0.5 if r else np.ones(s.shape[1], bool)
                idx_h = cand[:, keep]
                idx, gate = xb.put(idx_h), xb.take(s, np.nonzero(keep)[0], 1)
            if idx_h.shape[1] == 0:
                break
            depth[idx_h[0]] += 1
            h = lmkern.mor.gather(x, idx)
            n = idx_h.shape[1]
            q, k, v = qkv(h, shared, positions[idx_h[0]], B, n, xb)
            o = self._recursion_attention(r, q, k, v, positions[idx_h[0]], cache, prefill)
            x = lmkern.mor.scatter_residual(x, idx, self.block_update(h, shared, o, xb), self.ALPHA * gate)
            cand = idx_h
        self.depths.extend(depth.tolist())
        for l in (2, 3):
            x = self._plain(x, l, positions, cache, B, T)
        return logits_of(x[0], self.d, xb)

    def _plain(self, x, l, positions, cache, B, T):
        w, xb = self.d.layers[l], BACKEND
        q, k, v = qkv(x, w, positions, B, T, xb)
        c = cache["plain"][l]
        c.append(k, v, positions=positions[None])
        o = c.attend(q, q_pos=positions[None])
        x = x + o.reshape(B, T, WIDTH) @ w["wo"]
        return x + mlp(x, w, xb)

    def _recursion_attention(self, r, q, k, v, pos, cache, prefill):
        if self.share:
            c = cache["depth"][0]      # recursive KV sharing: every depth reads recursion 0's KV
            if r == 0:
                c.append(k, v, positions=pos[None])
            return c.attend(q, q_pos=pos[None])
        c = cache["depth"][r]          # recursion-wise caching: depth r holds only its own tokens
        c.append(k, v, positions=pos[None])
        return c.attend(q, q_pos=pos[None])

    def cache_bytes(self, cache):
        return sum(c.nbytes for c in cache["plain"]) + sum(c.nbytes for c in cache["depth"])

    def reference(self, tokens):
        B, T = 1, len(tokens)
        depth = np.asarray(self.depths)
        x = self.w.embed[tokens][None]
        pos = np.arange(T)

        def plain(x, w):
            q, k, v = ref_qkv(x, w, pos, B, T)
            x = x + ref.attention(q, k, v, causal=True).reshape(B, T, WIDTH) @ w["wo"]
            return x + mlp(x, w)

        x = plain(x, self.w.layers[0])
        shared = self.w.layers[1]
        k0 = v0 = None
        for r in range(self.R):
            idx = np.nonzero(depth > r)[0]
            if idx.size == 0:
                break
            h = x[:, idx]
            gate = self.ALPHA * ref.mor.router_scores(h, self.router, activation="sigmoid", alpha=1.0)
            q, k, v = ref_qkv(h, shared, pos[idx], B, idx.size)
            if self.share:
                if r == 0:
                    k0, v0 = k, v
                o = ref.attention(q, k0, v0, causal=True, q_pos=pos[idx], kv_pos=np.arange(T))
            else:
                o = ref.attention(q, k, v, causal=True, q_pos=pos[idx], kv_pos=pos[idx])
            x = ref.mor.scatter_residual(x, idx[None], self.block_update(h, shared, o), gate)
        for l in (2, 3):
            x = plain(x, self.w.layers[l])
        return logits_of(x[0], self.w)


# ---------------------------------------------------------------------------------------------
# ParScale: P streams with learned per-layer prefixes, aggregated before the LM head

class ParScaleModel:
    P, PREFIX = 4, 48

    def __init__(self, weights):
        self.w = weights
        self.d = weights.on(BACKEND)
        self.prefix_k = [weights.normal((self.P, self.PREFIX, HEADS, HEAD_DIM), 1.0) for _ in range(LAYERS)]
        self.prefix_v = [weights.normal((self.P, self.PREFIX, HEADS, HEAD_DIM), 1.0) for _ in range(LAYERS)]
        s = (self.P * WIDTH) ** -0.5
        self.agg = (weights.normal((WIDTH, self.P * WIDTH), s), weights.normal((WIDTH,), 0.02),
                    weights.normal((self.P, WIDTH), WIDTH ** -0.5), weights.normal((self.P,), 0.02))
        self.prefix_kd = [BACKEND.put(a) for a in self.prefix_k]
        self.prefix_vd = [BACKEND.put(a) for a in self.prefix_v]
        self.agg_d = tuple(BACKEND.put(a) for a in self.agg)

    def new_cache(self, max_len):
        return [lmkern.KVCache(self.P, max_len, HEADS, HEAD_DIM, device=BACKEND.cache_device) for _ in range(LAYERS)]

    def cache_bytes(self, cache, key="total"):
        """P streams' tokens plus the prefixes, once per stream (key="p1": the P = 1 model's cache)."""
        seq = int(cache[0].lengths[0])
        return lmkern.parscale.kv_cache_bytes(LAYERS, HEADS, HEAD_DIM, seq, batch=1, P=self.P,
                                              prefix_len=self.PREFIX)[key]

    def forward(self, tokens, pos0, cache, prefill):
        T, xb = len(tokens), BACKEND
        x = lmkern.parscale.expand(xb.take(self.d.embed, tokens, 0)[None], self.P)          # (P, T, W)
        positions = np.arange(pos0, pos0 + T)
        for l, w in enumerate(self.d.layers):
            q, k, v = qkv(x, w, positions, self.P, T, xb)
            c = cache[l]
            c.append(k, v)
            o = lmkern.parscale.prefix_attention(q, c.k, c.v, self.prefix_kd[l], self.prefix_vd[l], causal=True,
                                                 kv_lens=c.lengths)
            x = x + o.reshape(self.P, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w, xb)
        y = lmkern.parscale.aggregate(x, *self.agg_d, P=self.P)
        return logits_of(y[0], self.d, xb)

    def reference(self, tokens):
        T = len(tokens)
        x = ref.parscale.expand(self.w.embed[tokens][None], self.P)
        for l, w in enumerate(self.w.layers):
            q, k, v = ref_qkv(x, w, np.arange(T), self.P, T)
            o = ref.parscale.prefix_attention(q, k, v, self.prefix_k[l], self.prefix_v[l], causal=True)
            x = x + o.reshape(self.P, T, WIDTH) @ w["wo"]
            x = x + mlp(x, w)
        return logits_of(ref.parscale.aggregate(x, *self.agg, P=self.P)[0], self.w)


# ---------------------------------------------------------------------------------------------

CONFIGS = ("mha", "tpa", "mor-cache", "mor-share", "kivi2", "snapkv25", "streaming25", "parscale4")


def mha_bytes(tokens, layers=LAYERS):
    """Bytes of a float32 MHA cache holding ``tokens`` tokens in ``layers`` layers."""
    return layers * tokens * 2 * HEADS * HEAD_DIM * 4


def build(name, weights, max_len):
    """(model, cache, cache_bytes(), baseline_bytes(tokens)) of one configuration.

    The baseline is the same model's uncompressed, unrouted cache: a plain MHA cache of every token
    (TPA: the materialized K/V; MoR: every token at every recursion; ParScale: the P = 1 model)."""
    budget = PROMPT // 4
    if name in ("mha", "kivi2", "snapkv25", "streaming25"):
        model = MHAModel(weights)
        cache = {"mha": lambda: PlainCache(max_len), "kivi2": lambda: KiviCache(max_len),
                 "snapkv25": lambda: EvictingCache("snapkv", budget),
                 "streaming25": lambda: EvictingCache("streaming", budget)}[name]()
        return model, cache, cache.nbytes, mha_bytes
    if name == "tpa":
        model = TPAModel(weights)
        cache = model.new_cache(max_len)
        return model, cache, lambda: sum(c.nbytes for c in cache), mha_bytes
    if name.startswith("mor"):
        model = MoRModel(weights, share=name == "mor-share")
        cache = model.new_cache(max_len)
        return model, cache, lambda: model.cache_bytes(cache), lambda n: mha_bytes(n, LAYERS - 1 + model.R)
    if name == "parscale4":
        model = ParScaleModel(weights)
        cache = model.new_cache(max_len)
        return model, cache, lambda: model.cache_bytes(cache), mha_bytes
    raise ValueError(f"demo: unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")


def run(name, tokens=64, prompt_len=PROMPT):
    """Prefill a prompt and generate ``tokens`` tokens greedily; returns a result row (dict)."""
    weights = Weights()
    prompt = np.random.default_rng(SEED + 1).integers(0, VOCAB, prompt_len)
    model, cache, nbytes, baseline_bytes = build(name, weights, prompt_len + tokens)
    t0 = time.perf_counter()
    logits = model.forward(prompt, 0, cache, prefill=True)
    prefill_s = time.perf_counter() - t0
    seq = list(prompt)
    steps = [BACKEND.host(logits[-1])]
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        nxt = int(np.argmax(steps[-1]))
        seq.append(nxt)
        steps.append(BACKEND.host(model.forward(np.array([nxt]), len(seq) - 1, cache, prefill=False)[-1]))
    gen_s = time.perf_counter() - t0
    full = model.reference(np.array(seq))
    expected = full[prompt_len - 1:]
    dev = float(np.abs(np.stack(steps) - expected).max())
    bound = LOSSY_BOUND.get(name, LOSSLESS_BOUND)
    row = {"config": name, "kv_bytes": int(nbytes()), "baseline_bytes": int(baseline_bytes(len(seq))), "tokens_per_s": (tokens - 1) / gen_s if tokens > 1 else 0.0,
           "prefill_s": prefill_s, "max_dev": dev, "bound": bound, "ok": dev <= bound}
    if isinstance(model, MoRModel):
        d = np.asarray(model.depths)
        row["depths"] = "/".join(str(int((d == i).sum())) for i in range(1, model.R + 1))
    return row


def format_table(rows):
    lines = ["| configuration | KV-cache bytes | vs baseline | tokens/s | prefill | max abs logit dev | bound |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        extra = f" (depths 1/2/3: {r['depths']})" if "depths" in r else ""
        lines.append(f"| {r['config']}{extra} | {r['kv_bytes']:,} | {r['kv_bytes'] / r['baseline_bytes']:.3f}x | "
                     f"{r['tokens_per_s']:.1f} | {r['prefill_s'] * 1e3:.0f} ms | {r['max_dev']:.2e} | "
                     f"{'ok' if r['ok'] else 'FAIL'} <= {r['bound']:g} |")
    lines.append("")
    lines.append("vs baseline: KV bytes over the same model's uncompressed, unrouted float32 cache of the same tokens "
                 "(TPA: materialized K/V; MoR: every token at every recursion; ParScale: the P = 1 model).")
    lines.append("max abs logit dev: over the generated steps, against one uncached full forward of the NumPy twins.")
    return "\n".join(lines)


def main(args):
    configs = args.configs or list(CONFIGS)
    device = getattr(args, "device", "cpu")
    global BACKEND
    if device == "cuda":
        if not lmkern.cuda.available():
            raise SystemExit("demo: --device cuda needs a CUDA GPU and lmkern built with nvcc; none is available")
        # the fast runs go to the GPU as torch tensors (lmkern's kernels take them zero-copy); the
        # references stay NumPy twins on the CPU, so the deviation column compares GPU against CPU
        BACKEND = TorchCudaBackend()
    else:
        BACKEND = NP
    print(f"lmkern {lmkern.__version__} demo: {LAYERS}-layer decoder, width {WIDTH}, vocab {VOCAB}, "
          f"{args.prompt}-token prompt, {args.tokens} generated tokens, {lmkern.get_num_threads()} threads, "
          f"device {device}\n")
    rows = []
    for name in configs:
        rows.append(run(name, tokens=args.tokens, prompt_len=args.prompt))
    print(format_table(rows))
    bad = [r["config"] for r in rows if not r["ok"]]
    if bad:
        print(f"\ndeviation above bound: {', '.join(bad)}")
        return 1
    return 0
