"""lmkern.kv scoring and eviction on CUDA (attention_mass, pool1d, keep_topk, compact): the Python glue over
a host-memory fake of lmkern._cuda (runs everywhere), and the kernels against the NumPy twin on a GPU."""
import gc

import numpy as np
import pytest

import lmkern
from lmkern import cuda
from lmkern import kv as lkv
from lmkern.reference import kv as rkv

from conftest import GPU_TOL, assert_close, randn, requires_gpu, torch_cuda
from test_cuda import FakeCuda, FakeGpuArray, _arr_at, assert_stream_ordered

_REDUCE_NAMES = {0: "mean", 1: "sum", 2: "max", 3: "none"}


def _read(ptr, dtype, shape, strides):
    """float32 host copy of a fake-device array of `dtype` (bfloat16 included)."""
    if dtype == "bfloat16":
        return cuda._f32_from_bf16(np.ascontiguousarray(_arr_at(ptr, np.uint16, shape, strides)))
    return np.array(_arr_at(ptr, dtype, shape, strides), dtype=np.float32)


def _write(ptr, dtype, values):
    shape = values.shape
    strides = cuda._c_strides(shape)
    if dtype == "bfloat16":
        _arr_at(ptr, np.uint16, shape, strides)[...] = cuda._bf16_from_f32(values.astype(np.float32))
    else:
        _arr_at(ptr, dtype, shape, strides)[...] = values


class KvFakeCuda(FakeCuda):
    """FakeCuda plus host stand-ins of the kv scoring/eviction bindings (computed with the twin)."""

    def kv_attention_mass_plan(self, **kw):
        return self.real.kv_attention_mass_plan(**kw, num_sms=4)

    def kv_attention_mass(self, **kw):
        self.calls.append(("kv_attention_mass", kw))
        dt = kw["dtype"]
        B, N, M, Hq, Hkv, D = (kw[x] for x in ("B", "N", "M", "Hq", "Hkv", "D"))
        q = _read(kw["q"], dt, (B, N, Hq, D), tuple(kw["q_stride"]) + (1,))
        k = _read(kw["k"], dt, (B, M, Hkv, D), tuple(kw["k_stride"]) + (1,))

        def idx(ptr, bstride, n):
            if not ptr:
                return None
            return _arr_at(ptr, np.int64, (B, n) if bstride else (n,), (bstride, 1) if bstride else (1,)).copy()

        q_pos, kv_pos = idx(kw["q_pos"], kw["q_pos_bstride"], N), idx(kw["kv_pos"], kw["kv_pos_bstride"], M)
        lens = _arr_at(kw["kv_lens"], np.int64, (B,), (1,)).copy() if kw["kv_lens"] else None
        if lens is not None:
            lens = np.clip(lens, 0, M)  # the kernel's clamp of device-resident kv_lens
        if kw["normalize"] and B * M * N * Hq:
            floats = self.real.kv_attention_mass_plan(**kw, num_sms=4)[1]
            assert self.block_bytes(kw["scratch"]) >= 4 * floats
        mass = rkv.attention_mass(q, k, scale=kw["scale"], causal=kw["causal"], q_pos=q_pos, kv_pos=kv_pos,
                                  kv_lens=lens, normalize=kw["normalize"], group_reduce=_REDUCE_NAMES[kw["reduce"]])
        _write(kw["out"], "float32", mass)

    def kv_pool1d(self, **kw):
        self.calls.append(("kv_pool1d", kw))
        B, M, H = kw["B"], kw["M"], kw["H"]
        s = _read(kw["scores"], kw["dtype"], (B, M, H), tuple(kw["s_stride"]))
        res = rkv.pool1d(s, kw["kernel_size"], mode="max" if kw["max_mode"] else "avg")
        _write(kw["out"], kw["dtype"], res)

    def kv_keep_topk(self, **kw):
        self.calls.append(("kv_keep_topk", kw))
        B, M, H = kw["B"], kw["M"], kw["H"]
        s = _read(kw["scores"], kw["dtype"], (B, M, H), tuple(kw["s_stride"]))
        res = rkv.keep_topk(s, kw["K"], sink=kw["sink"], recent=kw["recent"])
        assert res.shape[1] == kw["K"]
        _write(kw["idx"], np.int64, res)

    def kv_compact(self, **kw):
        self.calls.append(("kv_compact", kw))
        B, M, K, H, rb = kw["B"], kw["M"], kw["K"], kw["H"], kw["row_bytes"]
        x = _arr_at(kw["x"], np.uint8, (B, M, H, rb), tuple(kw["x_stride_bytes"]) + (1,))
        idx = np.clip(_arr_at(kw["idx"], np.int64, (B, K, H), (K * H, H, 1)), 0, M - 1)  # the kernel's clamp
        out = _arr_at(kw["out"], np.uint8, (B, K, H, rb), (K * H * rb, H * rb, rb, 1))
        for b in range(B):
            for h in range(H):
                out[b, :, h] = x[b, idx[b, :, h], h]


