"""Benchmarks of lmkern.mor (SPEC 7): router, expert-choice top-k, gather/scatter, active-token attention.

    PYTHONPATH=python python benchmarks/bench_mor.py [--quick]

Baselines: the NumPy twin (lmkern.reference.mor) and PyTorch doing the same math on the same
thread count (``topk`` + ``sort`` for expert choice, ``clone`` + ``scatter_add_`` for the residual
scatter).  The last table times one recursion step of attention among the active tokens against
the dense step, for both KV modes, next to the MoR paper's predictions ``(k/N)^2`` (recursion-wise
caching: k queries over k keys) and ``k/N`` (recursive KV sharing: k queries over N keys).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import HAVE_TORCH, Table, torch, torch_threads  # noqa: E402
from _harness import timeit as _timeit  # noqa: E402

import lmkern  # noqa: E402
from lmkern import mor  # noqa: E402
from lmkern.reference import mor as ref  # noqa: E402


_QUICK = False


def timeit(fn, **kw):
    """The harness's timeit; --quick takes one short sample (a smoke test, not a measurement)."""
    if _QUICK:
        return _timeit(fn, repeat=1, min_time=0, warmup=0)
    return _timeit(fn, **kw)


def bench_router(table, rng, B, T, Dm, C, quick):
    h = rng.standard_normal((B, T, Dm)).astype(np.float32)
    w = (rng.standard_normal((Dm,) if C == 1 else (Dm, C)) / np.sqrt(Dm)).astype(np.float32)
    act = "sigmoid" if C == 1 else "softmax"
    t = timeit(lambda: mor.router_scores(h, w, activation=act, alpha=0.1))
    base = {"numpy twin": timeit(lambda: ref.router_scores(h, w, activation=act, alpha=0.1), repeat=3)}
    if HAVE_TORCH:
        th, tw = torch.from_numpy(h), torch.from_numpy(w)
        f = (lambda: 0.1 * torch.sigmoid(th @ tw)) if C == 1 else (lambda: torch.softmax(th @ tw, dim=-1))
        base["torch"] = timeit(f)
    table.add(f"router_scores {act} h {B}x{T}x{Dm}, C={C}", t, flops=2.0 * B * T * Dm * C,
              nbytes=4.0 * (B * T * Dm + Dm * C + B * T * C), baselines=base)


def bench_topk(table, rng, B, n, k):
    s = rng.random((B, n)).astype(np.float32)
    t = timeit(lambda: mor.expert_choice(s, k))
    base = {"numpy twin": timeit(lambda: ref.expert_choice(s, k), repeat=3)}
    if HAVE_TORCH:
        ts = torch.from_numpy(s)

        def torch_ec():
            vals, ids = torch.topk(ts, k, dim=1)
            ids_sorted, order = torch.sort(ids, dim=1)
            return ids_sorted, torch.gather(vals, 1, order)
        base["torch topk+sort"] = timeit(torch_ec)
    table.add(f"expert_choice {B}x{n}, k={k}", t, nbytes=4.0 * B * n + 12.0 * B * k, baselines=base)


def bench_token_choice(table, rng, B, T, C):
    p = rng.random((B, T, C)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32) * 0.01
    t = timeit(lambda: mor.token_choice(p, bias=bias))
    base = {}
    if HAVE_TORCH:
        tp, tb = torch.from_numpy(p), torch.from_numpy(bias)

        def torch_tc():
            choice = torch.argmax(tp + tb, dim=-1)
            return choice + 1, torch.gather(tp, -1, choice[..., None])[..., 0]
        base["torch"] = timeit(torch_tc)
    table.add(f"token_choice {B}x{T}x{C}", t, nbytes=4.0 * B * T * C + 12.0 * B * T, baselines=base)


