"""lmkern.parscale (SPEC 5): kernels against their NumPy twins, against attention over an explicitly
concatenated prefix, against the aggregation as the ParScale modeling code writes it (torch), and the
error contract."""
import numpy as np
import pytest

import lmkern
from lmkern import parscale as ps
from lmkern.reference import parscale as ref
from lmkern.reference import core as ref_core

from conftest import assert_close, noncontig, randn

DTYPES = [np.float32, np.float64]
FAR_PAST = -(2 ** 62)   # a kv position every query position is >= to (the prefix, made explicit)


# ---------------------------------------------------------------- expand

@pytest.mark.parametrize("P", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(2,), (3, 5), (1, 4, 7), (0, 3)])
def test_expand_matches_twin_and_is_stream_major(rng, P, shape):
    x = randn(rng, shape)
    x0 = x.copy()
    y = ps.expand(x, P)
    assert y.shape == (P * shape[0],) + shape[1:]
    np.testing.assert_array_equal(y, ref.expand(x, P))
    B = shape[0]
    for p in range(P):
        np.testing.assert_array_equal(y[p * B:(p + 1) * B], x)   # row p·B + b is x[b]
    np.testing.assert_array_equal(x, x0)


def test_expand_keeps_dtype_and_copies():
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    y = ps.expand(ids[:, ::2], 3)                                   # non-contiguous, integer
    assert y.dtype == np.int32 and y.flags.c_contiguous
    np.testing.assert_array_equal(y, np.concatenate([ids[:, ::2]] * 3))
    y[0, 0] = 99
    assert ids[0, 0] == 0


def test_expand_errors():
    with pytest.raises(ValueError, match="P"):
        ps.expand(np.ones((2, 3)), 0)
    with pytest.raises(TypeError, match="P"):
        ps.expand(np.ones((2, 3)), 2.0)
    with pytest.raises(ValueError, match="x"):
        ps.expand(np.float32(1.0), 2)


# ---------------------------------------------------------------- prefix_attention

def concat_prefix_attention(attn, q, k, v, prefix_k, prefix_v, *, causal, q_pos, kv_pos, kv_lens, scale=None):
    """Attention over [prefix | keys] concatenated per row, with the prefix made always admissible
    explicitly: prefix keys sit at kv position -2^62 (<= every query position) in the first L slots,
    kv_lens grows by L, and q_pos is passed explicitly (its default depends on kv_lens)."""
    PB, N = q.shape[:2]
    M = k.shape[1]
    P, L = prefix_k.shape[:2]
    B = PB // P
    rows = np.arange(PB) // B
    kc = np.concatenate([prefix_k[rows], k], axis=1)
    vc = np.concatenate([prefix_v[rows], v], axis=1)
    lens = np.full(PB, M) if kv_lens is None else np.asarray(kv_lens)
    qp = lens[:, None] - N + np.arange(N) if q_pos is None else np.broadcast_to(q_pos, (PB, N))
    kp = np.broadcast_to(np.arange(M) if kv_pos is None else kv_pos, (PB, M))
    kpc = np.concatenate([np.full((PB, L), FAR_PAST), kp], axis=1)
    return attn(q, kc, vc, causal=causal, scale=scale, q_pos=qp, kv_pos=kpc, kv_lens=lens + L, return_lse=True)


