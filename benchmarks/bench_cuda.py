"""GPU benchmarks (SPEC 7): attention prefill and split-KV decode vs PyTorch SDPA, and the families'
CUDA paths: tpa.decode (FlashTPA) vs materialize + SDPA, KIVI-2 QuantizedKVCache.attend vs float16
decode, attention_mass vs softmax-then-sum, mor.expert_choice vs topk + sort, scatter_residual vs
scatter_add, parscale.aggregate and prefix_attention vs the same math in torch.

    PYTHONPATH=python python benchmarks/bench_cuda.py [--quick]

Skips (exit 0) without a GPU or without torch with CUDA.  Times are medians of CUDA-event timings of
batches of back-to-back calls (the steady state of a decode loop).
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


def gpu_time(torch, fn, repeat=10, warmup=2, inner=10):
    """Median seconds per call of fn() by CUDA events on the current stream, over `repeat` batches of
    `inner` back-to-back calls: the steady state of a decode loop, where the host queues the next call
    while the GPU runs this one (a single call between two events would add the Python launch time
    whenever it exceeds the kernel's)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(samples)


def kernel_time(torch, fn, calls=20):
    """Seconds of GPU kernel time per call of fn() (the device time torch.profiler records), without the
    host's launch time: tells a slow kernel from a slow Python wrapper."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e6


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
    ap.add_argument("--only", choices=("attention", "tpa", "kv", "mor", "parscale"), action="append",
                    help="run only these sections (repeatable)")
    ap.add_argument("--kivi", metavar="DIR", help="a checkout of jy-yuan/KIVI (not shipped with lmkern): build its "
                    "CUDA gemv extension and time its decode beside QuantizedKVCache.attend (Hq = Hkv)")
    ap.add_argument("--t6", metavar="FILE", help="T6's decode/flashtpa_decode_triton.py (tensorgi/T6, not "
                    "shipped with lmkern): time its Triton FlashTPA decode beside tpa.decode for ranks Rk=Rv=1")
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

    only = set(args.only or ("attention", "tpa", "kv", "mor", "parscale"))
    if "attention" in only:
        bench_attention(torch, F, row, args.quick)
    if args.kivi and "kv" in only:
        try:
            bench_kivi_reference(torch, F, row, args.quick, args.kivi)
        except Exception as exc:   # a third-party build: report and go on
            print(f"| KIVI reference: skipped ({type(exc).__name__}: {exc}) | | | | | |", flush=True)
    t6 = load_t6(args.t6) if args.t6 else None
    for section in (bench_tpa, bench_kv, bench_mor, bench_parscale):
        if section.__name__[len("bench_"):] not in only:
            continue
        try:
            section(torch, F, row, args.quick, t6=t6)
        except NotImplementedError as exc:   # a family op without a CUDA path in this build
            print(f"| {section.__name__}: skipped ({exc}) | | | | | |", flush=True)
    return 0


def bench_attention(torch, F, row, quick):
    """Prefill (causal, N = M, tensor cores) and split-KV decode (GQA 32/8) vs torch SDPA."""
    bf16 = torch.bfloat16
    B, H, D = 1, 16, 128
    N = 1024 if quick else 8192
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
    M = 4096 if quick else 32768
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


def load_t6(path):
    """T6's Triton decode module, imported from a file the user fetched (its code is not part of lmkern)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("t6_flashtpa_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def t6_decode(t6, aq, bq, ak, bk, av, bv):
    """T6's FlashTPA decode (split over the cache, `parallel_bn`) on lmkern's layouts, for Rk = Rv = 1:
    T6 takes aq (B, N, H, R), bq (B, N, R, D), ak/av (B, M, H), bk (B, M, D), bv (B, M, E); all views."""
    B, H, Rq = aq.shape
    return t6.tpa_decode_parallel_bn_triton(aq[:, None], ak[..., 0], av[..., 0], bq[:, None], bk[:, :, 0],
                                            bv[:, :, 0], scale_q=1.0 / Rq, scale_k=1.0, scale_v=1.0)[:, 0]


def bench_tpa(torch, F, row, quick, t6=None):
    """tpa.decode, the paper's decode configuration (H=32, D=64, ranks 16/1/1), and T6-medium; with --t6,
    T6's Triton FlashTPA decode beside it (ranks 16/1/1 only: T6's kernel takes one K and V rank)."""
    M = 4096 if quick else 32768
    for dt_name, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        for H, Rq, Rk, Rv in ((32, 16, 1, 1), (16, 6, 2, 2)):
            B, D = 4, 64
            r = lambda *s: torch.randn(*s, device="cuda", dtype=dt)   # noqa: E731
            aq, bq = r(B, H, Rq), r(B, Rq, D)
            ak, bk, av, bv = r(B, M, H, Rk), r(B, M, Rk, D), r(B, M, H, Rv), r(B, M, Rv, D)
            t = gpu_time(torch, lambda: lmkern.tpa.decode(aq, bq, ak, bk, av, bv))

            def torch_tpa():   # T6's computation: materialize K, V, then SDPA
                q = torch.einsum("bhr,brd->bhd", aq, bq) / Rq
                k = torch.einsum("bmhr,bmrd->bhmd", ak, bk) / Rk
                v = torch.einsum("bmhr,bmrd->bhmd", av, bv) / Rv
                return F.scaled_dot_product_attention(q[:, :, None], k, v)
            ts = gpu_time(torch, torch_tpa)
            base = {"torch materialize+SDPA": ts}
            if t6 is not None and Rk == Rv == 1:
                ref = lmkern.tpa.decode(aq, bq, ak, bk, av, bv).float()
                dev = (t6_decode(t6, aq, bq, ak, bk, av, bv).float() - ref).abs().max().item()
                base["T6 Triton FlashTPA"] = gpu_time(torch, lambda: t6_decode(t6, aq, bq, ak, bk, av, bv))
                k_ours = kernel_time(torch, lambda: lmkern.tpa.decode(aq, bq, ak, bk, av, bv))
                k_t6 = kernel_time(torch, lambda: t6_decode(t6, aq, bq, ak, bk, av, bv))
                print(f"(T6 Triton decode vs tpa.decode, {dt_name}: max |diff| {dev:.2e}; GPU kernel time per call "
                      f"(torch.profiler): tpa.decode {fmt(k_ours)}, T6 {fmt(k_t6)}, ratio {k_t6 / k_ours:.2f}x)",
                      flush=True)
            nbytes = sum(x.numel() * x.element_size() for x in (ak, bk, av, bv))
            flops = 2 * B * M * (Rk * Rq * D + H * Rk * Rq + 2 * H * Rv + Rv * D)
            row(f"{dt_name} tpa.decode B={B} M={M} H={H} ranks {Rq}/{Rk}/{Rv} D={D}", t, flops, nbytes, base)


def bench_kv(torch, F, row, quick, t6=None):
    """KIVI-2 decode straight from the codes vs float16 decode over the uncompressed cache; attention_mass."""
    M = 4096 if quick else 32768
    B, Hq, Hkv, D = 4, 32, 8, 128
    k = torch.randn(B, M, Hkv, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, M, Hkv, D, device="cuda", dtype=torch.float16)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.float16)
    t16 = gpu_time(torch, lambda: lmkern.attention(q, k, v, causal=True))
    cache = lmkern.kv.QuantizedKVCache(B, M, Hkv, D, bits=2, group_size=32, residual=128, device="cuda")
    cache.append(k, v)
    t = gpu_time(torch, lambda: cache.attend(q))
    row(f"KIVI-2 attend B={B} M={M} Hq={Hq} Hkv={Hkv} D={D}", t, 4 * B * Hq * M * D, cache.nbytes,
        {"float16 lmkern.attention": t16})
    N = 32
    qw = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.float16)
    t = gpu_time(torch, lambda: lmkern.kv.attention_mass(qw, k))

    def torch_mass():   # softmax-then-sum: materializes every score
        kk = k.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
        p = torch.softmax((qw.transpose(1, 2).float() @ kk.float().transpose(-1, -2)) * D ** -0.5, dim=-1)
        return p.sum(dim=2).view(B, Hkv, Hq // Hkv, M).mean(dim=2)
    ts = gpu_time(torch, torch_mass)
    row(f"attention_mass B={B} N={N} M={M} Hq={Hq} Hkv={Hkv}", t, 2 * B * N * Hq * M * D * 2,
        (qw.numel() + k.numel()) * 2, {"torch softmax-then-sum": ts})


def load_kivi(root):
    """KIVI's quant package with its CUDA gemv extension built by torch (the user's checkout; nothing of it
    is part of lmkern)."""
    import importlib
    from torch.utils.cpp_extension import load
    csrc = os.path.join(root, "quant", "csrc")
    ext = load(name="kivi_gemv", sources=[os.path.join(csrc, "pybind.cpp"), os.path.join(csrc, "gemv_cuda.cu")],
               extra_cflags=["-O3", "-std=c++17", "-DENABLE_BF16"],
               extra_cuda_cflags=["-O3", "-std=c++17", "-DENABLE_BF16", "--use_fast_math", "--expt-relaxed-constexpr",
                                  "--expt-extended-lambda", "-U__CUDA_NO_HALF_OPERATORS__",
                                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                                  "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"])
    sys.modules["kivi_gemv"] = ext   # quant/matmul.py imports it by this name
    sys.path.insert(0, root)
    return importlib.import_module("quant.matmul"), importlib.import_module("quant.new_pack")


def bench_kivi_reference(torch, F, row, quick, root):
    """KIVI's own decode step (models/llama_kivi.py: its CUDA gemv over the packed keys and values, torch for
    the residual tokens and the softmax) beside QuantizedKVCache.attend, 2-bit, group 32, residual 128,
    Hq = Hkv = 32 (KIVI's llama path asserts one query head per KV head).  Written at stop 11 after the
    device was gone: not yet run."""
    mm, pack = load_kivi(root)
    B, H, D, bits, group, res = 1, 32, 128, 2, 32, 128
    M = 4096 if quick else 32768
    k = torch.randn(B, M, H, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, M, H, D, device="cuda", dtype=torch.float16)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.float16)
    cache = lmkern.kv.QuantizedKVCache(B, M, H, D, bits=bits, group_size=group, residual=res, device="cuda")
    cache.append(k, v)
    t = gpu_time(torch, lambda: cache.attend(q))
    # KIVI's layout: (B, nh, T, D); keys quantized per channel along tokens (K^T packed on its last axis),
    # values per token along features; the newest `res` tokens stay float16
    kt, vt, qt = k.transpose(1, 2), v.transpose(1, 2), q.transpose(1, 2).contiguous()
    mq = (M - res) // group * group
    kq, ks, kmn = pack.triton_quantize_and_pack_along_last_dim(kt[:, :, :mq].transpose(2, 3).contiguous(), group, bits)
    vq, vs, vmn = pack.triton_quantize_and_pack_along_last_dim(vt[:, :, :mq].contiguous(), group, bits)
    k_full, v_full = kt[:, :, mq:].contiguous(), vt[:, :, mq:].contiguous()

    def kivi_step():
        s = torch.cat([mm.cuda_bmm_fA_qB_outer(group, qt, kq, ks, kmn, bits), qt @ k_full.transpose(2, 3)], dim=-1)
        w = torch.softmax(s / D ** 0.5, dim=-1, dtype=torch.float32).to(torch.float16)
        return mm.cuda_bmm_fA_qB_outer(group, w[..., :mq].contiguous(), vq, vs, vmn, bits) + w[..., mq:] @ v_full
    ref = cache.attend(q).float()
    dev = (kivi_step().transpose(1, 2).float() - ref).abs().max().item()
    tk = gpu_time(torch, kivi_step)
    print(f"(KIVI's decode vs QuantizedKVCache.attend: max |diff| {dev:.2e}; GPU kernel time per call: lmkern "
          f"{fmt(kernel_time(torch, lambda: cache.attend(q)))}, KIVI {fmt(kernel_time(torch, kivi_step))})", flush=True)
    row(f"KIVI-2 attend B={B} M={M} Hq=Hkv={H} D={D}", t, 4 * B * H * M * D, cache.nbytes, {"KIVI's CUDA kernel": tk})


