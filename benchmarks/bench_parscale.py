"""Benchmarks of lmkern.parscale (SPEC 7): aggregate, its fused softmax/smoothing/sum stage, and
prefix_attention against concatenating the prefix per row.

    PYTHONPATH=python python benchmarks/bench_parscale.py [--quick]

Baselines: the NumPy twin, and torch doing the same math on the same thread count (the aggregation
as the ParScale modeling code writes it: rearrange, Linear -> SiLU -> Linear, float32 softmax,
smoothing, broadcast multiply and sum).  NumPy's BLAS (OpenBLAS) runs the GEMMs on its default
thread count, all cores, which on the benchmark machine equals lmkern's.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import HAVE_TORCH, Table, timeit, torch, torch_threads  # noqa: E402

import lmkern  # noqa: E402
from lmkern import _core, parscale  # noqa: E402
from lmkern.reference import parscale as ref  # noqa: E402


def make_aggregate(rng, P, B, T, Hd, Hh, dtype=np.float32):
    h = rng.standard_normal((P * B, T, Hd)).astype(dtype)
    w1 = (rng.standard_normal((Hh, P * Hd)) / np.sqrt(P * Hd)).astype(dtype)
    b1 = rng.standard_normal(Hh).astype(dtype)
    w2 = (rng.standard_normal((P, Hh)) / np.sqrt(Hh)).astype(dtype)
    b2 = rng.standard_normal(P).astype(dtype)
    return h, w1, b1, w2, b2


def torch_aggregate_fn(h, w1, b1, w2, b2, P, smoothing=0.1):
    """The ParScale modeling code's aggregation in torch, weights set once (as in a model)."""
    hs = torch.from_numpy(h)
    PB, T, Hd = hs.shape
    B = PB // P
    layer = torch.nn.Sequential(torch.nn.Linear(P * Hd, w1.shape[0]), torch.nn.SiLU(), torch.nn.Linear(w1.shape[0], P))
    with torch.no_grad():
        for dst, src in ((layer[0].weight, w1), (layer[0].bias, b1), (layer[2].weight, w2), (layer[2].bias, b2)):
            dst.copy_(torch.from_numpy(src))

    def run():
        with torch.no_grad():
            u = hs.reshape(P, B, T, Hd).permute(1, 2, 3, 0).reshape(B, T, Hd * P)
            attn = torch.softmax(layer(u).float(), dim=-1).unsqueeze(-1)
            attn = attn * (1 - smoothing) + smoothing / P
            return (hs.reshape(P, B, T, Hd).permute(1, 2, 0, 3) * attn).sum(dim=2).to(hs.dtype)
    return run


def bench_aggregate(rng, cases, quick):
    table = Table("parscale.aggregate (float32, interleaved, smoothing 0.1)")
    for P, B, T, Hd, Hh in cases:
        h, w1, b1, w2, b2 = make_aggregate(rng, P, B, T, Hd, Hh)
        R = B * T
        flops = 2.0 * R * P * Hd * Hh + 2.0 * R * Hh * P + 2.0 * P * R * Hd
        nbytes = 4.0 * (2 * P * R * Hd + Hh * P * Hd + R * Hd)      # h (gather + mix), w1, y
        t = timeit(lambda: parscale.aggregate(h, w1, b1, w2, b2, P=P))
        base = {"numpy twin": timeit(lambda: ref.aggregate(h, w1, b1, w2, b2, P=P), repeat=3 if quick else 5)}
        if HAVE_TORCH:
            base["torch"] = timeit(torch_aggregate_fn(h, w1, b1, w2, b2, P))
        table.add(f"P={P} B={B} T={T} Hd={Hd} Hh={Hh}", t, flops=flops, nbytes=nbytes, baselines=base)
    return table


def bench_stages(rng, P, B, T, Hd, Hh):
    """Where aggregate's time goes, stage by stage (the same calls aggregate makes)."""
    table = Table(f"parscale.aggregate stages, P={P} B={B} T={T} Hd={Hd} Hh={Hh} float32")
    h, w1, b1, w2, b2 = make_aggregate(rng, P, B, T, Hd, Hh)
    R = B * T
    hc = h.reshape(P * R, Hd)
    u = np.empty((R, P * Hd), np.float32)
    _core.parscale_gather(hc, u, P, True)
    x = u @ w1.T
    x0 = x.copy()
    z = np.ascontiguousarray(x @ w2.T)
    y = np.empty((R, Hd), np.float32)
    wts = np.empty((R, P), np.float32)

    base = {"numpy": timeit(lambda: np.ascontiguousarray(hc.reshape(P, R, Hd).transpose(1, 2, 0)))}
    table.add("gather u (interleave P streams)", timeit(lambda: _core.parscale_gather(hc, u, P, True)),
              nbytes=8.0 * P * R * Hd, baselines=base)
    table.add("GEMM1 u @ w1.T (NumPy BLAS)", timeit(lambda: u @ w1.T), flops=2.0 * R * P * Hd * Hh,
              nbytes=4.0 * (P * R * Hd + Hh * P * Hd + R * Hh))

    def silu_np():
        a = x0 + b1
        return a / (1 + np.exp(-a))
    base = {"numpy": timeit(silu_np)}
    if HAVE_TORCH:
        tx, tb = torch.from_numpy(x0), torch.from_numpy(b1)
        base["torch"] = timeit(lambda: torch.nn.functional.silu(tx + tb))
    table.add("bias + SiLU in place (fused)", timeit(lambda: _core.parscale_bias_silu_(x, b1)),
              flops=4.0 * R * Hh, nbytes=8.0 * R * Hh, baselines=base)
    table.add("GEMM2 x @ w2.T (NumPy BLAS)", timeit(lambda: x @ w2.T), flops=2.0 * R * Hh * P,
              nbytes=4.0 * (R * Hh + P * Hh + R * P))

    def mix_np():
        zz = (z + b2).astype(np.float32)
        e = np.exp(zz - zz.max(-1, keepdims=True))
        w = e / e.sum(-1, keepdims=True) * 0.9 + 0.1 / P
        return np.einsum("prj,rp->rj", hc.reshape(P, R, Hd), w)
    base = {"numpy twin": timeit(mix_np)}
    if HAVE_TORCH:
        th, tz, tb2 = torch.from_numpy(hc.reshape(P, R, Hd)), torch.from_numpy(z), torch.from_numpy(b2)

        def mix_torch():
            attn = torch.softmax((tz + tb2).float(), dim=-1) * 0.9 + 0.1 / P       # (R, P)
            return (th.permute(1, 0, 2) * attn.unsqueeze(-1)).sum(dim=1)
        base["torch"] = timeit(mix_torch)
    table.add("softmax_P + smoothing + weighted sum (fused)",
              timeit(lambda: _core.parscale_mix(hc, z, b2, y, wts, P, 0.1)),
              flops=2.0 * P * R * Hd, nbytes=4.0 * (P * R * Hd + R * Hd + 2 * R * P), baselines=base)
    return table


