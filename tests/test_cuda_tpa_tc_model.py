"""Lane-level NumPy model of the tensor-core TPA decode kernel, checked against the reference twin.

``tpa_decode_tc_kernel`` (kernels/cuda/tpa.cu) has not run on a GPU yet, so its index arithmetic is
checked here, the way tests/test_cuda_kernel_model.py checks the attention kernels.  The model
transcribes, statement by statement and with the CUDA index expressions:

* the host side: ``tc_config`` (TcCfg: padded sizes, row strides, TN from the shared-memory budget,
  accumulator tiles and the MT template choice), ``tc_layout`` (byte offsets of the shared-memory
  regions), the tensor-core branch of ``lk_tpa_decode_cuda_splits`` (split plan), ``launch_split``
  (split_len, score_scale), the ``VEC_*`` flags of ``lk_tpa_decode_cuda`` and ``vec_ok``;
* one block per (batch row, split): ``split_range``, the setup (bq, ``stage_aq``, the zero padding of
  W / bvt / bk, softmax state), per tile the staging (``stage<T>`` for ak / av, both 16-byte and scalar
  paths of the bk rows and the transposed bv), G on tensor cores (``load_a`` / ``ld32`` fragments fed to
  an ``mma.sync.m16n8k16`` model built from the PTX ISA fragment tables, as in mma.cuh's comment),
  the float32 scores, ``online_softmax_step<2>`` with the xor-butterfly warp reductions, the W rows
  rounded to the input dtype, acc = alpha acc + W bv on tensor cores, and the epilogue (out / lse or
  the split partials);
* ``tpa_combine_kernel`` / softmax.cuh ``combine_block`` for the split partials.

Loops ``for (q = tid; q < n; q += TC_THREADS)`` over the block's 128 threads visit every q in [0, n)
once: the model evaluates their bodies for all q at once (NumPy index arrays), each q with the CUDA
expression.  Likewise the 32 lanes of a warp are an index array ``lane``.

Memory is modeled as the kernel sees it: the input factors are flat arrays of 16-bit patterns (f16 or
bf16) read at ``base + b * stride[0] + j * stride[1] + c``; shared memory is one byte buffer carved by
``tc_layout``, each region a typed view of exactly its size (an index past it raises), filled with
0xff bytes before the block runs: uninitialized shared memory reads as NaN, so a read of an element
that no statement wrote poisons the result.  Tokens at or past ``kv_lens[b]`` are NaN in global memory:
a read of one poisons the result too.  The output, lse and scratch buffers start as a NaN bit pattern
that no arithmetic produces: every element must be written.  Shared-memory stores assert distinct
addresses within one phase (no two threads write one word), and 4-byte / 16-byte alignment where the
``ld32`` / ``uint4`` accesses need it.

Float32 storage (G_s, aq_s, ak_s, av_s, S_s, m, l, alpha, accumulators) is np.float32; arithmetic is
float32 where the kernel's is (fmaf modeled as a float64 product-sum rounded once to float32), the
tensor-core products are exact and summed in float64 then rounded to float32 (the hardware truncates
slightly differently).  Not modeled: the barrier placement (each phase between two __syncthreads is
run as a whole, in order), register pressure / spills, the tensor cores' exact truncation.  When the
kernel changes, change this model with it.
"""
import numpy as np
import pytest

from lmkern.reference import tpa as ref

F32 = np.float32
U16 = np.uint16

# ---- constants: tpa.cu lines 48-53 (SMEM_MAX), 394-396 (TC_*), 629 (COMBINE_THREADS), softmax.cuh LN2_F,
# lmkern/cuda.h LK_CUDA_ATTN_MAX_HEAD_DIM
TC_THREADS = 128
TC_WARPS = TC_THREADS // 32
TC_MAX_TILES = 16
SMEM_MAX = 96 * 1024
MAX_HEAD_DIM = 256
COMBINE_THREADS = 128
LOG2E = 1.4426950408889634
LN2_F = F32(0.6931471805599453)
VEC_AK, VEC_BK, VEC_AV, VEC_BV = 1, 2, 4, 8       # tpa.cu line 69


# ---- the 16-bit input types: from_f<T> (round to nearest even) and to_f<T> (exact), common.cuh --------

def f16_bits(x):
    """__float2half_rn of float32 values -> bit patterns."""
    return np.array(x, F32).astype(np.float16).view(U16)


def f16_val(u):
    """__half2float of bit patterns."""
    return np.array(u, U16).view(np.float16).astype(F32)