@pytest.fixture
def kvfake(monkeypatch):
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    f = KvFakeCuda(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())  # its blocks go back to the fake, never to the GPU pool
    yield f
    gc.collect()


def _last(fake, name):
    return [c for c in fake.calls if c[0] == name][-1][1]


def _same_error(exc_type, cpu_call, gpu_call):
    """Both calls raise exc_type with the same message (the paths share their validation)."""
    with pytest.raises(exc_type) as cpu_exc:
        cpu_call()
    with pytest.raises(exc_type) as gpu_exc:
        gpu_call()
    assert str(cpu_exc.value) == str(gpu_exc.value)
    return str(gpu_exc.value)


# ------------------------------------------------------------------------------------------------
# glue: attention_mass

MASS_CASES = [
    # B, N, M, Hq, Hkv, D, causal, extra
    (2, 5, 7, 4, 1, 16, True, {}),                                      # GQA 4, bottom-right causal
    (1, 3, 40, 8, 1, 8, False, {"kv_lens": [33]}),                      # GQA 8
    (2, 3, 6, 2, 2, 8, True, {"kv_lens": [6, 2]}),                      # GQA 1, ragged
    (2, 4, 5, 2, 1, 8, True, {"q_pos": [[0, 1, 2, 3], [4, 4, 0, 9]], "kv_pos": [0, 2, 4, 6, 8]}),
    (2, 3, 4, 2, 2, 8, True, {"q_pos": [1, 2, 3], "kv_pos": [[0, 1, 2, 3], [3, 2, 1, 0]], "scale": 0.3}),
    (1, 1, 1000, 4, 2, 24, False, {}),                                  # decode: several splits
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "none"])
@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,causal,extra", MASS_CASES)
def test_glue_attention_mass_matches_twin(kvfake, rng, B, N, M, Hq, Hkv, D, causal, extra, normalize, reduce):
    q, k = randn(rng, (B, N, Hq, D)), randn(rng, (B, M, Hkv, D))
    extra = {key: (np.asarray(val) if key != "scale" else val) for key, val in extra.items()}
    want = rkv.attention_mass(q, k, causal=causal, normalize=normalize, group_reduce=reduce, **extra)
    q0, k0 = q.copy(), k.copy()
    got = lkv.attention_mass(FakeGpuArray(q), FakeGpuArray(k), causal=causal, normalize=normalize,
                             group_reduce=reduce, **extra)
    assert isinstance(got, cuda.DeviceArray) and got.dtype == "float32"
    assert got.shape == (B, M, Hq if reduce == "none" else Hkv)
    assert_close(got.numpy(), want)
    assert np.array_equal(q, q0) and np.array_equal(k, k0)
    kw = _last(kvfake, "kv_attention_mass")
    assert kw["q"] == q.ctypes.data and kw["k"] == k.ctypes.data          # zero copy
    assert kw["normalize"] == normalize and kw["reduce"] == {"mean": 0, "sum": 1, "max": 2, "none": 3}[reduce]
    assert kw["scale"] == pytest.approx(extra.get("scale", D ** -0.5))
    assert (kw["q_pos"] is None) == ("q_pos" not in extra)               # default positions: computed on the device
    assert (kw["kv_lens"] is None) == ("kv_lens" not in extra)
    if "q_pos" in extra:
        assert kw["q_pos_bstride"] == (N if extra["q_pos"].ndim == 2 else 0)
    if "kv_pos" in extra:
        assert kw["kv_pos_bstride"] == (M if extra["kv_pos"].ndim == 2 else 0)
    if normalize and M >= 512:
        assert kw["num_splits"] > 1 and kw["scratch"]
    if not normalize:
        assert kw["scratch"] is None


