"""The Python layer against the SPEC's values: the recipes (shared by the kernels and their twins, so a
twin comparison cannot check them), argument checks, aliasing of out= and in-place calls, and a few twin
details.  Each test pins a behaviour that a one-line mutation of the Python layer changed while the rest
of the suite passed (mutation testing at stop 15)."""
import numpy as np
import pytest

import lmkern
from lmkern import kv, mor
from lmkern import parscale as ps
from lmkern import reference as ref
from conftest import randn
from test_parscale import agg_params


# ----------------------------------------------------------------------------- KV recipes (SPEC 4.6)

def test_snapkv_window_edges(rng):
    q, k = randn(rng, (1, 4, 2, 8)), randn(rng, (1, 4, 2, 8))
    # the window covers the whole cache: everything is kept
    assert kv.snapkv_select(q, k, 4)[0, :, 0].tolist() == [0, 1, 2, 3]
    # budget == window: the window only
    k16 = randn(rng, (1, 16, 2, 8))
    assert kv.snapkv_select(q, k16, 4)[0, :, 0].tolist() == [12, 13, 14, 15]


def test_snapkv_is_the_spec_composition(rng):
    """SnapKV = the window's causal attention mass on the prefix, mean over each GQA group, avg-pooled
    (kernel 5), top budget - W, plus the window."""
    B, W, M, Hq, Hkv, D, budget = 1, 8, 40, 4, 2, 16, 16
    q = randn(rng, (B, W, Hq, D)) * 3
    k = randn(rng, (B, M, Hkv, D))
    k[:, M - W:] += 4 * q[:, :, ::2]             # window keys attract the window queries: causality matters
    mass = kv.attention_mass(q, k, causal=True, group_reduce="mean")
    votes = kv.pool1d(mass[:, :M - W], 5)
    want = np.concatenate([kv.keep_topk(votes, budget - W),
                           np.broadcast_to(np.arange(M - W, M)[None, :, None], (B, W, Hkv))], axis=1)
    np.testing.assert_array_equal(kv.snapkv_select(q, k, budget), want)


def test_snapkv_votes_are_the_group_mean():
    """One-hot keys: query head 0 points at key 2 alone, heads 1-3 share key 8 with a key of their own;
    the group mean ranks key 8 first (the group max would rank key 2)."""
    M = D = 32
    k = np.eye(M, D, dtype=np.float32)[None, :, None, :]
    q = np.zeros((1, 1, 4, D), np.float32)
    q[0, 0, 0, 2] = 40.0
    for h, c in zip((1, 2, 3), (14, 20, 26)):
        q[0, 0, h, 8] = q[0, 0, h, c] = 40.0
    assert kv.snapkv_select(q, k, 2, kernel_size=1)[0, :, 0].tolist() == [8, 31]


def test_h2o_and_lazy_ratio_defaults():
    mass = np.array([0., 5, 4, 3, 2, 1, 0, 0], np.float32).reshape(1, 8, 1)
    assert kv.h2o_select(mass, 4, recent=2)[0, :, 0].tolist() == [1, 2, 6, 7]      # no sink by default
    assert kv.lazy_ratio(np.ones((1, 10, 1), np.float32), recent=2).tolist() == [[pytest.approx(0.6)]]  # sink 4


def test_scalekv_budgets_checks_and_drafters():
    with pytest.raises(ValueError):                  # 2 x 30 > 4 x 10: nothing left for the refiners
        kv.scalekv_budgets(4, [0, 1], per_layer=10, max_budget=30)
    with pytest.raises(ValueError):                  # layer 4 of 4 does not exist
        kv.scalekv_budgets(4, [4], per_layer=10, max_budget=12)
    b = kv.scalekv_budgets(4, [0, 0], per_layer=10, max_budget=16)   # a repeated drafter counts once
    assert b.tolist() == [16, 8, 8, 8] and b.sum() == 40


def test_attention_mass_default_q_pos_follows_kv_lens(rng):
    q, k = randn(rng, (1, 2, 1, 8)), randn(rng, (1, 6, 1, 8))
    np.testing.assert_array_equal(kv.attention_mass(q, k, causal=True, kv_lens=[4]),
                                  kv.attention_mass(q, k, causal=True, kv_lens=[4], q_pos=[[2, 3]]))


def test_quantized_cache_group_size_checked_at_construction():
    with pytest.raises(ValueError, match="group_size"):
        kv.QuantizedKVCache(1, 16, 1, 8, bits=2, group_size=2, residual=2)