def bench_mor(torch, F, row, quick, t6=None):
    """expert_choice 16x8192 k=2730 vs topk + sort; scatter_residual 8x4096x1024, 1365 tokens per row."""
    scores = torch.rand(16, 8192, device="cuda")
    t = gpu_time(torch, lambda: lmkern.mor.expert_choice(scores, 2730))
    ts = gpu_time(torch, lambda: torch.sort(torch.topk(scores, 2730, dim=1).indices, dim=1))
    row("mor.expert_choice 16x8192 k=2730", t, 0, scores.numel() * 4, {"torch topk+sort": ts})
    B, T, H, n = (2, 1024, 1024, 341) if quick else (8, 4096, 1024, 1365)
    h = torch.randn(B, T, H, device="cuda")
    idx = torch.sort(torch.rand(B, T, device="cuda").argsort(dim=1)[:, :n], dim=1).values
    y = torch.randn(B, n, H, device="cuda")
    gate = torch.rand(B, n, device="cuda")
    t = gpu_time(torch, lambda: lmkern.mor.scatter_residual(h, idx, y, gate))
    ts = gpu_time(torch, lambda: h.scatter_add(1, idx[..., None].expand(-1, -1, H), y * gate[..., None]))
    row(f"mor.scatter_residual {B}x{T}x{H} n={n}", t, 2 * B * n * H, (2 * h.numel() + y.numel()) * 4,
        {"torch scatter_add": ts})