def bench_prefix_attention(rng, batches, quick):
    P, N, M, Hq, Hkv, D, L = 8, 1, (128 if quick else 512), 14, 2, 64, 48
    table = Table(f"parscale.prefix_attention decode, P={P} N={N} M={M} Hq={Hq} Hkv={Hkv} D={D} L={L} float32")
    print("bytes column: KV bytes one call reads (shared prefix P·L vs per-row copies P·B·L); "
          "baselines: 'per-row cache' = attention over a cache already holding the prefix in every row "
          "(the modeling code's layout), 'concat per call' = building that concatenation, then attention\n")
    rows = []
    for B in batches:
        q = rng.standard_normal((P * B, N, Hq, D)).astype(np.float32)
        k = rng.standard_normal((P * B, M, Hkv, D)).astype(np.float32)
        v = rng.standard_normal((P * B, M, Hkv, D)).astype(np.float32)
        pk = rng.standard_normal((P, L, Hkv, D)).astype(np.float32)
        pv = rng.standard_normal((P, L, Hkv, D)).astype(np.float32)
        sel = np.arange(P * B) // B
        kc = np.concatenate([pk[sel], k], axis=1)
        vc = np.concatenate([pv[sel], v], axis=1)
        flops = 2.0 * P * B * N * Hq * (L + M) * 2 * D
        nbytes = 4.0 * (2 * P * B * M * Hkv * D + 2 * P * L * Hkv * D)
        t = timeit(lambda: parscale.prefix_attention(q, k, v, pk, pv))
        t_rowcache = timeit(lambda: lmkern.attention(q, kc, vc))

        def concat_then_attend():
            return lmkern.attention(q, np.concatenate([pk[sel], k], axis=1), np.concatenate([pv[sel], v], axis=1))
        t_concat = timeit(concat_then_attend, repeat=3 if quick else 5)
        table.add(f"B={B}", t, flops=flops, nbytes=nbytes,
                  baselines={"per-row cache": t_rowcache, "concat per call": t_concat})
        rows.append((B, 4.0 * 2 * P * L * Hkv * D, 4.0 * 2 * P * B * L * Hkv * D))
    print("\nprefix memory per layer: " + ", ".join(
        f"B={B}: {shared / 1024:.0f} KiB shared vs {per_row / 1024:.0f} KiB per row" for B, shared, per_row in rows))
    return table


def kv_memory_note():
    print("\n## KV-cache bytes, Qwen2.5-0.5B-like (24 layers, Hkv=2, D=64, float16-sized: 2 B), seq 2048\n")
    print("| P | batch | streams | prefix (once per stream) | prefix if copied per row | total / P=1 |")
    print("|---|---|---|---|---|---|")
    for P in (1, 2, 4, 8):
        for B in (1, 16):
            r = parscale.kv_cache_bytes(24, 2, 64, 2048, batch=B, P=P, dtype=np.float16)
            print(f"| {P} | {B} | {r['streams'] / 2**20:.1f} MiB | {r['prefix'] / 2**20:.2f} MiB | "
                  f"{r['prefix_per_row'] / 2**20:.2f} MiB | {r['ratio']:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args(argv)
    torch_threads()
    rng = np.random.default_rng(0)
    if args.quick:
        bench_aggregate(rng, [(4, 1, 16, 128, 128), (4, 2, 1, 128, 128)], True)
        bench_stages(rng, 4, 1, 16, 128, 128)
        bench_prefix_attention(rng, [1, 2], True)
    else:
        bench_aggregate(rng, [(8, 1, 256, 1024, 1024), (8, 1, 1, 1024, 1024), (4, 4, 1, 1024, 1024),
                              (2, 1, 256, 896, 896)], False)
        bench_stages(rng, 8, 1, 256, 1024, 1024)
        bench_prefix_attention(rng, [1, 2, 4, 8, 16], False)
    kv_memory_note()


if __name__ == "__main__":
    main()
