"""lmkern.tpa against its NumPy twin (lmkern.reference.tpa) and against the T6 computation in torch."""
import os
import sys

import numpy as np
import pytest

import lmkern
from lmkern import _core, tpa
from lmkern.reference import tpa as ref

from conftest import assert_close, noncontig, randn

DTYPES = [np.float32, np.float64]
PATHS = ["auto", "factor", "materialized"]


def factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, dtype=np.float32):
    """aq, bq (queries) and ak, bk, av, bv (keys/values) in the T6 layout."""
    return (randn(rng, (B, N, H, Rq), dtype), randn(rng, (B, N, Rq, D), dtype),
            randn(rng, (B, M, H, Rk), dtype), randn(rng, (B, M, Rk, D), dtype),
            randn(rng, (B, M, H, Rv), dtype), randn(rng, (B, M, Rv, E), dtype))


@pytest.fixture(autouse=True)
def simd_on():
    yield
    _core._set_simd(True)


# ------------------------------------------------------------------------------------------------
# materialize

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,H,R,D", [((2, 3), 5, 1, 7), ((4,), 34, 6, 64), ((), 3, 2, 5), ((2, 1, 3), 1, 16, 33)])
def test_materialize_matches_twin(rng, dtype, lead, H, R, D):
    a, b = randn(rng, lead + (H, R), dtype), randn(rng, lead + (R, D), dtype)
    a0, b0 = a.copy(), b.copy()
    out = tpa.materialize(a, b)
    assert out.dtype == dtype and out.shape == lead + (H, D)
    assert_close(out, ref.materialize(a, b), dtype)
    assert_close(out, np.einsum("...hr,...rd->...hd", a.astype(np.float64), b.astype(np.float64)) / R, dtype)
    assert_close(tpa.materialize(noncontig(a), noncontig(b), scale=0.5), ref.materialize(a, b, scale=0.5), dtype)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


def test_materialize_out_zero_sizes_and_errors(rng):
    a, b = randn(rng, (2, 4, 3)), randn(rng, (2, 3, 8))
    out = np.full((2, 4, 8), np.nan, np.float32)
    assert tpa.materialize(a, b, out=out) is out
    assert_close(out, ref.materialize(a, b))
    strided = np.zeros((2, 4, 16), np.float32)[..., ::2]
    tpa.materialize(a, b, out=strided)
    assert_close(strided, ref.materialize(a, b))
    assert tpa.materialize(randn(rng, (0, 4, 3)), randn(rng, (0, 3, 8))).shape == (0, 4, 8)
    assert tpa.materialize(randn(rng, (2, 0, 3)), randn(rng, (2, 3, 8))).shape == (2, 0, 8)
    assert np.array_equal(tpa.materialize(randn(rng, (2, 4, 0)), randn(rng, (2, 0, 8)), scale=1.0), np.zeros((2, 4, 8)))
    # a rank of 0: an empty sum, zeros whatever the scale (the default 1/R included)
    assert np.array_equal(tpa.materialize(randn(rng, (2, 4, 0)), randn(rng, (2, 0, 8))), np.zeros((2, 4, 8)))
    with pytest.raises(ValueError, match=r"tpa.materialize: b has shape \(2, 4, 8\); expected \(L0, R, D\)"):
        tpa.materialize(a, randn(rng, (2, 4, 8)))
    with pytest.raises(ValueError, match="a has shape"):
        tpa.materialize(randn(rng, (3,)), b)
    with pytest.raises(TypeError, match="a has dtype int64"):
        tpa.materialize(np.ones((2, 4, 3), np.int64), b)
    with pytest.raises(ValueError, match="out has shape"):
        tpa.materialize(a, b, out=np.zeros((2, 4, 7), np.float32))


# ------------------------------------------------------------------------------------------------
# attention (prefill)

