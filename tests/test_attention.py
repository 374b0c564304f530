"""Core kernels (SPEC 1): lmkern.attention, rope / rope_, KVCache against their NumPy twins."""
import gc
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import lmkern
from lmkern import _core
from lmkern import reference as ref
from conftest import assert_close, noncontig, randn


def make_qkv(rng, B, N, M, Hq, Hkv, D, E=None, dtype=np.float32):
    E = D if E is None else E
    return (randn(rng, (B, N, Hq, D), dtype), randn(rng, (B, M, Hkv, D), dtype), randn(rng, (B, M, Hkv, E), dtype))


def check_attention(q, k, v, dtype=None, tol=None, **kw):
    """Kernel vs twin for out and lse, with inputs unchanged after the call."""
    copies = [np.array(x, copy=True) for x in (q, k, v)]
    out, lse = lmkern.attention(q, k, v, return_lse=True, **kw)
    want, want_lse = ref.core.attention(q, k, v, return_lse=True, **kw)
    assert out.dtype == want.dtype and lse.dtype == want_lse.dtype
    assert_close(out, want, dtype, tol)
    assert_close(lse, want_lse, dtype, tol)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(np.asarray(x), c)
    return out, lse


@pytest.fixture(params=[True, False], ids=["simd", "generic"])
def simd(request):
    prev = _core._set_simd(request.param)
    yield request.param
    _core._set_simd(prev)


# ------------------------------------------------------------------------------------------
# attention: shapes, masks, dtypes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Hq,Hkv", [(48, 6), (47, 47), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_heads_prefill(rng, Hq, Hkv, causal, dtype, simd):
    q, k, v = make_qkv(rng, 2, 37, 75, Hq, Hkv, 24, 20, dtype)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("M", [0, 1, 2047, 2049])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_key_lengths(rng, M, causal, dtype, simd):
    # big M with few heads: decode (N = 1, split keys) and a short prefill block (tiles)
    for N, Hq, Hkv in ((1, 4, 2), (70, 2, 1)):
        q, k, v = make_qkv(rng, 1, N, M, Hq, Hkv, 16, 24, dtype)
        check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_d_ne_e_and_odd_features(rng, dtype, simd):
    for D, E in ((17, 33), (64, 3), (1, 1), (130, 70)):
        q, k, v = make_qkv(rng, 2, 40, 90, 4, 2, D, E, dtype)
        check_attention(q, k, v, causal=True)
        check_attention(q[:, :1], k, v, causal=True)


