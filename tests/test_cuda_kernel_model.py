"""Lane-level NumPy models of the CUDA attention kernels, checked against the reference twin.

The CUDA kernels cannot run on machines without a GPU, so their index arithmetic is checked here:
``mma_kernel_model`` transcribes ``attn_mma_kernel`` (kernels/cuda/attention.cu) statement by
statement at the level of the 32 lanes of each warp - shared-memory staging with zero padding, the
fragment loads (``qa``, ``kb``, ``vb`` offsets) fed to an ``mma.sync.m16n8k16`` model built from the
PTX ISA fragment tables (A: rows gid / gid+8, cols 2*tig(+1) / +8; B: rows 2*tig(+1) / +8, col gid;
C: rows gid / gid+8, cols 2*tig(+1)), masking, quad reductions, online softmax, P re-packed as the
A operand of P V, and the epilogue.  ``tile_kernel_model`` does the same for ``attn_tile_kernel``
(float32 prefill), ``warp_kernel_model`` for ``attn_warp_kernel``, the split plan
(``lk_attention_cuda_splits``, ``split_len_of``) and ``attn_combine_kernel``.
When a kernel changes, change its model with it.
"""
import numpy as np
import pytest

from lmkern.reference import core as ref

# ---- attn_mma_kernel ----

BM = BN = 64; NT = 8; VTS = BN + 8; WARPS = 4