def test_glue_attention_mass_strided_and_float16(kvfake, rng):
    q = randn(rng, (2, 6, 4, 16)).astype(np.float16)
    k = randn(rng, (2, 9, 2, 16)).astype(np.float16)
    qs = np.ascontiguousarray(np.swapaxes(q, 1, 2)).swapaxes(1, 2)     # token/head strides permuted
    kbig = np.zeros((2, 9, 2, 32), np.float16)
    kbig[..., :16] = k
    got = lkv.attention_mass(FakeGpuArray(qs), FakeGpuArray(kbig[..., :16]), causal=True, kv_lens=[9, 4])
    assert_close(got.numpy(), rkv.attention_mass(q, k, causal=True, kv_lens=[9, 4]), tol=1e-5)
    kw = _last(kvfake, "kv_attention_mass")
    assert kw["dtype"] == "float16"
    assert tuple(kw["k_stride"]) == (9 * 2 * 32, 2 * 32, 32)                 # no copies: strides passed
    assert tuple(kw["q_stride"]) == tuple(st // 2 for st in qs.strides[:3]) and kw["q"] == qs.ctypes.data


def test_glue_attention_mass_bfloat16_device_arrays_and_device_indices(kvfake, rng):
    q, k = randn(rng, (2, 3, 8, 8)), randn(rng, (2, 11, 2, 8))
    D = cuda.DeviceArray.from_numpy
    dq, dk = D(q, dtype="bfloat16"), D(k, dtype="bfloat16")
    lens = np.array([11, 20], np.int64)              # a device kv_lens is clamped, not checked
    qp = np.array([[3, 4, 5], [1, 2, 9]], np.int64)
    got = lkv.attention_mass(dq, dk, causal=True, q_pos=D(qp), kv_lens=D(lens), group_reduce="max")
    want = rkv.attention_mass(dq.numpy(), dk.numpy(), causal=True, q_pos=qp, kv_lens=[11, 11], group_reduce="max")
    assert isinstance(got, cuda.DeviceArray)
    assert_close(got.numpy(), want)
    kw = _last(kvfake, "kv_attention_mass")
    assert kw["dtype"] == "bfloat16" and kw["q_pos_bstride"] == 3


def test_glue_attention_mass_empty(kvfake, rng):
    for qs, ks in (((2, 0, 4, 8), (2, 5, 2, 8)), ((2, 3, 4, 8), (2, 0, 2, 8)), ((0, 3, 4, 8), (0, 5, 2, 8))):
        q, k = randn(rng, qs), randn(rng, ks)
        got = lkv.attention_mass(FakeGpuArray(q), FakeGpuArray(k))
        assert got.shape == (ks[0], ks[1], 2)
        assert np.array_equal(got.numpy(), rkv.attention_mass(q, k))


def test_glue_attention_mass_errors_match_cpu(kvfake, rng):
    q, k = randn(rng, (1, 2, 4, 8)), randn(rng, (1, 3, 2, 8))
    fq, fk = FakeGpuArray(q), FakeGpuArray(k)
    msg = _same_error(ValueError, lambda: lkv.attention_mass(q, randn(rng, (1, 3, 3, 8))),
                      lambda: lkv.attention_mass(fq, FakeGpuArray(randn(rng, (1, 3, 3, 8)))))
    assert "Hq must be a multiple of Hkv" in msg
    msg = _same_error(ValueError, lambda: lkv.attention_mass(q, randn(rng, (1, 3, 2, 6))),
                      lambda: lkv.attention_mass(fq, FakeGpuArray(randn(rng, (1, 3, 2, 6)))))
    assert "k has shape (1, 3, 2, 6)" in msg
    msg = _same_error(ValueError, lambda: lkv.attention_mass(q, k, kv_lens=[4]),
                      lambda: lkv.attention_mass(fq, fk, kv_lens=[4]))
    assert "kv_lens" in msg
    msg = _same_error(ValueError, lambda: lkv.attention_mass(q, k, q_pos=[1, 2, 3]),
                      lambda: lkv.attention_mass(fq, fk, q_pos=[1, 2, 3]))
    assert "q_pos" in msg
    _same_error(ValueError, lambda: lkv.attention_mass(q, k, group_reduce="median"),
                lambda: lkv.attention_mass(fq, fk, group_reduce="median"))
    _same_error(TypeError, lambda: lkv.attention_mass(q, k, kv_pos=[0.5, 1, 2]),
                lambda: lkv.attention_mass(fq, fk, kv_pos=[0.5, 1, 2]))
    with pytest.raises(TypeError, match="k has dtype float16 but q has dtype float32"):
        lkv.attention_mass(fq, FakeGpuArray(k.astype(np.float16)))
    with pytest.raises(TypeError, match="q has dtype float64"):
        lkv.attention_mass(FakeGpuArray(q.astype(np.float64)), fk)
    with pytest.raises(ValueError, match="different devices"):
        lkv.attention_mass(fq, k)
    with pytest.raises(ValueError, match="D = 264 exceeds 256"):
        lkv.attention_mass(FakeGpuArray(randn(rng, (1, 2, 1, 264))), FakeGpuArray(randn(rng, (1, 3, 1, 264))))
    assert not [c for c in kvfake.calls if c[0] == "kv_attention_mass"]     # nothing was launched


def test_glue_attention_mass_stream(kvfake, rng):
    q, k = randn(rng, (1, 2, 2, 8)), randn(rng, (1, 5, 1, 8))
    with cuda.use_stream(77):
        lkv.attention_mass(FakeGpuArray(q), FakeGpuArray(k), kv_lens=[4])
    assert_stream_ordered(kvfake, "kv_attention_mass", 77)
    s = randn(rng, (1, 9, 2))
    x = randn(rng, (1, 9, 2, 4))
    with cuda.use_stream(77):
        lkv.pool1d(FakeGpuArray(s), 3)
        assert_stream_ordered(kvfake, "kv_pool1d", 77)
        idx = lkv.keep_topk(FakeGpuArray(s), 4)
        assert_stream_ordered(kvfake, "kv_keep_topk", 77)
        kvfake.calls.clear()
        lkv.compact(FakeGpuArray(x), idx.numpy().astype(np.int32))   # a host idx, uploaded
        assert_stream_ordered(kvfake, "kv_compact", 77)


def test_glue_snapkv_pipeline_on_device_ops(kvfake, rng):
    # SnapKV's steps (mass of the window, pooled votes, top-k) chained on device arrays give the recipe's
    # selection (the recipe itself, kv.snapkv_select, takes host arrays)
    q, k = randn(rng, (1, 4, 4, 8)), randn(rng, (1, 30, 2, 8))
    mass = lkv.attention_mass(FakeGpuArray(q), FakeGpuArray(k), causal=True)
    votes = lkv.pool1d(FakeGpuArray(mass.numpy()[:, :26]), 5)
    idx = lkv.keep_topk(FakeGpuArray(votes.numpy()), 8)
    want = rkv.snapkv_select(q, k, 12)
    assert np.array_equal(idx.numpy(), want[:, :8])


# ------------------------------------------------------------------------------------------------
# glue: pool1d, keep_topk, compact

@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ks", [1, 3, 5, 9])
def test_glue_pool1d(kvfake, rng, mode, ks):
    s = randn(rng, (2, 7, 3))
    s[0, 2, 1] = np.nan
    sv = np.ascontiguousarray(s.transpose(0, 2, 1)).transpose(0, 2, 1)  # non-contiguous: passed as is
    want = rkv.pool1d(s, ks, mode=mode)
    got = lkv.pool1d(FakeGpuArray(sv), ks, mode=mode)
    assert got.dtype == "float32"
    assert_close(got.numpy(), want)
    kw = _last(kvfake, "kv_pool1d")
    assert kw["scores"] == sv.ctypes.data and tuple(kw["s_stride"]) == (21, 1, 7)
    assert kw["kernel_size"] == ks and kw["max_mode"] == (mode == "max")


def test_glue_pool1d_float16_and_errors(kvfake, rng):
    s = randn(rng, (1, 6, 2)).astype(np.float16)
    got = lkv.pool1d(FakeGpuArray(s), 3)
    assert got.dtype == "float16"
    assert_close(got.numpy(), rkv.pool1d(s, 3), tol=GPU_TOL["float16"])
    _same_error(ValueError, lambda: lkv.pool1d(s, 4), lambda: lkv.pool1d(FakeGpuArray(s), 4))
    _same_error(ValueError, lambda: lkv.pool1d(s, 3, mode="min"), lambda: lkv.pool1d(FakeGpuArray(s), 3, mode="min"))
    _same_error(ValueError, lambda: lkv.pool1d(s[0], 3), lambda: lkv.pool1d(FakeGpuArray(s[0]), 3))
    empty = lkv.pool1d(FakeGpuArray(np.zeros((2, 0, 3), np.float32)), 3)
    assert empty.shape == (2, 0, 3)


KEEP_CASES = [
    # scores column, budget, sink, recent
    ([1, 5, 5, 5, 2, 0], 3, 0, 0),                                         # ties to the lower position
    ([np.nan, 1, -np.inf, np.nan, 0, -0.0], 4, 0, 0),                       # NaN lowest; -0 == +0
    ([3, 1, 2], 5, 1, 1),                                                  # budget >= M
    ([9, 0, 8, 7, 6, 5, 0, 0], 5, 2, 2),                                   # sink + recent protected
    ([0, 0, 0, 0, 0], 2, 1, 1),                                            # want == 0
]


@pytest.mark.parametrize("col,budget,sink,recent", KEEP_CASES)
def test_glue_keep_topk(kvfake, col, budget, sink, recent):
    col = np.asarray(col, np.float32)
    s = np.stack([col, col[::-1].copy()], axis=1)[None]                    # (1, M, 2)
    want = rkv.keep_topk(s, budget, sink=sink, recent=recent)
    got = lkv.keep_topk(FakeGpuArray(s), budget, sink=sink, recent=recent)
    assert got.dtype == "int64" and got.shape == want.shape
    assert np.array_equal(got.numpy(), want)
    assert np.array_equal(got.numpy(), lkv.keep_topk(s, budget, sink=sink, recent=recent))
    kw = _last(kvfake, "kv_keep_topk")
    assert kw["K"] == min(budget, len(col)) and kw["sink"] == sink and kw["recent"] == recent


def test_glue_keep_topk_errors_match_cpu(kvfake, rng):
    s = randn(rng, (1, 6, 2))
    fs = FakeGpuArray(s)
    msg = _same_error(ValueError, lambda: lkv.keep_topk(s, 3, sink=2, recent=2),
                      lambda: lkv.keep_topk(fs, 3, sink=2, recent=2))
    assert "exceeds budget" in msg
    _same_error(ValueError, lambda: lkv.keep_topk(s, -1), lambda: lkv.keep_topk(fs, -1))
    _same_error(ValueError, lambda: lkv.keep_topk(s[0], 2), lambda: lkv.keep_topk(FakeGpuArray(s[0]), 2))
    with pytest.raises(TypeError, match="scores has dtype float64"):
        lkv.keep_topk(FakeGpuArray(s.astype(np.float64)), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_glue_compact_strided(kvfake, rng, dtype):
    x = (randn(rng, (2, 7, 3, 5)) * 100).astype(dtype)
    xbig = np.zeros((2, 7, 3, 8), dtype)
    xbig[..., :5] = x
    xs = xbig[..., :5]                                                     # rows contiguous, padded strides
    idx = np.stack([np.sort(rng.choice(7, 4, replace=False)) for _ in range(6)]).reshape(2, 3, 4).transpose(0, 2, 1)
    want = rkv.compact(x, idx)
    got = lkv.compact(FakeGpuArray(xs), idx)
    assert got.dtype == np.dtype(dtype).name
    assert np.array_equal(got.numpy(), want)
    kw = _last(kvfake, "kv_compact")
    item = np.dtype(dtype).itemsize
    assert kw["x"] == xs.ctypes.data and kw["row_bytes"] == 5 * item
    assert tuple(kw["x_stride_bytes"]) == (7 * 3 * 8 * item, 3 * 8 * item, 8 * item)


def test_glue_compact_device_idx_and_errors(kvfake, rng):
    x = randn(rng, (1, 4, 2, 3))
    idx = np.array([[[0, 3], [2, 1]]], np.int64)
    D = cuda.DeviceArray.from_numpy
    got = lkv.compact(D(x, dtype="bfloat16"), D(idx))
    assert got.dtype == "bfloat16"
    assert_close(got.numpy(), rkv.compact(D(x, dtype="bfloat16").numpy(), idx), tol=0)
    # a host idx is range-checked with the CPU path's message; a device idx is clamped instead
    msg = _same_error(ValueError, lambda: lkv.compact(x, [[[0, 4], [2, 1]]]),
                      lambda: lkv.compact(FakeGpuArray(x), [[[0, 4], [2, 1]]]))
    assert "idx must be in [0, M = 4)" in msg
    clamped = lkv.compact(FakeGpuArray(x), D(np.array([[[-5, 9], [2, 1]]], np.int64)))
    assert np.array_equal(clamped.numpy(), rkv.compact(x, [[[0, 3], [2, 1]]]))
    _same_error(ValueError, lambda: lkv.compact(x, np.zeros((1, 2, 3), np.int64)),
                lambda: lkv.compact(FakeGpuArray(x), np.zeros((1, 2, 3), np.int64)))
    _same_error(TypeError, lambda: lkv.compact(x, np.zeros((1, 2, 2))),
                lambda: lkv.compact(FakeGpuArray(x), np.zeros((1, 2, 2))))
    with pytest.raises(ValueError, match="different devices"):
        lkv.compact(x, D(idx))
    empty = lkv.compact(FakeGpuArray(x), np.zeros((1, 0, 2), np.int64))
    assert empty.shape == (1, 0, 2, 3)


# ------------------------------------------------------------------------------------------------
# on a GPU

def _torch():
    t = torch_cuda()
    if t is None:
        pytest.skip("torch with CUDA is not installed")
    return t


def _to(torch, a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda").to(getattr(torch, dtype))


def _host(t):
    return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


GPU_MASS_CASES = [
    # B, N, M, Hq, Hkv, D, causal, extra
    (2, 37, 53, 4, 1, 64, True, {}),                                      # GQA 4, row tiles across heads
    (1, 33, 100, 8, 1, 72, True, {"kv_lens": [77]}),                      # GQA 8, D not a multiple of 64
    (2, 40, 64, 3, 3, 256, False, {"kv_lens": [64, 0]}),                  # GQA 1, largest D, empty row
    (2, 17, 21, 2, 1, 31, True, {"q_pos": np.arange(17)[::-1].copy(), "kv_pos": np.arange(21) * 2}),
    (2, 5, 9, 2, 2, 8, True, {"q_pos": [[0, 1, 2, 3, 4], [9, 9, 1, 0, 5]], "kv_pos": [[0, 1, 2, 3, 4, 5, 6, 7, 8],
                                                                                     [8, 7, 6, 5, 4, 3, 2, 1, 0]]}),
    (1, 1, 2049, 8, 2, 128, False, {}),                                   # decode: split statistics
    (3, 32, 4097, 4, 4, 64, True, {"kv_lens": [4097, 1000, 31]}),         # SnapKV-like window, ragged
    (1, 1, 1, 1, 1, 1, False, {}),
]


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,causal,extra", GPU_MASS_CASES)
def test_gpu_attention_mass(rng, dtype, B, N, M, Hq, Hkv, D, causal, extra):
    torch = _torch()
    q, k = randn(rng, (B, N, Hq, D)) * 2, randn(rng, (B, M, Hkv, D))
    tq, tk = _to(torch, q, dtype), _to(torch, k, dtype)
    rq, rk = _host(tq), _host(tk)                                         # the twin sees the rounded inputs
    tol = GPU_TOL["float32"]                                              # same inputs; float32 arithmetic
    for normalize in (True, False):
        for reduce in ("mean", "sum", "max", "none"):
            want = rkv.attention_mass(rq, rk, causal=causal, normalize=normalize, group_reduce=reduce, **extra)
            got = lkv.attention_mass(tq, tk, causal=causal, normalize=normalize, group_reduce=reduce, **extra)
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device == tq.device
            assert_close(_host(got), want, tol=tol, err_msg=f"{normalize} {reduce}")


@requires_gpu
def test_gpu_attention_mass_noncontiguous_device_indices_and_determinism(rng):
    torch = _torch()
    B, N, M, Hq, Hkv, D = 2, 45, 300, 8, 2, 96
    q, k = randn(rng, (B, Hq, N, D)), randn(rng, (B, Hkv, M, D))
    tq = _to(torch, q, "float32").transpose(1, 2)                         # (B, N, Hq, D), head-major storage
    tk = _to(torch, k, "float32").transpose(1, 2)
    assert not tq.is_contiguous()
    lens = np.array([300, 123])
    kw = dict(causal=True, kv_lens=torch.tensor(lens, device="cuda"),
              q_pos=torch.tensor(np.arange(N) + 200, device="cuda", dtype=torch.int32))
    got = lkv.attention_mass(tq, tk, **kw)
    want = rkv.attention_mass(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), causal=True, kv_lens=lens,
                              q_pos=np.arange(N) + 200)
    assert_close(_host(got), want, tol=GPU_TOL["float32"])
    again = lkv.attention_mass(tq, tk, **kw)
    assert torch.equal(got, again)                                        # bitwise reproducible


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_keep_topk_matches_cpu_exactly(rng, dtype):
    torch = _torch()
    for B, M, H, budget, sink, recent in ((2, 1, 3, 1, 0, 0), (1, 37, 5, 10, 2, 3), (2, 1000, 4, 100, 4, 32),
                                          (1, 5000, 2, 1234, 0, 0), (1, 600, 3, 600, 10, 10), (1, 50, 2, 7, 7, 0),
                                          (2, 3000, 3, 64, 4, 60)):
        s = np.floor(randn(rng, (B, M, H)) * 3)                            # many ties
        s[rng.random(s.shape) < 0.05] = np.nan
        s[rng.random(s.shape) < 0.02] = -np.inf
        s[rng.random(s.shape) < 0.02] = -0.0
        ts = _to(torch, s.astype(np.float32), dtype)
        rs = _host(ts)
        want = lkv.keep_topk(rs, budget, sink=sink, recent=recent)      # the CPU kernel
        assert np.array_equal(want, rkv.keep_topk(rs, budget, sink=sink, recent=recent))
        got = lkv.keep_topk(ts, budget, sink=sink, recent=recent)
        assert got.dtype == torch.int64
        assert np.array_equal(_host(got), want), (B, M, H, budget, sink, recent)
    # strided scores (a transposed view)
    s = randn(rng, (2, 4, 777)).astype(np.float32)
    ts = _to(torch, s, dtype).transpose(1, 2)
    assert np.array_equal(_host(lkv.keep_topk(ts, 50, sink=1, recent=5)),
                          lkv.keep_topk(_host(ts), 50, sink=1, recent=5))


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "int8"])
def test_gpu_compact(rng, dtype):
    torch = _torch()
    for B, M, H, D, K in ((2, 300, 3, 128, 77), (1, 5, 2, 3, 5), (3, 64, 1, 1, 10)):
        x = randn(rng, (B, M, H, 2 * D)) * 50
        tx = torch.from_numpy(x).to("cuda").to(getattr(torch, dtype))[..., :D]     # padded rows
        idx = np.stack([np.sort(rng.choice(M, K, replace=False)) for _ in range(B * H)]).reshape(B, H, K)
        idx = idx.transpose(0, 2, 1).copy()
        want = rkv.compact(tx.cpu().float().numpy() if dtype == "bfloat16" else tx.cpu().numpy(), idx)
        got = lkv.compact(tx, idx)
        assert got.dtype == tx.dtype and tuple(got.shape) == (B, K, H, D)
        assert np.array_equal(_host(got), want)
        got_dev = lkv.compact(tx, torch.from_numpy(idx).to("cuda"))
        assert torch.equal(got, got_dev)
    # device idx out of range: clamped, never read out of bounds
    x = randn(rng, (1, 4, 2, 8))
    tx = _to(torch, x, "float32") if dtype not in ("float64", "int8") else torch.from_numpy(x).to("cuda")
    bad = torch.tensor([[[-3, 100], [1, 2]]], device="cuda")
    assert np.array_equal(_host(lkv.compact(tx, bad)), rkv.compact(x, [[[0, 3], [1, 2]]]).astype(np.float32))


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_gpu_pool1d(rng, dtype, mode):
    torch = _torch()
    for B, M, H, ks in ((2, 100, 3, 5), (1, 3, 2, 7), (1, 1, 1, 1), (2, 50, 4, 101), (1, 2049, 8, 9)):
        s = randn(rng, (B, M, H))
        s[0, M // 2, 0] = np.nan
        ts = _to(torch, s, dtype)
        want = rkv.pool1d(_host(ts), ks, mode=mode)
        got = lkv.pool1d(ts, ks, mode=mode)
        assert got.dtype == ts.dtype and got.shape == ts.shape
        assert_close(_host(got), want, tol=GPU_TOL[dtype])
    s = randn(rng, (2, 3, 60))
    ts = _to(torch, s, dtype).transpose(1, 2)                             # strided
    assert_close(_host(lkv.pool1d(ts, 5, mode=mode)), rkv.pool1d(_host(ts), 5, mode=mode), tol=GPU_TOL[dtype])