CONFIGS = [  # B, N, M, H, Rq, Rk, Rv, D, E
    (1, 3, 70, 34, 6, 2, 2, 64, 64),      # T6-small ranks
    (2, 2, 47, 47, 6, 2, 2, 64, 64),      # T6-medium
    (1, 2, 33, 61, 6, 2, 2, 64, 64),      # T6-large
    (1, 2, 33, 78, 6, 2, 2, 64, 64),      # T6-XL
    (2, 3, 130, 32, 16, 1, 1, 64, 64),    # the paper's decode ranks 16/1/1
    (2, 4, 9, 3, 1, 1, 1, 8, 5),          # every rank 1, D != E
    (3, 5, 40, 5, 3, 4, 2, 16, 24),       # Rk > Rq, D != E
    (1, 2, 17, 17, 2, 3, 5, 33, 17),      # odd everything
    (2, 19, 40, 6, 3, 2, 2, 16, 20),      # several query tiles, a partial one
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "B{}N{}M{}H{}R{}-{}-{}D{}E{}".format(*c))
def test_attention_matches_twin(rng, dtype, cfg):
    B, N, M, H, Rq, Rk, Rv, D, E = cfg
    args = factors(rng, *cfg, dtype)
    copies = [x.copy() for x in args]
    lens = rng.integers(0, M + 1, B)
    lens[0] = M
    for causal in (False, True):
        want, want_lse = ref.attention(*args, causal=causal, kv_lens=lens, return_lse=True)
        for path in PATHS:
            out, lse = tpa.attention(*args, causal=causal, kv_lens=lens, return_lse=True, _path=path)
            assert out.dtype == dtype and out.shape == (B, N, H, E)
            assert_close(out, want, dtype, err_msg=f"causal={causal} path={path}")
            assert_close(lse, want_lse, dtype, err_msg=f"lse causal={causal} path={path}")
    for x, c in zip(args, copies):
        assert np.array_equal(x, c)