@pytest.mark.parametrize("N", [1, 3, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ragged_kv_lens(rng, N, dtype, simd):
    q, k, v = make_qkv(rng, 4, N, 150, 6, 3, 16, dtype=dtype)
    for causal in (False, True):
        check_attention(q, k, v, causal=causal, kv_lens=np.array([0, 1, 149, 65], np.int32))
        check_attention(q, k, v, causal=causal, kv_lens=[150, 64, 63, 129])


@pytest.mark.parametrize("N", [1, 5, 80])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_explicit_positions_with_gaps(rng, N, dtype, simd):
    B, M = 2, 140
    q, k, v = make_qkv(rng, B, N, M, 8, 2, 16, 12, dtype)
    kv_pos_1 = np.cumsum(rng.integers(1, 4, M))                       # increasing with gaps
    kv_pos_2 = np.stack([rng.permutation(3 * M)[:M] for _ in range(B)])  # arbitrary order
    q_pos_1 = np.sort(rng.integers(0, 3 * M, N)).astype(np.int16)
    q_pos_2 = rng.integers(-5, 3 * M, (B, N))
    for qp in (q_pos_1, q_pos_2, None):
        for kp in (kv_pos_1, kv_pos_2, None):
            check_attention(q, k, v, causal=True, q_pos=qp, kv_pos=kp, kv_lens=[M, M - 7])
    # positions do not matter without causal
    a = lmkern.attention(q, k, v, q_pos=q_pos_2, kv_pos=kv_pos_2)
    np.testing.assert_array_equal(a, lmkern.attention(q, k, v))


def test_extreme_positions(rng, simd):
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for N in (1, 70):
        q, k, v = make_qkv(rng, 2, N, 130, 4, 2, 16)
        q_pos = np.where(np.arange(N) % 2, big, small)
        check_attention(q, k, v, causal=True, q_pos=q_pos)
        kv_pos = np.where(np.arange(130) % 3, small, big)
        check_attention(q, k, v, causal=True, q_pos=q_pos, kv_pos=kv_pos)
        check_attention(q, k, v, causal=True, q_pos=np.full(N, big), kv_pos=np.full(130, big))


def test_no_admissible_key_gives_zero_and_neg_inf(rng, simd):
    q, k, v = make_qkv(rng, 2, 6, 50, 4, 2, 8)
    out, lse = lmkern.attention(q, k, v, causal=True, q_pos=np.full(6, -1), kv_lens=[50, 0], return_lse=True)
    assert np.all(out == 0) and np.all(lse == -np.inf)
    out, lse = lmkern.attention(q, k, v, return_lse=True, kv_lens=[0, 3])
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf) and np.all(np.isfinite(lse[1]))


def test_scale_and_float64_precision(rng, simd):
    q, k, v = make_qkv(rng, 1, 33, 80, 4, 4, 32, dtype=np.float64)
    check_attention(q, k, v, scale=0.37, causal=True)
    check_attention(q, k, v, scale=0.0)


def test_dtype_promotion(rng, simd):
    q, k, v = make_qkv(rng, 1, 9, 20, 4, 2, 8)
    out = lmkern.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert out.dtype == np.float32
    assert_close(out, ref.core.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)))
    out = lmkern.attention(q, k.astype(np.float64), v)
    assert out.dtype == np.float64
    assert_close(out, ref.core.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_inputs(rng, dtype, simd):
    q, k, v = make_qkv(rng, 2, 40, 70, 8, 2, 16, 12, dtype)
    want = ref.core.attention(q, k, v, causal=True)
    assert_close(lmkern.attention(noncontig(q), noncontig(k), noncontig(v), causal=True), want)
    # transposed (B, H, T, D) storage, as torch users hold it
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert_close(lmkern.attention(qt, kt, v[:, ::-1][:, ::-1], causal=True), want)


def test_out_argument(rng, simd):
    q, k, v = make_qkv(rng, 2, 30, 50, 4, 2, 16, 8)
    want = ref.core.attention(q, k, v, causal=True)
    out = np.full((2, 30, 4, 8), np.nan, np.float32)
    res = lmkern.attention(q, k, v, causal=True, out=out)
    assert res is out
    assert_close(out, want)
    big = np.full((2, 30, 4, 16), 7.0, np.float32)
    view = big[..., ::2]
    res = lmkern.attention(q, k, v, causal=True, out=view)
    assert res is view
    assert_close(view, want)
    assert np.all(big[..., 1::2] == 7.0)
    out, lse = lmkern.attention(q, k, v, out=np.empty((2, 30, 4, 8), np.float32), return_lse=True)
    assert lse.shape == (2, 30, 4)
    with pytest.raises(ValueError, match="out"):
        lmkern.attention(q, k, v, out=np.empty((2, 30, 4, 9), np.float32))


def test_zero_sized(rng, simd):
    for B, N, Hq, Hkv in ((0, 5, 4, 2), (2, 0, 4, 2), (2, 5, 0, 0)):
        q, k, v = make_qkv(rng, B, N, 7, Hq, Hkv, 8, 6)
        out, lse = lmkern.attention(q, k, v, causal=True, return_lse=True)
        assert out.shape == (B, N, Hq, 6) and lse.shape == (B, N, Hq)
    q, k, v = make_qkv(rng, 1, 3, 0, 4, 2, 8, 0)
    out, lse = lmkern.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 3, 4, 0) and np.all(lse == -np.inf)
    # no features: D = 0 gives uniform weights (scale defaults to 1), E = 0 only lse
    for N in (1, 70):
        for D, E in ((0, 8), (8, 0), (0, 0)):
            check_attention(*make_qkv(rng, 2, N, 100, 4, 2, D, E), causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate(rng, dtype, simd):
    q, k, v = make_qkv(rng, 1, 70, 130, 4, 2, 16, dtype=dtype)
    q[0, 5, 1, 3] = np.nan
    v[0, 10, 0, 2] = np.inf
    out, lse = lmkern.attention(q, k, v, return_lse=True)
    want, want_lse = ref.core.attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(want_lse))
    assert np.all(np.isnan(out[0, 5, 1])) and np.isnan(lse[0, 5, 1])
    assert np.isinf(out[0, 0, 0, 2]) and not np.isnan(out[0, 0, 0, 2])
    # decode path too
    out1 = lmkern.attention(q[:, 5:6], k, v)
    assert np.all(np.isnan(out1[0, 0, 1])) and np.all(np.isfinite(out1[0, 0, 2:, :2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_nonfinite_values_never_leak(rng, dtype, simd):
    """A key the causal mask hides from a query adds nothing to it, even where its key or value is inf or
    NaN (0 * inf would be NaN); the rows that admit it get what IEEE arithmetic gives.  Keys beyond
    kv_lens likewise, in the kernel and in the twin.  Decode (split keys) and prefill (tiles)."""
    for N, M in ((4, 8), (1, 8), (70, 130), (1, 300), (3, 300)):
        q, k, v = make_qkv(rng, 2, N, M, 4, 2, 16, dtype=dtype)
        kd, vd = k.copy(), v.copy()
        kd[:, M - 3:, 0] = np.inf
        vd[:, M - 3:] = np.inf
        vd[0, M - 2, 1, 3] = np.nan
        q_pos = np.arange(N) + (M - 4 - N)                 # every query sees keys < M - 4 only
        want = lmkern.attention(q, k[:, :M - 4], v[:, :M - 4], causal=True, q_pos=q_pos)
        for kp in (None, np.arange(M)):
            got = lmkern.attention(q, kd, vd, causal=True, q_pos=q_pos, kv_pos=kp)
            assert np.all(np.isfinite(got))
            assert_close(got, want)
            assert_close(ref.core.attention(q, kd, vd, causal=True, q_pos=q_pos, kv_pos=kp), want)
        # beyond kv_lens
        lens = [M - 4, M - 3]
        got = lmkern.attention(q, kd, vd, kv_lens=lens)
        twin = ref.core.attention(q, kd, vd, kv_lens=lens)
        assert np.all(np.isfinite(got[0])) and np.all(np.isfinite(twin[0]))
        assert_close(got[:1], lmkern.attention(q[:1], k[:1, :M - 4], v[:1, :M - 4]))
        assert_close(twin, got)
        # rows that admit the dirty keys get inf / NaN, the others stay exact
        q_pos = np.linspace(M - 6, M - 1, N).astype(np.int64)
        got = lmkern.attention(q, k, vd, causal=True, q_pos=q_pos)
        twin = ref.core.attention(q, k, vd, causal=True, q_pos=q_pos)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(twin))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(twin))
        seen = q_pos >= M - 3
        assert np.all(np.isfinite(got[:, ~seen])) and not np.any(np.isfinite(got[:, seen]))
        assert_close(np.where(np.isfinite(got), got, 0), np.where(np.isfinite(twin), twin, 0))


@pytest.mark.parametrize("N,Hq,Hkv", [(1, 3, 1), (3, 2, 2), (1, 5, 1), (5, 2, 2), (1, 6, 2), (2, 7, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_row_tiles(rng, N, Hq, Hkv, dtype, simd):
    """The split-keys decode path with N * (Hq / Hkv) = 3, 5, 3, 7, 14 rows per KV head: its P.V step has
    a micro-kernel per row count, and rows of 3 and 5 (and tails after tiles of 4) were never compared with
    the twin (a mutation that gave 3 rows the 2-row kernel passed the suite)."""
    q, k, v = make_qkv(rng, 2, N, 100, Hq, Hkv, 16, 16, dtype)
    for causal in (False, True):
        check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_nonfinite_values_in_feature_tails_and_later_subchunks(rng, dtype, simd):
    """Masked keys with inf values add nothing (see the test above) also where the inf sits in the value
    features past the last full vector (E = 13), and where it sits in the second sub-chunk of 16 keys of a
    decode block (M = 60, keys 53..59 masked): both were unchecked paths of the exact P.V step."""
    for N, M, E, bad, last in ((1, 40, 13, (31, 12), 30), (40, 40, 13, (39, 12), None), (1, 60, 16, (55, slice(None)), 52)):
        q, k, v = make_qkv(rng, 2, N, M, 4, 2, 16, E, dtype)
        vd = v.copy()
        vd[:, bad[0], :, bad[1]] = np.inf
        q_pos = None if last is None else np.full((2, N), last)
        for kp in (None, np.arange(M)):
            got = lmkern.attention(q, k, vd, causal=True, q_pos=q_pos, kv_pos=kp)
            want = ref.core.attention(q, k, vd, causal=True, q_pos=q_pos, kv_pos=kp)
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
            assert_close(np.where(np.isfinite(got), got, 0), np.where(np.isfinite(want), want, 0))
            if last is not None:     # every query is before the bad key: exact and finite
                assert np.all(np.isfinite(got))
                assert_close(got, lmkern.attention(q, k[:, :last + 1], v[:, :last + 1], causal=True, q_pos=q_pos))
            else:                    # only the last query sees key 39
                assert np.all(np.isfinite(got[:, :-1])) and not np.all(np.isfinite(got[:, -1]))


def test_prefill_over_several_passes_of_transposed_keys(rng):
    """Prefill copies transposed keys for as many batch rows as fit in 64 MiB per pass; here each pass
    holds one row (float64, M = 16500, D = 256: 34 MB per row), so row 1's key-block position ranges come
    from the second pass (an index into them that ignored the pass passed every other test).  The causal
    queries sit early (positions 1000..1127), so most key blocks are skipped by those ranges."""
    q, k, v = make_qkv(rng, 2, 128, 16500, 1, 1, 256, 8, np.float64)
    q_pos = np.arange(128) + 1000
    check_attention(q, k, v, causal=True, q_pos=q_pos)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_spanning_the_exp_range(rng, dtype, simd):
    """Scores below their row's max by 0 to 200 (float64: 0 to 800): the softmax exponentials cover
    e^0 .. e^-200, across the float32 underflow at e^-87.3 (weights there are 0, or tiny normals just
    above it; float64: e^-708), in prefill, decode and the tpa / KIVI / attention_mass kernels that share
    lk_vf_exp_softmax (float64 attention: lk_vd_exp_softmax)."""
    B, N, M, Hq, Hkv, D = 1, 5, 300, 4, 2, 16
    q, k, v = make_qkv(rng, B, N, M, Hq, Hkv, D, dtype=dtype)
    # scores s_j = scale <q, k_j> with q = e_0 / scale: s_j = k_j[0], spread over [-200, 0]
    q[...] = 0
    q[..., 0] = np.sqrt(D)
    k[..., 0] = -np.linspace(0, 200 if dtype == np.float32 else 800, M)[None, :, None]
    for qq in (q, q[:, -1:]):
        out, lse = lmkern.attention(qq, k, v, return_lse=True)
        want, want_lse = ref.core.attention(qq, k, v, return_lse=True)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
        assert_close(out, want)
        assert_close(lse, want_lse)
    mass = lmkern.kv.attention_mass(q, k)
    assert_close(mass, lmkern.reference.kv.attention_mass(q, k))
    assert np.all(mass[0, -10:] == 0) or np.all(mass[0, -10:] < 1e-30)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_twins_raise_the_kernels_errors(rng):
    """The NumPy twins check their arguments by the same rules, with the same messages."""
    import lmkern.reference as R
    q, k = np.zeros((2, 3, 3, 4), np.float32), np.zeros((2, 5, 1, 4), np.float32)
    z = np.zeros
    calls = [
        ("attention", dict(q=q, k=k, v=k, kv_lens=[9, 9])),
        ("attention", dict(q=q, k=z((2, 5, 2, 4)), v=z((2, 5, 2, 4)))),
        ("attention", dict(q=q, k=k[..., :2], v=k)),
        ("attention", dict(q=q, k=k, v=k, q_pos=z((3, 3), np.int64))),
        ("attention", dict(q=q, k=k, v=k, out=z((2, 3, 3, 5), np.float32))),
        ("rope", dict(x=q, positions=np.arange(3), style="x")),
        ("rope", dict(x=q, positions=np.arange(3), rotary_dim=3)),
        ("rope", dict(x=q, positions=np.arange(4))),
        ("parscale.prefix_attention", dict(q=z((3, 1, 1, 4)), k=z((3, 2, 1, 4)), v=z((3, 2, 1, 4)),
                                           prefix_k=z((2, 1, 1, 4)), prefix_v=z((2, 1, 1, 4)))),
        ("tpa.decode", dict(aq=z((1, 2, 3)), bq=z((1, 3, 4)), ak=z((1, 5, 2, 1)), bk=z((1, 5, 1, 5)),
                            av=z((1, 5, 2, 1)), bv=z((1, 5, 1, 4)))),
        ("tpa.attention", dict(aq=z((1, 1, 2, 3)), bq=z((1, 1, 3, 5)), ak=z((1, 5, 2, 1)), bk=z((1, 5, 1, 5)),
                               av=z((1, 5, 2, 1)), bv=z((1, 5, 1, 4)), kv_lens=[6])),
        ("tpa.materialize", dict(a=z((2, 3)), b=z((2, 4)))),
    ]
    for name, kw in calls:
        mod, _, f = name.rpartition(".")
        lib = getattr(getattr(lmkern, mod) if mod else lmkern, f)
        twin = getattr(getattr(R, mod) if mod else R, f)
        with pytest.raises((ValueError, TypeError)) as a:
            lib(**kw)
        with pytest.raises((ValueError, TypeError)) as b:
            twin(**kw)
        assert (type(a.value), str(a.value)) == (type(b.value), str(b.value)), name


def test_out_shape_errors_name_the_axes(rng):
    q, k, v = make_qkv(rng, 1, 2, 3, 2, 1, 4, 3)
    with pytest.raises(ValueError, match=r"attention: out has shape \(1, 2, 2, 5\); expected \(B, N, Hq, E\) = \(1, 2, 2, 3\)"):
        lmkern.attention(q, k, v, out=np.zeros((1, 2, 2, 5), np.float32))
    with pytest.raises(ValueError, match=r"rope: out has shape .*expected \(B, T, G, D\) = \(1, 2, 2, 4\)"):
        lmkern.rope(q, np.arange(2), out=np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"tpa.decode: out has shape .*expected \(B, H, E\) = \(1, 2, 3\)"):
        lmkern.tpa.decode(q[:, 0, :, :1], q[:, 0, :1], k[..., :1].repeat(2, 2), k[:, :, :1],
                          k[..., :1].repeat(2, 2), v[:, :, :1], out=np.zeros((1, 2, 4), np.float32))


def test_errors_name_the_argument(rng):
    q, k, v = make_qkv(rng, 2, 5, 7, 4, 2, 8)
    with pytest.raises(ValueError, match=r"attention: q has shape .*\(B, N, Hq, D\)"):
        lmkern.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k has shape"):
        lmkern.attention(q, k[:, :, :, :4], v)
    with pytest.raises(ValueError, match="v has shape"):
        lmkern.attention(q, k, v[:, :6])
    with pytest.raises(ValueError, match="Hkv"):
        lmkern.attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="q_pos"):
        lmkern.attention(q, k, v, causal=True, q_pos=np.arange(4))
    with pytest.raises(ValueError, match="kv_pos"):
        lmkern.attention(q, k, v, causal=True, kv_pos=np.zeros((3, 7), np.int64))
    with pytest.raises(ValueError, match="kv_lens"):
        lmkern.attention(q, k, v, kv_lens=[1, 8])
    with pytest.raises(ValueError, match="kv_lens"):
        lmkern.attention(q, k, v, kv_lens=[-1, 3])
    with pytest.raises(ValueError, match="kv_lens"):
        lmkern.attention(q, k, v, kv_lens=[1, 2, 3])
    with pytest.raises(TypeError, match="q"):
        lmkern.attention(q.astype(np.int32), k, v)
    with pytest.raises(TypeError, match="v"):
        lmkern.attention(q, k, v.astype(np.complex64))
    with pytest.raises(TypeError, match="kv_lens"):
        lmkern.attention(q, k, v, kv_lens=[1.5, 2.0])
    with pytest.raises(TypeError, match="q_pos"):
        lmkern.attention(q, k, v, q_pos=np.zeros(5, np.float32))


# ------------------------------------------------------------------------------------------
# paths, threads, reproducibility, leaks
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,M", [(1, 3000), (3, 700), (200, 300)])
def test_simd_matches_generic(rng, N, M):
    q, k, v = make_qkv(rng, 2, N, M, 8, 2, 40, 24)
    kw = dict(causal=True, kv_lens=[M, M // 2 + 1], kv_pos=np.arange(M) * 2, q_pos=np.arange(N) * 2 + M // 2)
    prev = _core._set_simd(False)
    try:
        slow = lmkern.attention(q, k, v, return_lse=True, **kw)
    finally:
        _core._set_simd(prev)
    fast = lmkern.attention(q, k, v, return_lse=True, **kw)
    assert_close(fast[0], slow[0])
    assert_close(fast[1], slow[1])


def test_set_num_threads_takes_numpy_integers():
    before = lmkern.get_num_threads()
    try:
        lmkern.set_num_threads(np.int64(1))
        assert lmkern.get_num_threads() == 1
    finally:
        lmkern.set_num_threads(before)
    with pytest.raises(TypeError, match="set_num_threads"):
        lmkern.set_num_threads(1.0)


def test_threads_setting_and_reproducibility(rng):
    prev = lmkern.get_num_threads()
    try:
        q, k, v = make_qkv(rng, 1, 1, 5000, 8, 2, 32)
        qp, kp, vp = make_qkv(rng, 1, 150, 300, 8, 2, 32)
        results = {}
        for n in (1, 2, 3):
            lmkern.set_num_threads(n)
            assert lmkern.get_num_threads() == n
            a = lmkern.attention(q, k, v, causal=True, return_lse=True)
            b = lmkern.attention(q, k, v, causal=True, return_lse=True)
            c = lmkern.attention(qp, kp, vp, causal=True)
            d = lmkern.attention(qp, kp, vp, causal=True)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_array_equal(c, d)
            results[n] = a[0]
            assert_close(a[0], ref.core.attention(q, k, v, causal=True))
        assert_close(results[1], results[3])
    finally:
        lmkern.set_num_threads(prev)
    assert lmkern.get_num_threads() == prev


def test_python_threads_agree_with_serial(rng):
    cases = [make_qkv(rng, 1, n, 400, 8, 2, 32) for n in (1, 2, 50, 130)]
    serial = [lmkern.attention(q, k, v, causal=True) for q, k, v in cases]
    results = [[None] * len(cases) for _ in range(4)]
    errors = []

    def work(t):
        try:
            for _ in range(3):
                for c, (q, k, v) in enumerate(cases[t:] + cases[:t]):
                    results[t][(c + t) % len(cases)] = lmkern.attention(q, k, v, causal=True)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for t in range(4):
        for c in range(len(cases)):
            np.testing.assert_array_equal(results[t][c], serial[c])


def test_no_leaks(rng):
    q, k, v = make_qkv(rng, 1, 20, 64, 4, 2, 16)
    lens = np.array([50])
    qpos = np.arange(20)
    refs = [sys.getrefcount(x) for x in (q, k, v, lens, qpos)]
    out = np.empty((1, 20, 4, 16), np.float32)
    for _ in range(50):  # warm caches of numpy and Python
        lmkern.attention(q, k, v, causal=True, kv_lens=lens, q_pos=qpos, return_lse=True, out=out)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(500):
        lmkern.attention(q, k, v, causal=True, kv_lens=lens, q_pos=qpos, return_lse=True, out=out)
        lmkern.attention(q[:, :1], k, v)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert [sys.getrefcount(x) for x in (q, k, v, lens, qpos)] == refs
    assert sys.getrefcount(out) == 2


# ------------------------------------------------------------------------------------------
# rope
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_matches_twin(rng, style, dtype):
    x = randn(rng, (2, 9, 3, 16), dtype)
    copy = x.copy()
    for rotary_dim in (None, 8, 0):
        for pos in (np.arange(9) + 3, rng.integers(0, 5000, (2, 9))):
            for inverse in (False, True):
                kw = dict(rotary_dim=rotary_dim, style=style, inverse=inverse, base=500.0)
                got = lmkern.rope(x, pos, **kw)
                assert got.dtype == dtype
                assert_close(got, ref.core.rope(x, pos, **kw))
    np.testing.assert_array_equal(x, copy)
    got = lmkern.rope(x, np.arange(9), rotary_dim=8, style=style)
    np.testing.assert_array_equal(got[..., 8:], x[..., 8:])  # features >= r pass through


def test_rope_inverse_round_trip_and_in_place(rng):
    x = randn(rng, (2, 7, 4, 32))
    pos = rng.integers(0, 1 << 16, (2, 7))
    y = lmkern.rope(x, pos, style="interleaved")
    assert_close(lmkern.rope(y, pos, style="interleaved", inverse=True), x, tol=1e-5)
    z = x.copy()
    res = lmkern.rope_(z, pos, style="interleaved")
    assert res is z
    np.testing.assert_array_equal(z, y)
    nc = noncontig(x.copy())
    lmkern.rope_(nc, pos, style="interleaved")
    np.testing.assert_array_equal(nc, y)
    out = np.empty_like(x)
    assert lmkern.rope(x, pos, out=out) is out
    with pytest.raises(TypeError, match="x"):
        lmkern.rope_(x.astype(np.float16), pos)


def test_rope_large_positions_keep_float32_accuracy(rng):
    x = randn(rng, (1, 6, 2, 64))
    pos = np.array([0, 1, 1 << 19, (1 << 20) - 1, 1 << 20, 999_983])
    got = lmkern.rope(x, pos)
    twin64 = lmkern.rope(x.astype(np.float64), pos)
    assert_close(got, twin64, tol=2e-6)
    # float64 vs twin: one ulp of base**(-2i/r) times a position of 2^20 moves the angle by ~1e-10
    assert_close(twin64, ref.core.rope(x.astype(np.float64), pos), tol=1e-9)


def test_rope_errors_and_zero_size(rng):
    x = randn(rng, (2, 5, 3, 8))
    with pytest.raises(ValueError, match="rotary_dim"):
        lmkern.rope(x, np.arange(5), rotary_dim=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        lmkern.rope(x, np.arange(5), rotary_dim=10)
    with pytest.raises(ValueError, match="positions"):
        lmkern.rope(x, np.arange(4))
    with pytest.raises(ValueError, match="style"):
        lmkern.rope(x, np.arange(5), style="gptj")
    with pytest.raises(ValueError, match="x has shape"):
        lmkern.rope(x[0], np.arange(5))
    with pytest.raises(TypeError, match="positions"):
        lmkern.rope(x, np.arange(5.0))
    assert lmkern.rope(x[:0], np.zeros((0, 5), np.int64)).shape == (0, 5, 3, 8)
    # SPEC 1.2: r = rotary_dim or D, so 0 rotates the whole head like None
    np.testing.assert_array_equal(lmkern.rope(x, np.arange(5), rotary_dim=0), lmkern.rope(x, np.arange(5)))
    assert_close(ref.rope(x, np.arange(5), rotary_dim=0), lmkern.rope(x, np.arange(5)))
    assert lmkern.rope(x[:, :0], np.arange(0)).shape == (2, 0, 3, 8)


# ------------------------------------------------------------------------------------------
# KVCache
# ------------------------------------------------------------------------------------------

def test_kvcache_ragged_appends_and_attend(rng):
    B, S, Hkv, D, E = 3, 40, 2, 8, 6
    cache = lmkern.KVCache(B, S, Hkv, D, E)
    twin = ref.core.KVCache(B, S, Hkv, D, E)
    total = np.zeros(B, np.int64)
    for T, lens in ((5, [5, 2, 0]), (3, None), (7, [1, 7, 4])):
        k = randn(rng, (B, T, Hkv, D))
        v = randn(rng, (B, T, Hkv, E))
        cache.append(k, v, lengths=lens)
        twin.append(k, v, lengths=lens)
        add = np.full(B, T) if lens is None else np.array(lens)
        for b in range(B):
            np.testing.assert_array_equal(cache.k[b, total[b]:total[b] + add[b]], k[b, :add[b]])
            np.testing.assert_array_equal(cache.v[b, total[b]:total[b] + add[b]], v[b, :add[b]])
            np.testing.assert_array_equal(cache.positions[b, total[b]:total[b] + add[b]],
                                          np.arange(total[b], total[b] + add[b]))
        total += add
        np.testing.assert_array_equal(cache.lengths, total)
        assert cache.lengths.dtype == np.int64
        assert cache.k.shape == (B, total.max(), Hkv, D) and cache.v.shape == (B, total.max(), Hkv, E)
        assert cache.nbytes == int(total.sum()) * Hkv * (D + E) * 4
        for N in (1, 3):
            q = randn(rng, (B, N, 4, D))
            out, lse = cache.attend(q, return_lse=True)
            want, want_lse = twin.attend(q, return_lse=True)
            assert_close(out, want)
            assert_close(lse, want_lse)
    cache.reset()
    assert np.all(cache.lengths == 0) and cache.nbytes == 0 and cache.k.shape[1] == 0


def test_kvcache_stored_positions_and_overflow(rng):
    cache = lmkern.KVCache(2, 6, 1, 4, dtype=np.float64)
    twin = ref.core.KVCache(2, 6, 1, 4, dtype=np.float64)
    k = randn(rng, (2, 4, 1, 4), np.float64)
    pos = np.array([[10, 12, 14, 16], [0, 5, 6, 9]])
    cache.append(k, k, positions=pos)
    twin.append(k, k, positions=pos)
    np.testing.assert_array_equal(cache.positions, pos)
    q = randn(rng, (2, 2, 3, 4), np.float64)
    for q_pos in (None, np.array([13, 15])):
        assert_close(cache.attend(q, q_pos=q_pos), twin.attend(q, q_pos=q_pos))
    assert_close(cache.attend(q, causal=False, scale=0.1), twin.attend(q, causal=False, scale=0.1))
    snap = (cache.k.copy(), cache.lengths.copy(), cache.positions.copy())
    with pytest.raises(ValueError, match="max_len"):
        cache.append(randn(rng, (2, 3, 1, 4), np.float64), randn(rng, (2, 3, 1, 4), np.float64))
    np.testing.assert_array_equal(cache.lengths, snap[1])  # nothing written
    np.testing.assert_array_equal(cache._k[:, :4], snap[0])
    assert np.all(cache._k[:, 4:] == 0)
    cache.append(randn(rng, (2, 3, 1, 4), np.float64), randn(rng, (2, 3, 1, 4), np.float64), lengths=[2, 0])
    np.testing.assert_array_equal(cache.lengths, [6, 4])
    with pytest.raises(ValueError, match="k has shape"):
        cache.append(randn(rng, (2, 1, 2, 4)), randn(rng, (2, 1, 1, 4)))
    with pytest.raises(ValueError, match="lengths"):
        cache.append(randn(rng, (2, 1, 1, 4)), randn(rng, (2, 1, 1, 4)), lengths=[2, 0])
    with pytest.raises(TypeError, match="dtype"):
        lmkern.KVCache(1, 4, 1, 4, dtype=np.int32)


def test_kvcache_attend_is_attention_over_the_cache(rng):
    """SPEC 1.3: attend = attention(q, k, v, kv_lens=lengths, kv_pos=positions), q_pos passed through
    (None = attention's default L_b - N + i, even after custom positions were appended)."""
    cache = lmkern.KVCache(2, 8, 1, 4)
    k = randn(rng, (2, 5, 1, 4))
    cache.append(k, k, positions=np.array([[0, 1, 2, 10, 11], [3, 4, 7, 8, 9]]), lengths=[5, 3])
    q = randn(rng, (2, 2, 2, 4))
    for q_pos in (None, np.array([[2, 10], [4, 7]])):
        want = lmkern.attention(q, cache.k, cache.v, causal=True, q_pos=q_pos, kv_pos=cache.positions,
                                kv_lens=cache.lengths)
        np.testing.assert_array_equal(cache.attend(q, q_pos=q_pos), want)
        want = ref.attention(q, cache.k, cache.v, causal=True, q_pos=q_pos, kv_pos=cache.positions,
                             kv_lens=cache.lengths)
        assert_close(cache.attend(q, q_pos=q_pos), want)


def test_kvcache_attend_errors_name_the_query():
    cache = lmkern.KVCache(1, 4, 2, 8)
    cache.append(np.ones((1, 2, 2, 8), np.float32), np.ones((1, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"KVCache.attend: q has shape \(1, 1, 2, 3\); expected \(B, N, Hq, D\)"):
        cache.attend(np.ones((1, 1, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"KVCache.attend: q has shape \(2, 1, 2, 8\)"):
        cache.attend(np.ones((2, 1, 2, 8), np.float32))
    with pytest.raises(ValueError, match="KVCache.attend: q has Hq = 3 heads"):
        cache.attend(np.ones((1, 1, 3, 8), np.float32))
    with pytest.raises(ValueError, match="KVCache.attend: q_pos"):
        cache.attend(np.ones((1, 1, 2, 8), np.float32), q_pos=np.array([1, 2]))


@pytest.mark.parametrize("N,L", [(1, 5), (70, 130), (3, 0)])
def test_parscale_prefix_through_core_kernel(rng, N, L, simd):
    """The shared-prefix keys of attention_impl (used by lmkern.parscale) in both kernel paths."""
    from lmkern._attention import attention_impl
    P, B, M = 2, 4, 90
    q, k, v = make_qkv(rng, B, N, M, 8, 2, 16, 12)
    pk = randn(rng, (P, L, 2, 16))
    pv = randn(rng, (P, L, 2, 12))
    for causal in (False, True):
        kw = dict(causal=causal, scale=None, q_pos=None, kv_pos=None, kv_lens=[90, 0, 45, 1])
        got, lse = attention_impl("attention", q, k, v, return_lse=True, out=None, prefix_k=pk, prefix_v=pv, P=P, **kw)
        want, want_lse = ref.core.attention(q, k, v, return_lse=True, prefix_k=pk, prefix_v=pv, **kw)
        assert_close(got, want)
        assert_close(lse, want_lse)


def test_out_overlapping_an_input_gives_the_same_result(rng):
    """out= may share memory with an input the kernel still reads (NumPy semantics: as if the inputs were
    read first); tpa.materialize and mor.scatter_residual got this wrong before (found by fuzzing)."""
    import lmkern.reference as R
    f = lambda *s: randn(rng, s)  # noqa: E731
    a, b = f(4, 8, 8), f(4, 8, 8)
    for which in (0, 1):
        args = [a.copy(), b.copy()]
        got = lmkern.tpa.materialize(*args, out=args[which])
        assert_close(got, R.tpa.materialize(a, b))
    q, k, v = f(1, 40, 2, 8), f(1, 40, 2, 8), f(1, 40, 2, 8)
    for which in (0, 1, 2):
        args = [q.copy(), k.copy(), v.copy()]
        assert_close(lmkern.attention(*args, causal=True, out=args[which]), R.attention(q, k, v, causal=True))
    h, idx = f(1, 6, 4), np.array([[1, 0, 2]])
    base = f(1, 6, 4)
    want = R.mor.scatter_residual(h, idx, base[:, :3].copy())
    assert_close(lmkern.mor.scatter_residual(h, idx, base[:, :3], out=base), want)
    want = R.mor.scatter_residual(h, idx, h[:, 3:].copy(), h[:, 3:, 0].copy())
    assert_close(lmkern.mor.scatter_residual_(h, idx, h[:, 3:], h[:, 3:, 0]), want)


def test_bad_arguments_raise_value_or_type_errors():
    """None for a required array, huge or non-integral counts: ValueError / TypeError naming the argument,
    not AttributeError or OverflowError (found by fuzzing)."""
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    q = z(1, 2, 2, 4)
    bad = [
        (TypeError, "attention: v is None", lambda: lmkern.attention(q, q, None)),
        (TypeError, "rope: positions is None", lambda: lmkern.rope(q, None)),
        (TypeError, "tpa.materialize: a is None", lambda: lmkern.tpa.materialize(None, z(2, 3))),
        (TypeError, "mor.z_loss: logits is None", lambda: lmkern.mor.z_loss(None)),
        (TypeError, "kv.attention_mass: k is None", lambda: lmkern.kv.attention_mass(q, None)),
        (ValueError, r"set_num_threads: n must be in \[1, 65536\]", lambda: lmkern.set_num_threads(2 ** 63)),
        (ValueError, r"set_num_threads: n must be in \[1, 65536\]", lambda: lmkern.set_num_threads(2 ** 31)),
        (ValueError, "group_size", lambda: lmkern.kv.quantize(z(1, 0, 1, 4), bits=2, group_size=2 ** 63, axis="channel")),
        (TypeError, "rotary_dim", lambda: lmkern.rope(q, np.arange(2), rotary_dim=float("inf"))),
        (ValueError, "max_budget must be at most", lambda: lmkern.kv.scalekv_budgets(4, [0], per_layer=2, max_budget=2 ** 63)),
        (TypeError, "KVCache: max_len", lambda: lmkern.KVCache(1, float("inf"), 1, 4)),
    ]
    threads = lmkern.get_num_threads()
    for exc, msg, call in bad:
        with pytest.raises(exc, match=msg):
            call()
    assert lmkern.get_num_threads() == threads


def test_empty_outputs_do_no_work_along_empty_axes():
    """An empty result returns at once, however long the other axes (it used to walk them: found by
    fuzzing); lse, when asked for, is still computed."""
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    big = np.lib.stride_tricks.as_strided(z(1), shape=(1, 2 ** 40, 1, 0), strides=(0, 0, 0, 4))
    t = time.perf_counter()
    assert lmkern.attention(z(1, 2, 1, 0), big, big).shape == (1, 2, 1, 0)
    assert lmkern.rope(np.lib.stride_tricks.as_strided(z(1), shape=(2 ** 40, 2, 1, 0), strides=(0, 0, 0, 4)),
                       np.arange(2)).shape == (2 ** 40, 2, 1, 0)
    assert time.perf_counter() - t < 5
    out, lse = lmkern.attention(z(1, 2, 1, 0), z(1, 3, 1, 0), z(1, 3, 1, 0), return_lse=True)
    np.testing.assert_allclose(lse, np.log(3), rtol=1e-6)


def test_twin_and_kernel_agree_at_ieee_edges(rng):
    """+inf score: out and lse NaN in both; mixed float32/float64 TPA factors: the twin promotes all six
    before materializing, as the kernel does (found by fuzzing)."""
    import lmkern.reference as R
    q, k, v = make_qkv(rng, 1, 3, 5, 2, 2, 4)
    k[0, 1, 0] = np.inf
    for n in (3, 1):
        out, lse = lmkern.attention(q[:, :n], k, v, return_lse=True)
        want, want_lse = R.attention(q[:, :n], k, v, return_lse=True)
        np.testing.assert_array_equal(np.isnan(lse), np.isnan(want_lse))
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    shapes = ((1, 2, 3, 2), (1, 2, 2, 4), (1, 5, 3, 1), (1, 5, 1, 4), (1, 5, 3, 1), (1, 5, 1, 4))
    f = [randn(rng, s, np.float32 if i % 2 else np.float64) for i, s in enumerate(shapes)]
    assert_close(lmkern.tpa.attention(*f), R.tpa.attention(*f), np.float64)
