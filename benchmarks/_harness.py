"""The one timing and roofline helper shared by every benchmarks/bench_<family>.py (SPEC 7).

* :func:`timeit` - median (or best) of repeats (after a warm-up); :func:`timeit_many` - the same for
  several functions sampled round-robin, so their ratios survive a noisy machine.
* :func:`peaks` - float32 FMA throughput on all threads and read bandwidth over a 512 MiB buffer,
  measured once per run by lmkern's own micro-benchmarks (best of the repeats).
* :class:`Table` - prints one row per case: shape, median time, GB/s, GFLOP/s, roofline share
  (``max(flops / peak_flops, bytes / peak_bw) / time``) and speed-ups against the baselines given.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lmkern  # noqa: E402
from lmkern import _core  # noqa: E402

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except Exception:  # optional
    torch = None
    HAVE_TORCH = False


# The clock timeit reads.  Wall time by default; a single-threaded run on a shared, loaded machine may
# switch to time.thread_time (CPU seconds of the calling thread, blind to time spent preempted).
CLOCK = time.perf_counter


def timeit(fn, *, repeat=7, min_time=0.05, warmup=1, stat="median"):
    """Median (``stat="min"``: best) seconds per call of fn(); each sample loops until min_time so
    short calls are measurable."""
    for _ in range(warmup):
        fn()
    t0 = CLOCK()
    fn()
    once = max(CLOCK() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    samples = []
    for _ in range(repeat):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        samples.append((CLOCK() - t0) / inner)
    return min(samples) if stat == "min" else statistics.median(samples)


def timeit_many(fns, *, repeat=7, min_time=0.05, warmup=1, stat="median"):
    """{name: seconds per call} for several ways of doing the same thing, sampled round-robin
    (lmkern, torch, lmkern, torch, ...) so that a noisy neighbour slows them alike and the ratios
    of one run stay meaningful; otherwise as :func:`timeit`."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = CLOCK()
        fn()
        inner[name] = max(1, int(min_time / max(CLOCK() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = CLOCK()
            for _ in range(inner[name]):
                fn()
            samples[name].append((CLOCK() - t0) / inner[name])
    pick = min if stat == "min" else statistics.median
    return {name: pick(v) for name, v in samples.items()}


_PEAKS = None


def peaks():
    """(peak float32 FLOP/s on all threads, peak read bytes/s), measured once per process."""
    global _PEAKS
    if _PEAKS is None:
        # peaks are the best of the repeats (a shared machine only ever makes a sample slower), so
        # the roofline share errs low, never high
        iters = 2_000_000
        flops = _core._peak_fma(iters) / timeit(lambda: _core._peak_fma(iters), repeat=5, min_time=0, stat="min")
        buf = np.ones(128 * 1024 * 1024, np.float32)  # 512 MiB
        t = timeit(lambda: _core._read_sum(buf), repeat=7, min_time=0, stat="min")
        _PEAKS = (flops, buf.nbytes / t)
    return _PEAKS


def torch_threads():
    if HAVE_TORCH:
        torch.set_num_threads(lmkern.get_num_threads())


def roofline_share(seconds, flops, nbytes, flop_width=4):
    """flop_width: bytes per element of the FLOPs (8 for float64: half the float32 FMA peak, as SIMD lanes
    hold half as many doubles)."""
    pf, pb = peaks()
    return max(flops / (pf * 4 / flop_width), nbytes / pb) / seconds


class Table:
    def __init__(self, title):
        self.title = title
        self.rows = []
        pf, pb = peaks()
        print(f"\n## {title}\n")
        print(f"peaks measured in this run: {pf / 1e9:.0f} GFLOP/s float32 FMA on {lmkern.get_num_threads()} threads, "
              f"{pb / 1e9:.1f} GB/s read bandwidth")
        print()
        print("| case | median | GB/s | GFLOP/s | roofline share | speed-ups |")
        print("|---|---|---|---|---|---|")

    def add(self, case, seconds, *, flops=0.0, nbytes=0.0, baselines=None, flop_width=4):
        """baselines: {name: seconds} of the same math done another way; prints name x(speed-up).
        flop_width=8: float64 FLOPs, whose peak is half the measured float32 one."""
        share = roofline_share(seconds, flops, nbytes, flop_width)
        ups = ", ".join(f"{name} {t / seconds:.2f}x" for name, t in (baselines or {}).items() if t)
        row = (case, seconds, nbytes / seconds / 1e9, flops / seconds / 1e9, share, ups)
        self.rows.append(row)
        ALL_ROWS.append((self.title, row))
        print(f"| {case} | {fmt_time(seconds)} | {row[2]:.1f} | {row[3]:.1f} | {share * 100:.0f}% | {ups} |", flush=True)
        return row


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


ALL_ROWS = []  # (table title, row) of every Table in this process, for plot()


def plot(path):
    """Achieved vs peak: one point per benchmark row, x = GB/s share of peak bandwidth,
    y = GFLOP/s share of peak FLOP/s (matplotlib, from the `bench` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pf, pb = peaks()
    fig, ax = plt.subplots(figsize=(8, 6))
    for title, row in ALL_ROWS:
        case, seconds, gbs, gflops, share, _ = row
        ax.scatter(gbs * 1e9 / pb * 100, gflops * 1e9 / pf * 100, s=30)
        ax.annotate(f"{title}: {case}", (gbs * 1e9 / pb * 100, gflops * 1e9 / pf * 100), fontsize=6)
    ax.set_xlabel(f"bandwidth, % of measured peak ({pb / 1e9:.0f} GB/s)")
    ax.set_ylabel(f"FLOP/s, % of measured peak ({pf / 1e9:.0f} GFLOP/s)")
    ax.set_title("lmkern kernels: achieved vs peak (SPEC 7)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
