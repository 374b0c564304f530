"""lmkern.kv against its NumPy twin (lmkern.reference.kv) and against the SPEC's stated properties."""
import numpy as np
import pytest

import lmkern
from lmkern import _core, kv
from lmkern.reference import kv as ref
from lmkern.reference import core as ref_core

from conftest import assert_close, noncontig, randn

FLOATS = [np.float32, np.float64]


@pytest.fixture(params=[True, False], ids=["simd", "generic"])
def simd(request):
    was = _core._set_simd(request.param)
    yield request.param
    _core._set_simd(was)


# ----------------------------------------------------------------------------- quantize / dequantize

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_matches_twin_and_bound(rng, dtype, bits, axis):
    G = 8
    x = randn(rng, (2, 24, 3, 16), dtype) * 3
    x[0, :8, 0, :8] = 1.25                       # a constant group in both layouts
    x_copy = x.copy()
    qt = kv.quantize(x, bits=bits, group_size=G, axis=axis)
    tw = ref.quantize(x, bits=bits, group_size=G, axis=axis)
    np.testing.assert_array_equal(x, x_copy)
    assert qt.codes.dtype == np.uint8 and qt.scale.dtype == np.float32 and qt.zero.dtype == np.float32
    np.testing.assert_array_equal(qt.codes, tw.codes)
    np.testing.assert_array_equal(qt.scale, tw.scale)
    np.testing.assert_array_equal(qt.zero, tw.zero)
    xh = kv.dequantize(qt)
    assert xh.dtype == dtype and xh.shape == x.shape
    np.testing.assert_array_equal(xh, ref.dequantize(tw))
    assert np.isfinite(xh).all()
    rep_axis = 3 if axis == "token" else 1
    s = np.repeat(qt.scale.astype(np.float64), G, axis=rep_axis)
    lo = np.repeat(qt.zero.astype(np.float64), G, axis=rep_axis)
    err = np.abs(x.astype(np.float64) - xh.astype(np.float64))
    ulp = np.finfo(np.float32).eps * np.maximum(np.abs(x), np.abs(lo)) * 2
    assert (err <= s / 2 + ulp).all()
    # group extremes: the minimum exactly, the maximum up to the rounding of (2^bits-1)*scale + zero
    at_min = x.astype(np.float64) == lo
    assert at_min.any()
    np.testing.assert_array_equal(xh[at_min].astype(np.float64), x[at_min].astype(np.float64))
    hi = lo + (2 ** bits - 1) * s
    at_max = np.isclose(x, hi, rtol=1e-6, atol=0) & (s > 0)
    assert at_max.any()
    slack = 4 * np.finfo(np.float32).eps * (np.abs(lo) + np.abs(hi))[at_max]
    assert (np.abs(xh[at_max].astype(np.float64) - x[at_max]) <= slack).all()
    # the constant group: scale 0 and exact
    np.testing.assert_array_equal(xh[0, :8, 0, :8], 1.25)
    assert qt.nbytes == qt.codes.nbytes + qt.scale.nbytes + qt.zero.nbytes


def test_quantize_hand_packed_layout():
    # token axis, 2 bits, one group of 4 features: lo = 0, hi = 3, scale = 1, codes 0, 1, 2, 3
    x = np.array([0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0], np.float32).reshape(1, 1, 1, 8)
    qt = kv.quantize(x, bits=2, group_size=4, axis="token")
    # LSB-first: byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
    assert qt.codes.tolist() == [[[[0b11100100, 0b00011011]]]]
    np.testing.assert_array_equal(qt.scale, [[[[1.0, 1.0]]]])
    # channel axis, 4 bits, 4 tokens of one feature: codes along tokens, two per byte
    y = np.array([0.0, 15.0, 5.0, 10.0], np.float32).reshape(1, 4, 1, 1)
    qc = kv.quantize(y, bits=4, group_size=4, axis="channel")
    assert qc.codes.shape == (1, 2, 1, 1)
    assert qc.codes[0, :, 0, 0].tolist() == [0 | 15 << 4, 5 | 10 << 4]
    np.testing.assert_array_equal(kv.dequantize(qc), y)
    # 8 bits is one code per byte
    q8 = kv.quantize(y, bits=8, group_size=2, axis="channel")
    assert q8.codes[0, :, 0, 0].tolist() == [0, 255, 0, 255]


def test_quantize_round_half_even_and_nan():
    # lo = 0, hi = 3 -> scale 1; 0.5 and 2.5 round to even (0 and 2)
    x = np.array([0.0, 0.5, 2.5, 3.0], np.float32).reshape(1, 1, 1, 4)
    qt = kv.quantize(x, bits=2, group_size=4, axis="token")
    np.testing.assert_array_equal(kv.dequantize(qt).ravel(), [0.0, 0.0, 2.0, 3.0])
    # NaN poisons only its own group, never crashes
    y = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    y[0, 0, 0, 1] = np.nan
    a, b = kv.quantize(y, bits=4, group_size=4, axis="token"), ref.quantize(y, bits=4, group_size=4, axis="token")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    assert np.isnan(kv.dequantize(a)[..., :4]).all() and np.isfinite(kv.dequantize(a)[..., 4:]).all()


