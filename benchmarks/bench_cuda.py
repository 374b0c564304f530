"""GPU benchmarks of lmkern.cuda (SPEC 7): attention prefill and split-KV decode vs PyTorch SDPA.

    PYTHONPATH=python python benchmarks/bench_cuda.py [--quick]

Skips (exit 0) without a GPU or without torch with CUDA.  Times are medians of CUDA-event timings.
Roofline share uses peaks measured in the same run on the same GPU: bf16 tensor-core throughput of
a large torch.matmul and device-memory bandwidth of a large copy (read + write bytes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lmkern  # noqa: E402
from lmkern import cuda  # noqa: E402


def gpu_time(torch, fn, repeat=10, warmup=2):
    """Median seconds per call of fn() by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / 1e3)
    return statistics.median(samples)


def gpu_peaks(torch, quick):
    n = 2048 if quick else 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = gpu_time(torch, lambda: x @ x, repeat=5)
    flops = 2 * n ** 3 / t
    buf = torch.empty((64 if quick else 512) * 2 ** 20, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(buf)
    t = gpu_time(torch, lambda: dst.copy_(buf), repeat=5)
    bw = 2 * buf.numel() * 4 / t
    return flops, bw


def fmt(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args(argv)
    if not cuda.available():
        print("bench_cuda: skipped (no CUDA GPU visible, or lmkern built without CUDA)")
        return 0
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench_cuda: skipped (needs torch with CUDA for allocation and the SDPA baseline)")
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda: skipped (torch does not see the GPU)")
        return 0

    pf, pb = gpu_peaks(torch, args.quick)
    print(f"\n## lmkern.cuda on {torch.cuda.get_device_name()}\n")
    print(f"peaks measured in this run: {pf / 1e12:.0f} TFLOP/s bf16 (torch.matmul), {pb / 1e9:.0f} GB/s copy bandwidth\n")
    print("| case | median | GB/s | TFLOP/s | roofline share | speed-ups |")
    print("|---|---|---|---|---|---|")

    def row(case, t, flops, nbytes, base):
        share = max(flops / pf, nbytes / pb) / t
        ups = ", ".join(f"{k} {v / t:.2f}x" for k, v in base.items() if v)
        print(f"| {case} | {fmt(t)} | {nbytes / t / 1e9:.0f} | {flops / t / 1e12:.1f} | {share * 100:.0f}% | {ups} |",
              flush=True)

    bf16 = torch.bfloat16
    # prefill: causal, N = M, tensor cores
    B, H, D = 1, 16, 128
    N = 1024 if args.quick else 8192
    for dt_name, dt in (("bf16", bf16), ("f16", torch.float16)):
        q = torch.randn(B, N, H, D, device="cuda", dtype=dt)
        k = torch.randn(B, N, H, D, device="cuda", dtype=dt)
        v = torch.randn(B, N, H, D, device="cuda", dtype=dt)
        t = gpu_time(torch, lambda: lmkern.attention(q, k, v, causal=True))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants (B, H, T, D)
        ts = gpu_time(torch, lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        flops = 4 * B * H * N * N * D / 2  # causal: half of QK^T and PV
        nbytes = 4 * B * N * H * D * 2
        row(f"{dt_name} causal B={B} N=M={N} H={H} D={D}", t, flops, nbytes, {"torch SDPA": ts})

    # decode: N = 1, long cache, split-KV (GQA 32/8)
    M = 4096 if args.quick else 32768
    for dt_name, dt in (("bf16", bf16), ("f32", torch.float32)):
        Bd, Hq, Hkv = 4, 32, 8
        q = torch.randn(Bd, 1, Hq, D, device="cuda", dtype=dt)
        k = torch.randn(Bd, M, Hkv, D, device="cuda", dtype=dt)
        v = torch.randn(Bd, M, Hkv, D, device="cuda", dtype=dt)
        t = gpu_time(torch, lambda: lmkern.attention(q, k, v, causal=True))
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
        vt = v.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
        ts = gpu_time(torch, lambda: F.scaled_dot_product_attention(qt, kt, vt))
        flops = 4 * Bd * Hq * M * D
        nbytes = 2 * Bd * M * Hkv * D * k.element_size()
        row(f"{dt_name} decode B={Bd} M={M} Hq={Hq} Hkv={Hkv} D={D}", t, flops, nbytes,
            {"torch SDPA (KV expanded)": ts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
