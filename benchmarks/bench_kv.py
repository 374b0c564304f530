"""Benchmarks of lmkern.kv (SPEC 7): KIVI decode over the quantized cache, attention mass, and a
fidelity table (quantization and eviction against float32 attention).

    PYTHONPATH=python python benchmarks/bench_kv.py [--quick] [--no-memory]

Prints one SPEC 7 table per section: roofline share and speed-ups against float32
``lmkern.attention`` over the uncompressed cache, PyTorch on the same thread count and the NumPy twin.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
from _harness import HAVE_TORCH, Table, timeit, torch, torch_threads  # noqa: E402

import lmkern  # noqa: E402
from lmkern import kv  # noqa: E402
from lmkern.reference import core as ref_core  # noqa: E402
from lmkern.reference import kv as ref_kv  # noqa: E402


# ----------------------------------------------------------------------------- decode

def _torch_last(fn):
    """Times a PyTorch baseline after lmkern's own timings, then lets PyTorch's OpenMP pool go idle (its
    spinning workers otherwise steal the cores from the next lmkern measurement)."""
    if not HAVE_TORCH:
        return None
    torch_threads()
    t = timeit(fn, repeat=5)
    time.sleep(0.5)
    return t


def bench_decode(M, D, cases, bits_list, G=32, R=128, twin=True):
    rng = np.random.default_rng(0)
    table = Table(f"kv decode: QuantizedKVCache.attend, N=1, M={M}, D=E={D}, group {G}, residual {R}")
    summary = []
    for Hq, Hkv in cases:
        k = rng.standard_normal((1, M, Hkv, D), dtype=np.float32)
        v = rng.standard_normal((1, M, Hkv, D), dtype=np.float32)
        q = rng.standard_normal((1, 1, Hq, D), dtype=np.float32)
        base = timeit(lambda: lmkern.attention(q, k, v, causal=True), repeat=5)
        f32_bytes = k.nbytes + v.nbytes
        flops = 4.0 * M * Hq * D          # q.k and p.v for every query head and key
        rows = []
        for bits in bits_list:
            cache = kv.QuantizedKVCache(1, M, Hkv, D, bits=bits, group_size=G, residual=R).append(k, v)
            t = timeit(lambda: cache.attend(q), repeat=9)
            t_twin = None
            if twin:
                kd = np.concatenate([kv.dequantize(kv.quantize(k[:, :M - R], bits=bits, group_size=G, axis="channel")),
                                     k[:, M - R:]], axis=1) if M > R else k
                vd = np.concatenate([kv.dequantize(kv.quantize(v[:, :M - R], bits=bits, group_size=G, axis="token")),
                                     v[:, M - R:]], axis=1) if M > R else v
                t_twin = timeit(lambda: ref_core.attention(q, kd, vd, causal=True), repeat=1, min_time=0)
                del kd, vd
            rows.append((bits, t, t_twin, cache.nbytes))
            del cache
        t_torch = None
        if HAVE_TORCH:
            import torch.nn.functional as F
            tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
            t_torch = _torch_last(lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=Hq != Hkv))
        table.add(f"float32 lmkern.attention Hq={Hq} Hkv={Hkv}", base, flops=flops, nbytes=f32_bytes,
                  baselines={"torch sdpa": t_torch})
        for bits, t, t_twin, nbytes in rows:
            table.add(f"{bits}-bit KIVI Hq={Hq} Hkv={Hkv}", t, flops=flops, nbytes=nbytes,
                      baselines={"float32 lmkern.attention": base, "torch sdpa": t_torch, "numpy twin": t_twin})
            summary.append((Hq, Hkv, bits, base / t, f32_bytes / nbytes))
        del k, v
    print()
    for Hq, Hkv, bits, up, ratio in summary:
        print(f"  {bits}-bit Hq={Hq} Hkv={Hkv}: {up:.1f}x faster than float32 lmkern.attention, "
              f"{ratio:.2f}x fewer bytes (.nbytes)")
    return summary


# ----------------------------------------------------------------------------- attention mass

def bench_mass(N, M, Hq, Hkv, D):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, N, Hq, D), dtype=np.float32)
    k = rng.standard_normal((1, M, Hkv, D), dtype=np.float32)
    table = Table(f"kv.attention_mass: N={N} window queries, M={M}, Hq={Hq}, Hkv={Hkv}, D={D}")
    t = timeit(lambda: kv.attention_mass(q, k), repeat=5)
    t_torch = None
    if HAVE_TORCH:
        g = Hq // Hkv
        tq = torch.from_numpy(q).permute(0, 2, 1, 3).reshape(1, Hkv, g * N, D)
        tk = torch.from_numpy(k).permute(0, 2, 1, 3)

        def torch_mass():   # softmax-then-sum: materializes every score
            s = (tq @ tk.transpose(-1, -2)) * D ** -0.5
            return torch.softmax(s, -1).view(1, Hkv, g, N, M).sum(3).mean(2)
        t_torch = _torch_last(torch_mass)
        err = np.abs(kv.attention_mass(q, k) - torch_mass().permute(0, 2, 1).numpy()).max()
        time.sleep(0.5)
        print(f"max |lmkern - torch| = {err:.2e}")
    t_twin = timeit(lambda: ref_kv.attention_mass(q, k), repeat=1, min_time=0) if N * M * Hq <= 2 ** 26 else None
    table.add(f"attention_mass N={N} M={M}", t, flops=2.0 * N * M * Hq * D, nbytes=q.nbytes + k.nbytes,
              baselines={"torch softmax-then-sum": t_torch, "numpy twin": t_twin})
    return t_torch / t if t_torch else None


_MEM_CHILD = """
import sys, numpy as np
sys.path.insert(0, 'python')
import lmkern
from lmkern import kv
N = M = {n}; Hq, Hkv, D = {hq}, {hkv}, {d}
rng = np.random.default_rng(0)
q = rng.standard_normal((1, N, Hq, D), dtype=np.float32)
k = rng.standard_normal((1, M, Hkv, D), dtype=np.float32)
kv.attention_mass(q[:, :64], k[:, :64])            # load everything once
def status(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
with open('/proc/self/clear_refs', 'w') as f:         # reset the peak (VmHWM) to the current RSS
    f.write('5')
before = status('VmRSS:')
out = kv.attention_mass(q, k, causal=True)
print((status('VmHWM:') - before) / 1024.0, out.nbytes / 2 ** 20)
"""


def mass_memory(n, hq=2, hkv=1, d=64):
    """Peak extra resident memory (MiB) of attention_mass at N = M = n, in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _MEM_CHILD.format(n=n, hq=hq, hkv=hkv, d=d)], cwd=root,
                         capture_output=True, text=True, check=True)
    extra, out_mb = (float(x) for x in res.stdout.split())
    materialized = n * n * hq * 4 / 2 ** 20
    print(f"\nattention_mass at N = M = {n}, Hq={hq}, Hkv={hkv}, D={d} (causal): peak extra memory "
          f"{extra:.1f} MiB (of which the (B, M, Hkv) result {out_mb:.2f} MiB); "
          f"softmax-then-sum would materialize N*M*Hq float32 = {materialized:.0f} MiB")
    return extra