PREFIX_CASES = [
    # P, B, N, M, Hq, Hkv, D, E, L
    (2, 3, 5, 7, 4, 2, 16, 16, 4),
    (3, 1, 1, 9, 6, 6, 8, 12, 48),       # decode row, D != E, released L
    (1, 2, 4, 4, 3, 1, 5, 7, 1),         # P = 1, GQA 3
    (2, 2, 3, 6, 8, 2, 4, 4, 0),         # L = 0 is plain attention
    (4, 2, 6, 5, 2, 1, 33, 9, 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFIX_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_prefix_attention_equals_attention_over_concatenated_prefix(rng, dtype, case, causal, ragged):
    P, B, N, M, Hq, Hkv, D, E, L = case
    q = randn(rng, (P * B, N, Hq, D), dtype)
    k = randn(rng, (P * B, M, Hkv, D), dtype)
    v = randn(rng, (P * B, M, Hkv, E), dtype)
    pk = randn(rng, (P, L, Hkv, D), dtype)
    pv = randn(rng, (P, L, Hkv, E), dtype)
    kv_lens = rng.integers(0, M + 1, P * B) if ragged else None
    if ragged:
        kv_lens[0] = 0                       # a row with no real key still sees its prefix
    args = [a.copy() for a in (q, k, v, pk, pv)]
    out, lse = ps.prefix_attention(q, k, v, pk, pv, causal=causal, kv_lens=kv_lens, return_lse=True)
    want, want_lse = concat_prefix_attention(ref_core.attention, q, k, v, pk, pv, causal=causal, q_pos=None,
                                             kv_pos=None, kv_lens=kv_lens)
    assert_close(out, want, dtype)
    assert_close(lse, want_lse, dtype)
    # the kernel over the explicit concatenation agrees too, as does the twin
    k_out, k_lse = concat_prefix_attention(lmkern.attention, q, k, v, pk, pv, causal=causal, q_pos=None,
                                           kv_pos=None, kv_lens=kv_lens)
    assert_close(out, k_out, dtype)
    t_out, t_lse = ref.prefix_attention(q, k, v, pk, pv, causal=causal, kv_lens=kv_lens, return_lse=True)
    assert_close(out, t_out, dtype)
    assert_close(lse, t_lse, dtype)
    for a, a0 in zip((q, k, v, pk, pv), args):
        np.testing.assert_array_equal(a, a0)
    if L == 0:
        plain = lmkern.attention(q, k, v, causal=causal, kv_lens=kv_lens)
        assert_close(out, plain, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_attention_positions_do_not_reach_the_prefix(rng, dtype):
    P, B, N, M, Hq, Hkv, D, L = 2, 2, 4, 6, 4, 2, 8, 5
    q = randn(rng, (P * B, N, Hq, D), dtype)
    k = randn(rng, (P * B, M, Hkv, D), dtype)
    v = randn(rng, (P * B, M, Hkv, D), dtype)
    pk = randn(rng, (P, L, Hkv, D), dtype)
    pv = randn(rng, (P, L, Hkv, D), dtype)
    kv_pos = rng.permutation(M) + 3                     # (M,), shuffled
    q_pos = rng.integers(-2, M + 3, (P * B, N))         # (B, N), some before every key
    kv_lens = np.array([M, 3, 0, 5])
    out, lse = ps.prefix_attention(q, k, v, pk, pv, causal=True, q_pos=q_pos, kv_pos=kv_pos, kv_lens=kv_lens,
                                   return_lse=True, scale=0.3)
    want, want_lse = concat_prefix_attention(ref_core.attention, q, k, v, pk, pv, causal=True, q_pos=q_pos,
                                             kv_pos=kv_pos, kv_lens=kv_lens, scale=0.3)
    assert_close(out, want, dtype)
    assert_close(lse, want_lse, dtype)
    assert np.isfinite(lse).all()                       # the prefix is always admissible
    # a query before every real key sees the prefix only
    only = lmkern.attention(q[:1, :1], pk[:1], pv[:1], scale=0.3)
    q1 = np.array([[-10]])
    got = ps.prefix_attention(q[:1, :1], k[:1], v[:1], pk[:1], pv[:1], causal=True, q_pos=q1, scale=0.3)
    assert_close(got, only, dtype)


def test_prefix_attention_streams_use_their_own_prefix(rng):
    """Row r reads prefix r // B: with zero real keys, each row's output is its stream's prefix."""
    P, B, Hkv, D = 3, 2, 1, 4
    q = np.zeros((P * B, 1, 1, D), np.float64)          # uniform attention over the prefix
    k = np.zeros((P * B, 2, Hkv, D))
    v = np.zeros((P * B, 2, Hkv, D))
    pk = np.zeros((P, 1, Hkv, D))
    pv = np.arange(P, dtype=np.float64).reshape(P, 1, 1, 1) * np.ones((P, 1, Hkv, D))
    out = ps.prefix_attention(q, k, v, pk, pv, kv_lens=np.zeros(P * B, int))
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.repeat(np.arange(P), B))


def test_prefix_attention_noncontiguous_and_out(rng):
    P, B, N, M, Hq, Hkv, D = 2, 2, 3, 5, 4, 2, 8
    q = randn(rng, (P * B, N, Hq, D))
    k = randn(rng, (P * B, M, Hkv, D))
    v = randn(rng, (P * B, M, Hkv, D))
    pk = randn(rng, (P, 3, Hkv, D))
    pv = randn(rng, (P, 3, Hkv, D))
    want = ps.prefix_attention(q, k, v, pk, pv, causal=True)
    got = ps.prefix_attention(noncontig(q), noncontig(k), noncontig(v), noncontig(pk), noncontig(pv), causal=True)
    assert_close(got, want, np.float32)
    out = noncontig(np.zeros_like(want))
    res = ps.prefix_attention(q, k, v, pk, pv, causal=True, out=out)
    assert res is out
    assert_close(out, want, np.float32)


def test_prefix_attention_zero_sized(rng):
    q = np.zeros((0, 3, 2, 4), np.float32)
    out = ps.prefix_attention(q, np.zeros((0, 5, 2, 4)), np.zeros((0, 5, 2, 4)), np.zeros((2, 3, 2, 4)),
                              np.zeros((2, 3, 2, 4)))
    assert out.shape == (0, 3, 2, 4)
    twin = ref.prefix_attention(q, np.zeros((0, 5, 2, 4)), np.zeros((0, 5, 2, 4)), np.zeros((2, 3, 2, 4)),
                                np.zeros((2, 3, 2, 4)))
    assert twin.shape == (0, 3, 2, 4)      # the twin too (its prefix bookkeeping divided by zero rows)
    q = randn(rng, (2, 0, 2, 4))
    out = ps.prefix_attention(q, randn(rng, (2, 5, 2, 4)), randn(rng, (2, 5, 2, 4)), randn(rng, (2, 3, 2, 4)),
                              randn(rng, (2, 3, 2, 4)))
    assert out.shape == (2, 0, 2, 4)


def test_prefix_attention_errors(rng):
    q = randn(rng, (5, 2, 2, 4))
    k = v = randn(rng, (5, 3, 2, 4))
    pk = pv = randn(rng, (2, 3, 2, 4))
    with pytest.raises(ValueError, match="q has P·B = 5 rows, which is not divisible by P = 2"):
        ps.prefix_attention(q, k, v, pk, pv)
    q = randn(rng, (4, 2, 2, 4))
    k = v = randn(rng, (4, 3, 2, 4))
    with pytest.raises(ValueError, match="prefix_k has shape"):
        ps.prefix_attention(q, k, v, randn(rng, (2, 3, 1, 4)), pv)
    with pytest.raises(ValueError, match="prefix_v has shape"):
        ps.prefix_attention(q, k, v, pk, randn(rng, (2, 4, 2, 4)))
    with pytest.raises(ValueError, match="prefix_k"):
        ps.prefix_attention(q, k, v, randn(rng, (2, 3, 2)), pv)
    with pytest.raises(TypeError, match="prefix_v"):
        ps.prefix_attention(q, k, v, pk, pv.astype(np.int32))
    with pytest.raises(ValueError, match="kv_lens"):
        ps.prefix_attention(q, k, v, pk, pv, kv_lens=[1, 2, 3, 4 + 3])


# ---------------------------------------------------------------- aggregate

def agg_params(rng, P, Hd, Hh, dtype=np.float32, scale=1.0):
    w1 = randn(rng, (Hh, P * Hd), dtype) * dtype(scale / np.sqrt(max(P * Hd, 1)))
    b1 = randn(rng, (Hh,), dtype)
    w2 = randn(rng, (P, Hh), dtype) * dtype(1 / np.sqrt(max(Hh, 1)))
    b2 = randn(rng, (P,), dtype)
    return w1, b1, w2, b2


def loop_aggregate(h, w1, b1, w2, b2, P, smoothing, layout):
    """The SPEC's formulas with explicit loops over (b, t, p, j): the twin's own oracle."""
    PB, T, Hd = h.shape
    B = PB // P
    h = h.astype(np.float64)
    y = np.zeros((B, T, Hd))
    wts = np.zeros((B, T, P))
    for b in range(B):
        for t in range(T):
            u = np.zeros(P * Hd)
            for p in range(P):
                for j in range(Hd):
                    u[j * P + p if layout == "interleaved" else p * Hd + j] = h[p * B + b, t, j]
            a = u @ w1.T.astype(np.float64) + b1
            z = (a / (1 + np.exp(-a))) @ w2.T.astype(np.float64) + b2
            e = np.exp(z - z.max())
            w = e / e.sum() * (1 - smoothing) + smoothing / P
            wts[b, t] = w
            y[b, t] = sum(w[p] * h[p * B + b, t] for p in range(P))
    return y, wts


@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_aggregate_twin_follows_the_spec_formulas(rng, layout):
    P, B, T, Hd, Hh = 3, 2, 2, 5, 4
    h = randn(rng, (P * B, T, Hd), np.float64)
    params = agg_params(rng, P, Hd, Hh, np.float64)
    y, w = ref.aggregate(h, *params, P=P, layout=layout, return_weights=True)
    want_y, want_w = loop_aggregate(h, *params, P, 0.1, layout)
    assert_close(y, want_y, np.float64)
    assert_close(w, want_w.astype(np.float32), np.float32)


AGG_SHAPES = [
    # P, B, T, Hd, Hh
    (2, 1, 1, 8, 8),
    (2, 3, 5, 37, 29),        # hidden size != Hh, odd sizes
    (8, 1, 7, 300, 64),       # P = 8, Hd beyond one column block, SIMD tail
    (8, 2, 3, 17, 130),
    (3, 2, 4, 1, 3),
    (5, 1, 2, 513, 16),
    (4, 3, 1, 33, 20),        # R = 3 rows: the blocked sgemv route of the first GEMM
    (8, 2, 1, 2100, 40),      # R = 2 with K = 16800: several blocks, a short last one
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", AGG_SHAPES)
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_aggregate_matches_twin(rng, dtype, shape, layout):
    P, B, T, Hd, Hh = shape
    h = randn(rng, (P * B, T, Hd), dtype)
    params = agg_params(rng, P, Hd, Hh, dtype, scale=3.0)
    copies = [a.copy() for a in (h,) + params]
    y, w = ps.aggregate(h, *params, P=P, layout=layout, return_weights=True)
    want_y, want_w = ref.aggregate(h, *params, P=P, layout=layout, return_weights=True)
    assert y.dtype == dtype and y.shape == (B, T, Hd)
    assert w.dtype == np.float32 and w.shape == (B, T, P)
    assert_close(y, want_y, dtype)
    assert_close(w, want_w, np.float32)
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-6)
    for a, a0 in zip((h,) + params, copies):
        np.testing.assert_array_equal(a, a0)
    y2 = ps.aggregate(h, *params, P=P, layout=layout)
    np.testing.assert_array_equal(y2, y)                 # return_weights changes nothing else


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_layouts_agree_with_permuted_w1_and_differ_without(rng, dtype):
    P, B, T, Hd, Hh = 4, 2, 3, 6, 10
    h = randn(rng, (P * B, T, Hd), dtype)
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh, dtype, scale=4.0)
    # concat column p·Hd + j holds what interleaved column j·P + p holds
    perm = (np.arange(Hd)[None, :] * P + np.arange(P)[:, None]).reshape(-1)
    w1_concat = w1[:, perm]
    yi, wi = ps.aggregate(h, w1, b1, w2, b2, P=P, layout="interleaved", return_weights=True)
    yc, wc = ps.aggregate(h, w1_concat, b1, w2, b2, P=P, layout="concat", return_weights=True)
    assert_close(yc, yi, dtype)
    assert_close(wc, wi, np.float32)
    # the wrong layout is a different model: the weights must differ visibly
    ywrong, wwrong = ps.aggregate(h, w1, b1, w2, b2, P=P, layout="concat", return_weights=True)
    assert np.abs(wwrong - wi).max() > 1e-2
    with pytest.raises(AssertionError):
        assert_close(ywrong, yi, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_smoothing_limits(rng, dtype):
    P, B, T, Hd, Hh = 4, 2, 3, 9, 7
    h = randn(rng, (P * B, T, Hd), dtype)
    params = agg_params(rng, P, Hd, Hh, dtype, scale=3.0)
    # smoothing = 1: the plain mean of the streams, whatever the router says
    y1, w1 = ps.aggregate(h, *params, P=P, smoothing=1.0, return_weights=True)
    np.testing.assert_array_equal(w1, np.full((B, T, P), 0.25, np.float32))
    assert_close(y1, h.reshape(P, B, T, Hd).mean(0), dtype)
    # smoothing = 0: the raw softmax
    y0, w0 = ps.aggregate(h, *params, P=P, smoothing=0.0, return_weights=True)
    want_y, want_w = ref.aggregate(h, *params, P=P, smoothing=0.0, return_weights=True)
    assert_close(y0, want_y, dtype)
    assert_close(w0, want_w, np.float32)
    # smoothing mixes linearly: w_s = (1 - s) w_0 + s / P
    _, w3 = ps.aggregate(h, *params, P=P, smoothing=0.3, return_weights=True)
    assert_close(w3, 0.7 * w0 + 0.3 / P, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_extreme_logits_stay_finite(rng, dtype):
    P, B, T, Hd, Hh = 4, 1, 3, 8, 5
    h = randn(rng, (P * B, T, Hd), dtype)
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh, dtype)
    b2 = np.array([1e30, -1e30, 3e29, -3e38], dtype)
    y, w = ps.aggregate(h, w1, b1, w2, b2, P=P, smoothing=0.1, return_weights=True)
    assert np.isfinite(y).all() and np.isfinite(w).all()
    assert_close(w, np.broadcast_to(np.array([0.925, 0.025, 0.025, 0.025], np.float32), w.shape), np.float32)
    assert_close(y, 0.925 * h[0:1] + 0.025 * (h[1:2] + h[2:3] + h[3:4]), dtype)
    # silu of huge pre-activations stays finite too
    y2 = ps.aggregate(h, w1 * dtype(1e30), b1, w2 * dtype(1e-30), b2, P=P)
    assert np.isfinite(y2).all()


def test_aggregate_nan_propagates(rng):
    P, B, T, Hd, Hh = 2, 1, 2, 4, 3
    h = randn(rng, (P * B, T, Hd))
    params = list(agg_params(rng, P, Hd, Hh))
    params[3] = np.array([np.nan, 0.0], np.float32)
    y = ps.aggregate(h, *params, P=P)
    assert np.isnan(y).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_P1_returns_h(rng, dtype):
    h = randn(rng, (3, 4, 5), dtype)
    w1, b1, w2, b2 = agg_params(rng, 1, 5, 6, dtype)
    y = ps.aggregate(h, w1, b1, w2, b2, P=1)
    assert y is h
    y, w = ps.aggregate(h, w1, b1, w2, b2, P=1, return_weights=True)
    np.testing.assert_array_equal(w, np.ones((3, 4, 1), np.float32))
    yt, wt = ref.aggregate(h, w1, b1, w2, b2, P=1, return_weights=True)
    np.testing.assert_array_equal(yt, h)
    np.testing.assert_array_equal(wt, w)
    out = np.zeros_like(h)
    assert ps.aggregate(h, w1, b1, w2, b2, P=1, out=out) is out
    np.testing.assert_array_equal(out, h)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_noncontiguous_inputs_and_out(rng, dtype):
    P, B, T, Hd, Hh = 3, 2, 4, 10, 6
    h = randn(rng, (P * B, T, Hd), dtype)
    params = agg_params(rng, P, Hd, Hh, dtype)
    want = ps.aggregate(h, *params, P=P)
    got = ps.aggregate(noncontig(h), *(noncontig(a) for a in params), P=P)
    assert_close(got, want, dtype)
    got_t = ps.aggregate(h.transpose(1, 0, 2).copy().transpose(1, 0, 2), params[0].T.copy().T, *params[1:], P=P)
    assert_close(got_t, want, dtype)
    out = np.zeros((B, T, Hd), dtype)
    assert ps.aggregate(h, *params, P=P, out=out) is out
    assert_close(out, want, dtype)
    out_nc = noncontig(np.zeros((B, T, Hd), dtype))
    assert ps.aggregate(h, *params, P=P, out=out_nc) is out_nc
    assert_close(out_nc, want, dtype)


def test_aggregate_mixed_and_half_dtypes(rng):
    P, B, T, Hd, Hh = 2, 1, 3, 4, 5
    h = randn(rng, (P * B, T, Hd), np.float16)
    params = agg_params(rng, P, Hd, Hh, np.float32)
    y = ps.aggregate(h, *params, P=P)
    assert y.dtype == np.float32
    assert_close(y, ref.aggregate(h.astype(np.float32), *params, P=P), np.float32)
    y64 = ps.aggregate(h.astype(np.float64), *params, P=P)
    assert y64.dtype == np.float64


def test_aggregate_last_position_is_a_slice(rng):
    P, B, T, Hd, Hh = 4, 2, 6, 12, 8
    h = randn(rng, (P * B, T, Hd), np.float64)
    params = agg_params(rng, P, Hd, Hh, np.float64)
    full = ps.aggregate(h, *params, P=P)
    last = ps.aggregate(h[:, -1:], *params, P=P)
    assert_close(last, full[:, -1:], np.float64)


@pytest.mark.parametrize("shape", [(2, 0, 3, 4, 5), (2, 2, 0, 4, 5), (2, 2, 3, 0, 5), (2, 2, 3, 4, 0)])
def test_aggregate_zero_sized(rng, shape):
    P, B, T, Hd, Hh = shape
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    y, w = ps.aggregate(h, *params, P=P, return_weights=True)
    want_y, want_w = ref.aggregate(h, *params, P=P, return_weights=True)
    assert y.shape == (B, T, Hd) and w.shape == (B, T, P)
    assert_close(y, want_y, np.float32)
    assert_close(w, want_w, np.float32)


def test_aggregate_simd_and_generic_paths_agree(rng):
    P, B, T, Hd, Hh = 8, 1, 5, 203, 37
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh, scale=5.0)
    y_simd, w_simd = ps.aggregate(h, *params, P=P, return_weights=True)
    lmkern._core._set_simd(False)
    try:
        y_gen, w_gen = ps.aggregate(h, *params, P=P, return_weights=True)
    finally:
        lmkern._core._set_simd(True)
    assert_close(y_simd, y_gen, np.float32)
    assert_close(w_simd, w_gen, np.float32)


def test_aggregate_reproducible_and_thread_count_independent(rng):
    P, B, T, Hd, Hh = 4, 1, 9, 700, 32
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    a = ps.aggregate(h, *params, P=P)
    np.testing.assert_array_equal(ps.aggregate(h, *params, P=P), a)
    n = lmkern.get_num_threads()
    lmkern.set_num_threads(1)
    try:
        b = ps.aggregate(h, *params, P=P)
    finally:
        lmkern.set_num_threads(n)
    assert_close(b, a, np.float32)


def test_aggregate_errors(rng):
    P, B, T, Hd, Hh = 2, 3, 2, 4, 5
    h = randn(rng, (P * B, T, Hd))
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh)
    with pytest.raises(ValueError, match="h has P·B = 5 rows, which is not divisible by P = 2"):
        ps.aggregate(h[:5], w1, b1, w2, b2, P=P)
    with pytest.raises(ValueError, match="h has shape"):
        ps.aggregate(h[0], w1, b1, w2, b2, P=P)
    with pytest.raises(ValueError, match=r"w1 has shape \(5, 9\); expected \(Hh, P·Hd\) = \(5, 8\)"):
        ps.aggregate(h, np.zeros((5, 9), np.float32), b1, w2, b2, P=P)
    with pytest.raises(ValueError, match="b1 has shape"):
        ps.aggregate(h, w1, b1[:4], w2, b2, P=P)
    with pytest.raises(ValueError, match="w2 has shape"):
        ps.aggregate(h, w1, b1, w2.T, b2, P=P)
    with pytest.raises(ValueError, match="b2 has shape"):
        ps.aggregate(h, w1, b1, w2, b2[:1], P=P)
    with pytest.raises(ValueError, match="layout"):
        ps.aggregate(h, w1, b1, w2, b2, P=P, layout="stacked")
    with pytest.raises(ValueError, match="smoothing"):
        ps.aggregate(h, w1, b1, w2, b2, P=P, smoothing=1.5)
    with pytest.raises(ValueError, match="smoothing"):
        ps.aggregate(h, w1, b1, w2, b2, P=P, smoothing=float("nan"))
    with pytest.raises(ValueError, match="P"):
        ps.aggregate(h, w1, b1, w2, b2, P=0)
    with pytest.raises(TypeError, match="h has dtype int"):
        ps.aggregate(h.astype(np.int32), w1, b1, w2, b2, P=P)
    with pytest.raises(TypeError, match="w2 has dtype complex"):
        ps.aggregate(h, w1, b1, w2.astype(np.complex64), b2, P=P)
    with pytest.raises(ValueError, match="out has shape"):
        ps.aggregate(h, w1, b1, w2, b2, P=P, out=np.zeros((B, T, Hd + 1), np.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        ps.aggregate(h, w1, b1, w2, b2, P=P, out=np.zeros((B, T, Hd), np.float64))
    # the twin keeps the same contract
    with pytest.raises(ValueError, match="h has P·B = 5 rows"):
        ref.aggregate(h[:5], w1, b1, w2, b2, P=P)


def test_core_guards_against_bad_direct_calls(rng):
    h = randn(rng, (4, 3))
    with pytest.raises(ValueError, match="h"):
        lmkern._core.parscale_gather(h, np.empty((2, 6), np.float32), 3, True)
    with pytest.raises(ValueError):
        lmkern._core.parscale_gather(h, np.empty((2, 5), np.float32), 2, True)
    with pytest.raises(ValueError):
        lmkern._core.parscale_mix(h, np.zeros((2, 3), np.float32), None, np.empty((2, 3), np.float32), None, 2, 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        lmkern._core.parscale_mix(h, np.zeros((2, 2), np.float32), None, np.empty((2, 3), np.float32), None, 2, -0.1)
    with pytest.raises(TypeError):
        lmkern._core.parscale_bias_silu_(h.T, None)


class _FakeCudaArray:
    """Claims to live on a CUDA device (DLPack device type 2); enough to exercise the routing."""
    shape = (2, 1, 1)
    dtype = np.float32

    def __dlpack_device__(self):
        return (2, 0)


def test_cuda_route_errors_name_the_function():
    # the CUDA paths (tests/test_cuda_parscale.py) refuse what they cannot read, naming the function
    x = _FakeCudaArray()
    if lmkern.cuda._cuda is None:
        with pytest.raises(RuntimeError, match="without CUDA"):
            ps.aggregate(x, x, x, x, x, P=2)
        with pytest.raises(RuntimeError, match="without CUDA"):
            ps.expand(x, 2)
    else:
        with pytest.raises(TypeError, match="parscale.aggregate: on CUDA, aggregate needs torch or CuPy"):
            ps.aggregate(x, x, x, x, x, P=2)
        with pytest.raises(TypeError, match="parscale.expand: x of type _FakeCudaArray is not a CUDA array"):
            ps.expand(x, 2)
    with pytest.raises(ValueError, match="different devices"):
        ps.aggregate(x, np.zeros((1, 2)), x, x, x, P=2)


# ---------------------------------------------------------------- against the ParScale modeling code (torch)

def torch_parscale_aggregate(h, w1, b1, w2, b2, P, smoothing):
    """The aggregation as modeling_qwen2_parscale.py writes it (written anew here, in torch):
    rearrange "(n b) s h -> b s (h n)", Linear -> SiLU -> Linear, softmax in float32, smoothing,
    rearrange "(n b) s h -> b s n h", weighted sum over n, cast back."""
    torch = pytest.importorskip("torch")
    hs = torch.from_numpy(h)
    PB, T, Hd = hs.shape
    B = PB // P
    layer = torch.nn.Sequential(torch.nn.Linear(P * Hd, w1.shape[0]), torch.nn.SiLU(), torch.nn.Linear(w1.shape[0], P))
    with torch.no_grad():
        layer[0].weight.copy_(torch.from_numpy(w1))
        layer[0].bias.copy_(torch.from_numpy(b1))
        layer[2].weight.copy_(torch.from_numpy(w2))
        layer[2].bias.copy_(torch.from_numpy(b2))
        layer = layer.to(hs.dtype)
        u = hs.reshape(P, B, T, Hd).permute(1, 2, 3, 0).reshape(B, T, Hd * P)       # b s (h n)
        attn = torch.softmax(layer(u).float(), dim=-1).unsqueeze(-1)                # (B, T, P, 1)
        attn = attn * (1 - smoothing) + smoothing / P
        streams = hs.reshape(P, B, T, Hd).permute(1, 2, 0, 3)                       # b s n h
        y = (streams * attn).sum(dim=2).to(hs.dtype)
    return y.numpy(), attn[..., 0].numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [2, 8])
def test_aggregate_matches_parscale_modeling_code(rng, dtype, P):
    B, T, Hd, Hh = 2, 5, 24, 24
    h = randn(rng, (P * B, T, Hd), dtype)
    params = agg_params(rng, P, Hd, Hh, dtype, scale=3.0)
    want_y, want_w = torch_parscale_aggregate(h, *params, P, 0.1)
    y, w = ps.aggregate(h, *params, P=P, smoothing=0.1, return_weights=True)
    # the modeling code's softmax is float32 even for float64 inputs (we use double): float32 tolerance
    assert_close(y, want_y, dtype, tol=2e-5)
    assert_close(w, want_w.astype(np.float32), np.float32)


# ---------------------------------------------------------------- kv_cache_bytes

def test_kv_cache_bytes_counts_the_prefix_once_per_stream():
    per_token = 24 * 2 * (64 + 64) * 4
    r = ps.kv_cache_bytes(24, 2, 64, 1000, batch=4, P=8)
    assert r["streams"] == 8 * 4 * 1000 * per_token
    assert r["prefix"] == 8 * 48 * per_token
    assert r["prefix_per_row"] == 4 * r["prefix"]
    assert r["total"] == r["streams"] + r["prefix"]
    assert r["p1"] == 4 * 1000 * per_token
    assert r["ratio"] == pytest.approx(8 + 8 * 48 / 4000)
    # the prefix does not grow with the batch
    assert ps.kv_cache_bytes(24, 2, 64, 1000, batch=16, P=8)["prefix"] == r["prefix"]
    # P = 1 is the plain model
    one = ps.kv_cache_bytes(24, 2, 64, 1000, batch=4, P=1)
    assert one["total"] == one["p1"] and one["prefix"] == 0 and one["ratio"] == 1
    # v_head_dim, dtype, prefix_len
    r2 = ps.kv_cache_bytes(2, 1, 8, 10, P=2, prefix_len=3, v_head_dim=4, dtype=np.float64)
    assert r2["streams"] == 2 * 1 * 2 * 10 * (8 + 4) * 8 and r2["prefix"] == 2 * 3 * 2 * 12 * 8


def test_kv_cache_bytes_agrees_with_a_real_cache():
    P, B, T, Hkv, D, L = 3, 2, 7, 2, 16, 5
    cache = lmkern.KVCache(P * B, T, Hkv, D)
    cache.append(np.zeros((P * B, T, Hkv, D), np.float32), np.zeros((P * B, T, Hkv, D), np.float32))
    prefix_bytes = 2 * P * L * Hkv * D * 4
    r = ps.kv_cache_bytes(1, Hkv, D, T, batch=B, P=P, prefix_len=L)
    assert r["total"] == cache.nbytes + prefix_bytes


def test_kv_cache_bytes_errors():
    with pytest.raises(ValueError, match="seq_len"):
        ps.kv_cache_bytes(2, 2, 64, -1)
    with pytest.raises(TypeError, match="head_dim"):
        ps.kv_cache_bytes(2, 2, 64.0, 10)
    with pytest.raises(ValueError, match="P"):
        ps.kv_cache_bytes(2, 2, 64, 10, P=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [0, 1, 3])
def test_kernels_on_any_team_size(rng, dtype, threads):
    """aggregate runs its kernels on the calling thread (see _AGG_THREADS); the team path must agree."""
    P, R, Hd, Hh = 4, 7, 600, 45
    h = randn(rng, (P * R, Hd), dtype)
    n = lmkern.get_num_threads()
    lmkern.set_num_threads(3)                       # uneven chunks even on a 2-core machine
    try:
        for interleaved, shift in ((True, 0), (True, 1), (False, 0)):
            u = np.empty(R * P * Hd + shift, dtype)[shift:].reshape(R, P * Hd)   # shift: off any vector alignment
            lmkern._core.parscale_gather(h, u, P, interleaved, threads)
            hs = h.reshape(P, R, Hd)
            want = hs.transpose(1, 2, 0) if interleaved else hs.transpose(1, 0, 2)
            np.testing.assert_array_equal(u, want.reshape(R, P * Hd))
        x = randn(rng, (Hh, R), dtype) * dtype(10)
        b1 = randn(rng, (Hh,), dtype)
        want = (x + b1[:, None]) / (1 + np.exp(-(x + b1[:, None])))
        lmkern._core.parscale_bias_silu_(x, b1, threads)
        assert_close(x, want, dtype)
        z = randn(rng, (P, R), dtype)
        b2 = randn(rng, (P,), dtype)
        y = np.empty((R, Hd), dtype)
        w = np.empty((R, P), np.float32)
        lmkern._core.parscale_mix(h, z, b2, y, w, P, 0.2, threads)
        zz = (z.T + b2).astype(np.float64)
        e = np.exp(zz - zz.max(1, keepdims=True))
        want_w = e / e.sum(1, keepdims=True) * 0.8 + 0.2 / P
        assert_close(w, want_w.astype(np.float32), np.float32)
        assert_close(y, np.einsum("prj,rp->rj", hs.astype(np.float64), want_w), dtype)
    finally:
        lmkern.set_num_threads(n)


def test_prefix_attention_never_copies_the_prefix_per_row(rng):
    """Peak allocation of a call stays far below one per-row copy of the prefix (P·B·L keys)."""
    import tracemalloc
    P, B, N, M, Hq, Hkv, D, L = 4, 64, 1, 2, 4, 2, 64, 48
    q = randn(rng, (P * B, N, Hq, D))
    k = randn(rng, (P * B, M, Hkv, D))
    v = randn(rng, (P * B, M, Hkv, D))
    pk = randn(rng, (P, L, Hkv, D))
    pv = randn(rng, (P, L, Hkv, D))
    per_row_copy = 2 * P * B * L * Hkv * D * 4                   # 12 MiB
    tracemalloc.start()
    try:
        out = ps.prefix_attention(q, k, v, pk, pv, causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < per_row_copy / 20, (peak, per_row_copy)
    want = concat_prefix_attention(ref_core.attention, q[:8], k[:8], v[:8], pk[:1], pv[:1], causal=True,
                                   q_pos=None, kv_pos=None, kv_lens=None)[0]
    assert_close(out[:8], want, np.float32)


def test_bindings_do_not_leak_references(rng):
    import sys
    P, B, T, Hd, Hh = 2, 2, 3, 8, 5
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    pk = randn(rng, (P, 2, 1, 4))
    q = randn(rng, (P * B, 1, 2, 4))
    k = randn(rng, (P * B, 3, 1, 4))
    objs = (h,) + params + (pk, q, k)
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(50):
        ps.aggregate(h, *params, P=P, return_weights=True)
        ps.prefix_attention(q, k, k, pk, pk, return_lse=True)
        with pytest.raises(ValueError):
            lmkern._core.parscale_mix(h.reshape(P * B * T, Hd), np.zeros((P, 1), np.float32), None,
                                      np.empty((B * T, Hd), np.float32), None, P, 0.1)
    assert [sys.getrefcount(o) for o in objs] == before


def test_aggregate_result_has_h_dtype_and_p1_returns_h_itself():
    """SPEC 5.3: y in h's dtype (float64 weights do not widen a float32 h); P = 1 returns h unchanged."""
    rng = np.random.default_rng(3)
    P, B, T, Hd, Hh = 2, 2, 3, 8, 5
    h = rng.standard_normal((P * B, T, Hd)).astype(np.float32)
    ws = (rng.standard_normal((Hh, P * Hd)), rng.standard_normal(Hh), rng.standard_normal((P, Hh)),
          rng.standard_normal(P))                                     # float64 weights
    y = ps.aggregate(h, *ws, P=P)
    assert y.dtype == np.float32
    want = ref.aggregate(h.astype(np.float64), *ws, P=P)     # computed wide, rounded once
    np.testing.assert_allclose(y, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert ref.aggregate(h, *ws, P=P).dtype == np.float32
    h1 = h[:B]
    w1 = (ws[0][:, :Hd], ws[1], ws[2][:1], ws[3][:1])
    assert ps.aggregate(h1, *w1, P=1) is h1
    assert ref.aggregate(h1, *w1, P=1) is h1