def bf16_bits(x):
    """__float2bfloat16_rn: round-to-nearest-even of the float32 bit pattern to its upper 16 bits."""
    f = np.array(x, F32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(U16)
    return np.where(np.isnan(f), U16(0x7FFF), r).astype(U16)


def bf16_val(u):
    """__bfloat162float of bit patterns."""
    return (np.array(u, U16).astype(np.uint32) << 16).view(F32)


DT = {"float16": (f16_bits, f16_val), "bfloat16": (bf16_bits, bf16_val)}
UNWRITTEN16, UNWRITTEN32 = U16(0x7FDA), np.uint32(0x7FA5A5A5)   # NaN in f16, bf16, float32: never-written marks


def fmaf(a, b, c):
    """fmaf on float32 operands: the exact product plus c, rounded once (to float64, then float32)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def exp2f(x):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(np.asarray(x, F32)).astype(F32)


# ---- mma.sync.m16n8k16.row.col f32 <- f16/bf16 (PTX ISA fragment tables; mma.cuh lines 3-7) -------------

_LANE = np.arange(32)
_GID, _TIG = _LANE >> 2, _LANE & 3
# A element i of a lane (a[i // 2], half i % 2): row gid (+8 for i in 2,3,6,7), col 2 tig + (i & 1) (+8 for i >= 4)
_A_ROW = np.array([[g + (8 if i in (2, 3, 6, 7) else 0) for i in range(8)] for g in _GID])
_A_COL = np.array([[2 * t + (i & 1) + (8 if i >= 4 else 0) for i in range(8)] for t in _TIG])
# B element i (b0 halves, b1 halves): row k = 2 tig + (i & 1) (+8 for b1), col n = gid
_B_ROW = np.array([[2 * t + (i & 1) + (8 if i >= 2 else 0) for i in range(4)] for t in _TIG])
_B_COL = np.repeat(_GID[:, None], 4, axis=1)
# C / D element i: row gid (+8 for i >= 2), col 2 tig + (i & 1)
_C_ROW = np.array([[g + (8 if i >= 2 else 0) for i in range(4)] for g in _GID])
_C_COL = np.array([[2 * t + (i & 1) for i in range(4)] for t in _TIG])


def mma(c, a, b0, b1):
    """c: [32][4] float32, a: [32][4][2] (the 4 registers of two halves each), b0 / b1: [32][2] -> d [32][4]."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    C = np.full((16, 8), np.nan)
    A[_A_ROW, _A_COL] = np.asarray(a, np.float64).reshape(32, 8)
    B[_B_ROW, _B_COL] = np.concatenate([b0, b1], axis=1)
    C[_C_ROW, _C_COL] = c
    with np.errstate(invalid="ignore", over="ignore"):
        D = A @ B + C
    return D[_C_ROW, _C_COL].astype(F32)


def test_mma_fragment_tables_are_bijections_and_multiply():
    """The fragment tables cover each matrix element exactly once, and mma multiplies."""
    for rows, cols, shape in ((_A_ROW, _A_COL, (16, 16)), (_B_ROW, _B_COL, (16, 8)), (_C_ROW, _C_COL, (16, 8))):
        seen = np.zeros(shape, int)
        np.add.at(seen, (rows, cols), 1)
        assert (seen == 1).all()
    rng = np.random.default_rng(0)
    A, Bm, C = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    a = np.zeros((32, 4, 2))
    b0, b1, c = np.zeros((32, 2)), np.zeros((32, 2)), np.zeros((32, 4))
    for lane in range(32):                       # scalar transcription of mma.cuh's comment
        g, t = lane >> 2, lane & 3
        a[lane] = [A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2],
                   A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10]]
        b0[lane], b1[lane] = Bm[2 * t:2 * t + 2, g], Bm[2 * t + 8:2 * t + 10, g]
        c[lane] = [C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]]
    d = mma(c.astype(F32), a, b0, b1)
    D = A @ Bm + C.astype(F32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        np.testing.assert_allclose(d[lane], [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]],
                                   rtol=1e-6, atol=1e-6)


# ---- host side: tc_config, tc_layout, split plan, launch_split, vec flags (tpa.cu 409-432, 663-864) -----

def odd_pad(x):        # tpa.cu line 55
    return x | 1


def align16(x):        # tpa.cu line 413
    return (x + 15) // 16 * 16


def tc_layout(c, H, Rq, Rk):
    """tpa.cu lines 415-432: byte offsets (and the unaligned byte size of each region)."""
    sizes = [("bq", c["Rq8"] * c["KS"] * 2), ("bk", c["TN"] * Rk * c["KS"] * 2), ("bvt", c["E8"] * c["WS"] * 2),
             ("W", c["H16"] * c["WS"] * 2), ("G", c["TN"] * Rk * c["GS"] * 4), ("aq", H * Rq * 4),
             ("ak", c["TN"] * c["AKJ"] * 4), ("av", c["TN"] * c["AVJ"] * 4), ("S", H * c["TNP"] * 4),
             ("m", H * 4), ("l", H * 4), ("alpha", H * 4)]
    L, o = {}, 0
    for name, size in sizes:
        L[name] = (o, size)
        o = align16(o + size)
    L["total"] = o
    return L