@pytest.mark.parametrize("M", [0, 1, 2047, 2049])
def test_attention_cache_lengths(rng, M):
    cfg = (2, 3, M, 6, 4, 2, 1, 16, 12)
    args = factors(rng, *cfg)
    for causal in (False, True):
        want, want_lse = ref.attention(*args, causal=causal, return_lse=True)
        out, lse = tpa.attention(*args, causal=causal, return_lse=True)
        assert_close(out, want)
        assert_close(lse, want_lse)
    if M == 0:
        assert np.array_equal(out, np.zeros_like(out)) and np.all(lse == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_paths_simd_and_splits_agree(rng, dtype):
    """The factor and materialized contractions, SIMD and generic code, and any cache split agree."""
    # Rv = 3: the generic path's 1 / Rv is not a power of two (float64 must not round it to float32)
    cfgs = [(2, 2, 300, 34, 6, 2, 2, 64, 64), (1, 3, 200, 32, 16, 1, 1, 64, 40), (2, 1, 129, 5, 1, 3, 2, 7, 9),
            (2, 3, 20, 3, 2, 2, 3, 8, 6)]
    for cfg in cfgs:
        args = factors(rng, *cfg, dtype)
        want = ref.attention(*args, causal=True)
        for simd in (True, False):
            _core._set_simd(simd)
            for path in PATHS:
                for splits in (1, 2, 5):
                    got = tpa.attention(*args, causal=True, _path=path, _splits=splits)
                    assert_close(got, want, err_msg=f"cfg={cfg} simd={simd} path={path} splits={splits}")


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "generic"])
def test_attention_positions_ragged_and_noncontiguous(rng, simd):
    _core._set_simd(simd)                         # simd_on puts SIMD back after the test
    B, N, M, H, Rq, Rk, Rv, D, E = 3, 11, 50, 7, 3, 2, 2, 16, 8
    for dtype in DTYPES:
        args = factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, dtype)
        kv_pos = np.stack([rng.permutation(M) for _ in range(B)])           # (B, M), not monotone
        q_pos = rng.integers(-2, M + 2, (B, N)).astype(np.int32)
        lens = np.array([M, 17, 0])
        want, want_lse = ref.attention(*args, causal=True, q_pos=q_pos, kv_pos=kv_pos, kv_lens=lens,
                                       scale=0.3, return_lse=True)
        for path in ("factor", "materialized"):
            out, lse = tpa.attention(*[noncontig(x) for x in args], causal=True, q_pos=q_pos, kv_pos=kv_pos,
                                     kv_lens=lens, scale=0.3, return_lse=True, _path=path)
            assert_close(out, want, dtype)
            assert_close(lse, want_lse, dtype)
        # (N,) / (M,) positions
        want = ref.attention(*args, causal=True, q_pos=q_pos[0], kv_pos=kv_pos[0])
        assert_close(tpa.attention(*args, causal=True, q_pos=q_pos[0], kv_pos=kv_pos[0]), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inadmissible_keys_never_leak_and_nan_propagates(rng, dtype):
    """NaN/inf in keys beyond kv_lens or causally masked never reaches the output; NaN in an
    admissible key's factors gives NaN for exactly the queries that see it (IEEE propagation)."""
    B, N, M, H, Rq, Rk, Rv, D, E = 2, 3, 150, 5, 3, 2, 2, 8, 8
    args = factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, dtype)
    lens = np.array([100, 150])
    want = ref.attention(*args, causal=True, kv_lens=lens)
    dirty = [x.copy() for x in args]
    for x in dirty[2:]:
        x[0, 100:] = np.nan                      # beyond kv_lens of row 0
    dirty[3][1, 149] = np.inf                    # row 1: key 149 is admissible only for the last query
    dirty[5][1, 149] = np.nan
    for simd in (True, False):
        _core._set_simd(simd)
        for path in ("factor", "materialized"):
            out = tpa.attention(*dirty, causal=True, kv_lens=lens, _path=path)
            assert_close(out[0], want[0])
            assert_close(out[1, :2], want[1, :2])      # queries at positions 147, 148 never see key 149
            assert np.all(np.isnan(out[1, 2]))
            dec = tpa.decode(dirty[0][:, 0], dirty[1][:, 0], *dirty[2:], kv_lens=lens - [0, 1], _path=path)
            assert np.all(np.isfinite(dec))
        bad = [x.copy() for x in args]
        bad[2][0, 99, 2, 0] = np.nan                 # one head of one admissible key
        out = tpa.attention(*bad, causal=True, kv_lens=lens)
        assert np.all(np.isnan(out[0, 2, 2])) and np.all(np.isfinite(out[0, :2])) and np.all(np.isfinite(out[0, 2, :2]))


def test_attention_equals_materialized_core_attention(rng):
    """SPEC 2.2: equals lmkern.attention over the materialized Q, K, V."""
    aq, bq, ak, bk, av, bv = factors(rng, 2, 5, 60, 9, 3, 2, 2, 16, 16)
    q, k, v = tpa.materialize(aq, bq), tpa.materialize(ak, bk), tpa.materialize(av, bv)
    lens = np.array([60, 31])
    assert_close(tpa.attention(aq, bq, ak, bk, av, bv, causal=True, kv_lens=lens),
                 lmkern.attention(q, k, v, causal=True, kv_lens=lens))


def test_attention_out_mixed_dtypes_and_zero_sizes(rng):
    args = factors(rng, 2, 3, 20, 4, 2, 1, 1, 8, 6)
    out = np.empty((2, 3, 4, 6), np.float32)
    assert tpa.attention(*args, out=out) is out
    assert_close(out, ref.attention(*args))
    mixed = list(args)
    mixed[5] = mixed[5].astype(np.float64)
    assert tpa.attention(*mixed).dtype == np.float64
    half = [x.astype(np.float16) for x in args]
    assert tpa.attention(*half).dtype == np.float32
    assert_close(tpa.attention(*half), ref.attention(*[x.astype(np.float32) for x in half]))
    for shape in [(0, 3, 20, 4, 2, 1, 1, 8, 6), (2, 0, 20, 4, 2, 1, 1, 8, 6), (2, 3, 20, 0, 2, 1, 1, 8, 6),
                  (2, 3, 20, 4, 2, 1, 1, 8, 0)]:
        a = factors(rng, *shape)
        out, lse = tpa.attention(*a, return_lse=True)
        B, N, M, H, Rq, Rk, Rv, D, E = shape
        assert out.shape == (B, N, H, E) and lse.shape == (B, N, H)
        assert_close(lse, ref.attention(*a, return_lse=True)[1])
    a = factors(rng, 2, 3, 5, 4, 2, 1, 1, 0, 6)       # D = 0: every score is 0, a plain average of V
    assert_close(tpa.attention(*a, causal=True), ref.attention(*a, causal=True))