def bench_parscale(torch, F, row, quick, t6=None):
    """aggregate P=8 B=1 T=256 H=1024 and prefix_attention decode vs the same math in torch."""
    P, B, T, H = 8, 1, 256, 1024
    h = torch.randn(P * B, T, H, device="cuda")
    w1 = torch.randn(H, P * H, device="cuda") * (P * H) ** -0.5    # Linear layout (out, in)
    b1 = torch.zeros(H, device="cuda")
    w2 = torch.randn(P, H, device="cuda") * H ** -0.5
    b2 = torch.zeros(P, device="cuda")
    t = gpu_time(torch, lambda: lmkern.parscale.aggregate(h, w1, b1, w2, b2, P=P))

    def torch_agg():   # ParScale's modeling code: interleaved concat -> MLP -> softmax -> smoothing -> sum
        hs = h.view(P, B, T, H)
        z = F.silu(F.linear(hs.permute(1, 2, 3, 0).reshape(B, T, H * P), w1, b1))
        w = torch.softmax(F.linear(z, w2, b2).float(), dim=-1) * (1 - 0.1) + 0.1 / P
        return (hs * w.permute(2, 0, 1)[..., None]).sum(0)
    ts = gpu_time(torch, torch_agg)
    row(f"parscale.aggregate P={P} B={B} T={T} H={H}", t, 2 * B * T * (P * H * H + H * P),
        (h.numel() + w1.numel()) * 4, {"torch": ts})
    Bd, M, L, Hq, Hkv, D = 16, 4096, 48, 16, 4, 128
    q = torch.randn(P * Bd, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(P * Bd, M, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pk = torch.randn(P, L, Hkv, D, device="cuda", dtype=torch.bfloat16)
    pv = torch.randn_like(pk)
    t = gpu_time(torch, lambda: lmkern.parscale.prefix_attention(q, k, v, pk, pv))

    def torch_prefix():   # the prefix copied per row, then SDPA
        kk = torch.cat([pk.repeat_interleave(Bd, dim=0), k], dim=1).transpose(1, 2)
        vv = torch.cat([pv.repeat_interleave(Bd, dim=0), v], dim=1).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, enable_gqa=True)
    ts = gpu_time(torch, torch_prefix)
    row(f"parscale.prefix_attention decode P={P} B={Bd} M={M} L={L}", t, 4 * P * Bd * Hq * (M + L) * D,
        2 * (k.numel() + pk.numel()) * 2, {"torch concat+SDPA": ts})


if __name__ == "__main__":
    sys.exit(main())
