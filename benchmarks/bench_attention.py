"""Benchmark of lmkern.attention on the CPU (SPEC 7).

    PYTHONPATH=python python benchmarks/bench_attention.py [--quick] [--threads N]

Per case: median time, GB/s (q, k, v read once, out written once), GFLOP/s (2 (D + E) FLOPs per
admissible (query, key, head) triple: exact count of the mask, so causal cases count half), the
roofline share against the FMA / read-bandwidth peaks measured in the same run, and speed-ups
against the NumPy twin (timed once: it is slow) and against torch
``scaled_dot_product_attention`` on the same thread count (lmkern and torch sampled round-robin) (GQA via ``enable_gqa``; the masks
lmkern computes from positions are handed to torch as a materialized boolean ``attn_mask``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import lmkern  # noqa: E402
from lmkern import reference as ref  # noqa: E402


def admissible_mask(B, N, M, causal, q_pos=None, kv_pos=None, kv_lens=None):
    """(B, N, M) bool: the SPEC 1.1 mask (for FLOP counts and torch's attn_mask)."""
    lens = np.full(B, M) if kv_lens is None else np.asarray(kv_lens)
    qp = lens[:, None] - N + np.arange(N) if q_pos is None else np.broadcast_to(q_pos, (B, N))
    kp = np.broadcast_to(np.arange(M) if kv_pos is None else kv_pos, (B, M))
    mask = np.broadcast_to(np.arange(M)[None, None, :] < lens[:, None, None], (B, N, M))
    if causal:
        mask = mask & (kp[:, None, :] <= qp[:, :, None])
    return mask


def torch_sdpa(q, k, v, *, causal, mask):
    """torch SDPA over the same token-major arrays (views, as a torch user holds them)."""
    torch = H.torch
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    N, M = q.shape[1], k.shape[1]
    if not causal or mask.all():
        return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)
    if N == M and np.array_equal(mask, np.broadcast_to(np.tril(np.ones((N, M), bool)), mask.shape)):
        return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=gqa)
    tm = torch.from_numpy(np.ascontiguousarray(mask))[:, None]  # (B, 1, N, M)
    return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, enable_gqa=gqa)


def cases(quick):
    rng = np.random.default_rng(0)
    s = 8 if quick else 1

    def qkv(B, N, M, Hq, Hkv, D, E=None, dtype=np.float32):
        E = E or D
        return (rng.standard_normal((B, N, Hq, D)).astype(dtype), rng.standard_normal((B, M, Hkv, D)).astype(dtype),
                rng.standard_normal((B, M, Hkv, E)).astype(dtype))

    n = 1024 // s
    yield f"prefill causal GQA B=1 N=M={n} Hq=16 Hkv=4 D=64 [target]", qkv(1, n, n, 16, 4, 64), dict(causal=True)
    m = 32768 // s
    yield f"decode B=1 N=1 M={m} Hq=32 Hkv=8 D=128 [target]", qkv(1, 1, m, 32, 8, 128), dict(causal=True)
    m = 65536 // s
    # 512 MiB of K/V, beyond the 480 MiB L3 this VM reports (the target's 256 MiB may partly hit L3);
    # lmkern only: the twin and torch's GQA path would copy K/V (torch 4x)
    yield (f"decode B=1 N=1 M={m} Hq=32 Hkv=8 D=128 ({2 * m * 8 * 128 * 4 >> 20} MiB K/V; no baselines)", qkv(1, 1, m, 32, 8, 128),
           dict(causal=True, _no_baselines=True))
    n = 2048 // s
    yield f"prefill causal MHA B=1 N=M={n} H=8 D=128", qkv(1, n, n, 8, 8, 128), dict(causal=True)
    m = 4096 // s
    yield f"decode B=8 N=1 M={m} Hq=32 Hkv=8 D=128", qkv(8, 1, m, 32, 8, 128), dict(causal=True)
    n, m = 256 // s, 4096 // s
    yield f"chunked prefill B=1 N={n} M={m} Hq=16 Hkv=4 D=128 causal", qkv(1, n, m, 16, 4, 128), dict(causal=True)
    t = 2048 // s
    idx = np.sort(rng.choice(t, t // 3, replace=False))
    yield (f"MoR active tokens B=1 N=M={idx.size} of {t} (q_pos=kv_pos=idx) Hq=16 Hkv=4 D=64",
           qkv(1, idx.size, idx.size, 16, 4, 64), dict(causal=True, q_pos=idx, kv_pos=idx))
    n = 512 // s
    yield f"bidirectional B=2 N=M={n} H=8 D=64 E=32 (D != E)", qkv(2, n, n, 8, 8, 64, 32), dict(causal=False)
    # float64, NumPy's default dtype (the roofline share counts the float64 FMA peak, half the float32 one)
    n = 1024 // s
    yield (f"float64 prefill causal GQA B=1 N=M={n} Hq=16 Hkv=4 D=64", qkv(1, n, n, 16, 4, 64, dtype=np.float64),
           dict(causal=True))
    m = 8192 // s
    yield f"float64 decode B=1 N=1 M={m} Hq=32 Hkv=8 D=128", qkv(1, 1, m, 32, 8, 128, dtype=np.float64), dict(causal=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="thread count for lmkern and torch")
    ap.add_argument("--thread-time", action="store_true",
                    help="one thread for every library, timed in CPU seconds of that thread (time.thread_time): "
                         "figures that survive a loaded shared machine")
    args = ap.parse_args(argv)
    if args.thread_time:
        args.threads = 1
        H.CLOCK = time.thread_time
    if args.threads:
        lmkern.set_num_threads(args.threads)
    H.torch_threads()
    clock = ", CPU time of the one thread" if args.thread_time else ""
    table = H.Table(f"attention (CPU float32 unless named, {lmkern.get_num_threads()} threads{clock})")
    for name, (q, k, v), kw in cases(args.quick):
        no_baselines = kw.pop("_no_baselines", False)
        B, N, Hq, D = q.shape
        M, E = k.shape[1], v.shape[3]
        mask = admissible_mask(B, N, M, kw.get("causal", False), kw.get("q_pos"), kw.get("kv_pos"), kw.get("kv_lens"))
        pairs = float(mask.sum())
        flops = 2.0 * (D + E) * pairs * Hq
        nbytes = float(q.nbytes + k.nbytes + v.nbytes + B * N * Hq * E * q.itemsize)
        out = np.empty((B, N, Hq, E), q.dtype)
        fns = {"lmkern": lambda: lmkern.attention(q, k, v, out=out, **kw)}
        if H.HAVE_TORCH and not no_baselines:
            fns["torch SDPA"] = torch_sdpa(q, k, v, causal=kw.get("causal", False), mask=mask)
        times = H.timeit_many(fns, repeat=3, min_time=0.01) if args.quick else H.timeit_many(fns, repeat=9)
        base = {}
        if not no_baselines:
            base["numpy twin"] = H.timeit(lambda: ref.core.attention(q, k, v, **kw), repeat=1, min_time=0, warmup=0)
        base.update({n: t for n, t in times.items() if n != "lmkern"})
        table.add(name, times["lmkern"], flops=flops, nbytes=nbytes, baselines=base, flop_width=q.itemsize)
    return table


if __name__ == "__main__":
    main()