def test_attention_bitwise_reproducible(rng):
    args = factors(rng, 1, 2, 3000, 34, 6, 2, 2, 64, 64)
    a = tpa.attention(*args, causal=True)
    b = tpa.attention(*args, causal=True)
    assert np.array_equal(a, b)


def test_attention_errors(rng):
    args = list(factors(rng, 2, 3, 20, 4, 2, 1, 1, 8, 6))
    names = ["aq", "bq", "ak", "bk", "av", "bv"]
    for k, name in enumerate(names):
        bad = list(args)
        # ak binds the letters first (a wrong rank then); the others: an axis bound earlier, too long
        shape = list(args[k].shape)
        shape[3 if k == 1 else 2] += 1
        bad[k] = np.zeros(args[k].shape[1:] if k == 2 else shape, np.float32)
        with pytest.raises(ValueError, match=f"tpa.attention: {name} has shape"):
            tpa.attention(*bad)
    bad = list(args)
    bad[1] = np.zeros((2, 3, 2, 9), np.float32)
    with pytest.raises(ValueError, match=r"bq has shape \(2, 3, 2, 9\); expected \(B, N, Rq, D\) = \(2, 3, 2, 8\)"):
        tpa.attention(*bad)
    with pytest.raises(ValueError, match="kv_lens"):
        tpa.attention(*args, kv_lens=[21, 3])
    with pytest.raises(ValueError, match="kv_lens"):
        tpa.attention(*args, kv_lens=[1, 2, 3])
    with pytest.raises(ValueError, match="q_pos"):
        tpa.attention(*args, q_pos=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="kv_pos"):
        tpa.attention(*args, kv_pos=np.zeros((2, 19), np.int64))
    with pytest.raises(TypeError, match="kv_pos"):
        tpa.attention(*args, kv_pos=np.zeros(20, np.float32))
    bad = list(args)
    bad[3] = bad[3].astype(np.int32)
    with pytest.raises(TypeError, match="bk has dtype int32"):
        tpa.attention(*bad)
    with pytest.raises(ValueError, match="out has shape"):
        tpa.attention(*args, out=np.zeros((2, 3, 4, 5), np.float32))


# ------------------------------------------------------------------------------------------------
# decode and the factor cache

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [(2, 1, 130, 32, 16, 1, 1, 64, 64), (3, 1, 77, 34, 6, 2, 2, 64, 64),
                                 (2, 1, 2049, 5, 1, 1, 1, 16, 8), (1, 1, 1, 3, 2, 2, 3, 8, 12)],
                         ids=lambda c: "M{2}H{3}R{4}-{5}-{6}E{8}".format(*c))
def test_decode_matches_twin_and_attention(rng, dtype, cfg):
    B, N, M, H, Rq, Rk, Rv, D, E = cfg
    aq, bq, ak, bk, av, bv = factors(rng, *cfg, dtype)
    lens = rng.integers(0, M + 1, B)
    lens[0] = M
    want, want_lse = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens, return_lse=True)
    for path in PATHS:
        out, lse = tpa.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens, return_lse=True, _path=path)
        assert out.shape == (B, H, E) and lse.shape == (B, H)
        assert_close(out, want, dtype)
        assert_close(lse, want_lse, dtype)
    # decode == attention with N = 1
    att, att_lse = tpa.attention(aq, bq, ak, bk, av, bv, kv_lens=lens, return_lse=True)
    assert_close(out, att[:, 0], dtype)
    assert_close(lse, att_lse[:, 0], dtype)
    att_causal = tpa.attention(aq, bq, ak, bk, av, bv, kv_lens=lens, causal=True)
    assert_close(out, att_causal[:, 0], dtype)


