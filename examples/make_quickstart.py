"""Writes and executes examples/quickstart.ipynb (saved with its outputs).

    PYTHONPATH=python python examples/make_quickstart.py

The test suite executes the saved notebook again (tests/test_notebook.py), so it cannot rot.
"""
import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

CELLS = [
    ("md", """# lmkern quickstart

NumPy arrays in, NumPy arrays out. Each family in a few cells: the core attention, Tensor Product
Attention, Mixture-of-Recursions, KV-cache compression and ParScale. Every kernel has a NumPy twin in
`lmkern.reference`; we compare against it as we go."""),
    ("code", """import numpy as np
import lmkern
from lmkern import reference as ref

rng = np.random.default_rng(0)
def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)

print(lmkern.__version__, lmkern._core.simd, lmkern.get_num_threads(), "threads")"""),
    ("md", """## Core: attention, RoPE, a KV cache
`q (B, N, Hq, D)`, `k (B, M, Hkv, D)`, `v (B, M, Hkv, E)`; grouped-query heads, causal masking with
bottom-right alignment, ragged `kv_lens`, explicit positions, and the log-sum-exp on request."""),
    ("code", """q = lmkern.rope(randn(2, 16, 8, 64), np.arange(112, 128))
k, v = randn(2, 128, 2, 64), randn(2, 128, 2, 64)
out, lse = lmkern.attention(q, k, v, causal=True, kv_lens=[128, 100], return_lse=True)
expected = ref.attention(q, k, v, causal=True, kv_lens=[128, 100])
print(out.shape, lse.shape, "max |kernel - twin| =", np.abs(out - expected).max())

cache = lmkern.KVCache(batch=2, max_len=256, kv_heads=2, head_dim=64)
cache.append(k, v, lengths=[128, 100])
print("cache lengths", cache.lengths, "bytes", cache.nbytes, "decode out", cache.attend(q[:, -1:]).shape)"""),
    ("md", "A wrong shape is a `ValueError` that names the function, the argument and the expected shape:"),
    ("code", """try:
    lmkern.attention(q, k[..., :32], v)
except ValueError as err:
    print(err)
try:
    lmkern.attention(q.astype(np.int32), k, v)
except TypeError as err:
    print(err)"""),
    ("md", """## Tensor Product Attention (`lmkern.tpa`)
Per token, `Q = (1/Rq) sum_r aq[:, r] (x) bq[r]` and likewise K, V. The cache keeps the factors;
`decode` contracts them in the FlashTPA order and never forms K or V."""),
    ("code", """B, M, H, D = 1, 2048, 32, 64
ak, bk, av, bv = randn(B, M, H, 1), randn(B, M, 1, D), randn(B, M, H, 1), randn(B, M, 1, D)
tcache = lmkern.tpa.KVCache(B, 4096, H, 1, 1, D)
tcache.append(ak, bk, av, bv)
aq, bq = randn(B, H, 16), randn(B, 16, D)
y = tcache.decode(aq, bq)
y_ref = ref.tpa.decode(aq, bq, ak, bk, av, bv)
print(y.shape, "max err", np.abs(y - y_ref).max())
print(f"factor cache {tcache.nbytes:,} bytes vs MHA {tcache.mha_nbytes:,} bytes: "
      f"{tcache.mha_nbytes / tcache.nbytes:.1f}x smaller")"""),
    ("md", """## Mixture-of-Recursions (`lmkern.mor`)
Expert-choice routing keeps the top-k tokens per recursion (`capacity` gives k); the shared block runs
on the gathered tokens; `scatter_residual` adds its gated update back."""),
    ("code", """T, Dm = 2048, 128
h = randn(1, T, Dm)
w = randn(Dm) / np.sqrt(Dm)
print("capacity schedule:", [lmkern.mor.capacity(T, s, 3) for s in range(3)])
scores = lmkern.mor.router_scores(h, w, activation="sigmoid", alpha=0.1)
idx, gate = lmkern.mor.expert_choice(scores, lmkern.mor.capacity(T, 1, 3))
hs = lmkern.mor.gather(h, idx)
h2 = lmkern.mor.scatter_residual(h, idx, np.tanh(hs), gate)
print(idx.shape, bool(np.all(np.diff(idx[0]) > 0)), "tokens updated:", int((h2 != h).any(-1).sum()))"""),
    ("md", """## KV-cache compression (`lmkern.kv`)
KIVI 2-bit: keys quantized per channel, values per token, the most recent 128 tokens kept in full
precision; attention runs straight from the packed codes. SnapKV keeps the keys the last queries vote for."""),
    ("code", """B, M, Hq, Hkv, D = 1, 4096, 32, 8, 128
k, v = randn(B, M, Hkv, D), randn(B, M, Hkv, D)
q = randn(B, 1, Hq, D)
qcache = lmkern.kv.QuantizedKVCache(B, M, Hkv, D, bits=2, group_size=32, residual=128)
qcache.append(k, v)
full = lmkern.attention(q, k, v, causal=True)
approx = qcache.attend(q)
print(f"KIVI-2: {qcache.nbytes:,} bytes vs {k.nbytes + v.nbytes:,} float32 "
      f"({(k.nbytes + v.nbytes) / qcache.nbytes:.1f}x smaller), rel. error "
      f"{np.linalg.norm(approx - full) / np.linalg.norm(full):.3f}")
q4 = lmkern.kv.QuantizedKVCache(B, M, Hkv, D, bits=4, group_size=32, residual=128)
q4.append(k, v)
print(f"KIVI-4: {q4.nbytes:,} bytes, rel. error {np.linalg.norm(q4.attend(q) - full) / np.linalg.norm(full):.3f}"
      "  (i.i.d. Gaussian K/V with diffuse attention is the worst case: the output is a tiny average)")
idx = lmkern.kv.snapkv_select(randn(B, 32, Hq, D), k, 1024)
print("SnapKV keeps", idx.shape, "->", lmkern.kv.compact(k, idx).shape)"""),
    ("md", """## ParScale (`lmkern.parscale`)
P streams of the same input with learned prefixes, combined by a softmax over streams."""),
    ("code", """P, B, T, Hd, Hh = 4, 1, 16, 256, 256
h = randn(P * B, T, Hd)
w1, b1, w2, b2 = randn(Hh, P * Hd) / 32, randn(Hh), randn(P, Hh) / 16, randn(P)
y, weights = lmkern.parscale.aggregate(h, w1, b1, w2, b2, P=P, return_weights=True)
print(y.shape, weights.shape, "weights sum to", weights.sum(-1).min(), "...", weights.sum(-1).max())
print("max err", np.abs(y - ref.parscale.aggregate(h, w1, b1, w2, b2, P=P)).max())"""),
    ("md", """## On a GPU with PyTorch
Pass CUDA tensors and get CUDA tensors back, zero-copy, on the current stream (skipped without a GPU)."""),
    ("code", """try:
    import torch
    have_gpu = torch.cuda.is_available() and lmkern.cuda.available()
except ImportError:
    have_gpu = False
if have_gpu:
    qt = torch.randn(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16)
    ot = lmkern.attention(qt, qt, qt, causal=True)
    print(type(ot).__name__, ot.device, ot.dtype)
else:
    print("skipped: no CUDA GPU (or lmkern built without CUDA)")"""),
    ("md", "## KV bytes vs context length"),
    ("code", """ctx = np.array([1024, 4096, 16384, 65536])
H, D, layers = 32, 128, 32
mha = 2 * H * D * 4 * layers * ctx
t1 = lmkern.tpa.KVCache(1, 1, H, 2, 2, D); t1.append(randn(1, 1, H, 2), randn(1, 1, 2, D), randn(1, 1, H, 2), randn(1, 1, 2, D))
tpa = t1.nbytes * layers * ctx
q1 = lmkern.kv.QuantizedKVCache(1, 4096, H, D, bits=2, group_size=32, residual=128)
q1.append(randn(1, 4096, H, D), randn(1, 4096, H, D))
kivi = q1.nbytes / 4096 * layers * ctx
try:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, b in (("MHA float32", mha), ("TPA ranks 2/2", tpa), ("KIVI 2-bit", kivi)):
        ax.loglog(ctx, b / 2**30, marker="o", label=name)
    ax.set_xlabel("context length (tokens)"); ax.set_ylabel("KV cache, GiB (32 layers)"); ax.legend(); ax.grid(alpha=.3)
    plt.show()
except ImportError:
    pass
for name, b in (("MHA float32", mha), ("TPA ranks 2/2", tpa), ("KIVI 2-bit", kivi)):
    print(f"{name:>14}: " + ", ".join(f"{x / 2**30:.2f} GiB" for x in b))"""),
]


def build():
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


def main():
    nb = build()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    path = os.path.join(HERE, "quickstart.ipynb")
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