def test_quantize_noncontig_float16_zero_sized(rng):
    x = randn(rng, (2, 8, 3, 16))
    qa = kv.quantize(noncontig(x), bits=4, group_size=8, axis="token")
    np.testing.assert_array_equal(qa.codes, kv.quantize(x, bits=4, group_size=8, axis="token").codes)
    qh = kv.quantize(x.astype(np.float16), bits=4, group_size=8, axis="channel")
    assert qh.dtype == np.float32 and kv.dequantize(qh).dtype == np.float32
    for shape, axis in (((2, 0, 3, 16), "channel"), ((0, 8, 3, 16), "token"), ((2, 8, 0, 16), "token"),
                        ((2, 8, 3, 0), "token")):
        qz = kv.quantize(np.zeros(shape, np.float32), bits=2, group_size=4, axis=axis)
        assert kv.dequantize(qz).shape == shape


def test_quantize_errors(rng):
    x = randn(rng, (1, 8, 2, 16))
    for bits in (1, 3, 16, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            kv.quantize(x, bits=bits, group_size=8, axis="token")
    for g in (0, -4, 3, 6):            # 6 is not a multiple of 4 codes per byte at 2 bits
        with pytest.raises(ValueError, match="group_size"):
            kv.quantize(x, bits=2, group_size=g, axis="token")
    with pytest.raises(ValueError, match="group_size"):
        kv.quantize(x, bits=2, group_size=32, axis="token")        # D = 16 % 32
    with pytest.raises(ValueError, match="group_size"):
        kv.quantize(x, bits=2, group_size=16, axis="channel")      # T = 8 % 16
    with pytest.raises(ValueError, match="axis"):
        kv.quantize(x, bits=2, group_size=8, axis="head")
    with pytest.raises(ValueError, match=r"kv.quantize: x has shape \(8, 2, 16\)"):
        kv.quantize(x[0], bits=2, group_size=8, axis="token")
    with pytest.raises(TypeError, match="x"):
        kv.quantize(x.astype(np.int32), bits=2, group_size=8, axis="token")
    with pytest.raises(TypeError, match="qt"):
        kv.dequantize(x)


# ----------------------------------------------------------------------------- the KIVI cache

def _fill(caches, rng, Hkv, D, E, chunks, lengths=None):
    B = caches[0].batch
    for T in chunks:
        k = randn(rng, (B, T, Hkv, D))
        v = randn(rng, (B, T, Hkv, E))
        lens = None if lengths is None else np.minimum(lengths, T)
        for c in caches:
            c.append(k, v, lengths=lens)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_cache_attend_matches_twin(rng, simd, bits, group):
    Hkv, D, E, G, R = 2, 64, 32, 16, 32
    Hq = Hkv * group
    kw = dict(bits=bits, group_size=G, residual=R)
    fast = kv.QuantizedKVCache(3, 300, Hkv, D, E, **kw)
    twin = ref.QuantizedKVCache(3, 300, Hkv, D, E, **kw)
    # rows of different lengths: below the residual, just above it, far above it
    _fill([fast, twin], rng, Hkv, D, E, [20, 1, 45, 130, 3], lengths=np.array([20, 45, 130]))
    assert fast.lengths.tolist() == twin.lengths.tolist()
    assert fast.nbytes == twin.nbytes
    for N in (1, 4):
        q = randn(rng, (3, N, Hq, D))
        q_copy = q.copy()
        out, lse = fast.attend(q, return_lse=True)
        eo, el = twin.attend(q, return_lse=True)
        np.testing.assert_array_equal(q, q_copy)
        assert_close(out, eo, np.float32)
        assert_close(lse, el, np.float32)
        assert_close(fast.attend(noncontig(q)), eo if N == 1 else twin.attend(q), np.float32)
        # non-causal, explicit positions, scale
        qp = np.array([5, 40, 200])[:, None] + np.arange(N)
        assert_close(fast.attend(q, causal=False, scale=0.3), twin.attend(q, causal=False, scale=0.3), np.float32)
        assert_close(fast.attend(q, q_pos=qp), twin.attend(q, q_pos=qp), np.float32)


@pytest.mark.parametrize("G, D, E", [(32, 40, 128), (64, 24, 192), (32, 72, 96), (8, 17 * 8, 40), (16, 48, 80),
                                     (8, 17, 16), (16, 20, 32)])
@pytest.mark.parametrize("bits", [2, 4])
def test_cache_attend_tile_shapes_match_twin(rng, simd, G, D, E, bits):
    """Every tile shape of the SIMD kernel against the twin: one row (MHA decode, whose values run in
    chunks of up to 8 vectors spanning one or several feature groups, with leftover chunks when E is not a
    multiple of the chunk), 2, 3, 5 and 12 rows (tiles of 4, 2 and 1), key features left over after the
    paired steps (odd D / LK_VF) and past the last full vector (D = 17, 20), groups of 8 to 64 tokens.  (The main twin test above uses G = 16 and
    E = 32 only, which never reaches the wide one-row chunks that an MHA decode at G = 32 runs.)"""
    Hkv, R = 2, 2 * G
    kw = dict(bits=bits, group_size=G, residual=R)
    fast = kv.QuantizedKVCache(2, 8 * G, Hkv, D, E, **kw)
    twin = ref.QuantizedKVCache(2, 8 * G, Hkv, D, E, **kw)
    _fill([fast, twin], rng, Hkv, D, E, [5 * G + 3, G - 1], lengths=np.array([6 * G + 2, 3 * G + 1]))
    for group, N in ((1, 1), (1, 2), (3, 1), (5, 1), (4, 3)):
        q = randn(rng, (2, N, Hkv * group, D))
        out, lse = fast.attend(q, return_lse=True)
        eo, el = twin.attend(q, return_lse=True)
        assert_close(out, eo, np.float32, err_msg=f"group {group} N {N}")
        assert_close(lse, el, np.float32, err_msg=f"group {group} N {N}")


@pytest.mark.parametrize("length", [5, 13, 40])
def test_cache_attend_nan_query_gives_nan(rng, simd, length):
    """A NaN (or inf) in a query makes that row's output and lse NaN, as the twin and lmkern.attention
    give: also when every score of a block is NaN (short blocks, the generic path), where the max that
    skips NaN once left the block looking empty and the row came out 0 with lse -inf."""
    kw = dict(bits=2, group_size=8, residual=8)
    fast = kv.QuantizedKVCache(1, 64, 2, 16, 16, **kw)
    twin = ref.QuantizedKVCache(1, 64, 2, 16, 16, **kw)
    _fill([fast, twin], rng, 2, 16, 16, [length])
    q = randn(rng, (1, 2, 4, 16))
    q[0, 0, 1, 3] = np.nan
    q[0, 1, 2, :] = np.inf
    out, lse = fast.attend(q, return_lse=True)
    with np.errstate(invalid="ignore"):
        want, want_lse = twin.attend(q, return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(want_lse))
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
    assert np.isnan(out[0, 1, 2]).all()
    ok = ~np.isnan(want)
    assert_close(out[ok], want[ok], np.float32)


def test_cache_boundary_rule_and_nbytes(rng):
    G, R, D, E, H = 8, 16, 16, 8, 2
    c = kv.QuantizedKVCache(1, 100, H, D, E, bits=2, group_size=G, residual=R)
    for L_target in (5, 16, 17, 23, 24, 25, 40, 41):
        n = L_target - int(c.lengths[0])
        _fill([c], rng, H, D, E, [n])
        L = L_target
        Qk = G * (max(0, L - R) // G)
        Qv = max(0, L - R)
        want = (Qk * H * D // 4 + (Qk // G) * H * D * 8 + (L - Qk) * H * D * 4
                + Qv * H * E // 4 + Qv * H * (E // G) * 8 + (L - Qv) * H * E * 4)
        assert c.nbytes == want, L
    c.reset()
    assert c.nbytes == 0 and c.lengths.tolist() == [0]


def test_cache_streaming_equals_one_shot(rng):
    Hkv, D, E = 2, 32, 32
    kw = dict(bits=2, group_size=16, residual=32)
    k, v = randn(rng, (1, 150, Hkv, D)), randn(rng, (1, 150, Hkv, E))
    one = kv.QuantizedKVCache(1, 150, Hkv, D, E, **kw).append(k, v)
    step = kv.QuantizedKVCache(1, 150, Hkv, D, E, **kw)
    for t in range(150):
        step.append(noncontig(k[:, t:t + 1]), v[:, t:t + 1].astype(np.float64))
    for name in ("_kc", "_ks", "_kz", "_vc", "_vs", "_vz"):
        np.testing.assert_array_equal(getattr(one, name), getattr(step, name), err_msg=name)
    q = randn(rng, (1, 1, 4, D))
    np.testing.assert_array_equal(one.attend(q), step.attend(q))
    # the quantized part is exactly quantize() of the first Qk / Qv tokens (a token is quantized once)
    Qk, Qv = 16 * ((150 - 32) // 16), 150 - 32
    kd = kv.dequantize(kv.quantize(k[:, :Qk], bits=2, group_size=16, axis="channel"))
    vd = kv.dequantize(kv.quantize(v[:, :Qv], bits=2, group_size=16, axis="token"))
    keys = np.concatenate([kd, k[:, Qk:]], axis=1)
    vals = np.concatenate([vd, v[:, Qv:]], axis=1)
    assert_close(step.attend(q), ref_core.attention(q, keys, vals, causal=True), np.float32)


def test_cache_long_context_split(rng):
    # long enough to be split over the cache (several partial states merged by the softmax combine)
    Hkv, D = 1, 32
    c = kv.QuantizedKVCache(1, 3000, Hkv, D, bits=4, group_size=32, residual=128)
    t = ref.QuantizedKVCache(1, 3000, Hkv, D, bits=4, group_size=32, residual=128)
    _fill([c, t], rng, Hkv, D, D, [2049, 1])
    q = randn(rng, (1, 2, 8, D))
    assert_close(c.attend(q), t.attend(q), np.float32)


def test_cache_float64_empty_and_errors(rng):
    c = kv.QuantizedKVCache(2, 64, 2, 16, bits=2, group_size=8, residual=8)
    q = randn(rng, (2, 1, 4, 16), np.float64)
    out, lse = c.attend(q, return_lse=True)            # empty cache: zeros and -inf
    assert out.dtype == np.float64 and not out.any() and np.isneginf(lse).all()
    _fill([c], rng, 2, 16, 16, [30])
    t = ref.QuantizedKVCache(2, 64, 2, 16, bits=2, group_size=8, residual=8)
    _fill([t], np.random.default_rng(1234), 2, 16, 16, [30])
    c2 = kv.QuantizedKVCache(2, 64, 2, 16, bits=2, group_size=8, residual=8)
    _fill([c2], np.random.default_rng(1234), 2, 16, 16, [30])
    assert_close(c2.attend(q), t.attend(q), np.float32)
    assert c.attend(q[:, :0]).shape == (2, 0, 4, 16)
    with pytest.raises(ValueError, match="max_len"):
        c.append(randn(rng, (2, 40, 2, 16)), randn(rng, (2, 40, 2, 16)))
    assert c.lengths.tolist() == [30, 30]               # nothing written
    with pytest.raises(ValueError, match=r"q has shape"):
        c.attend(randn(rng, (2, 1, 4, 8)))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        c.attend(randn(rng, (2, 1, 3, 16)))
    with pytest.raises(ValueError, match="bits"):
        kv.QuantizedKVCache(1, 8, 1, 16, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        kv.QuantizedKVCache(1, 8, 1, 16, bits=2, group_size=6)
    with pytest.raises(ValueError, match="residual"):
        kv.QuantizedKVCache(1, 8, 1, 32, bits=2, group_size=16, residual=24)
    with pytest.raises(ValueError, match="v_head_dim"):
        kv.QuantizedKVCache(1, 8, 1, 32, 24, bits=2, group_size=16, residual=32)


# ----------------------------------------------------------------------------- attention mass

@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_attention_mass_matches_twin(rng, simd, reduce, normalize):
    B, N, M, Hq, Hkv, D = 2, 5, 131, 6, 3, 24
    q, k = randn(rng, (B, N, Hq, D)), randn(rng, (B, M, Hkv, D))
    qc, kc = q.copy(), k.copy()
    for causal in (False, True):
        kw = dict(causal=causal, normalize=normalize, group_reduce=reduce, kv_lens=[M, 70])
        got = kv.attention_mass(q, k, **kw)
        assert got.dtype == np.float32
        assert got.shape == (B, M, Hq if reduce == "none" else Hkv)
        assert_close(got, ref.attention_mass(q, k, **kw), np.float32)
        assert not got[1, 70:].any()                                    # keys past kv_lens get nothing
    np.testing.assert_array_equal(q, qc)
    np.testing.assert_array_equal(k, kc)
    if normalize and reduce == "sum":
        # every query distributes a total mass of 1 over its admissible keys
        tot = kv.attention_mass(q, k, group_reduce="sum").sum(axis=1)
        assert_close(tot, np.full_like(tot, N * (Hq // Hkv)), np.float32)


@pytest.mark.parametrize("where", ["q", "k", "k_inf"])
def test_attention_mass_nan_row_is_nan_on_its_admissible_keys(rng, simd, where):
    # a NaN score (or a +inf one) makes its query row's softmax NaN, as torch.softmax: the row puts NaN
    # on every key it may see and nothing on the keys it may not (the causal mask keeps them clean)
    N, M, Hq, Hkv, D = 3, 150, 4, 2, 16
    q, k = randn(rng, (1, N, Hq, D)), randn(rng, (1, M, Hkv, D))
    if where == "q":
        q[0, 0, 1, 3] = np.nan            # query row 0 (position M - N) of head 1
    elif where == "k":
        k[0, 40, 0, 5] = np.nan           # key 40 of KV head 0: every row of heads 0, 1 sees it
    else:
        k[0, 40, 0] = np.where(q[0, :, 0].sum(axis=0) >= 0, np.inf, -np.inf)   # a +inf score for head 0, row 0
    for causal in (False, True):
        for reduce in ("none", "mean", "max"):
            got = kv.attention_mass(q, k, causal=causal, group_reduce=reduce)
            want = ref.attention_mass(q, k, causal=causal, group_reduce=reduce)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            assert_close(np.nan_to_num(got), np.nan_to_num(want), np.float32)
            assert np.isnan(got).any()
    got = kv.attention_mass(q, k, causal=True, group_reduce="none")
    if where == "q":   # row 0 sees keys 0 .. M - N: NaN there, the other heads and the last keys clean
        assert np.isnan(got[0, :M - N + 1, 1]).all() and not np.isnan(got[0, M - N + 1:, 1]).any()
        assert not np.isnan(got[0, :, [0, 2, 3]]).any()


def test_attention_mass_short_cache_split_over_heads(rng, simd):
    """B = 1 and a few keys: work is split over KV heads so two threads share it (a mutation that gave
    every thread the first head passed the suite)."""
    was = lmkern.get_num_threads()
    try:
        lmkern.set_num_threads(2)
        for B, M, Hq, Hkv in ((1, 20, 4, 2), (1, 32, 8, 4), (1, 5, 6, 3), (2, 20, 4, 2)):
            q, k = randn(rng, (B, 3, Hq, 16)), randn(rng, (B, M, Hkv, 16))
            for reduce in ("mean", "none"):
                assert_close(kv.attention_mass(q, k, group_reduce=reduce), ref.attention_mass(q, k, group_reduce=reduce),
                             np.float32)
    finally:
        lmkern.set_num_threads(was)


def test_attention_mass_nan_query_with_one_admissible_key(rng, simd):
    """Causal N = M = 40: query 0 sees key 0 only; a NaN in it makes its row NaN on key 0, also when the
    rest of its chunk is masked (the chunk's NaN check once missed that case)."""
    N = M = 40
    q, k = randn(rng, (1, N, 4, 16)), randn(rng, (1, M, 2, 16))
    q[0, 0, 1, :] = np.nan
    got = kv.attention_mass(q, k, causal=True, group_reduce="none")
    want = ref.attention_mass(q, k, causal=True, group_reduce="none")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 0, 1])
    assert_close(np.nan_to_num(got), np.nan_to_num(want), np.float32)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 8), (1, 3, 2049, 8, 1, 16), (2, 2, 0, 2, 2, 8), (1, 0, 5, 4, 2, 8)])
def test_attention_mass_shapes_positions_float64(rng, shape):
    B, N, M, Hq, Hkv, D = shape
    q, k = randn(rng, (B, N, Hq, D), np.float64), randn(rng, (B, M, Hkv, D), np.float64)
    qp = rng.integers(0, max(M, 1), (B, N))
    kp = rng.permutation(max(M, 1))[:M]
    kw = dict(causal=True, q_pos=qp, kv_pos=kp, group_reduce="max")
    assert_close(kv.attention_mass(noncontig(q), k, **kw), ref.attention_mass(q, k, **kw), np.float32)


def test_attention_mass_errors(rng):
    q, k = randn(rng, (1, 2, 4, 8)), randn(rng, (1, 9, 2, 8))
    with pytest.raises(ValueError, match="group_reduce"):
        kv.attention_mass(q, k, group_reduce="median")
    with pytest.raises(ValueError, match=r"k has shape"):
        kv.attention_mass(q, randn(rng, (1, 9, 2, 4)))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kv.attention_mass(randn(rng, (1, 2, 3, 8)), k)
    with pytest.raises(ValueError, match="kv_lens"):
        kv.attention_mass(q, k, kv_lens=[10])
    with pytest.raises(TypeError, match="q"):
        kv.attention_mass(q.astype(int), k)


# ----------------------------------------------------------------------------- pooling and selection

@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ks", [1, 3, 5, 7])
def test_pool1d(rng, mode, ks):
    s = randn(rng, (2, 6, 3), np.float64)
    got = kv.pool1d(s, ks, mode=mode)
    assert_close(got, ref.pool1d(s, ks, mode=mode), np.float64)
    r = ks // 2
    if mode == "avg":       # edges count the padding as zeros
        np.testing.assert_allclose(got[:, 0], s[:, :r + 1].sum(axis=1) / ks)
    else:                   # edges ignore the padding
        np.testing.assert_allclose(got[:, 0], s[:, :r + 1].max(axis=1))
    torch = pytest.importorskip("torch")
    tp = torch.nn.functional.avg_pool1d if mode == "avg" else torch.nn.functional.max_pool1d
    want = tp(torch.from_numpy(s).permute(0, 2, 1), ks, stride=1, padding=r).permute(0, 2, 1).numpy()
    assert_close(got, want, np.float64)


def test_pool1d_errors(rng):
    s = randn(rng, (1, 5, 2))
    for ks in (0, 2, -1):
        with pytest.raises(ValueError, match="kernel_size"):
            kv.pool1d(s, ks)
    with pytest.raises(ValueError, match="mode"):
        kv.pool1d(s, 3, mode="sum")
    assert kv.pool1d(np.zeros((1, 0, 2), np.float32), 3).shape == (1, 0, 2)


def test_keep_topk_rules():
    s = np.array([5, 1, 7, 7, np.nan, 7, 0, 2, -np.inf, 3], np.float64).reshape(1, 10, 1)
    # ties go to the lower position; NaN ranks below -inf
    assert kv.keep_topk(s, 3)[0, :, 0].tolist() == [2, 3, 5]
    assert kv.keep_topk(s, 9)[0, :, 0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    # sink and recent are always kept, the rest by score
    assert kv.keep_topk(s, 4, sink=1, recent=2)[0, :, 0].tolist() == [0, 2, 8, 9]
    # budget >= M keeps everything
    assert kv.keep_topk(s, 50)[0, :, 0].tolist() == list(range(10))
    with pytest.raises(ValueError, match="sink"):
        kv.keep_topk(s, 3, sink=2, recent=2)
    with pytest.raises(ValueError, match="budget"):
        kv.keep_topk(s, -1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_keep_topk_matches_twin(rng, dtype):
    s = np.round(randn(rng, (2, 300, 5), dtype), 1)        # many ties
    s[0, ::7, 1] = np.nan
    for budget, sink, recent in ((40, 4, 8), (0, 0, 0), (299, 0, 299), (301, 3, 3)):
        got = kv.keep_topk(noncontig(s.transpose(0, 2, 1).copy()).transpose(0, 2, 1), budget, sink=sink, recent=recent)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref.keep_topk(s, budget, sink=sink, recent=recent))


def test_compact(rng):
    x = randn(rng, (2, 20, 3, 5), np.float64)
    idx = kv.keep_topk(randn(rng, (2, 20, 3)), 7)
    got = kv.compact(x, idx)
    np.testing.assert_array_equal(got, ref.compact(x, idx))
    assert got.shape == (2, 7, 3, 5) and got.dtype == np.float64
    np.testing.assert_array_equal(got[1, :, 2], x[1, idx[1, :, 2], 2])
    codes = rng.integers(0, 255, (2, 20, 3, 4)).astype(np.uint8)       # any dtype: it copies rows
    np.testing.assert_array_equal(kv.compact(codes, idx), ref.compact(codes, idx))
    with pytest.raises(ValueError, match="idx"):
        kv.compact(x, idx + 20)
    with pytest.raises(ValueError, match=r"idx has shape"):
        kv.compact(x, idx[:, :, :2])
    assert kv.compact(x, idx[:, :0]).shape == (2, 0, 3, 5)


def test_streaming_indices():
    assert kv.streaming_indices(10, sink=2, recent=3).tolist() == [0, 1, 7, 8, 9]
    assert kv.streaming_indices(4, sink=2, recent=3).tolist() == [0, 1, 2, 3]
    assert kv.streaming_indices(0, recent=3).tolist() == []
    with pytest.raises(ValueError, match="recent"):
        kv.streaming_indices(5, recent=-1)


# ----------------------------------------------------------------------------- recipes

def test_recipes_match_twins(rng):
    q, k = randn(rng, (2, 8, 4, 16)), randn(rng, (2, 120, 2, 16))
    got = kv.snapkv_select(q, k, 40)
    np.testing.assert_array_equal(got, ref.snapkv_select(q, k, 40))
    assert got.shape == (2, 40, 2) and (got[:, -8:] == np.arange(112, 120)[None, :, None]).all()
    assert kv.snapkv_select(q, k, 500).shape == (2, 120, 2)
    with pytest.raises(ValueError, match="budget"):
        kv.snapkv_select(q, k, 4)
    mass = kv.attention_mass(q, k, causal=False)
    np.testing.assert_array_equal(kv.h2o_select(mass, 30, recent=10), ref.h2o_select(mass, 30, recent=10))
    lr = kv.lazy_ratio(mass, sink=4, recent=16)
    assert_close(lr, ref.lazy_ratio(mass, sink=4, recent=16), np.float32)
    assert lr.shape == (2, 2) and ((lr > 0) & (lr < 1)).all()
    assert kv.scalekv_budgets(8, [0, 1], per_layer=100, max_budget=250).tolist() == [250, 250] + [50] * 6
    b = kv.scalekv_budgets(5, [4], per_layer=10, max_budget=20)
    assert b.sum() == 50 and b[4] == 20 and b.tolist() == [8, 8, 7, 7, 20]
    with pytest.raises(ValueError, match="max_budget"):
        kv.scalekv_budgets(2, [0, 1], per_layer=10, max_budget=20)


def test_snapkv_keeps_planted_tokens(rng):
    # keys the window queries align with must survive a 25% budget
    M, D = 400, 32
    k = randn(rng, (1, M, 1, D)) * 0.3
    q = randn(rng, (1, 16, 2, D)) * 0.3
    planted = np.array([37, 150, 151, 290])
    k[0, planted, 0] = q[0, :, 0].mean(axis=0) * 12
    idx = kv.snapkv_select(q, k, 100)
    assert set(planted.tolist()) <= set(idx[0, :, 0].tolist())


def test_reproducible_and_thread_counts(rng):
    c = kv.QuantizedKVCache(1, 1200, 2, 32, bits=2, group_size=32, residual=64)
    _fill([c], rng, 2, 32, 32, [1100])
    q, k = randn(rng, (1, 3, 8, 32)), randn(rng, (1, 900, 2, 32))
    was = lmkern.get_num_threads()
    try:
        a1, a2 = c.attend(q), c.attend(q)
        m1, m2 = kv.attention_mass(q, k, causal=True), kv.attention_mass(q, k, causal=True)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(m1, m2)
        lmkern.set_num_threads(1)
        assert_close(c.attend(q), a1, np.float32)
        assert_close(kv.attention_mass(q, k, causal=True), m1, np.float32)
    finally:
        lmkern.set_num_threads(was)


def test_quantized_cache_default_q_pos_is_attention_default(rng):
    """q_pos=None means L_b - N + i (SPEC 1.3's rule, shared with lmkern.KVCache), even after custom positions."""
    c = kv.QuantizedKVCache(2, 64, 1, 32, bits=4, group_size=32, residual=32)
    k = randn(rng, (2, 40, 1, 32))
    pos = np.stack([np.arange(40) * 3, np.arange(40) + 7])
    c.append(k, k, positions=pos, lengths=[40, 33])
    q = randn(rng, (2, 3, 2, 32))
    want_pos = c.lengths[:, None] - 3 + np.arange(3)
    np.testing.assert_array_equal(c.attend(q), c.attend(q, q_pos=want_pos))
    assert not np.allclose(c.attend(q), c.attend(q, q_pos=pos[:, 30:33]))


def test_cache_attend_masked_nonfinite_values_never_leak(rng, simd):
    """A token a query's causal position hides adds nothing to it, even where its full-precision value
    (or the scale of its quantized value) is inf or NaN; the rows that see it get IEEE's inf / NaN."""
    B, Hkv, Hq, D, L = 1, 2, 4, 32, 70
    k, v = randn(rng, (B, L, Hkv, D)), randn(rng, (B, L, Hkv, D))
    v[0, 3, 1, 5] = np.inf          # quantized (per-token groups: that group's scale becomes inf)
    v[0, L - 2:] = np.inf           # the residual
    v[0, L - 1, 0, 2] = np.nan
    for G, R in ((32, 32), (8, 8)):
        fast = kv.QuantizedKVCache(B, 128, Hkv, D, D, bits=2, group_size=G, residual=R)
        twin = ref.QuantizedKVCache(B, 128, Hkv, D, D, bits=2, group_size=G, residual=R)
        fast.append(k, v)
        twin.append(k, v)
        q = randn(rng, (B, 3, Hq, D))
        for q_pos in ([1, 2, L - 3], [L - 3, L - 2, L - 1], [0, 1, 2]):
            got = fast.attend(q, q_pos=q_pos)
            want = twin.attend(q, q_pos=q_pos)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
            assert_close(np.where(np.isfinite(got), got, 0), np.where(np.isfinite(want), want, 0))
        assert np.all(np.isfinite(fast.attend(q, q_pos=[0, 1, 2])))



def test_cache_attend_nonfinite_scan_and_nan_block_edges(rng, simd):
    """Two edges of a block of G tokens: an inf value in the block's last token, masked for the query
    (the scan for masked non-finite values must reach it), and a NaN key that is the block's only
    admissible one (every other score is masked: the NaN must still make the row NaN)."""
    kw = dict(bits=2, group_size=8, residual=8)
    k, v = randn(rng, (1, 24, 1, 16)), randn(rng, (1, 24, 1, 16))
    v[0, 23] = np.inf
    fast, twin = kv.QuantizedKVCache(1, 24, 1, 16, **kw), ref.QuantizedKVCache(1, 24, 1, 16, **kw)
    fast.append(k, v)
    twin.append(k, v)
    q = randn(rng, (1, 1, 1, 16))
    got = fast.attend(q, q_pos=[22])
    assert np.all(np.isfinite(got))
    assert_close(got, twin.attend(q, q_pos=[22]), np.float32)
    # one residual block; positions make token 3 the only key query position 5 may see
    k, v = randn(rng, (1, 8, 1, 16)), randn(rng, (1, 8, 1, 16))
    k[0, 3, 0, 0] = np.nan
    pos = np.array([[100, 100, 100, 5, 100, 100, 100, 100]])
    fast, twin = kv.QuantizedKVCache(1, 8, 1, 16, **kw), ref.QuantizedKVCache(1, 8, 1, 16, **kw)
    fast.append(k, v, positions=pos)
    twin.append(k, v, positions=pos)
    got, lse = fast.attend(q, q_pos=[5], return_lse=True)
    with np.errstate(invalid="ignore"):
        want, want_lse = twin.attend(q, q_pos=[5], return_lse=True)
    assert np.isnan(want).all() and np.isnan(got).all() and np.isnan(lse).all() and np.isnan(want_lse).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_float64_rounding_stays_in_range(rng, axis, bits):
    """float64 data in a very narrow group (1000 + [0, 1e-4)): the float32 zero and scale round, so the
    quotient (x - zero) / scale runs slightly below 0 and above 2^bits - 1; codes are clipped to the range
    (never spilling into the neighbouring code's bits) and equal the twin's."""
    x = 1000 + rng.uniform(0, 1e-4, (1, 8, 2, 16))
    qt, tw = kv.quantize(x, bits=bits, group_size=8, axis=axis), ref.quantize(x, bits=bits, group_size=8, axis=axis)
    np.testing.assert_array_equal(qt.codes, tw.codes)
    per = 8 // bits
    codes = (qt.codes[..., None] >> (bits * np.arange(per))) & ((1 << bits) - 1)
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1
    np.testing.assert_array_equal(kv.dequantize(qt), ref.dequantize(tw))


def test_keep_topk_many_nans_in_the_budget():
    """Budgets that take some of many NaN scores but not all: the NaNs rank below every number and
    among themselves by position (an ordering that compared NaN with NaN misplaced numbers too)."""
    s = np.array([3, np.nan, 1, np.nan, np.nan, 2, np.nan, 0.5, np.nan, np.nan], np.float32).reshape(1, 10, 1)
    for K in range(1, 11):
        got = kv.keep_topk(s, K)
        np.testing.assert_array_equal(got, ref.keep_topk(s, K), err_msg=f"K={K}")
    # K = 6: the four numbers, then the NaNs at the lowest positions (1, 3); indices ascending
    assert kv.keep_topk(s, 6)[0, :, 0].tolist() == [0, 1, 2, 3, 5, 7]


def test_cache_sizes_are_integers_and_hand_built_tensors_are_checked():
    for make in (lambda **kw: lmkern.KVCache(**kw), lambda **kw: kv.QuantizedKVCache(**kw)):
        with pytest.raises(TypeError, match="batch must be a non-negative integer; got float 1.5"):
            make(batch=1.5, max_len=4, kv_heads=1, head_dim=32)
        with pytest.raises(ValueError, match="v_head_dim must be a non-negative integer; got -1"):
            make(batch=1, max_len=4, kv_heads=1, head_dim=32, v_head_dim=-1)
    with pytest.raises(TypeError, match="tpa.KVCache: k_rank must be a non-negative integer"):
        lmkern.tpa.KVCache(1, 4, 1, 2.0, 1, 4)
    qt = kv.quantize(np.zeros((1, 4, 1, 8), np.float32), bits=2, group_size=4, axis="token")
    from lmkern._kvbase import QuantizedTensor
    for bits, g, axis, msg in ((0, 4, "token", "bits"), (2, 0, "token", "group_size"), (2, 4, "x", "axis")):
        bad = QuantizedTensor(qt.codes, qt.scale, qt.zero, bits=bits, group_size=g, axis=axis, shape=qt.shape,
                              dtype=qt.dtype)
        with pytest.raises(ValueError, match=f"kv.dequantize: {msg}"):
            kv.dequantize(bad)


def test_compact_object_arrays_count_references():
    """Python objects are gathered by NumPy (the kernel copies raw bytes, which for objects would leave the
    result pointing at freed lists: found by fuzzing)."""
    import gc
    import sys
    x = np.empty((1, 3, 1, 1), object)
    for i in range(3):
        x[0, i, 0, 0] = [i] * 1000
    before = sys.getrefcount(x[0, 2, 0, 0])
    out = kv.compact(x, np.array([[[2], [0]]]))
    assert sys.getrefcount(x[0, 2, 0, 0]) > before     # out holds a reference of its own
    del x
    gc.collect()
    assert out.shape == (1, 2, 1, 1) and out[0, 0, 0, 0] == [2] * 1000 and out[0, 1, 0, 0] == [0] * 1000