def test_decode_long_cache_and_splits(rng):
    """M = 65537 (not a block multiple), several splits: the padded tail is masked and the combine exact."""
    cfg = (2, 1, 65537, 4, 2, 1, 1, 16, 8)
    aq, bq, ak, bk, av, bv = factors(rng, *cfg)
    bk[1, -1] *= 40                  # one large score in the last (partial) block of row 1
    lens = np.array([65537, 65536])
    want, want_lse = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens, return_lse=True)
    for splits in (0, 1, 7):
        out, lse = tpa.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens, return_lse=True, _splits=splits)
        assert_close(out, want)
        assert_close(lse, want_lse)


def test_decode_cache_beyond_prefetch_threshold(rng):
    """A T6-medium cache of 16 MB (over LK_PF_MIN_BYTES, so the kernel prefetches the block ahead where the
    CPU takes it), with a partial last block, rows of different lengths and a head count (47) that leaves
    remainder tiles in the value fold."""
    cfg = (1, 1, 9001, 47, 6, 2, 2, 64, 64)
    aq, bq, ak, bk, av, bv = factors(rng, *cfg)
    want, want_lse = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, return_lse=True)
    out, lse = tpa.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, return_lse=True)
    assert_close(out, want)
    assert_close(lse, want_lse)
    cfg = (2, 1, 12001, 32, 16, 1, 1, 64, 64)  # the paper's decode configuration, 18 MB
    aq, bq, ak, bk, av, bv = factors(rng, *cfg)
    lens = np.array([12001, 7777])
    want = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens)
    assert_close(tpa.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, kv_lens=lens), want)


def test_decode_split_combine_is_max_stabilized(rng):
    """Partials whose maxima differ by far more than 88 (float32 exp range) still combine exactly."""
    cfg = (1, 1, 4000, 3, 1, 1, 1, 4, 4)
    aq, bq, ak, bk, av, bv = factors(rng, *cfg)
    bk[0, :2000] *= 0.01
    bk[0, 3999] = 500 * np.sign(bq[0, 0, 0]) * np.abs(bk[0, 3999])   # one dominant key, in the last split
    want, want_lse = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, return_lse=True)
    out, lse = tpa.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv, return_lse=True, _splits=4)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    assert_close(out, want)
    assert_close(lse, want_lse, tol=1e-5)


def test_decode_noncontiguous_out_and_errors(rng):
    aq, bq, ak, bk, av, bv = factors(rng, 2, 1, 30, 5, 3, 2, 2, 8, 8)
    aq, bq = aq[:, 0], bq[:, 0]
    want = ref.decode(aq, bq, ak, bk, av, bv)
    out = np.zeros((2, 5, 16), np.float32)[..., ::2]
    tpa.decode(noncontig(aq), noncontig(bq), noncontig(ak), noncontig(bk), noncontig(av), noncontig(bv), out=out)
    assert_close(out, want)
    with pytest.raises(ValueError, match=r"tpa.decode: bq has shape \(2, 3, 9\); expected \(B, Rq, D\) = \(2, 3, 8\)"):
        tpa.decode(aq, np.zeros((2, 3, 9), np.float32), ak, bk, av, bv)
    with pytest.raises(ValueError, match="tpa.decode: aq has shape"):
        tpa.decode(aq[:, None], bq, ak, bk, av, bv)
    with pytest.raises(ValueError, match="ak has shape"):
        tpa.decode(aq, bq, ak[..., 0], bk, av, bv)
    with pytest.raises(ValueError, match="av has shape"):
        tpa.decode(aq, bq, ak, bk, av[:, :, :4], bv)
    assert np.all(tpa.decode(aq, bq, ak, bk, av[..., :0], bv[:, :, :0]) == 0)   # Rv = 0: V = 0
    with pytest.raises(ValueError, match="kv_lens"):
        tpa.decode(aq, bq, ak, bk, av, bv, kv_lens=[-1, 3])


