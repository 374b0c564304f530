"""lmkern.mor against its NumPy twins (lmkern.reference.mor), hand computations and the dense recipe."""
import contextlib
import os
import sys

import numpy as np
import pytest

import lmkern
from lmkern import _core, mor
from lmkern.reference import mor as ref

from conftest import assert_close, noncontig, randn

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=[True, False], ids=["simd", "generic"])
def simd(request):
    _core._set_simd(request.param)
    yield request.param
    _core._set_simd(True)


@contextlib.contextmanager
def one_thread():
    saved = lmkern.get_num_threads()
    lmkern.set_num_threads(1)
    try:
        yield
    finally:
        lmkern.set_num_threads(saved)


class FakeCudaArray:
    """Claims to live on a CUDA device (DLPack device type 2): routes to the CUDA path."""

    def __init__(self, shape):
        self.shape = shape

    def __dlpack_device__(self):
        return (2, 0)


# ------------------------------------------------------------------------------------------ capacity

def test_capacity_schedule():
    assert [mor.capacity(2048, s, 3) for s in range(3)] == [2048, 1365, 682]
    assert [mor.capacity(10, s, 4) for s in range(4)] == [10, 7, 5, 2]
    assert mor.capacity(1, 2, 3) == 1 and mor.capacity(0, 0, 1) == 1  # max(1, ...)
    assert ref.capacity(2048, 2, 3) == 682


@pytest.mark.parametrize("args, name", [((10, 3, 3), "step"), ((10, -1, 3), "step"), ((10, 0, 0), "n_recursions"),
                                        ((-1, 0, 3), "seq_len")])
def test_capacity_errors(args, name):
    with pytest.raises(ValueError, match=name):
        mor.capacity(*args)
    with pytest.raises(TypeError, match="step"):
        mor.capacity(10, 1.5, 3)


# ------------------------------------------------------------------------------------- router_scores

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softmax", "none"])
@pytest.mark.parametrize("C", [None, 1, 3, 17, 40])
def test_router_scores_matches_twin(rng, dtype, activation, C, simd):
    h = randn(rng, (2, 37, 47), dtype)
    w = randn(rng, (47,) if C is None else (47, C), dtype) / 4
    h0, w0 = h.copy(), w.copy()
    got = mor.router_scores(h, w, activation=activation, alpha=0.1, temperature=1.7)
    want = ref.router_scores(h, w, activation=activation, alpha=0.1, temperature=1.7)
    assert got.dtype == dtype and got.shape == ((2, 37) if C is None else (2, 37, C))
    assert_close(got, want, dtype)
    assert np.array_equal(h, h0) and np.array_equal(w, w0)


def test_router_scores_hand_values():
    h = np.array([[[1.0, 2.0], [0.0, -1.0]]])
    w = np.array([0.5, -0.25])
    z = np.array([[0.0, 0.25]])
    assert_close(mor.router_scores(h, w, alpha=0.1), 0.1 / (1 + np.exp(-z)))
    assert_close(mor.router_scores(h, w, activation="tanh", temperature=2.0), np.tanh(z / 2))
    assert_close(mor.router_scores(h, w, activation="none", alpha=3.0), 3 * z)
    w2 = np.array([[0.5, 1.0], [-0.25, 0.0]])
    s = mor.router_scores(h, w2, activation="softmax")
    zz = h[0] @ w2
    assert_close(s[0], np.exp(zz) / np.exp(zz).sum(axis=1, keepdims=True))
    assert_close(s.sum(-1), np.ones((1, 2)))


def test_router_scores_noncontig_mixed_and_empty(rng):
    h = randn(rng, (3, 11, 24))
    w = randn(rng, (24, 2), np.float64)
    got = mor.router_scores(noncontig(h), noncontig(w), activation="softmax")
    assert got.dtype == np.float64
    assert_close(got, ref.router_scores(h, w, activation="softmax"), np.float64)
    got16 = mor.router_scores(h.astype(np.float16), w.astype(np.float16))
    assert got16.dtype == np.float32
    for shape in [(0, 5, 24), (2, 0, 24)]:
        assert mor.router_scores(np.zeros(shape, np.float32), w[:, 0].astype(np.float32)).shape == shape[:2]
    z = mor.router_scores(np.zeros((2, 3, 0)), np.zeros((0,)))
    assert_close(z, np.full((2, 3), 0.5))