def test_quantize_twin_rounds_half_to_even():
    x = np.array([0, 0.5, 1.5, 3], np.float32).reshape(1, 1, 1, 4)     # scale 1: 0.5 and 1.5 are ties
    a = kv.dequantize(kv.quantize(x, bits=2, group_size=4, axis="token"))
    b = ref.kv.dequantize(ref.kv.quantize(x, bits=2, group_size=4, axis="token"))
    assert a.ravel().tolist() == [0, 0, 2, 3]
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- argument checks

def test_kvcache_refuses_float16():
    with pytest.raises(TypeError):
        lmkern.KVCache(1, 8, 1, 4, dtype=np.float16)


def test_index_arrays_of_unsigned_dtypes_and_counts_that_are_bools(rng):
    x = randn(rng, (1, 3, 1, 4))
    np.testing.assert_array_equal(lmkern.attention(x, x, x, kv_lens=np.array([2], np.uint32)),
                                  lmkern.attention(x, x, x, kv_lens=[2]))
    with pytest.raises(TypeError):
        kv.streaming_indices(True, sink=0, recent=2)


def test_read_only_out_is_a_value_error(rng):
    x = randn(rng, (1, 3, 1, 4))
    o = np.zeros_like(x)
    o.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        lmkern.attention(x, x, x, out=o)
    assert not o.any()


# ----------------------------------------------------------------------------- MoR

def test_balance_loss_depths_start_at_one_and_empty_token_choice():
    with pytest.raises(ValueError, match="depth"):
        mor.balance_loss(np.full((1, 4, 2), 0.5, np.float32), np.array([[0, 1, 2, 2]]))
    depth, gate = mor.token_choice(np.zeros((0, 3, 0), np.float32))
    assert depth.shape == (0, 3) and gate.shape == (0, 3)


def test_scatter_residual_with_aliased_out_or_y():
    base = np.arange(10, dtype=np.float32).reshape(1, 5, 2)
    idx, y = np.array([[0, 2]]), np.full((1, 2, 2), 100, np.float32)
    want = mor.scatter_residual(base[:, :4].copy(), idx, y)
    b2 = base.copy()
    np.testing.assert_array_equal(mor.scatter_residual(b2[:, :4], idx, y, out=b2[:, 1:]), want)  # out overlaps h
    h = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    want = mor.scatter_residual(h.copy(), np.array([[1, 0]]), h[:, 0:2].copy())
    mor.scatter_residual_(h, np.array([[1, 0]]), h[:, 0:2])                                      # y views h
    np.testing.assert_array_equal(h, want)


def test_expert_choice_decode_threshold_is_strict(rng):
    """alpha * sigmoid(0) = 0.5 = alpha * threshold: not above it, so the token stops at depth 1."""
    blk = mor.SharedBlock(8, 2, 4, 16, seed=0)
    rw = np.zeros(8, np.float32)
    h = randn(rng, (1, 6, 8))
    _, caches, _ = mor.expert_choice_prefill(h, blk, rw, n_recursions=2, alpha=1.0)
    x = randn(rng, (1, 1, 8))
    assert mor.expert_choice_decode(x, np.array([6]), blk, rw, caches, n_recursions=2, alpha=1.0)[1].tolist() == [1]


# ----------------------------------------------------------------------------- ParScale

def test_aggregate_out_aliasing_h(rng):
    P, B, T, Hd, Hh = 2, 2, 3, 8, 5
    h = randn(rng, (P * B, T, Hd))
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh)
    want = ps.aggregate(h.copy(), w1, b1, w2, b2, P=P)
    hh = h.copy()
    np.testing.assert_array_equal(ps.aggregate(hh, w1, b1, w2, b2, P=P, out=hh[1:1 + B]), want)


def test_aggregate_twin_is_stable_for_large_logits(rng):
    P, B, T, Hd, Hh = 2, 1, 2, 4, 3
    h = randn(rng, (P * B, T, Hd), np.float64)
    w1, b1, w2, _ = agg_params(rng, P, Hd, Hh, np.float64)
    b2 = np.array([1000.0, 0.0])
    want = ref.parscale.aggregate(h, w1, b1, w2, b2, P=P)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(ps.aggregate(h, w1, b1, w2, b2, P=P), want, rtol=1e-12, atol=1e-12)