def test_kvcache_appends_bytes_and_decode(rng):
    B, H, Rq, Rk, Rv, D, E = 3, 6, 4, 2, 1, 16, 12
    cache = tpa.KVCache(B, 40, H, Rk, Rv, D, E)
    twin = ref.KVCache(B, 40, H, Rk, Rv, D, E)
    full = factors(rng, B, 1, 40, H, Rq, Rk, Rv, D, E)[2:]
    filled = np.zeros(B, np.int64)
    stored = [[[] for _ in range(B)] for _ in full]     # what each row should hold: its appended tokens
    for T, lens in ((5, [5, 2, 0]), (7, [3, 7, 1]), (1, None)):
        chunk = [np.stack([x[b, filled[b]:filled[b] + T] if filled[b] + T <= 40 else x[b, :T] for b in range(B)])
                 for x in full]
        cache.append(*chunk, lengths=lens)
        twin.append(*chunk, lengths=lens)
        n = [T] * B if lens is None else lens
        for f, x in enumerate(chunk):
            for b in range(B):
                stored[f][b].append(x[b, :n[b]])
        filled += T if lens is None else np.array(lens)
    assert np.array_equal(cache.lengths, filled) and cache.lengths.dtype == np.int64
    per_token = (Rk + Rv) * H + Rk * D + Rv * E
    assert cache.nbytes == int(filled.sum()) * per_token * 4 == twin.nbytes
    assert cache.mha_nbytes == int(filled.sum()) * H * (D + E) * 4
    assert cache.ak.shape == (B, filled.max(), H, Rk) and cache.bv.shape == (B, filled.max(), Rv, E)
    for b in range(B):   # the stored factors are the appended ones, in order
        L = filled[b]
        for name, rows in zip(("ak", "bk", "av", "bv"), stored):
            np.testing.assert_array_equal(getattr(cache, name)[b, :L], np.concatenate(rows[b]), err_msg=name)
    aq, bq = randn(rng, (B, H, Rq)), randn(rng, (B, Rq, D))
    out, lse = cache.decode(aq, bq, return_lse=True)
    want, want_lse = twin.decode(aq, bq, return_lse=True)
    assert_close(out, want)
    assert_close(lse, want_lse)
    assert_close(out, tpa.decode(aq, bq, cache.ak, cache.bk, cache.av, cache.bv, kv_lens=cache.lengths))
    # overflow writes nothing
    before = [x.copy() for x in (cache.ak, cache.bk, cache.av, cache.bv)]
    big = [np.ones((B, 35) + x.shape[2:], np.float32) for x in full]
    with pytest.raises(ValueError, match="exceeds max_len"):
        cache.append(*big)
    assert np.array_equal(cache.lengths, filled)
    for x, y in zip(before, (cache.ak, cache.bk, cache.av, cache.bv)):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="bk has shape"):
        cache.append(full[0][:, :2], full[1][:, :3], full[2][:, :2], full[3][:, :2])
    with pytest.raises(ValueError, match="lengths"):
        cache.append(*[x[:, :2] for x in full], lengths=[3, 0, 0])
    cache.reset()
    assert cache.nbytes == 0 and cache.ak.shape[1] == 0
    with pytest.raises(ValueError, match="k_rank"):
        tpa.KVCache(1, 4, 2, -1, 1, 8)
    with pytest.raises(TypeError, match="dtype"):
        tpa.KVCache(1, 4, 2, 1, 1, 8, dtype=np.int32)