def mma(c, a, b0, b1):
    # c: [32][4] floats, a: [32][4] pairs, b0/b1: [32] pairs -> per PTX layout
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        ae = [a[lane][i // 2][i % 2] for i in range(8)]
        for i in range(8):
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = ae[i]
        be = [b0[lane][0], b0[lane][1], b1[lane][0], b1[lane][1]]
        for i in range(4):
            B[t * 2 + (i & 1) + (8 if i >= 2 else 0), g] = be[i]
        for i in range(4):
            C[g + (8 if i >= 2 else 0), t * 2 + (i & 1)] = c[lane][i]
    D = A @ B + C
    out = np.zeros((32, 4))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            out[lane][i] = D[g + (8 if i >= 2 else 0), t * 2 + (i & 1)]
    return out

def mma_kernel_model(q, k, v, causal, scale, q_pos, kv_pos, kv_lens, pk=None, pv=None, prows=1):
    B, N, Hq, D = q.shape; M, Hkv, E = k.shape[1], k.shape[2], v.shape[3]
    L = 0 if pk is None else pk.shape[1]
    DP, EP = (D + 15) // 16 * 16, (E + 15) // 16 * 16; QS = DP + 8
    out = np.full((B, N, Hq, E), np.nan); lse = np.full((B, N, Hq), np.nan)
    sl2 = scale * 1.4426950408889634
    nmb = (N + BM - 1) // BM
    def row_len(b):
        l = M if kv_lens is None else kv_lens[b]; return min(max(l, 0), M)
    def qposf(b, i, ln):
        if q_pos is None: return ln - N + i
        return q_pos[i] if q_pos.ndim == 1 else q_pos[b, i]
    def kvposf(b, j):
        if kv_pos is None: return j
        return kv_pos[j] if kv_pos.ndim == 1 else kv_pos[b, j]
    def key_row(b, g, jj):
        return pk[b // prows, jj, g] if jj < L else k[b, jj - L, g]
    def val_row(b, g, jj):
        return pv[b // prows, jj, g] if jj < L else v[b, jj - L, g]
    for blk in range(nmb * Hq * B):
        mb, h, b = nmb - 1 - blk % nmb, (blk // nmb) % Hq, blk // (nmb * Hq)
        g = h // (Hq // Hkv); i0 = mb * BM; valid_q = min(N - i0, BM); ln = row_len(b)
        q_s = np.zeros(BM * QS)
        for r in range(valid_q):
            q_s[r * QS: r * QS + D] = q[b, i0 + r, h]
        qpos_s = [qposf(b, i0 + r, ln) if r < valid_q else 0 for r in range(BM)]
        qmax = max(qpos_s[:valid_q])
        real = ln
        if causal and kv_pos is None:
            real = 0 if qmax < 0 else (qmax + 1 if qmax < ln else ln)
        end = L + real
        st = [dict(m0=-np.inf, m1=-np.inf, l0=np.zeros(32), l1=np.zeros(32), acc=np.zeros((EP // 8, 32, 4)))
              for _ in range(WARPS)]
        for kt in range(0, end, BN):
            valid_k = min(end - kt, BN)
            k_s = np.zeros(BN * QS); vt_s = np.zeros(EP * VTS); kvp_s = [0] * BN
            for r in range(valid_k):
                k_s[r * QS: r * QS + D] = key_row(b, g, kt + r)
                vv = val_row(b, g, kt + r)
                for e in range(E): vt_s[e * VTS + r] = vv[e]
                if kt + r >= L: kvp_s[r] = kvposf(b, kt + r - L)
            for w in range(WARPS):
                wr = w * 16
                if not (i0 + wr < N): continue
                S = st[w]
                s = np.zeros((NT, 32, 4))
                for ks in range(DP // 16):
                    a = []
                    for lane in range(32):
                        gid, tig = lane >> 2, lane & 3
                        qa = (wr + gid) * QS + ks * 16 + 2 * tig
                        a.append([(q_s[qa], q_s[qa + 1]), (q_s[qa + 8 * QS], q_s[qa + 8 * QS + 1]),
                                  (q_s[qa + 8], q_s[qa + 9]), (q_s[qa + 8 * QS + 8], q_s[qa + 8 * QS + 9])])
                    for nt in range(NT):
                        b0, b1 = [], []
                        for lane in range(32):
                            gid, tig = lane >> 2, lane & 3
                            kb = (nt * 8 + gid) * QS + ks * 16 + 2 * tig
                            b0.append((k_s[kb], k_s[kb + 1])); b1.append((k_s[kb + 8], k_s[kb + 9]))
                        s[nt] = mma(s[nt], a, b0, b1)
                mx0 = np.full(32, -np.inf); mx1 = np.full(32, -np.inf)
                for lane in range(32):
                    gid, tig = lane >> 2, lane & 3
                    qp0, qp1 = qpos_s[wr + gid], qpos_s[wr + gid + 8]
                    for nt in range(NT):
                        for c in range(4):
                            kl = nt * 8 + 2 * tig + (c & 1); jj = kt + kl
                            ok = kl < valid_k
                            if ok and causal and jj >= L: ok = kvp_s[kl] <= (qp0 if c < 2 else qp1)
                            s[nt, lane, c] = s[nt, lane, c] * sl2 if ok else -np.inf
                        mx0[lane] = max(mx0[lane], s[nt, lane, 0], s[nt, lane, 1])
                        mx1[lane] = max(mx1[lane], s[nt, lane, 2], s[nt, lane, 3])
                # quad reduce
                mx0 = np.array([max(mx0[(l // 4) * 4:(l // 4) * 4 + 4]) for l in range(32)])
                mx1 = np.array([max(mx1[(l // 4) * 4:(l // 4) * 4 + 4]) for l in range(32)])
                m0 = S["m0"]; m1 = S["m1"]  # uniform per row: keep arrays per lane
                m0 = np.broadcast_to(m0, (32,)).copy(); m1 = np.broadcast_to(m1, (32,)).copy()
                mn0 = np.maximum(m0, mx0); mn1 = np.maximum(m1, mx1)
                b0_ = np.where(mn0 == -np.inf, 0, mn0); b1_ = np.where(mn1 == -np.inf, 0, mn1)
                corr0 = np.exp2(m0 - b0_); corr1 = np.exp2(m1 - b1_)
                s[:, :, 0] = np.exp2(s[:, :, 0] - b0_); s[:, :, 1] = np.exp2(s[:, :, 1] - b0_)
                s[:, :, 2] = np.exp2(s[:, :, 2] - b1_); s[:, :, 3] = np.exp2(s[:, :, 3] - b1_)
                rs0 = (s[:, :, 0] + s[:, :, 1]).sum(0); rs1 = (s[:, :, 2] + s[:, :, 3]).sum(0)
                S["l0"] = S["l0"] * corr0 + rs0; S["l1"] = S["l1"] * corr1 + rs1
                S["m0"], S["m1"] = mn0, mn1
                S["acc"][:, :, 0] *= corr0; S["acc"][:, :, 1] *= corr0
                S["acc"][:, :, 2] *= corr1; S["acc"][:, :, 3] *= corr1
                P = _rnd16(s)  # packed to f16
                for kk in range(BN // 16):
                    a = [[(P[2 * kk, l, 0], P[2 * kk, l, 1]), (P[2 * kk, l, 2], P[2 * kk, l, 3]),
                          (P[2 * kk + 1, l, 0], P[2 * kk + 1, l, 1]), (P[2 * kk + 1, l, 2], P[2 * kk + 1, l, 3])]
                         for l in range(32)]
                    for et in range(EP // 8):
                        b0, b1 = [], []
                        for lane in range(32):
                            gid, tig = lane >> 2, lane & 3
                            vb = (et * 8 + gid) * VTS + kk * 16 + 2 * tig
                            b0.append((vt_s[vb], vt_s[vb + 1])); b1.append((vt_s[vb + 8], vt_s[vb + 9]))
                        S["acc"][et] = mma(S["acc"][et], a, b0, b1)
        for w in range(WARPS):
            wr = w * 16
            if not (i0 + wr < N): continue
            S = st[w]
            m0 = np.broadcast_to(S["m0"], (32,)); m1 = np.broadcast_to(S["m1"], (32,))
            l0 = np.array([S["l0"][(l // 4) * 4:(l // 4) * 4 + 4].sum() for l in range(32)])
            l1 = np.array([S["l1"][(l // 4) * 4:(l // 4) * 4 + 4].sum() for l in range(32)])
            for lane in range(32):
                gid, tig = lane >> 2, lane & 3
                ia, ib = i0 + wr + gid, i0 + wr + gid + 8
                inv0 = 1 / l0[lane] if l0[lane] > 0 else 0; inv1 = 1 / l1[lane] if l1[lane] > 0 else 0
                for et in range(EP // 8):
                    e = et * 8 + 2 * tig
                    for (ii, inv, c0) in ((ia, inv0, 0), (ib, inv1, 2)):
                        if ii < N:
                            if e < E: out[b, ii, h, e] = S["acc"][et, lane, c0] * inv
                            if e + 1 < E: out[b, ii, h, e + 1] = S["acc"][et, lane, c0 + 1] * inv
                if tig == 0:
                    if ia < N: lse[b, ia, h] = (m0[lane] + np.log2(l0[lane])) * np.log(2) if l0[lane] > 0 else -np.inf
                    if ib < N: lse[b, ib, h] = (m1[lane] + np.log2(l1[lane])) * np.log(2) if l1[lane] > 0 else -np.inf
    return out, lse


# ---- attn_warp_kernel, split plan, attn_combine_kernel ----

def splits_of(B, N, Hq, M, L, sms):
    rows, total = B * N * Hq, L + M
    if rows <= 0 or total <= 512: return 1
    target = sms * 32
    s = (target + rows - 1) // rows
    s = min(s, (total + 255) // 256, 128)
    return max(s, 1)

def split_len_of(M, L, S):
    per = (L + M + S - 1) // S
    return (per + 31) // 32 * 32

def warp_kernel_model(q, k, v, causal, scale, q_pos, kv_pos, kv_lens, pk, pv, prows, S):
    B, N, Hq, D = q.shape; M, Hkv, E = k.shape[1], k.shape[2], v.shape[3]
    L = 0 if pk is None else pk.shape[1]
    sl2 = scale * 1.4426950408889634
    split_len = split_len_of(M, L, S)
    scratch = np.full(B * N * Hq * S * (E + 2), np.nan)
    out = np.full((B, N, Hq, E), np.nan); lse = np.full((B, N, Hq), np.nan)
    rows = B * N * Hq
    for task in range(rows * S):
        row, split = task % rows, task // rows
        h, i, b = row % Hq, (row // Hq) % N, row // (Hq * N)
        g = h // (Hq // Hkv)
        qs = q[b, i, h] * sl2
        ln = M if kv_lens is None else min(max(kv_lens[b], 0), M)
        qp = (ln - N + i) if q_pos is None else (q_pos[i] if q_pos.ndim == 1 else q_pos[b, i])
        real = ln
        if causal and kv_pos is None: real = 0 if qp < 0 else (qp + 1 if qp < ln else ln)
        end = L + real
        lo = split * split_len; hi = min(lo + split_len, end)
        m, l, acc = -np.inf, 0.0, np.zeros(E)
        for base in range(lo, hi, 32):
            s = np.full(32, -np.inf)
            for lane in range(32):
                jj = base + lane
                if jj < hi:
                    ok = True
                    if jj >= L and causal:
                        j = jj - L
                        kp = j if kv_pos is None else (kv_pos[j] if kv_pos.ndim == 1 else kv_pos[b, j])
                        ok = kp <= qp
                    if ok:
                        kr = pk[b // prows, jj, g] if jj < L else k[b, jj - L, g]
                        s[lane] = qs @ kr
            cmax = np.fmax.reduce(s); m_new = max(m, cmax)      # fmaxf: NaN scores do not set the max
            ref = 0.0 if m_new == -np.inf else m_new
            corr = 0.0 if m == -np.inf else np.exp2(m - ref)
            with np.errstate(invalid="ignore"):
                pj = np.where(s == -np.inf, 0, np.exp2(s - ref))
            l = l * corr + pj.sum(); m = m_new; acc *= corr
            for kk in range(min(hi - base, 32)):
                if pj[kk] == 0: continue
                jj = base + kk
                vr = pv[b // prows, jj, g] if jj < L else v[b, jj - L, g]
                acc += pj[kk] * vr
        if S == 1:
            out[b, i, h] = acc * (0 if l == 0 else 1 / l)
            lse[b, i, h] = -np.inf if l == 0 else (m + np.log2(l)) * np.log(2)
        else:
            o = (row * S + split) * (E + 2)
            scratch[o] = m; scratch[o + 1] = l; scratch[o + 2:o + 2 + E] = acc
    if S > 1:
        for row in range(rows):
            h, i, b = row % Hq, (row // Hq) % N, row // (Hq * N)
            part = scratch[row * S * (E + 2):(row + 1) * S * (E + 2)].reshape(S, E + 2)
            assert not np.isnan(part[:, 0]).any()            # m is an fmaxf: never NaN
            if np.isnan(part[:, 1]).any():                   # softmax.cuh combine_row: NaN in, NaN out
                out[b, i, h] = np.nan; lse[b, i, h] = np.nan
                continue
            mx = part[:, 0].max()
            total = 0.0; o = np.zeros(E)
            if mx != -np.inf:
                for s_ in range(S):
                    if part[s_, 1] != 0:
                        w = np.exp2(part[s_, 0] - mx); total += w * part[s_, 1]; o += w * part[s_, 2:]
            out[b, i, h] = o * (1 / total if total > 0 else 0)
            lse[b, i, h] = (mx + np.log2(total)) * np.log(2) if total > 0 else -np.inf
    return out, lse



def _rnd16(x):
    return np.asarray(x, np.float16).astype(np.float64)


MMA_CASES = [
    # B, N, M, Hq, Hkv, D, E, causal, kwargs
    (1, 20, 70, 2, 1, 24, 40, True, {}),                                   # D, E not multiples of 16
    (2, 17, 30, 2, 2, 16, 8, False, {"kv_lens": np.array([30, 0])}),       # an empty row
    (1, 70, 130, 1, 1, 72, 20, True, {}),                                  # 2 row blocks, 3 key tiles
    (1, 18, 21, 1, 1, 32, 32, True, {"q_pos": np.arange(18)[::-1].copy(), "kv_pos": np.arange(21) * 2}),
    (2, 16, 9, 2, 1, 8, 8, True, {"P": 2, "Lp": 5}),                        # ParScale prefix
    (1, 16, 5, 1, 1, 16, 16, True, {"kv_lens": np.array([3])}),            # early rows see no key
]


@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,E,causal,kw", MMA_CASES)
def test_mma_kernel_model(B, N, M, Hq, Hkv, D, E, causal, kw):
    rng = np.random.default_rng(0)
    kw = dict(kw)
    P, Lp = kw.pop("P", None), kw.pop("Lp", 0)
    q, k, v = (_rnd16(rng.standard_normal(s)) for s in ((B, N, Hq, D), (B, M, Hkv, D), (B, M, Hkv, E)))
    pk = pv = None
    if P:
        pk, pv = _rnd16(rng.standard_normal((P, Lp, Hkv, D))), _rnd16(rng.standard_normal((P, Lp, Hkv, E)))
    o, lse = mma_kernel_model(q, k, v, causal, D ** -0.5, kw.get("q_pos"), kw.get("kv_pos"), kw.get("kv_lens"),
                              pk, pv, B // P if P else 1)
    want, want_lse = ref.attention(q, k, v, causal=causal, return_lse=True, prefix_k=pk, prefix_v=pv, **kw)
    assert not np.isnan(o).any() and not np.isnan(lse).any()  # every output written
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(o - want).max() < 3e-3                           # P is rounded to f16 for P V
    assert np.abs(lse[fin] - want_lse[fin]).max() < 1e-9


WARP_CASES = [
    (1, 1, 2049, 2, 1, 8, 12, True, {}),
    (2, 1, 1500, 2, 2, 8, 8, True, {"kv_lens": np.array([1500, 0])}),
    (1, 3, 1200, 1, 1, 8, 8, True, {"kv_pos": np.arange(1200)[::-1].copy(), "q_pos": np.array([5, 600, 1199])}),
    (2, 1, 700, 1, 1, 4, 4, False, {"P": 2, "Lp": 300}),
    (1, 2, 40, 2, 1, 4, 4, True, {"q_pos": np.array([-3, 2])}),
]


@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,E,causal,kw", WARP_CASES)
def test_warp_kernel_model(B, N, M, Hq, Hkv, D, E, causal, kw):
    rng = np.random.default_rng(1)
    kw = dict(kw)
    P, Lp = kw.pop("P", None), kw.pop("Lp", 0)
    q, k, v = (rng.standard_normal(s) for s in ((B, N, Hq, D), (B, M, Hkv, D), (B, M, Hkv, E)))
    pk = pv = None
    if P:
        pk, pv = rng.standard_normal((P, Lp, Hkv, D)), rng.standard_normal((P, Lp, Hkv, E))
    S = splits_of(B, N, Hq, M, Lp, 132)
    assert (S > 1) == (B * N * Hq < 132 * 32 and Lp + M > 512)
    o, lse = warp_kernel_model(q, k, v, causal, D ** -0.5, kw.get("q_pos"), kw.get("kv_pos"), kw.get("kv_lens"),
                               pk, pv, B // P if P else 1, S)
    want, want_lse = ref.attention(q, k, v, causal=causal, return_lse=True, prefix_k=pk, prefix_v=pv, **kw)
    assert not np.isnan(o).any()
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(o - want).max() < 1e-12
    assert np.abs(lse[fin] - want_lse[fin]).max() < 1e-12


@pytest.mark.parametrize("M", [40, 2049])   # one split, several splits
def test_warp_kernel_model_nan_query_gives_nan(M):
    """A NaN query row gives NaN out and lse (SPEC 0), on the single-split and the split+combine paths;
    the other rows are unaffected."""
    rng = np.random.default_rng(2)
    B, N, Hq, Hkv, D, E = 1, 1, 2, 1, 8, 8
    q, k, v = (rng.standard_normal(s) for s in ((B, N, Hq, D), (B, M, Hkv, D), (B, M, Hkv, E)))
    q[0, 0, 1, 3] = np.nan
    S = splits_of(B, N, Hq, M, 0, 132)
    assert (S > 1) == (M > 512)
    o, lse = warp_kernel_model(q, k, v, True, D ** -0.5, None, None, None, None, None, 1, S)
    assert np.isnan(o[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    want, want_lse = ref.attention(q[:, :, :1], k, v, causal=True, return_lse=True)
    assert np.abs(o[:, :, :1] - want).max() < 1e-12 and np.abs(lse[:, :, :1] - want_lse).max() < 1e-12


# ---- attn_tile_kernel (float32 prefill) ----

T_WARPS, T_ROWS, T_BN = 4, 8, 32
T_BM = T_WARPS * T_ROWS


def tile_kernel_model(q, k, v, causal, scale, q_pos, kv_pos, kv_lens, pk, pv, prows):
    B, N, Hq, D = q.shape
    M, Hkv, E = k.shape[1], k.shape[2], v.shape[3]
    L = 0 if pk is None else pk.shape[1]
    KS = D if D % 2 else D + 1
    sl2 = scale * 1.4426950408889634
    out = np.full((B, N, Hq, E), np.nan)
    lse = np.full((B, N, Hq), np.nan)
    nmb = (N + T_BM - 1) // T_BM
    for blk in range(nmb * Hq * B):
        mb, h, b = nmb - 1 - blk % nmb, (blk // nmb) % Hq, blk // (nmb * Hq)
        g, i0 = h // (Hq // Hkv), mb * T_BM
        valid_q = min(N - i0, T_BM)
        ln = M if kv_lens is None else min(max(kv_lens[b], 0), M)
        q_s = np.zeros(T_BM * D)
        for idx in range(T_BM * D):
            r, d = idx // D, idx % D
            q_s[idx] = q[b, i0 + r, h, d] * sl2 if r < valid_q else 0
        def qposf(i):
            if q_pos is None:
                return ln - N + i
            return q_pos[i] if q_pos.ndim == 1 else q_pos[b, i]
        qpos_s = [qposf(i0 + r) if r < valid_q else 0 for r in range(T_BM)]
        qmax = max(qpos_s[:valid_q])
        real = ln
        if causal and kv_pos is None:
            real = 0 if qmax < 0 else (qmax + 1 if qmax < ln else ln)
        end = L + real
        st = [dict(m=np.full(T_ROWS, -np.inf), l=np.zeros(T_ROWS), acc=np.zeros((T_ROWS, E)))
              for _ in range(T_WARPS)]
        for kt in range(0, end, T_BN):
            valid_k = min(end - kt, T_BN)
            k_s = np.zeros(T_BN * KS)
            v_s = np.zeros(T_BN * E)
            kvp_s = [0] * T_BN
            for r in range(valid_k):
                jj = kt + r
                kr = pk[b // prows, jj, g] if jj < L else k[b, jj - L, g]
                vr = pv[b // prows, jj, g] if jj < L else v[b, jj - L, g]
                k_s[r * KS: r * KS + D] = kr
                v_s[r * E: r * E + E] = vr
                if jj >= L:
                    j = jj - L
                    kvp_s[r] = j if kv_pos is None else (kv_pos[j] if kv_pos.ndim == 1 else kv_pos[b, j])
            for w in range(T_WARPS):
                wr = w * T_ROWS
                if not wr < valid_q:
                    continue
                S = st[w]
                s = np.zeros((T_ROWS, 32))                      # [row][lane]
                for lane in range(32):
                    for d in range(D):
                        kd = k_s[lane * KS + d]
                        for r in range(T_ROWS):
                            s[r, lane] += q_s[(wr + r) * D + d] * kd
                for r in range(T_ROWS):
                    for lane in range(32):
                        ok = lane < valid_k and (not (causal and kt + lane >= L) or kvp_s[lane] <= qpos_s[wr + r])
                        s[r, lane] = s[r, lane] if ok else -np.inf
                    m_new = max(S["m"][r], s[r].max())
                    base = 0.0 if m_new == -np.inf else m_new
                    corr = np.exp2(S["m"][r] - base)
                    s[r] = np.exp2(s[r] - base)
                    S["l"][r] = S["l"][r] * corr + s[r].sum()
                    S["m"][r] = m_new
                    S["acc"][r] *= corr
                for kk in range(valid_k):
                    for r in range(T_ROWS):
                        S["acc"][r] += s[r, kk] * v_s[kk * E: kk * E + E]
        for w in range(T_WARPS):
            wr = w * T_ROWS
            if not wr < valid_q:
                continue
            S = st[w]
            for r in range(T_ROWS):
                i = i0 + wr + r
                if i >= N:
                    continue
                lr = S["l"][r]
                out[b, i, h] = S["acc"][r] * (1 / lr if lr > 0 else 0)
                lse[b, i, h] = (S["m"][r] + np.log2(lr)) * np.log(2) if lr > 0 else -np.inf
    return out, lse


TILE_CASES = [
    (1, 40, 70, 2, 1, 7, 5, True, {}),                                     # 2 row blocks, odd D
    (2, 16, 33, 2, 2, 8, 8, False, {"kv_lens": np.array([33, 0])}),
    (1, 20, 21, 1, 1, 6, 6, True, {"q_pos": np.arange(20)[::-1].copy(), "kv_pos": np.arange(21) * 2}),
    (2, 17, 9, 2, 1, 4, 4, True, {"P": 2, "Lp": 40}),
]


@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,E,causal,kw", TILE_CASES)
def test_tile_kernel_model(B, N, M, Hq, Hkv, D, E, causal, kw):
    rng = np.random.default_rng(2)
    kw = dict(kw)
    P, Lp = kw.pop("P", None), kw.pop("Lp", 0)
    q, k, v = (rng.standard_normal(s) for s in ((B, N, Hq, D), (B, M, Hkv, D), (B, M, Hkv, E)))
    pk = pv = None
    if P:
        pk, pv = rng.standard_normal((P, Lp, Hkv, D)), rng.standard_normal((P, Lp, Hkv, E))
    o, lse = tile_kernel_model(q, k, v, causal, D ** -0.5, kw.get("q_pos"), kw.get("kv_pos"), kw.get("kv_lens"),
                               pk, pv, B // P if P else 1)
    want, want_lse = ref.attention(q, k, v, causal=causal, return_lse=True, prefix_k=pk, prefix_v=pv, **kw)
    assert not np.isnan(o).any()
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    assert np.abs(o - want).max() < 1e-12
    assert np.abs(lse[fin] - want_lse[fin]).max() < 1e-12