def test_router_scores_errors(rng):
    h = randn(rng, (2, 3, 8))
    with pytest.raises(ValueError, match=r"mor.router_scores: w has shape \(7,\)"):
        mor.router_scores(h, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="h has shape"):
        mor.router_scores(h[0], np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="activation"):
        mor.router_scores(h, np.zeros(8, np.float32), activation="relu")
    with pytest.raises(ValueError, match="temperature"):
        mor.router_scores(h, np.zeros(8, np.float32), temperature=0.0)
    with pytest.raises(TypeError, match="w has dtype int64"):
        mor.router_scores(h, np.zeros(8, np.int64))


# ------------------------------------------------------------------------------------- expert_choice

def check_expert_choice(scores, k, candidates=None):
    s0 = scores.copy()
    c0 = None if candidates is None else candidates.copy()
    idx, gate = mor.expert_choice(scores, k, candidates=candidates)
    ridx, rgate = ref.expert_choice(scores, k, candidates=candidates)
    assert idx.dtype == np.int64 and idx.shape == ridx.shape
    assert np.array_equal(idx, ridx)
    assert gate.dtype == rgate.dtype and np.array_equal(gate, rgate, equal_nan=True)
    assert np.all(np.diff(idx, axis=1) > 0)
    assert np.array_equal(scores, s0, equal_nan=True)
    if candidates is not None:
        assert np.array_equal(candidates, c0)
    return idx, gate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(1, 1), (2, 1), (7, 3), (2047, 682), (2049, 1365), (2049, 2049), (300, 0), (300, 1),
                                  (300, 299)])