def test_kvcache_float64_and_t6_memory_ratio(rng):
    cache = tpa.KVCache(1, 8, 34, 2, 2, 64, dtype=np.float64)
    f = factors(rng, 1, 1, 8, 34, 6, 2, 2, 64, 64, np.float64)
    cache.append(*f[2:])
    assert cache.ak.dtype == np.float64
    assert cache.mha_nbytes / cache.nbytes == pytest.approx(2 * 34 * 64 / (4 * (34 + 64)))
    assert_close(cache.decode(f[0][:, 0], f[1][:, 0]), ref.decode(f[0][:, 0], f[1][:, 0], *f[2:]), np.float64)


# ------------------------------------------------------------------------------------------------
# RoPE on factors, and the T6 computation in torch

def test_rope_on_factors_is_relative(rng):
    """Rotating bq and bk by their positions makes scores depend only on position differences."""
    B, N, M, H, Rq, Rk, Rv, D, E = 1, 4, 30, 5, 3, 2, 2, 16, 16
    aq, bq, ak, bk, av, bv = factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, np.float64)
    q_pos, kv_pos = np.arange(M - N, M), np.arange(M)
    outs = []
    for shift in (0, 1000):
        rq = lmkern.rope(bq, q_pos + shift, style="half", inverse=True)
        rk = lmkern.rope(bk, kv_pos + shift, style="half", inverse=True)
        outs.append(tpa.attention(aq, rq, ak, rk, av, bv, causal=True))
    assert_close(outs[0], outs[1], np.float64, tol=1e-9)
    # and RoPE commutes with the head factor: rotating the materialized K equals materializing rotated bk
    assert_close(tpa.materialize(ak, lmkern.rope(bk, kv_pos)), lmkern.rope(tpa.materialize(ak, bk), kv_pos),
                 np.float64)


def test_matches_t6_torch_computation(rng):
    torch = pytest.importorskip("torch")
    B, T, H, Rq, Rk, Rv, D = 2, 37, 34, 6, 2, 2, 64
    aq, bq, ak, bk, av, bv = factors(rng, B, T, T, H, Rq, Rk, Rv, D, D)

    def t6_rotary(x, pos):  # the T6 training code's rotary: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        ang = torch.outer(torch.as_tensor(pos, dtype=torch.float64), inv_freq)
        cos, sin = ang.cos()[None, :, None, :].float(), ang.sin()[None, :, None, :].float()
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    t = [torch.from_numpy(x) for x in (aq, bq, ak, bk, av, bv)]
    pos = np.arange(T)
    tbq, tbk = t6_rotary(t[1], pos), t6_rotary(t[3], pos)
    q = torch.einsum("bthr,btrd->bthd", t[0], tbq) / Rq
    k = torch.einsum("bthr,btrd->bthd", t[2], tbk) / Rk
    v = torch.einsum("bthr,btrd->bthd", t[4], t[5]) / Rv
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2).numpy()
    rbq = lmkern.rope(bq, pos, style="half", inverse=True)
    rbk = lmkern.rope(bk, pos, style="half", inverse=True)
    assert_close(tpa.attention(aq, rbq, ak, rbk, av, bv, causal=True), want, tol=1e-4)
    # decode of the last token over the factor cache
    cache = tpa.KVCache(B, T, H, Rk, Rv, D)
    cache.append(ak, rbk, av, bv)
    assert_close(cache.decode(aq[:, -1], rbq[:, -1]), want[:, -1], tol=1e-4)