def bench_gather_scatter(table, rng, B, T, Dm, k, quick):
    h = rng.standard_normal((B, T, Dm)).astype(np.float32)
    idx = np.sort(np.stack([rng.choice(T, k, replace=False) for _ in range(B)]), axis=1)
    y = rng.standard_normal((B, k, Dm)).astype(np.float32)
    gate = rng.random((B, k)).astype(np.float32)
    shape = f"{B}x{T}x{Dm}, k={k}"

    t = timeit(lambda: mor.gather(h, idx))
    base = {"numpy fancy index": timeit(lambda: np.take_along_axis(h, idx[..., None], axis=1))}
    if HAVE_TORCH:
        th, ti = torch.from_numpy(h), torch.from_numpy(idx)
        base["torch gather"] = timeit(lambda: torch.gather(th, 1, ti[..., None].expand(-1, -1, Dm)))
    table.add(f"gather {shape}", t, nbytes=4.0 * 2 * B * k * Dm + 8.0 * B * k, baselines=base)

    t = timeit(lambda: mor.scatter_residual(h, idx, y, gate))
    base = {"numpy twin": timeit(lambda: ref.scatter_residual(h, idx, y, gate), repeat=3)}
    if HAVE_TORCH:
        ty, tg = torch.from_numpy(y), torch.from_numpy(gate)
        ix = ti[..., None].expand(-1, -1, Dm)

        def torch_scatter():
            out = th.clone()
            return out.scatter_add_(1, ix, tg[..., None] * ty)
        base["torch clone+scatter_add"] = timeit(torch_scatter)
    # read h and y, write out (+ idx and gate)
    table.add(f"scatter_residual {shape}", t, nbytes=4.0 * (2 * B * T * Dm + B * k * Dm + B * k) + 8.0 * B * k,
              baselines=base)

    out = np.empty_like(h)
    t = timeit(lambda: mor.scatter_residual(h, idx, y, gate, out=out))
    base = {}
    if HAVE_TORCH:
        tout = torch.from_numpy(out)

        def torch_scatter_out():
            tout.copy_(th)
            return tout.scatter_add_(1, ix, tg[..., None] * ty)
        base["torch copy_+scatter_add_"] = timeit(torch_scatter_out)
    table.add(f"scatter_residual out= (preallocated) {shape}", t,
              nbytes=4.0 * (2 * B * T * Dm + B * k * Dm + B * k) + 8.0 * B * k, baselines=base)

    hh = h.copy()
    t = timeit(lambda: mor.scatter_residual_(hh, idx, y, gate))
    base = {}
    if HAVE_TORCH:
        thh = th.clone()
        base["torch scatter_add_"] = timeit(lambda: thh.scatter_add_(1, ix, tg[..., None] * ty))
    # read y, read and write the k updated rows of h
    table.add(f"scatter_residual_ (in place) {shape}", t, nbytes=4.0 * (3 * B * k * Dm + B * k) + 8.0 * B * k,
              baselines=base)


def bench_attention(rng, B, T, H, D, n_recursions):
    """Time of one recursion step vs the dense causal step, both KV modes, vs the paper's predictions."""
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, H, D)).astype(np.float32)
    v = rng.standard_normal((B, T, H, D)).astype(np.float32)
    pos = np.arange(T)
    dense = timeit(lambda: lmkern.attention(q, k, v, causal=True), repeat=3, min_time=0)
    print(f"\n## mor: attention among active tokens, one recursion step (B={B}, T=N={T}, H={H}, D={D})\n")
    print(f"dense causal step: {dense * 1e3:.2f} ms\n")
    print("| step | k | k/N | recursion-wise: time | ratio | (k/N)^2 | KV sharing: time | ratio | k/N |")
    print("|---|---|---|---|---|---|---|---|---|")
    for step in range(1, n_recursions):
        kr = mor.capacity(T, step, n_recursions)
        idx = np.sort(np.stack([rng.choice(T, kr, replace=False) for _ in range(B)]), axis=1)
        qa, ka, va = mor.gather(q.reshape(B, T, -1), idx), mor.gather(k.reshape(B, T, -1), idx), \
            mor.gather(v.reshape(B, T, -1), idx)
        qa, ka, va = (x.reshape(B, kr, H, D) for x in (qa, ka, va))
        t_rec = timeit(lambda: lmkern.attention(qa, ka, va, causal=True, q_pos=idx, kv_pos=idx), repeat=3, min_time=0)
        t_sh = timeit(lambda: lmkern.attention(qa, k, v, causal=True, q_pos=idx, kv_pos=pos), repeat=3, min_time=0)
        f = kr / T
        print(f"| {step} | {kr} | {f:.3f} | {t_rec * 1e3:.2f} ms | {t_rec / dense:.3f} | {f * f:.3f} | "
              f"{t_sh * 1e3:.2f} ms | {t_sh / dense:.3f} | {f:.3f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args(argv)
    quick = args.quick
    global _QUICK
    _QUICK = quick
    torch_threads()
    rng = np.random.default_rng(0)
    table = Table("mor")
    if quick:
        bench_router(table, rng, 2, 256, 128, 1, quick)
        bench_topk(table, rng, 4, 1024, 341)
        bench_token_choice(table, rng, 2, 256, 3)
        bench_gather_scatter(table, rng, 2, 256, 128, 85, quick)
        bench_attention(rng, 1, 128, 2, 32, 3)
    else:
        bench_router(table, rng, 8, 4096, 1024, 1, quick)
        bench_router(table, rng, 8, 4096, 1024, 3, quick)
        bench_topk(table, rng, 16, 8192, 2730)
        bench_token_choice(table, rng, 8, 4096, 3)
        bench_gather_scatter(table, rng, 8, 4096, 1024, 1365, quick)
        bench_attention(rng, 1, 1024, 4, 64, 3)
    return table


if __name__ == "__main__":
    main()