def test_expert_choice_matches_twin(rng, dtype, n, k):
    check_expert_choice(randn(rng, (3, n), dtype), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_narrow_range_scores(rng, dtype):
    """alpha * sigmoid scores share their top bytes: the radix select must go deep."""
    s = (0.1 / (1 + np.exp(-rng.standard_normal((4, 3000)) * 0.01))).astype(dtype)
    check_expert_choice(s, 1000)
    # few distinct values: massive ties at the cutoff
    check_expert_choice(rng.integers(0, 4, (5, 999)).astype(dtype), 500)


def test_expert_choice_ties_go_to_lower_position():
    s = np.array([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    idx, gate = mor.expert_choice(s, 3)
    assert idx.tolist() == [[1, 2, 3]] and gate.tolist() == [[3.0, 2.0, 2.0]]
    idx, _ = mor.expert_choice(np.zeros((2, 6)), 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2
    # -0.0 ties with +0.0, in both dtypes (each has its own key transform)
    for dtype in DTYPES:
        idx, _ = mor.expert_choice(np.array([[0.0, -0.0, -0.0, -1.0]], dtype), 2)
        assert idx.tolist() == [[0, 1]]
        idx, _ = mor.expert_choice(np.array([[-0.0, 0.0, -1.0]], dtype), 1)
        assert idx.tolist() == [[0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_nan_ranks_lowest(dtype):
    s = np.array([[np.nan, -np.inf, 0.5, np.nan, -3.0], [np.nan, np.nan, np.nan, np.nan, 1.0]], dtype)
    idx, gate = check_expert_choice(s, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 4]]
    assert np.isnan(gate[1, 0]) and gate[1, 2] == 1.0
    idx, _ = check_expert_choice(s, 4)
    assert idx.tolist() == [[0, 1, 2, 4], [0, 1, 2, 4]]
    s2 = np.array([[-np.inf, np.inf, np.nan, 1e30, -1e30]], dtype)
    assert check_expert_choice(s2, 2)[0].tolist() == [[1, 3]]
    assert check_expert_choice(s2, 4)[0].tolist() == [[0, 1, 3, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_hierarchical(rng, dtype):
    """Three recursions: each chooses among the previous survivors; rows keep different survivors."""
    B, T, R = 3, 301, 3
    cand = None
    for step in range(R):
        k = mor.capacity(T, step, R)
        n = T if cand is None else cand.shape[1]
        s = randn(rng, (B, n), dtype)
        idx, gate = check_expert_choice(s, k, cand)
        if cand is not None:
            assert all(set(idx[b]) <= set(cand[b]) for b in range(B))
            pos = np.searchsorted(cand[0], idx[0])
            assert np.array_equal(gate[0], s[0, pos])
        cand = idx
    assert not np.array_equal(cand[0], cand[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_all_candidates_kept(rng, dtype):
    """k == n with candidates: every candidate survives, returned as its token position (not as its index
    among the candidates, which a mutation of that branch returned while the suite passed)."""
    cand = np.array([[3, 8, 20, 21, 40], [1, 2, 4, 9, 11]])
    idx, gate = check_expert_choice(randn(rng, (2, 5), dtype), 5, cand)
    assert idx.tolist() == cand.tolist()


def test_expert_choice_noncontig_and_threads(rng):
    s = randn(rng, (5, 777))
    cand = np.repeat(np.arange(0, 777 * 3, 3)[None], 5, axis=0).astype(np.int32)
    got = check_expert_choice(noncontig(s), 200, noncontig(cand))
    with one_thread():
        one = mor.expert_choice(s, 200, candidates=cand)
    assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])
    assert got[0].dtype == np.int64


def test_expert_choice_empty():
    # empty eligibility after filtering: no candidates left
    idx, gate = mor.expert_choice(np.zeros((2, 0)), 0, candidates=np.zeros((2, 0), np.int64))
    assert idx.shape == (2, 0) and gate.shape == (2, 0) and idx.dtype == np.int64
    idx, gate = mor.expert_choice(np.zeros((0, 5), np.float32), 3)
    assert idx.shape == (0, 3) and gate.dtype == np.float32
    idx, gate = mor.expert_choice(np.ones((2, 5)), 0)
    assert idx.shape == (2, 0)


def test_expert_choice_errors():
    s = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"mor.expert_choice: k must be in \[0, n = 5\]; got k = 6"):
        mor.expert_choice(s, 6)
    with pytest.raises(ValueError, match="k must be"):
        mor.expert_choice(s, -1)
    with pytest.raises(TypeError, match="k must be an integer"):
        mor.expert_choice(s, 2.0)
    with pytest.raises(ValueError, match="scores has shape"):
        mor.expert_choice(np.zeros(5), 2)
    with pytest.raises(ValueError, match="candidates has shape"):
        mor.expert_choice(s, 2, candidates=np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="candidates must be"):
        mor.expert_choice(s, 2, candidates=np.array([[0, 1, 2, 3, 4], [0, 2, 1, 3, 4]]))
    with pytest.raises(ValueError, match="candidates must be"):
        mor.expert_choice(s, 2, candidates=np.array([[-1, 1, 2, 3, 4], [0, 1, 2, 3, 4]]))
    with pytest.raises(TypeError, match="candidates has dtype"):
        mor.expert_choice(s, 2, candidates=np.zeros((2, 5)))
    with pytest.raises(TypeError, match="scores has dtype"):
        mor.expert_choice(np.zeros((2, 5), np.int32), 2)


# -------------------------------------------------------------------------------------- token_choice

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3, 4, 9])
def test_token_choice_matches_twin(rng, dtype, C):
    p = rng.random((3, 45, C)).astype(dtype)
    bias = (rng.standard_normal(C) * 0.3).astype(dtype)
    p0 = p.copy()
    for b in (None, bias):
        depth, gate = mor.token_choice(p, bias=b)
        rd, rg = ref.token_choice(p, bias=b)
        assert depth.dtype == np.int64 and np.array_equal(depth, rd)
        assert gate.dtype == dtype and np.array_equal(gate, rg)
    assert np.array_equal(p, p0)
    depth, gate = mor.token_choice(noncontig(p), bias=noncontig(bias))
    assert np.array_equal(depth, ref.token_choice(p, bias=bias)[0])


def test_token_choice_bias_steers_selection_only():
    p = np.array([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [np.nan, 0.1, np.nan], [np.nan] * 3]])
    depth, gate = mor.token_choice(p)
    assert depth.tolist() == [[1, 3, 1, 2, 1]]
    assert np.array_equal(gate, [[0.5, 0.6, 0.4, 0.1, np.nan]], equal_nan=True)
    depth, gate = mor.token_choice(p, bias=np.array([0.0, 0.25, 0.0]))
    assert depth.tolist() == [[2, 3, 2, 2, 1]]
    assert np.array_equal(gate, [[0.3, 0.6, 0.4, 0.1, np.nan]], equal_nan=True)  # unbiased gates


def test_token_choice_errors_and_empty():
    with pytest.raises(ValueError, match="bias has shape"):
        mor.token_choice(np.zeros((1, 2, 3)), bias=np.zeros(2))
    with pytest.raises(ValueError, match="probs has shape"):
        mor.token_choice(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="C = 0"):
        mor.token_choice(np.zeros((1, 2, 0)))
    with pytest.raises(TypeError, match="probs has dtype"):
        mor.token_choice(np.zeros((1, 2, 3), bool))
    depth, gate = mor.token_choice(np.zeros((2, 0, 3), np.float32))
    assert depth.shape == (2, 0) and gate.shape == (2, 0)


# ---------------------------------------------------------------------------------- gather / scatter

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, Dm, k", [(1, 1, 1, 1), (3, 37, 47, 12), (2, 64, 2049, 30), (2, 5, 3, 0)])
def test_gather_matches_twin(rng, dtype, B, T, Dm, k):
    h = randn(rng, (B, T, Dm), dtype)
    idx = rng.integers(0, T, (B, k))
    h0 = h.copy()
    got = mor.gather(h, idx)
    assert got.dtype == dtype
    assert np.array_equal(got, ref.gather(h, idx))
    assert np.array_equal(mor.gather(noncontig(h), idx.astype(np.int32)), got)
    assert np.array_equal(h, h0)


def test_gather_errors():
    h = np.zeros((2, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"mor.gather: idx holds 5 at \(1, 0\)"):
        mor.gather(h, np.array([[0, 1], [5, 1]]))
    with pytest.raises(ValueError, match="idx holds -1"):
        mor.gather(h, np.array([[0, -1], [0, 1]]))
    with pytest.raises(ValueError, match="idx has shape"):
        mor.gather(h, np.array([[0, 1]]))
    with pytest.raises(TypeError, match="idx has dtype"):
        mor.gather(h, np.zeros((2, 1)))
    with pytest.raises(ValueError, match="idx"):  # the C guard, called directly
        _core.mor_gather(h, np.array([[0], [7]]), np.zeros((2, 1, 3), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, Dm, k", [(1, 1, 1, 1), (3, 37, 47, 12), (2, 40, 2049, 55), (2, 5, 3, 0), (4, 9, 17, 30)])
def test_scatter_residual_matches_twin(rng, dtype, B, T, Dm, k, simd):
    h = randn(rng, (B, T, Dm), dtype)
    idx = rng.integers(0, T, (B, k))  # repeated indices when k is large
    y = randn(rng, (B, k, Dm), dtype)
    gate = rng.random((B, k)).astype(dtype)
    h0, y0, g0, i0 = h.copy(), y.copy(), gate.copy(), idx.copy()
    for g in (gate, None):
        want = ref.scatter_residual(h, idx, y, g)
        got = mor.scatter_residual(h, idx, y, g)
        assert got.dtype == dtype
        assert_close(got, want, dtype)
        hh = h.copy()
        assert mor.scatter_residual_(hh, idx, y, g) is hh
        assert np.array_equal(hh, got)  # in place == out of place, bitwise
    assert np.array_equal(h, h0) and np.array_equal(y, y0) and np.array_equal(gate, g0) and np.array_equal(idx, i0)


def test_scatter_residual_repeated_indices_accumulate_in_order():
    h = np.zeros((1, 3, 1), np.float32)
    y = np.array([[[1e8], [1.0], [-1e8]]], np.float32)
    out = mor.scatter_residual(h, np.array([[1, 1, 1]]), y)
    assert out[0, :, 0].tolist() == [0.0, 0.0, 0.0]  # (0 + 1e8 + 1) - 1e8 in float32: j order
    out = mor.scatter_residual(h, np.array([[1, 2, 1]]), y, np.array([[2.0, 3.0, 0.5]], np.float32))
    assert out[0, :, 0].tolist() == [0.0, 2e8 - 5e7, 3.0]


def test_scatter_residual_out_noncontig_threads(rng):
    B, T, Dm, k = 3, 50, 300, 70
    h = randn(rng, (B, T, Dm))
    idx = rng.integers(0, T, (B, k))
    y = randn(rng, (B, k, Dm))
    gate = rng.random((B, k)).astype(np.float32)
    want = mor.scatter_residual(h, idx, y, gate)
    assert_close(mor.scatter_residual(noncontig(h), idx, noncontig(y), noncontig(gate)), want)
    out = np.empty_like(h)
    assert mor.scatter_residual(h, idx, y, gate, out=out) is out and np.array_equal(out, want)
    out_nc = noncontig(np.empty_like(h))
    assert mor.scatter_residual(h, idx, y, gate, out=out_nc) is out_nc and np.array_equal(out_nc, want)
    hh = h.copy()
    assert mor.scatter_residual(hh, idx, y, gate, out=hh) is hh and np.array_equal(hh, want)
    hn = noncontig(h.copy())
    mor.scatter_residual_(hn, idx, y, gate)
    assert np.array_equal(hn, want)
    with one_thread():
        one = mor.scatter_residual(h, idx, y, gate)
    assert np.array_equal(one, want)
    # in place computes in h's dtype: float64 y into a float32 h
    h32 = h.copy()
    mor.scatter_residual_(h32, idx, y.astype(np.float64), gate)
    assert h32.dtype == np.float32 and np.array_equal(h32, want)


def test_scatter_residual_errors_write_nothing():
    h = np.zeros((2, 4, 3), np.float32)
    y = np.ones((2, 2, 3), np.float32)
    bad = np.array([[0, 1], [2, 4]])
    with pytest.raises(ValueError, match=r"mor.scatter_residual_: idx holds 4 at \(1, 1\)"):
        mor.scatter_residual_(h, bad, y)
    with pytest.raises(ValueError, match="idx holds -2"):
        mor.scatter_residual_(h, np.array([[0, 1], [-2, 1]]), y)
    assert not h.any()
    with pytest.raises(ValueError, match="idx"):  # the C guard, called directly
        _core.mor_scatter(None, bad, y, None, h)
    assert not h.any()
    with pytest.raises(ValueError, match="mor.scatter_residual: idx holds 4"):
        mor.scatter_residual(h, bad, y)
    with pytest.raises(ValueError, match="y has shape"):
        mor.scatter_residual(h, np.zeros((2, 2), np.int64), np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="gate has shape"):
        mor.scatter_residual(h, np.zeros((2, 2), np.int64), y, np.ones((2, 3)))
    with pytest.raises(TypeError, match="h must be a numpy.ndarray"):
        mor.scatter_residual_(h.tolist(), np.zeros((2, 2), np.int64), y)
    with pytest.raises(TypeError, match="h has dtype"):
        mor.scatter_residual_(h.astype(np.float16), np.zeros((2, 2), np.int64), y)
    with pytest.raises(ValueError, match="out has shape"):
        mor.scatter_residual(h, np.zeros((2, 2), np.int64), y, out=np.zeros((2, 4, 4), np.float32))


def test_scatter_residual_empty():
    for shape in [(0, 4, 3), (2, 4, 0)]:
        h = np.ones(shape, np.float32)
        out = mor.scatter_residual(h, np.zeros((shape[0], 1), np.int64), np.ones((shape[0], 1, shape[2]), np.float32))
        assert out.shape == shape
    h = np.ones((2, 0, 3))
    assert mor.scatter_residual(h, np.zeros((2, 0), np.int64), np.ones((2, 0, 3))).shape == (2, 0, 3)


# ---------------------------------------------------------------------------------------------- losses

def test_balance_loss_hand():
    probs = np.array([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]])
    depth = np.array([[1, 2], [3, 1]])
    P = probs.reshape(4, 3).mean(0)
    f = 3 * np.array([2, 1, 1]) / 4
    assert mor.balance_loss(probs, depth) == pytest.approx(float(f @ P), rel=1e-14)
    assert ref.balance_loss(probs, depth) == pytest.approx(float(f @ P), rel=1e-14)
    uniform = np.full((1, 6, 3), 1 / 3)
    assert mor.balance_loss(uniform, np.array([[1, 2, 3, 1, 2, 3]])) == pytest.approx(1.0)
    assert np.isnan(mor.balance_loss(np.zeros((0, 2, 3)), np.zeros((0, 2), np.int64)))
    with pytest.raises(ValueError, match="depth must be in"):
        mor.balance_loss(probs, depth + 1)
    with pytest.raises(ValueError, match="depth has shape"):
        mor.balance_loss(probs, depth[0])


def test_z_loss_hand(rng):
    x = np.array([[1.0, -2.0, 3.0]])
    assert mor.z_loss(x) == pytest.approx((1 + 4 + 9) / 3)
    logits = np.array([[[0.0, 0.0], [1000.0, 1000.0]]])  # stable: lse = 1000 + log 2
    want = (np.log(2) ** 2 + (1000 + np.log(2)) ** 2) / 2
    assert mor.z_loss(logits) == pytest.approx(want, rel=1e-12)
    big = randn(rng, (2, 9, 4))
    assert mor.z_loss(big) == pytest.approx(ref.z_loss(big), rel=1e-6)
    assert mor.z_loss(big[..., 0]) == pytest.approx(ref.z_loss(big[..., 0]), rel=1e-6)
    with pytest.raises(ValueError, match="logits has shape"):
        mor.z_loss(np.zeros(3))
    # IEEE rows: a NaN logit makes the loss NaN even beside -inf; a row of -inf has lse -inf, squared +inf
    for row, want in (([np.nan, -np.inf, -np.inf], np.nan), ([-np.inf, -np.inf, -np.inf], np.inf),
                      ([-np.inf, np.nan, 1.0], np.nan)):
        for dtype in DTYPES:
            x = np.array([[row]], dtype)
            with np.errstate(invalid="ignore"):
                tw = ref.z_loss(x)
            got = mor.z_loss(x)
            np.testing.assert_array_equal(got, want, err_msg=str(row))
            np.testing.assert_array_equal(got, tw, err_msg=str(row))


def test_router_bce_hand(rng):
    x = np.array([[0.0, 2.0, -3.0, 50.0]])
    y = np.array([[True, False, False, True]])
    sig = 1 / (1 + np.exp(-x[0, :3]))
    per = np.array([-np.log(sig[0]), -np.log(1 - sig[1]), -np.log(1 - sig[2]), 0.0])
    assert mor.router_bce(x, y) == pytest.approx(per.mean(), rel=1e-12)
    e = np.array([[1, 0, 1, 0]])
    assert mor.router_bce(x, y, eligible=e) == pytest.approx((per[0] + per[2]) / 2, rel=1e-12)
    # numerically stable far out, where the naive float32 formula gives inf
    far = np.array([[-200.0, 200.0]], np.float32)
    assert mor.router_bce(far, np.array([[1, 0]])) == pytest.approx(200.0)
    assert np.isnan(mor.router_bce(x, y, eligible=np.zeros((1, 4), bool)))
    logits = randn(rng, (3, 20))
    sel = rng.random((3, 20)) < 0.3
    el = rng.random((3, 20)) < 0.7
    assert mor.router_bce(logits, sel, eligible=el) == pytest.approx(ref.router_bce(logits, sel, eligible=el), rel=1e-9)
    with pytest.raises(ValueError, match="selected has shape"):
        mor.router_bce(x, y[:, :2])
    with pytest.raises(TypeError, match="eligible has dtype"):
        mor.router_bce(x, y, eligible=np.ones((1, 4)))


# --------------------------------------------------------------------------------------- CUDA route

def test_cuda_route_device_mismatch():
    # the kernels route to lmkern._cuda_mor (tests/test_cuda_mor.py, the losses too); host data with a device index array is a device mismatch (host index arrays with device data are uploaded)
    with pytest.raises(ValueError, match="different devices"):
        mor.gather(np.zeros((1, 2, 3), np.float32), FakeCudaArray((1, 1)))
    with pytest.raises(ValueError, match="different devices"):
        mor.scatter_residual(FakeCudaArray((1, 2, 3)), np.zeros((1, 1), np.int64), np.zeros((1, 1, 3), np.float32))


# ----------------------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
def test_recipe_forward_equals_dense(rng, dtype, kv_mode):
    block = mor.SharedBlock(dm=16, heads=2, head_dim=8, ffn=32, seed=1, dtype=dtype)
    w = (rng.standard_normal(16) / 2).astype(dtype)
    h = randn(rng, (2, 19, 16), dtype)
    h0 = h.copy()
    got, trace = mor.expert_choice_forward(h, block, w, n_recursions=3, kv_mode=kv_mode)
    want, masks = ref.expert_choice_forward_dense(h, block, w, n_recursions=3, kv_mode=kv_mode)
    assert [t[0].shape[1] for t in trace] == [19, 12, 6]
    for (idx, _), m in zip(trace, masks):
        assert all(np.array_equal(idx[b], np.nonzero(m[b])[0]) for b in range(2))
    assert not np.array_equal(masks[2][0], masks[2][1])  # rows keep different tokens
    assert_close(got, want, dtype, tol=1e-5 if dtype == np.float32 else 1e-12)
    assert np.array_equal(h, h0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_mode", ["recursion", "share"])
def test_recipe_decode_with_per_depth_caches(rng, dtype, kv_mode):
    B, T, R = 3, 14, 3
    block = mor.SharedBlock(dm=16, heads=2, head_dim=8, ffn=32, seed=2, dtype=dtype)
    w = (rng.standard_normal(16) / 2).astype(dtype)
    h = randn(rng, (B, T, 16), dtype)
    h_pre, caches, trace = mor.expert_choice_prefill(h, block, w, n_recursions=R, kv_mode=kv_mode)
    if kv_mode == "recursion":
        for r, (idx, _) in enumerate(trace):  # cache r holds exactly the tokens active at depth r
            assert np.array_equal(caches[r].lengths, [idx.shape[1]] * B)
            assert np.array_equal(caches[r].positions, idx)
    depths = []
    for step in range(2):  # two decode steps; each new token's depth decided causally
        hn = randn(rng, (B, 1, 16), dtype)
        out, depth = mor.expert_choice_decode(hn, np.full(B, T + step), block, w, caches, n_recursions=R,
                                              kv_mode=kv_mode)
        depths.append(depth)
        # dense reference over prompt + new tokens with the same active sets
        h = np.concatenate([h, hn], axis=1)
        active = []
        for r, (idx, _) in enumerate(trace):
            m = np.zeros((B, h.shape[1]), bool)
            for b in range(B):
                m[b, idx[b]] = True
                for s, d in enumerate(depths):
                    m[b, T + s] = d[b] > r
            active.append(m)
        want, _ = ref.expert_choice_forward_dense(h, block, w, n_recursions=R, kv_mode=kv_mode, active=active)
        assert_close(out[:, 0], want[:, -1], dtype, tol=1e-5 if dtype == np.float32 else 1e-12)
        assert_close(h_pre, want[:, :T], dtype, tol=1e-5 if dtype == np.float32 else 1e-12)
    assert all(1 <= d.min() and d.max() <= R for d in depths)
    if kv_mode == "recursion":
        for r in range(R):
            assert np.array_equal(caches[r].lengths, [trace[r][0].shape[1] + sum(int(d[b] > r) for d in depths)
                                                      for b in range(B)])


# --------------------------------------------------------------------------------------- benchmark

def test_bench_quick_runs(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_mor
    table = bench_mor.main(["--quick"])
    assert len(table.rows) == 7
    assert "expert_choice" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_many_tokens_match_twin_for_any_thread_count(rng, dtype):
    B, T, C = 3, 3001, 4  # several reduction blocks
    logits = randn(rng, (B, T, C), dtype) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    depth = rng.integers(1, C + 1, (B, T))
    sel = rng.random((B, T)) < 0.4
    elig = rng.random((B, T)) < 0.8
    got = (mor.balance_loss(probs, depth), mor.z_loss(logits), mor.z_loss(logits[..., 0]),
           mor.router_bce(logits[..., 1], sel, eligible=elig), mor.router_bce(noncontig(logits[..., 1]), sel))
    want = (ref.balance_loss(probs, depth), ref.z_loss(logits), ref.z_loss(logits[..., 0]),
            ref.router_bce(logits[..., 1], sel, eligible=elig), ref.router_bce(logits[..., 1], sel))
    for g, w in zip(got, want):
        assert isinstance(g, float) and g == pytest.approx(w, rel=1e-12)
    with one_thread():
        again = (mor.balance_loss(probs, depth), mor.z_loss(logits), mor.z_loss(logits[..., 0]),
                 mor.router_bce(logits[..., 1], sel, eligible=elig), mor.router_bce(noncontig(logits[..., 1]), sel))
    assert again == got  # bitwise, whatever the thread count
    inf_logits = np.array([[[-np.inf, 0.0], [np.inf, 1.0]]])
    assert mor.z_loss(inf_logits) == ref.z_loss(inf_logits) == np.inf


def test_no_reference_leaks(rng):
    h = randn(rng, (2, 9, 8))
    w = randn(rng, (8,))
    s = randn(rng, (2, 9))
    idx = np.array([[0, 3], [2, 2]])
    y = randn(rng, (2, 2, 8))
    gate = randn(rng, (2, 2))
    probs = rng.random((2, 9, 3)).astype(np.float32)
    depth = rng.integers(1, 4, (2, 9))
    arrays = (h, w, s, idx, y, gate, probs, depth)
    before = [sys.getrefcount(a) for a in arrays]
    for _ in range(50):
        mor.router_scores(h, w)
        mor.expert_choice(s, 4)
        mor.expert_choice(s[:, :4], 2, candidates=idx[:, :1].repeat(4, 1) + np.arange(4))
        mor.token_choice(probs)
        mor.gather(h, idx)
        mor.scatter_residual(h, idx, y, gate)
        mor.balance_loss(probs, depth)
        with pytest.raises(ValueError):
            mor.gather(h, idx + 9)
    assert [sys.getrefcount(a) for a in arrays] == before


def test_twins_at_empty_edges():
    """The twins agree with the kernels where a dimension is 0 (found by fuzzing): router scores with
    Dm = 0 (all zeros in, activation of 0 out), balance loss with no tokens (NaN)."""
    from lmkern.reference import mor as rmor
    h = np.zeros((2, 3, 0), np.float32)
    for w, act in ((np.zeros((0,), np.float32), "sigmoid"), (np.zeros((0, 4), np.float32), "softmax")):
        np.testing.assert_array_equal(lmkern.mor.router_scores(h, w, activation=act),
                                      rmor.router_scores(h, w, activation=act))
    p, d = np.zeros((0, 3, 2), np.float32), np.zeros((0, 3), np.int64)
    assert np.isnan(lmkern.mor.balance_loss(p, d)) and np.isnan(rmor.balance_loss(p, d))