# ----------------------------------------------------------------------------- fidelity

def planted_inputs(rng, M, N, Hq, Hkv, D, n_planted, logit=6.0):
    """Heavy hitters: per KV head a unit direction u shared by every query (q = noise + 2u) and
    n_planted prompt tokens whose keys point along u with a scaled logit of about ``logit`` above the
    rest, so they draw most of the attention of every query (prompt and window alike)."""
    g = Hq // Hkv
    u = rng.standard_normal((Hkv, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    q_all = rng.standard_normal((1, M, Hq, D)) + 2.0 * np.repeat(u, g, axis=0)[None, None]
    k = rng.standard_normal((1, M, Hkv, D))
    v = rng.standard_normal((1, M, Hkv, D))
    planted = np.stack([np.sort(rng.choice(np.arange(16, M - 4 * N), n_planted, replace=False)) for _ in range(Hkv)], 1)
    for h in range(Hkv):
        k[0, planted[:, h], h] += u[h] * logit * D ** 0.5 / 2.0
    f = np.float32
    return q_all[:, M - N:].astype(f), q_all.astype(f), k.astype(f), v.astype(f), planted


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fidelity(M, N, Hq, Hkv, D, G=32, R=128, n_planted=32):
    rng = np.random.default_rng(7)
    q, q_all, k, v, planted = planted_inputs(rng, M, N, Hq, Hkv, D, n_planted)
    full = lmkern.attention(q, k, v, causal=True)
    print(f"\n## kv fidelity: N={N} window queries over M={M} keys, Hq={Hq}, Hkv={Hkv}, D={D}; "
          f"{n_planted} planted high-attention tokens per KV head\n")
    print("| method | budget | planted tokens kept | output error (rel. L2 vs float32) |")
    print("|---|---|---|---|")
    for bits in (2, 4, 8):
        cache = kv.QuantizedKVCache(1, M, Hkv, D, bits=bits, group_size=G, residual=R).append(k, v)
        print(f"| KIVI {bits}-bit (group {G}, residual {R}) | {cache.nbytes / (k.nbytes + v.nbytes):.1%} of bytes "
              f"| all | {rel_err(cache.attend(q), full):.2e} |")
    # H2O scores: mass accumulated over every prompt query (prefill), the window queries included
    h2o_mass = kv.attention_mass(q_all, k, causal=True, group_reduce="sum")
    rows = []
    for frac in (0.10, 0.25, 0.50):
        budget = int(frac * M)
        sel = {
            f"SnapKV (window {N}, avg pool 5)": kv.snapkv_select(q, k, budget),
            "H2O (half heavy, half recent)": kv.h2o_select(h2o_mass, budget, recent=budget // 2),
            "StreamingLLM (4 sinks + recent)": np.broadcast_to(
                kv.streaming_indices(M, sink=4, recent=budget - 4)[None, :, None], (1, budget, Hkv)).copy(),
        }
        for name, idx in sel.items():
            kept = np.mean([np.isin(planted[:, h], idx[0, :, h]).mean() for h in range(Hkv)])
            out = attend_kept(q, k, v, idx, M)
            rows.append((name, frac, kept, rel_err(out, full)))
            print(f"| {name} | {frac:.0%} | {kept:.0%} | {rel_err(out, full):.2e} |")
    return rows


def attend_kept(q, k, v, idx, M):
    """Window attention over the kept tokens only: per KV head, compact and attend at the original positions."""
    Hkv = k.shape[2]
    Hq, N = q.shape[2], q.shape[1]
    g = Hq // Hkv
    kc, vc = kv.compact(k, idx), kv.compact(v, idx)
    out = np.empty((1, N, Hq, v.shape[3]), np.float32)
    for h in range(Hkv):
        out[:, :, h * g:(h + 1) * g] = lmkern.attention(
            q[:, :, h * g:(h + 1) * g], kc[:, :, h:h + 1], vc[:, :, h:h + 1], causal=True,
            q_pos=np.arange(M - N, M), kv_pos=idx[0, :, h])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--no-memory", action="store_true", help="skip the N = M = 16384 memory measurement")
    args = ap.parse_args(argv)
    print(f"lmkern {lmkern.__version__}, {lmkern._core.simd}, {lmkern.get_num_threads()} threads")
    if args.quick:
        bench_decode(1024, 64, [(8, 8), (8, 2)], [2, 4], G=32, R=128)
        bench_mass(8, 1024, 8, 2, 64)
        fidelity(512, 16, 8, 2, 32, n_planted=8)
        return
    bench_decode(32768, 128, [(32, 32), (32, 8)], [2, 4], twin=False)
    bench_mass(32, 32768, 32, 8, 128)
    if not args.no_memory:
        mass_memory(16384)
    fidelity(4096, 32, 32, 8, 64)


if __name__ == "__main__":
    main()