def tc_config(dtype, H, Rq, Rk, Rv, D, E):
    """tpa.cu lines 756-782; None where it returns false."""
    if dtype not in ("float16", "bfloat16"):
        return None
    if D < 1 or E < 1 or D > MAX_HEAD_DIM or E > MAX_HEAD_DIM:
        return None
    if H < 1 or H > 4096 or Rq < 1 or Rq > 256 or Rk < 1 or Rk > 16 or Rv < 1 or Rv > 16:
        return None
    c = dict(DP=(D + 15) // 16 * 16, E8=(E + 7) // 8 * 8, H16=(H + 15) // 16 * 16, Rq8=(Rq + 7) // 8 * 8)
    c["tiles"] = c["H16"] // 16 * (c["E8"] // 8)
    per_warp = (c["tiles"] + TC_WARPS - 1) // TC_WARPS
    if per_warp > TC_MAX_TILES:
        return None
    c["MT"] = 4 if per_warp <= 4 else 8 if per_warp <= 8 else 16
    c["KS"] = c["DP"] + 8
    c["GS"] = c["Rq8"] + 4
    c["AKJ"] = odd_pad(H * Rk)
    c["AVJ"] = odd_pad(H * Rv)
    tn = 64
    while tn >= 16:
        c["TN"] = tn
        c["TNP"] = odd_pad(tn)
        c["WS"] = tn * Rv + 8
        c["smem"] = tc_layout(c, H, Rq, Rk)["total"]
        if c["smem"] <= SMEM_MAX:
            return c
        tn //= 2
    return None


def tc_splits(B, M, TN, num_sms):
    """The tensor-core branch of lk_tpa_decode_cuda_splits, tpa.cu lines 820-827."""
    if B <= 0 or M <= 4 * TN:
        return 1
    splits = (4 * (num_sms if num_sms > 0 else 1) + B - 1) // B
    most = (M + 4 * TN - 1) // (4 * TN)
    splits = min(splits, most, 512)
    return max(splits, 1)


def split_len_of(M, num_splits, TN):
    """launch_split, tpa.cu lines 721-723: a multiple of the tile, covering M."""
    split_len = (M + num_splits - 1) // num_splits
    split_len = (split_len + TN - 1) // TN * TN
    return max(split_len, TN)


def vec_ok(base_aligned, sb, sj, off_step, ln, inner, item=2):
    """tpa.cu lines 706-710 (the base pointer's 16-byte alignment is an argument)."""
    per = 16 // item
    return (base_aligned and sb % per == 0 and sj % per == 0 and off_step % per == 0 and ln % per == 0
            and inner % per == 0)


# ---- one block of tpa_decode_tc_kernel (tpa.cu lines 434-626) ------------------------------------------

class Smem:
    """extern __shared__ tc_smem: 0xff bytes (NaN in f16, bf16 and float32) until written."""

    def __init__(self, L):
        self.buf = np.full(L["total"], 0xFF, np.uint8)
        self.L = L

    def region(self, name, dtype):
        off, size = self.L[name]
        assert off % 16 == 0
        return self.buf[off:off + size].view(dtype)


def sread(arr, idx):
    idx = np.asarray(idx)
    assert (idx >= 0).all(), "negative shared-memory index"
    return arr[idx]                       # an index past the region raises IndexError


def swrite(arr, idx, val):
    idx = np.asarray(idx).ravel()
    assert (idx >= 0).all(), "negative shared-memory index"
    assert np.unique(idx).size == idx.size, "two threads store to one shared-memory element"
    arr[idx] = np.asarray(val).ravel() if np.ndim(val) else val


def gread(g, idx):
    idx = np.asarray(idx)
    assert (idx >= 0).all() and (idx < g.size).all(), "global read out of bounds"
    return g[idx]


def ld32(arr, x, val):
    """ld32(p) of a 16-bit array: the elements x, x + 1 (low, high half); 4-byte aligned."""
    x = np.asarray(x)
    assert (x % 2 == 0).all(), "ld32 of an odd element offset"
    return val(sread(arr, np.stack([x, x + 1], axis=-1)))


def load_a(arr, tile, stride, val):
    """mma.cuh lines 48-55: x = tile + gid * stride + 2 tig; a[0..3] = x, x + 8 stride, x + 8, x + 8 stride + 8."""
    x = tile + _GID * stride + 2 * _TIG
    return np.stack([ld32(arr, x, val), ld32(arr, x + 8 * stride, val), ld32(arr, x + 8, val),
                     ld32(arr, x + 8 * stride + 8, val)], axis=1)


def warp_max(x):
    """common.cuh warp_max<32>: xor butterfly of fmaxf."""
    for o in (16, 8, 4, 2, 1):
        x = np.fmax(x, x[_LANE ^ o])
    return x


def warp_sum(x):
    """common.cuh warp_sum<32>: xor butterfly, float32 adds."""
    x = np.asarray(x, F32)
    for o in (16, 8, 4, 2, 1):
        x = (x + x[_LANE ^ o]).astype(F32)
    return x


def stage(dst, src, src_off, tok_stride, j0, nvalid, TN, ln, inner, dst_j, dst_inner, vec, val):
    """stage<T>, tpa.cu lines 114-138 (T 16-bit: PER = 16 / sizeof(T) = 8)."""
    if ln <= 0:
        return
    if vec:
        PER = 8
        cpr = ln // PER
        chunks = TN * cpr
        q = np.arange(chunks)
        j = q // cpr
        c = (q - j * cpr) * PER
        raw = np.zeros((chunks, PER), U16)                                   # make_uint4(0, 0, 0, 0)
        live = j < nvalid
        addr = src_off + (j0 + j[live]) * tok_stride + c[live]
        assert (addr % PER == 0).all(), "uint4 load not 16-byte aligned"
        raw[live] = gread(src, addr[:, None] + np.arange(PER))
        d = j * dst_j + (c // inner) * dst_inner + c % inner                  # PER elements stay in one inner row
        swrite(dst, d[:, None] + np.arange(PER), val(raw))                   # d[u] = raw_f<T>(raw, u)
    else:
        total = TN * ln
        q = np.arange(total)
        j = q // ln
        c = q - j * ln
        v = np.zeros(total, F32)
        live = j < nvalid
        v[live] = val(gread(src, src_off + (j0 + j[live]) * tok_stride + c[live]))
        swrite(dst, j * dst_j + (c // inner) * dst_inner + c % inner, v)


def split_range(P, b, split, split_len):
    """tpa.cu lines 142-148."""
    ln = P["kv_lens"][b] if P["kv_lens"] is not None else P["M"]
    ln = 0 if ln < 0 else (P["M"] if ln > P["M"] else ln)
    start = split * split_len
    return start, min(start + split_len, ln)



def _row_index(TN, width, step, inner):
    """The staging loops' thread index q -> (token j, element c of its row, rank, feature): q < TN * width
    / step, c = (q - j * cpr) * step, rank = c / inner, feature = c - rank * inner (CUDA integer math)."""
    cpr = width // step
    q = np.arange(TN * cpr)
    j = q // cpr
    c = (q - j * cpr) * step
    r = c // inner
    return j, c, r, c - r * inner


def _gather16(arr, base, tok_stride, j0, j, c, nvalid, name):
    """uint4 loads of 8 16-bit elements at base + (j0 + j) tok_stride + c for live tokens, zeros beyond."""
    raw = np.zeros((j.size, 8), U16)
    live = j < nvalid
    addr = base + (j0 + j[live]) * tok_stride + c[live]
    assert (addr % 8 == 0).all(), f"uint4 load of {name} not 16-byte aligned"
    raw[live] = gread(arr, addr[:, None] + np.arange(8))
    return raw


def _gather1(arr, base, tok_stride, j0, j, c, nvalid, zero):
    """One element per thread at base + (j0 + j) tok_stride + c for live tokens, `zero` beyond."""
    v = np.full(j.size, zero, U16)
    live = j < nvalid
    v[live] = gread(arr, base + (j0 + j[live]) * tok_stride + c[live])
    return v


def tc_block_model(P, cfg, blk, num_splits, split_len, score_scale, out_g, lse_g, scratch):
    """One block (blockIdx.x = blk) of tpa_decode_tc_kernel<T, MT>."""
    bits, val = DT[P["dtype"]]
    H, Rq, Rk, Rv, D, E = (P[x] for x in ("H", "Rq", "Rk", "Rv", "D", "E"))
    st = P["st"]
    L = tc_layout(cfg, H, Rq, Rk)                                                    # line 440
    assert L["total"] == cfg["smem"] <= SMEM_MAX
    sm = Smem(L)
    bq_s, bk_s, bvt_s, W_s = (sm.region(n, U16) for n in ("bq", "bk", "bvt", "W"))   # lines 441-446
    G_s, aq_s, ak_s, av_s, S_s, m_s, l_s, alpha_s = (sm.region(n, F32) for n in
                                                   ("G", "aq", "ak", "av", "S", "m", "l", "alpha"))
    TN, KS, WS, GS, DP = cfg["TN"], cfg["KS"], cfg["WS"], cfg["GS"], cfg["DP"]     # line 447
    lane, gid, tig = _LANE, _GID, _TIG                                               # line 448
    zero = bits(F32(0))[()]                                                          # line 449
    MT = cfg["MT"]

    split, b = blk % num_splits, blk // num_splits                                   # line 451
    start, end = split_range(P, b, split, split_len)                                 # lines 452-453

    # setup, lines 457-474
    bq_off = b * st["bq"][0]
    q = np.arange(cfg["Rq8"] * DP)
    r, d = q // DP, q - (q // DP) * DP
    v = np.full(q.size, zero, U16)
    live = (r < Rq) & (d < D)
    v[live] = gread(P["bq"], bq_off + r[live] * st["bq"][1] + d[live])
    swrite(bq_s, r * KS + d, v)                                                      # bq_s[r KS + d]
    q = np.arange(H * Rq)                                  # stage_aq<T>(aq_s, p, st, b, 0, H, ...), lines 150-160
    h, r = q // Rq, q - (q // Rq) * Rq
    swrite(aq_s, q, (val(gread(P["aq"], b * st["aq"][0] + (0 + h) * st["aq"][1] + r)) * score_scale).astype(F32))
    q = np.arange((cfg["H16"] - H) * WS)
    swrite(W_s, H * WS + q, zero)                                                    # W rows >= H
    q = np.arange((cfg["E8"] - E) * WS)
    swrite(bvt_s, E * WS + q, zero)                                                  # bvt rows >= E
    if DP > D:
        q = np.arange(TN * Rk * (DP - D))
        row, d = q // (DP - D), D + q % (DP - D)
        swrite(bk_s, row * KS + d, zero)                                             # bk columns >= D
    swrite(m_s, np.arange(H), -np.inf)
    swrite(l_s, np.arange(H), 0.0)
    swrite(alpha_s, np.arange(H), 1.0)
    acc = np.zeros((MT, TC_WARPS, 32, 4), F32)                                       # float acc[MT][4] per thread

    akp, bkp = b * st["ak"][0], b * st["bk"][0]                                      # lines 479-482
    avp, bvp = b * st["av"][0], b * st["bv"][0]
    inv_rv = F32(1.0) / F32(Rv)                                                      # line 483
    etiles, mtiles_g, ntiles_g, ksteps_g = cfg["E8"] // 8, TN * Rk // 16, cfg["Rq8"] // 8, DP // 16   # line 484
    ksteps_v, RvE, RkD = TN * Rv // 16, Rv * E, Rk * D                               # line 485
    assert TN * Rk % 16 == 0 and TN * Rv % 16 == 0

    j0 = start
    while j0 < end:                                                                  # line 487
        nvalid = min(TN, end - j0)                                                   # line 488
        # 1. stage, lines 491-521
        stage(ak_s, P["ak"], akp, st["ak"][1], j0, nvalid, TN, H * Rk, H * Rk, cfg["AKJ"], 0,
              P["vec"] & VEC_AK, val)
        stage(av_s, P["av"], avp, st["av"][1], j0, nvalid, TN, H * Rv, H * Rv, cfg["AVJ"], 0,
              P["vec"] & VEC_AV, val)
        # bk rows and the transposed bv: 16-byte loads (lines 493-500, 507-515) or one element per
        # thread (lines 501-505, 516-520); (j, c) = (token, element of its row), (s|t, d|e) = (rank, feature)
        if P["vec"] & VEC_BK:
            j, c, s, d = _row_index(TN, RkD, 8, D)
            raw = _gather16(P["bk"], bkp, st["bk"][1], j0, j, c, nvalid, "bk")
            dst = (j * Rk + s) * KS + d
            assert (dst % 8 == 0).all(), "uint4 store to bk_s not 16-byte aligned"
            swrite(bk_s, dst[:, None] + np.arange(8), raw)
        else:
            j, c, s, d = _row_index(TN, RkD, 1, D)
            swrite(bk_s, (j * Rk + s) * KS + d, _gather1(P["bk"], bkp, st["bk"][1], j0, j, c, nvalid, zero))
        if P["vec"] & VEC_BV:
            j, c, t, e = _row_index(TN, RvE, 8, E)
            raw = _gather16(P["bv"], bvp, st["bv"][1], j0, j, c, nvalid, "bv")
            for u in range(8):
                swrite(bvt_s, (e + u) * WS + j * Rv + t, bits(val(raw[:, u])))     # from_f(raw_f(raw, u)): exact
        else:
            j, c, t, e = _row_index(TN, RvE, 1, E)
            swrite(bvt_s, e * WS + j * Rv + t, _gather1(P["bv"], bvp, st["bv"][1], j0, j, c, nvalid, zero))
        # 2. G on tensor cores, lines 524-539 (mt = warp, warp + 4, ...: every mt once)
        for mt in range(mtiles_g):
            for nt in range(ntiles_g):
                c = np.zeros((32, 4), F32)
                for ks in range(ksteps_g):
                    a = load_a(bk_s, mt * 16 * KS + ks * 16, KS, val)
                    bb = (nt * 8 + gid) * KS + ks * 16 + 2 * tig
                    c = mma(c, a, ld32(bq_s, bb, val), ld32(bq_s, bb + 8, val))
                g = (mt * 16 + gid) * GS + nt * 8 + 2 * tig
                swrite(G_s, np.concatenate([g, g + 1, g + 8 * GS, g + 8 * GS + 1]),
                       np.concatenate([c[:, 0], c[:, 1], c[:, 2], c[:, 3]]))
        # 3. scores, lines 542-556
        q = np.arange(H * TN)
        h = q // TN
        j = q - h * TN
        sc = np.full(q.size, -np.inf, F32)
        live = j < nvalid
        hv, jv = h[live], j[live]
        scv = np.zeros(hv.size, F32)
        for s in range(Rk):
            g = (jv * Rk + s) * GS
            mix = np.zeros(hv.size, F32)
            for r in range(Rq):
                mix = fmaf(sread(aq_s, hv * Rq + r), sread(G_s, g + r), mix)
            scv = fmaf(sread(ak_s, jv * cfg["AKJ"] + hv * Rk + s), mix, scv)
        sc[live] = scv
        swrite(S_s, h * cfg["TNP"] + j, sc)
        # 4. online softmax, one warp per head (h = warp, warp + 4, ...), and the W rows, lines 559-573
        for h in range(H):
            s0 = np.full(32, -np.inf, F32)
            s1 = np.full(32, -np.inf, F32)
            s0[lane < TN] = sread(S_s, h * cfg["TNP"] + lane[lane < TN])
            s1[lane + 32 < TN] = sread(S_s, h * cfg["TNP"] + lane[lane + 32 < TN] + 32)
            # online_softmax_step<2>, lines 166-183
            m_old = m_s[h]
            m_new = np.fmax(m_old, warp_max(np.fmax(s0, s1)))
            m_use = np.where(m_new == -np.inf, F32(0), m_new).astype(F32)
            p0 = exp2f(s0 - m_use)
            p1 = exp2f(s1 - m_use)
            alpha = exp2f(m_old - m_use)
            tot = warp_sum((p0 + p1).astype(F32))
            m_s[h] = m_new[0]                                                        # lane 0
            l_s[h] = fmaf(l_s[h], alpha[0], tot[0])
            alpha_s[h] = alpha[0]
            for u in range(2):
                j = lane + 32 * u
                ok = j < TN
                pw = (p1 if u else p0)[ok]
                for t in range(Rv):
                    w = (pw * sread(av_s, j[ok] * cfg["AVJ"] + h * Rv + t)).astype(F32)   # float32 product
                    swrite(W_s, h * WS + j[ok] * Rv + t, bits(w))                    # from_f<T>: rounded to T
        # 5. acc = alpha acc + W bv on tensor cores; tile k of warp w is t = w + 4 k, lines 577-594
        for w in range(TC_WARPS):
            for k in range(MT):
                t = w + k * TC_WARPS
                if t < cfg["tiles"]:
                    mh, ne = t // etiles, t - (t // etiles) * etiles
                    h0 = mh * 16 + gid
                    h1 = h0 + 8
                    # h0 < H ? alpha_s[h0] : 1.f (the clamp only keeps the vectorized read in range)
                    a0 = np.where(h0 < H, alpha_s[np.minimum(h0, H - 1)], F32(1)).astype(F32)
                    a1 = np.where(h1 < H, alpha_s[np.minimum(h1, H - 1)], F32(1)).astype(F32)
                    acc[k, w, :, 0] *= a0
                    acc[k, w, :, 1] *= a0
                    acc[k, w, :, 2] *= a1
                    acc[k, w, :, 3] *= a1
                    for ks in range(ksteps_v):
                        a = load_a(W_s, mh * 16 * WS + ks * 16, WS, val)
                        bb = (ne * 8 + gid) * WS + ks * 16 + 2 * tig
                        acc[k, w] = mma(acc[k, w], a, ld32(bvt_s, bb, val), ld32(bvt_s, bb + 8, val))
        j0 += TN

    # write, lines 599-625
    for w in range(TC_WARPS):
        for k in range(MT):
            t = w + k * TC_WARPS
            if t >= cfg["tiles"]:
                continue
            mh, ne = t // etiles, t - (t // etiles) * etiles
            for c in range(4):
                h = mh * 16 + gid + (8 if c >= 2 else 0)
                e = ne * 8 + 2 * tig + (c & 1)
                ok = (h < H) & (e < E)
                h, e, a = h[ok], e[ok], acc[k, w, ok, c]
                if num_splits == 1:
                    lv = l_s[h]
                    with np.errstate(divide="ignore"):
                        inv = np.where(lv == 0, F32(0), F32(1) / lv).astype(F32)
                    out_g[b * st["out"][0] + h * st["out"][1] + e] = bits((a * inv_rv).astype(F32) * inv)
                else:
                    scratch[((b * H + h) * num_splits + split) * (E + 2) + 2 + e] = (a * inv_rv).astype(F32)
    for h in range(H):
        m, lv = m_s[h], l_s[h]
        if num_splits == 1:
            with np.errstate(divide="ignore", invalid="ignore"):
                lse_g[b * H + h] = -np.inf if lv == 0 else F32(F32(m + F32(np.log2(lv))) * LN2_F)
        else:
            part = ((b * H + h) * num_splits + split) * (E + 2)
            scratch[part] = m
            scratch[part + 1] = lv


def combine_model(part, num_splits, E, bits):
    """softmax.cuh combine_block<T, COMBINE_THREADS> over one row's partials -> (out bits [E], lse)."""
    NT, W = COMBINE_THREADS, COMBINE_THREADS // 32
    stride = E + 2
    ms, ls = part[0::stride][:num_splits], part[1::stride][:num_splits]
    mx = F32(-np.inf)
    for s in range(num_splits):
        mx = np.fmax(mx, ms[s])
    if np.isnan(ms).any() or np.isnan(ls).any():
        return bits(np.full(E, np.nan, F32)), F32(np.nan)
    tot_t = np.zeros(NT, F32)                          # per thread: s = tid, tid + NT, ...
    if mx != -np.inf:
        for s in range(num_splits):
            if ls[s] != 0:
                tot_t[s % NT] = F32(tot_t[s % NT] + F32(exp2f(ms[s] - mx) * ls[s]))
    total = F32(0)
    for w in range(W):                                 # warp_sum, then the warps in order
        total = F32(total + warp_sum(tot_t[32 * w:32 * w + 32])[0])
    inv = F32(1) / total if total > 0 else F32(0)
    with np.errstate(divide="ignore"):
        lse = F32(F32(mx + F32(np.log2(total))) * LN2_F) if total > 0 else F32(-np.inf)
    o = np.zeros(E, U16)
    for e0 in range(0, E, NT):
        ec = min(E - e0, NT)
        EL = (ec + 31) // 32 * 32
        groups = NT // EL
        red = np.zeros(NT, F32)
        for g in range(groups):
            for e in range(ec):
                sm = F32(0)
                if mx != -np.inf:
                    for s in range(g, num_splits, groups):
                        if ls[s] != 0:
                            sm = F32(sm + F32(exp2f(ms[s] - mx) * part[s * stride + 2 + e0 + e]))
                red[g * EL + e] = sm
        for e in range(ec):
            a = F32(0)
            for k in range(groups):
                a = F32(a + red[k * EL + e])
            o[e0 + e] = bits(F32(a * inv))
    return o, lse


# ---- the launch: lk_tpa_decode_cuda (tensor-core branch) and launch_split ----------------------------

def make_problem(rng, dtype, B, M, H, Rq, Rk, Rv, D, E, kv_lens, cap=None, vec="auto"):
    """Factors rounded to dtype in a cache of `cap` >= M tokens (the kernel reads the [:, :M] view), tokens
    at or past kv_lens[b] NaN in global memory; returns (P for the model, float64 factors for the twin)."""
    bits, val = DT[dtype]
    cap = M if cap is None else cap
    lens = np.full(B, M) if kv_lens is None else np.asarray(kv_lens)
    shapes = dict(aq=(B, H, Rq), bq=(B, Rq, D), ak=(B, cap, H, Rk), bk=(B, cap, Rk, D), av=(B, cap, H, Rv),
                  bv=(B, cap, Rv, E))
    P = dict(dtype=dtype, B=B, M=M, H=H, Rq=Rq, Rk=Rk, Rv=Rv, D=D, E=E,
             kv_lens=None if kv_lens is None else lens, st={})
    host = {}
    for name, shp in shapes.items():
        x = val(bits(rng.standard_normal(shp).astype(F32))).astype(np.float64)
        host[name] = x[:, :M] if name in ("ak", "bk", "av", "bv") else x
        g = bits(x.astype(F32))
        if name in ("ak", "bk", "av", "bv"):
            for b_ in range(B):
                g[b_, lens[b_]:] = bits(F32(np.nan))       # never read: j >= kv_lens[b] is not loaded
            host[name] = np.where(np.arange(M)[None, :, None, None] < lens[:, None, None, None], host[name], 0.0)
        P[name] = g.ravel()
        # (batch, second axis) element strides of the view the kernel reads, 0 for axes of length 1
        # (_cuda_tpa._normalized); the cached factors' batch stride spans `cap` tokens
        full = [int(np.prod(shp[i + 1:])) for i in range(2)]
        view = (B, M) if name in ("ak", "bk", "av", "bv") else shp[:2]
        P["st"][name] = tuple(0 if n == 1 else s for n, s in zip(view, full))
    P["st"]["out"] = (0 if B == 1 else H * E, 0 if H == 1 else E)
    # VEC_* flags, tpa.cu lines 856-861 (allocations are 16-byte aligned)
    hk, hv = H * Rk, H * Rv
    flags = 0
    if vec == "auto":
        if vec_ok(True, *P["st"]["ak"], 0, hk, hk):
            flags |= VEC_AK
        if vec_ok(True, *P["st"]["av"], 0, hv, hv):
            flags |= VEC_AV
        if vec_ok(True, *P["st"]["bk"], 0, Rk * D, D):
            flags |= VEC_BK
        if vec_ok(True, *P["st"]["bv"], 0, Rv * E, E):
            flags |= VEC_BV
    P["vec"] = flags
    return P, host


def tc_decode_model(P, scale, splits=0, num_sms=132):
    """lmkern._cuda_tpa.decode (plan, or `splits` forced) -> lk_tpa_decode_cuda -> launch_split over the
    blocks, then tpa_combine_kernel: (out [B, H, E] as float64 of the dtype's values, lse [B, H] float32,
    num_splits, cfg)."""
    bits, val = DT[P["dtype"]]
    B, M, H, Rq, Rk, E = (P[x] for x in ("B", "M", "H", "Rq", "Rk", "E"))
    cfg = tc_config(P["dtype"], H, Rq, Rk, P["Rv"], P["D"], E)
    assert cfg is not None, "the launcher does not take this shape"
    num_splits = min(int(splits), 4096) if splits > 0 else tc_splits(B, M, cfg["TN"], num_sms)
    split_len = split_len_of(M, num_splits, cfg["TN"])
    score_scale = F32(scale * LOG2E / (float(Rq) * float(Rk)))        # line 728
    # never-written sentinels: NaNs with a payload that no arithmetic produces
    out_g = np.full(B * H * E, UNWRITTEN16, U16)
    lse_g = np.full(B * H, UNWRITTEN32, np.uint32).view(F32)
    scratch = np.full(B * H * num_splits * (E + 2), UNWRITTEN32, np.uint32).view(F32) if num_splits > 1 else None
    for blk in range(B * num_splits):                                 # grid: blocks_per_split (B) x num_splits
        tc_block_model(P, cfg, blk, num_splits, split_len, score_scale, out_g, lse_g, scratch)
    if num_splits > 1:
        assert not (scratch.view(np.uint32) == UNWRITTEN32).any(), "a partial element was never written"
        for row in range(B * H):                                      # tpa_combine_kernel, lines 631-639
            b, h = row // H, row % H
            o, lse_g[row] = combine_model(scratch[row * num_splits * (E + 2):(row + 1) * num_splits * (E + 2)],
                                          num_splits, E, bits)
            out_g[b * P["st"]["out"][0] + h * P["st"]["out"][1] + np.arange(E)] = o
    assert not (out_g == UNWRITTEN16).any(), "an output element was never written"
    assert not (lse_g.view(np.uint32) == UNWRITTEN32).any(), "an lse element was never written"
    return val(out_g).astype(np.float64).reshape(B, H, E), lse_g.reshape(B, H), num_splits, cfg


# ---- tests -----------------------------------------------------------------------------------------------

TOL_OUT = {"float16": 2e-3, "bfloat16": 1.6e-2}   # W and out rounded to the dtype (relative to max(1, |out|))

CASES = [
    # dtype, B, M, H, Rq, Rk, Rv, D, E, kv_lens, splits (0: the plan on 132 SMs), extra
    ("float16", 2, 129, 32, 16, 1, 1, 64, 64, [129, 70], 0, {}),        # T6 decode config, TN 64, MT 4
    ("bfloat16", 2, 129, 32, 16, 1, 1, 64, 64, [129, 70], 0, {}),
    ("bfloat16", 3, 129, 32, 16, 1, 1, 64, 64, [129, 0, 64], 3, {}),    # forced splits, an empty row
    ("float16", 1, 600, 32, 16, 1, 1, 64, 64, None, 0, {}),             # the plan splits: 3
    ("float16", 2, 70, 32, 16, 1, 1, 64, 64, [70, 17], 0, {"vec": "off"}),   # scalar staging paths
    ("bfloat16", 3, 70, 34, 6, 2, 2, 64, 64, [70, 17, 1], 0, {}),       # T6-small, TN 32, MT 8
    ("float16", 2, 129, 34, 6, 2, 2, 64, 64, [129, 2], 0, {}),          # T6-small, plan: 2 splits
    ("bfloat16", 1, 70, 34, 6, 2, 2, 64, 64, None, 5, {}),              # empty trailing splits
    ("float16", 2, 70, 34, 6, 2, 2, 64, 64, [70, 33], 0, {"cap": 80}),   # a cache view: batch stride of 80 tokens
    ("float16", 2, 1, 32, 16, 1, 1, 64, 64, None, 0, {}),               # M = 1
    ("float16", 3, 17, 32, 16, 1, 1, 64, 64, [17, 0, 1], 0, {}),        # one split, an empty row
    ("float16", 2, 0, 3, 2, 1, 1, 8, 8, None, 0, {}),                   # M = 0: no tile at all
    ("bfloat16", 1, 2, 34, 6, 2, 2, 64, 64, None, 2, {}),               # M = 2, a split with no token
    ("float16", 2, 17, 8, 4, 1, 2, 64, 32, [17, 2], 0, {}),             # D != E
    ("bfloat16", 2, 70, 5, 3, 2, 1, 40, 20, [70, 0], 2, {}),            # D, E padded; scalar bv path
    ("float16", 2, 33, 3, 1, 1, 1, 1, 3, [33, 31], 0, {}),              # D = 1, E = 3
    ("bfloat16", 2, 40, 4, 8, 16, 16, 32, 32, [40, 17], 0, {}),         # Rk = Rv = 16: TN 16
    ("float16", 1, 70, 32, 16, 1, 1, 256, 256, None, 2, {}),            # D = E = 256: TN 32, MT 16
    ("bfloat16", 2, 64, 4, 5, 3, 4, 256, 200, [64, 1], 0, {}),          # Rk = 3, E = 200: TN 16
]


def _case_id(c):
    return f"{c[0][:4]}-B{c[1]}-M{c[2]}-H{c[3]}-r{c[4]}.{c[5]}.{c[6]}-D{c[7]}-E{c[8]}-s{c[10]}" + \
        "".join(f"-{k}{v}" for k, v in c[11].items())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_tc_kernel_model_matches_twin(case):
    dtype, B, M, H, Rq, Rk, Rv, D, E, lens, splits, extra = case
    rng = np.random.default_rng(7)
    P, host = make_problem(rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens, **extra)
    out, lse, S, cfg = tc_decode_model(P, D ** -0.5, splits=splits)
    want, want_lse = ref.decode(host["aq"], host["bq"], host["ak"], host["bk"], host["av"], host["bv"],
                                kv_lens=None if lens is None else np.array(lens), return_lse=True)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(lse[fin] - want_lse[fin]).max(initial=0) <= 2e-5 * max(1.0, np.abs(want_lse[fin]).max(initial=0))
    assert (out[~fin] == 0).all()                                         # an empty row: out 0
    err = np.abs(out - want).max()
    assert err <= TOL_OUT[dtype] * max(1.0, np.abs(want).max()), err


def test_cases_cover_the_configurations():
    """The cases reach TN 64 / 32 / 16, MT 4 / 8 / 16, one and several splits, both staging paths."""
    seen = set()
    for dtype, B, M, H, Rq, Rk, Rv, D, E, lens, splits, extra in CASES:
        cfg = tc_config(dtype, H, Rq, Rk, Rv, D, E)
        S = min(splits, 4096) if splits else tc_splits(B, M, cfg["TN"], 132)
        seen |= {("TN", cfg["TN"]), ("MT", cfg["MT"]), ("split", S > 1)}
    assert {("TN", 64), ("TN", 32), ("TN", 16), ("MT", 4), ("MT", 8), ("MT", 16),
            ("split", True), ("split", False)} <= seen


def test_nan_query_head_gives_nan_row_only():
    """A NaN in aq of one head: that head's out and lse are NaN (one split and split+combine); the other
    heads are unaffected (W rows are heads: the NaN row stays in its accumulator rows)."""
    rng = np.random.default_rng(3)
    for splits in (1, 3):
        P, host = make_problem(rng, "float16", 1, 129, 20, 4, 1, 1, 16, 16, None)
        aq = host["aq"].copy()
        aq[0, 5, 2] = np.nan
        P["aq"] = f16_bits(aq.astype(F32)).ravel()
        out, lse, S, _ = tc_decode_model(P, 0.25, splits=splits)
        assert S == splits
        assert np.isnan(out[0, 5]).all() and np.isnan(lse[0, 5])
        keep = [h for h in range(20) if h != 5]
        want, want_lse = ref.decode(aq[:, keep], host["bq"], host["ak"][:, :, keep], host["bk"],
                                    host["av"][:, :, keep], host["bv"], return_lse=True)
        assert np.abs(out[:, keep] - want).max() <= TOL_OUT["float16"] * max(1.0, np.abs(want).max())
        assert np.abs(lse[:, keep] - want_lse).max() <= 2e-5 * max(1.0, np.abs(want_lse).max())


def test_device_kv_lens_are_clamped():
    """split_range clamps device-resident kv_lens to [0, M] (tpa.cu line 145): 10**9 reads M tokens, -5 none."""
    rng = np.random.default_rng(5)
    P, host = make_problem(rng, "bfloat16", 2, 70, 34, 6, 2, 2, 64, 64, [70, 0])
    for splits in (1, 2):
        P["kv_lens"] = np.array([10 ** 9, -5])
        out, lse, _, _ = tc_decode_model(P, 0.125, splits=splits)
        want, want_lse = ref.decode(*(host[x] for x in ("aq", "bq", "ak", "bk", "av", "bv")), kv_lens=np.array([70, 0]),
                                    scale=0.125, return_lse=True)
        assert (out[1] == 0).all() and (lse[1] == -np.inf).all()
        assert np.abs(out - want).max() <= TOL_OUT["bfloat16"] * max(1.0, np.abs(want).max())
        assert np.abs(lse[0] - want_lse[0]).max() <= 2e-5 * max(1.0, np.abs(want_lse[0]).max())


def test_layout_regions_are_disjoint_and_aligned():
    for dtype, B, M, H, Rq, Rk, Rv, D, E, lens, splits, extra in CASES:
        cfg = tc_config(dtype, H, Rq, Rk, Rv, D, E)
        L = tc_layout(cfg, H, Rq, Rk)
        regions = sorted(v for k, v in L.items() if k != "total")
        for (o0, s0), (o1, _) in zip(regions, regions[1:]):
            assert o0 % 16 == 0 and o0 + s0 <= o1
        assert regions[-1][0] + regions[-1][1] <= L["total"] <= SMEM_MAX
        # ld32 / uint4 row strides: KS and WS elements keep 4-byte (16-byte for KS) alignment of rows
        assert (cfg["KS"] * 2) % 16 == 0 and cfg["WS"] % 2 == 0


PLAN_SHAPES = [
    # H, Rq, Rk, Rv, D, E
    (32, 16, 1, 1, 64, 64), (34, 6, 2, 2, 64, 64), (8, 4, 1, 2, 64, 32), (5, 3, 2, 1, 40, 20), (3, 1, 1, 1, 1, 3),
    (4, 8, 16, 16, 32, 32), (32, 16, 1, 1, 256, 256), (4, 5, 3, 4, 256, 200),
    (200, 16, 1, 1, 64, 64),      # 13 x 8 tiles: 26 per warp > 16 -> rejected
    (128, 16, 1, 1, 64, 64),      # 64 tiles: MT 16
    (16, 16, 16, 16, 256, 256),   # no TN fits 96 KiB -> rejected
    (8, 8, 17, 1, 64, 64),        # Rk > 16 -> rejected
    (8, 257, 1, 1, 64, 64),       # Rq > 256 -> rejected
]


@pytest.mark.parametrize("H,Rq,Rk,Rv,D,E", PLAN_SHAPES)
def test_host_plan_matches_compiled_library(H, Rq, Rk, Rv, D, E):
    """tc_config / the split plan of the model against lmkern._cuda.tpa_decode_plan (host code, no GPU)."""
    try:
        from lmkern import _cuda
        plan = _cuda.tpa_decode_plan
    except (ImportError, AttributeError) as exc:   # built without the CUDA extension
        pytest.skip(f"lmkern._cuda unavailable: {exc}")
    for dtype in ("float16", "bfloat16"):
        cfg = tc_config(dtype, H, Rq, Rk, Rv, D, E)
        for B, M in ((1, 1), (1, 256), (1, 257), (1, 600), (2, 129), (3, 5000), (600, 9000), (1, 100000)):
            kw = dict(dtype=dtype, B=B, M=M, H=H, Rq=Rq, Rk=Rk, Rv=Rv, D=D, E=E, aq=1, bq=1, ak=1, bk=1, av=1,
                      bv=1, out=1, num_sms=132, path=3)
            if cfg is None:
                with pytest.raises(ValueError, match="tensor-core"):
                    plan(**kw)
                break
            S = tc_splits(B, M, cfg["TN"], 132)
            assert plan(**kw) == (S, B * H * S * (E + 2) if S > 1 else 0), (B, M)
    assert tc_config("float32", H, Rq, Rk, Rv, D, E) is None