def test_bench_quick_runs(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_tpa
    decode_table, prefill_table = bench_tpa.main(["--quick"])
    assert len(decode_table.rows) == 3 and len(prefill_table.rows) == 2   # float32 x 2, float64 x 1
    out = capsys.readouterr().out
    assert "T6-medium" in out and "KV-cache bytes per token" in out


def test_cuda_route_mixed_devices_and_gpu_cache(rng):
    # the CUDA paths themselves are tested in test_cuda_tpa.py
    class FakeCudaArray:  # enough for routing: lives on CUDA device 0
        def __dlpack_device__(self):
            return (2, 0)

    aq, bq, ak, bk, av, bv = factors(rng, 1, 1, 4, 2, 1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="different devices"):
        tpa.decode(FakeCudaArray(), bq[:, 0], ak, bk, av, bv)
    with pytest.raises(ValueError, match="device"):
        ref.KVCache(1, 4, 2, 1, 1, 4, device="cuda")       # the twin stays on the host


def test_no_reference_leaks_and_concurrent_calls(rng):
    import threading
    aq, bq, ak, bk, av, bv = factors(rng, 2, 1, 600, 5, 3, 2, 2, 16, 8)
    q0, q1 = aq[:, 0], bq[:, 0]
    out = np.empty((2, 5, 8), np.float32)
    objs = (q0, q1, ak, bk, av, bv, out)
    before = [sys.getrefcount(x) for x in objs]
    for _ in range(20):
        tpa.decode(q0, q1, ak, bk, av, bv, out=out, return_lse=True)
        tpa.attention(aq, bq, ak, bk, av, bv, causal=True)
        tpa.materialize(ak, bk)
    assert [sys.getrefcount(x) for x in objs] == before
    want = tpa.decode(q0, q1, ak, bk, av, bv)
    results = [None] * 4

    def work(k):
        results[k] = [tpa.decode(q0, q1, ak, bk, av, bv) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        for r in res:
            assert np.array_equal(r, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_zero_is_an_empty_sum(rng, dtype):
    """SPEC 0: a zero-sized dimension is never an error.  A rank of 0 materializes to 0: Rq = 0 or Rk = 0
    gives every score 0 (uniform attention over the admissible keys), Rv = 0 gives output 0."""
    B, N, M, H, D, E = 2, 3, 9, 4, 8, 5
    for ranks in ((0, 2, 1), (3, 0, 2), (2, 1, 0), (0, 0, 0)):
        args = factors(rng, B, N, M, H, *ranks, D, E, dtype)
        for causal in (False, True):
            out, lse = tpa.attention(*args, causal=causal, kv_lens=[9, 4], return_lse=True)
            want, want_lse = ref.attention(*args, causal=causal, kv_lens=[9, 4], return_lse=True)
            assert_close(out, want, dtype)
            assert_close(lse, want_lse, dtype)
        dec = tpa.decode(args[0][:, 0], args[1][:, 0], *args[2:])
        assert_close(dec, ref.decode(args[0][:, 0], args[1][:, 0], *args[2:]), dtype)
        if ranks[2] == 0:
            assert np.all(out == 0)
        cache = tpa.KVCache(B, 16, H, ranks[1], ranks[2], D, E, dtype=dtype)
        cache.append(*args[2:])
        assert cache.nbytes == B * M * (ranks[1] * (H + D) + ranks[2] * (H + E)) * np.dtype(dtype).itemsize
        assert_close(cache.decode(args[0][:, 0], args[1][:, 0]), dec, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_query_or_first_key_makes_the_row_nan(rng, dtype):
    """A NaN score met while the running max is still -inf (a NaN query, NaN in the first key) makes the
    row NaN on every path, as in lmkern.attention (the generic path used to skip it: found by fuzzing)."""
    B, N, M, H, Rq, Rk, Rv, D, E = 1, 2, 3, 2, 2, 1, 1, 4, 2
    args = [np.ones(x.shape, dtype) for x in factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, dtype)]
    for k, where in ((1, (0, 0, 0, 0)), (3, (0, 0, 0, 0))):
        bad = [x.copy() for x in args]
        bad[k][where] = np.nan
        for simd in (True, False):
            _core._set_simd(simd)
            for path in PATHS:
                out, lse = tpa.attention(*bad, return_lse=True, _path=path)
                seen = np.isnan(ref.attention(*bad, return_lse=True)[1])
                assert seen.any()
                np.testing.assert_array_equal(np.isnan(lse), seen)
                assert np.all(np.isnan(out[seen]))
                dec, dlse = tpa.decode(bad[0][:, 0], bad[1][:, 0], *bad[2:], return_lse=True, _path=path)
                np.testing.assert_array_equal(np.isnan(dlse), seen[:, 0])

