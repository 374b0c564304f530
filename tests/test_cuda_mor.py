"""lmkern.mor on the GPU: the Python glue over a host-memory fake of lmkern._cuda (runs everywhere),
a NumPy model of the expert-choice kernel's block-level algorithm, and the kernels themselves against
the NumPy twins (``@requires_gpu``, torch CUDA tensors)."""
import numpy as np
import pytest

from lmkern import cuda, mor
from lmkern.reference import mor as ref

from conftest import GPU_TOL, assert_close, randn, requires_gpu, torch_cuda
from test_cuda import FakeCuda, FakeGpuArray, _arr_at, assert_stream_ordered

# ------------------------------------------------------------------------------------------------
# a fake lmkern._cuda with the mor methods, computing with the twins


def _read(ptr, dtype, shape, strides):
    """float32 (or the dtype's) copy of device memory at ptr; bfloat16 decoded from its bits."""
    if dtype == "bfloat16":
        return cuda._f32_from_bf16(_arr_at(ptr, np.uint16, shape, strides).copy())
    return _arr_at(ptr, dtype, shape, strides).copy()


def _write(ptr, dtype, shape, values):
    if dtype == "bfloat16":
        _arr_at(ptr, np.uint16, shape, _c(shape))[...] = cuda._bf16_from_f32(np.asarray(values, np.float32))
    else:
        _arr_at(ptr, dtype, shape, _c(shape))[...] = values


def _c(shape):
    return cuda._c_strides(shape)


def _f32(a):
    return a.astype(np.float32) if a.dtype != np.float32 else a


class MorFakeCuda(FakeCuda):
    def mor_topk(self, **kw):
        self.calls.append(("mor_topk", kw))
        B, n, k, dt = kw["B"], kw["n"], kw["k"], kw["dtype"]
        s = _f32(_read(kw["scores"], dt, (B, n), (kw["scores_stride"], 1)))
        cand = _read(kw["candidates"], np.int64, (B, n), (n, 1)) if kw["candidates"] else None
        if k == 0 or B == 0:
            return
        # device candidates are not validated by the kernel: copy through (the twin would refuse)
        idx, gate = ref.expert_choice(s, k)
        if cand is not None:
            idx = np.take_along_axis(cand, idx, axis=1)
        _write(kw["idx"], np.int64, (B, k), idx)
        _write(kw["gate"], dt, (B, k), gate)

    def mor_router(self, **kw):
        self.calls.append(("mor_router", kw))
        B, T, Dm, C, dt = kw["B"], kw["T"], kw["Dm"], kw["C"], kw["dtype"]
        h = _f32(_read(kw["h"], dt, (B, T, Dm), tuple(kw["h_stride"]) + (1,)))
        w = _f32(_read(kw["w"], dt, (Dm, C), tuple(kw["w_stride"])))
        act = {v: a for a, v in mor._ACTIVATIONS.items()}[kw["activation"]]
        z = ref.router_scores(h, w, activation=act, alpha=kw["alpha"], temperature=kw["temperature"])
        _write(kw["z"], dt, (B, T, C), z)

    def mor_token_choice(self, **kw):
        self.calls.append(("mor_token_choice", kw))
        B, T, C, dt = kw["B"], kw["T"], kw["C"], kw["dtype"]
        p = _f32(_read(kw["probs"], dt, (B, T, C), tuple(kw["probs_stride"]) + (1,)))
        bias = _f32(_read(kw["bias"], dt, (C,), (1,))) if kw["bias"] else None
        depth, gate = ref.token_choice(p, bias=bias)
        _write(kw["depth"], np.int64, (B, T), depth)
        _write(kw["gate"], dt, (B, T), gate)

    def mor_gather(self, **kw):
        self.calls.append(("mor_gather", kw))
        B, T, k, Dm, dt = kw["B"], kw["T"], kw["k"], kw["Dm"], kw["dtype"]
        h = _read(kw["h"], dt, (B, T, Dm), tuple(kw["h_stride"]) + (1,))
        idx = _read(kw["idx"], np.int64, (B, k), (k, 1))
        out = np.zeros((B, k, Dm), h.dtype)
        for b in range(B):  # the kernel's rule: an out-of-range device index gives a zero row
            for j in range(k):
                if 0 <= idx[b, j] < T:
                    out[b, j] = h[b, idx[b, j]]
        assert B * k * Dm == 0 or tuple(kw["out_stride"]) == (k * Dm, Dm)
        _write(kw["out"], dt, (B, k, Dm), out)

    def mor_scatter(self, **kw):
        self.calls.append(("mor_scatter", kw))
        B, T, k, Dm, dt = kw["B"], kw["T"], kw["k"], kw["Dm"], kw["dtype"]
        assert kw["h"] != kw["out"]
        out = _arr_at(kw["out"], np.uint16 if dt == "bfloat16" else dt, (B, T, Dm), tuple(kw["out_stride"]) + (1,))
        base = _read(kw["h"] or kw["out"], dt, (B, T, Dm), tuple(kw["h_stride" if kw["h"] else "out_stride"]) + (1,))
        idx = _read(kw["idx"], np.int64, (B, k), (k, 1))
        y = _read(kw["y"], dt, (B, k, Dm), tuple(kw["y_stride"]) + (1,))
        gate = _read(kw["gate"], dt, (B, k), (k, 1)) if kw["gate"] else None
        keep = (idx >= 0) & (idx < T)  # the kernel skips out-of-range device indices
        res = base.copy()
        for b in range(B):
            for j in range(k):
                if keep[b, j]:
                    g = gate[b, j] if gate is not None else 1
                    res[b, idx[b, j]] = res[b, idx[b, j]] + g * y[b, j]
        out[...] = cuda._bf16_from_f32(res) if dt == "bfloat16" else res


@pytest.fixture
def fake(monkeypatch):
    import gc
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    f = MorFakeCuda(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())
    yield f
    gc.collect()


def _last(fake, name):
    return [c for c in fake.calls if c[0] == name][-1][1]


def _host(x):
    return x.a if isinstance(x, FakeGpuArray) else x.numpy()


# ------------------------------------------------------------------------------------------------
# glue: expert_choice


def _tie_scores():
    s = np.array([[0.5, 0.9, 0.5, np.nan, 0.5, -0.0, 0.0, 0.9],
                  [np.nan, np.nan, 1.0, -np.inf, np.inf, 0.5, 0.5, 0.5]], np.float32)
    return s


@pytest.mark.parametrize("k", [0, 1, 3, 5, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_glue_expert_choice_ties_nan(fake, k, dtype):
    s = _tie_scores().astype(dtype)
    s0 = s.copy()
    idx, gate = mor.expert_choice(FakeGpuArray(s), k)
    want_idx, want_gate = ref.expert_choice(s, k)
    assert isinstance(idx, cuda.DeviceArray) and idx.dtype == "int64" and idx.shape == (2, k)
    assert gate.dtype == np.dtype(dtype).name
    assert np.array_equal(idx.numpy(), want_idx)
    assert np.array_equal(gate.numpy().astype(np.float32), want_gate, equal_nan=True)
    assert np.array_equal(s, s0, equal_nan=True)
    kw = _last(fake, "mor_topk")
    assert (kw["B"], kw["n"], kw["k"], kw["dtype"]) == (2, 8, k, np.dtype(dtype).name)
    assert kw["scores"] == s.ctypes.data and kw["scores_stride"] == 8 and kw["candidates"] is None


def test_glue_expert_choice_candidates_strided_and_stream(fake, rng):
    big = randn(rng, (3, 12))
    s = big[:, 2:9]                           # row stride 12: passed zero-copy
    cand = np.sort(rng.choice(50, size=(3, 7), replace=True), axis=1) + np.arange(7) * 50
    idx, gate = mor.expert_choice(FakeGpuArray(s), 4, candidates=cand)
    want_idx, want_gate = ref.expert_choice(s, 4, candidates=cand)
    assert np.array_equal(idx.numpy(), want_idx) and np.array_equal(gate.numpy(), want_gate)
    kw = _last(fake, "mor_topk")
    assert kw["scores"] == s.ctypes.data and kw["scores_stride"] == 12 and kw["candidates"]
    with cuda.use_stream(99):
        mor.expert_choice(FakeGpuArray(s), 2, candidates=cuda.DeviceArray.from_numpy(cand))
    assert_stream_ordered(fake, "mor_topk", 99)
    from lmkern import _cuda_mor
    _cuda_mor.expert_choice(FakeGpuArray(s), 2, stream=1234)
    assert _last(fake, "mor_topk")["stream"] == 1234


def test_glue_expert_choice_rows_with_different_survivors(fake, rng):
    # hierarchical filtering, two recursions: every batch row keeps different tokens
    B, T = 3, 11
    s0 = randn(rng, (B, T))
    idx0, _ = mor.expert_choice(FakeGpuArray(s0), 7)
    s1 = randn(rng, (B, 7))
    idx1, gate1 = mor.expert_choice(FakeGpuArray(s1), 3, candidates=idx0)   # device candidates
    r0, _ = ref.expert_choice(s0, 7)
    r1, g1 = ref.expert_choice(s1, 3, candidates=r0)
    assert np.array_equal(idx1.numpy(), r1) and np.array_equal(gate1.numpy(), g1)
    assert len({tuple(r) for r in r1}) > 1


def test_glue_expert_choice_bfloat16_device_array(fake, rng):
    s = randn(rng, (2, 9))
    ds = cuda.DeviceArray.from_numpy(s, dtype="bfloat16")
    sb = ds.numpy()  # the bf16-rounded values
    idx, gate = mor.expert_choice(ds, 4)
    want_idx, want_gate = ref.expert_choice(sb, 4)
    assert gate.dtype == "bfloat16"
    assert np.array_equal(idx.numpy(), want_idx) and np.array_equal(gate.numpy(), want_gate)


def test_glue_expert_choice_errors(fake, rng):
    s = FakeGpuArray(randn(rng, (2, 5)))
    for bad_k in (6, -1):
        with pytest.raises(ValueError) as gpu:
            mor.expert_choice(s, bad_k)
        with pytest.raises(ValueError) as cpu:
            mor.expert_choice(s.a, bad_k)
        assert str(gpu.value) == str(cpu.value) and "k must be in [0, n = 5]" in str(gpu.value)
    with pytest.raises(ValueError, match="strictly ascending"):
        mor.expert_choice(s, 2, candidates=np.array([[0, 1, 1, 2, 3], [0, 1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"candidates has shape \(2, 4\)"):
        mor.expert_choice(s, 2, candidates=np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"scores has shape \(5,\)"):
        mor.expert_choice(FakeGpuArray(randn(rng, (5,))), 2)
    with pytest.raises(TypeError, match="scores has dtype float64"):
        mor.expert_choice(FakeGpuArray(randn(rng, (2, 5)).astype(np.float64)), 2)
    with pytest.raises(TypeError, match="k must be an integer"):
        mor.expert_choice(s, 2.5)
    with pytest.raises(ValueError, match="different devices"):
        mor.expert_choice(s.a, 2, candidates=cuda.DeviceArray.from_numpy(np.zeros((2, 5), np.int64)))


# ------------------------------------------------------------------------------------------------
# glue: router_scores, token_choice


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softmax", "none"])
def test_glue_router_scores(fake, rng, activation):
    h = randn(rng, (2, 5, 12))
    wbig = randn(rng, (12, 6))
    w = wbig[:, ::2]                    # strided weight, read through its strides
    z = mor.router_scores(FakeGpuArray(h), FakeGpuArray(w), activation=activation, alpha=0.5, temperature=2.0)
    assert z.shape == (2, 5, 3)
    assert_close(z.numpy(), ref.router_scores(h, w, activation=activation, alpha=0.5, temperature=2.0))
    kw = _last(fake, "mor_router")
    assert tuple(kw["w_stride"]) == (6, 2) and kw["w"] == w.ctypes.data
    assert kw["activation"] == mor._ACTIVATIONS[activation] and kw["C"] == 3
    v = randn(rng, (12,))
    z1 = mor.router_scores(FakeGpuArray(h), FakeGpuArray(v), activation=activation)
    assert z1.shape == (2, 5)
    assert_close(z1.numpy(), ref.router_scores(h, v, activation=activation))
    assert tuple(_last(fake, "mor_router")["w_stride"]) == (1, 0)


def test_glue_router_scores_errors(fake, rng):
    h = FakeGpuArray(randn(rng, (2, 5, 12)))
    with pytest.raises(ValueError, match=r"router_scores: w has shape \(11,\)"):
        mor.router_scores(h, FakeGpuArray(randn(rng, (11,))))
    with pytest.raises(ValueError, match="activation must be one of"):
        mor.router_scores(h, FakeGpuArray(randn(rng, (12,))), activation="relu")
    with pytest.raises(ValueError, match="temperature must be positive"):
        mor.router_scores(h, FakeGpuArray(randn(rng, (12,))), temperature=0)
    with pytest.raises(TypeError, match="w has dtype float16 but h has dtype float32"):
        mor.router_scores(h, FakeGpuArray(randn(rng, (12,)).astype(np.float16)))


def test_glue_token_choice(fake, rng):
    p = randn(rng, (2, 6, 4))
    p[0, 1] = np.nan
    p[1, 2, :2] = np.nan
    p[1, 3] = [0.25, 0.5, 0.5, 0.1]                       # tie: the lower depth
    bias = np.array([0.0, -0.1, 0.2, 0.0], np.float32)
    depth, gate = mor.token_choice(FakeGpuArray(p), bias=FakeGpuArray(bias))
    wd, wg = ref.token_choice(p, bias=bias)
    assert depth.dtype == "int64"
    assert np.array_equal(depth.numpy(), wd) and np.array_equal(gate.numpy(), wg, equal_nan=True)
    depth, gate = mor.token_choice(FakeGpuArray(p))
    wd, wg = ref.token_choice(p)
    assert np.array_equal(depth.numpy(), wd) and np.array_equal(gate.numpy(), wg, equal_nan=True)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
        mor.token_choice(FakeGpuArray(p), bias=FakeGpuArray(bias[:3]))
    with pytest.raises(ValueError, match="C = 0 choices"):
        mor.token_choice(FakeGpuArray(np.zeros((1, 2, 0), np.float32)))


# ------------------------------------------------------------------------------------------------
# glue: gather, scatter_residual


def test_glue_gather(fake, rng):
    hbig = randn(rng, (2, 7, 10))
    h = hbig[:, :, 1:9]                                      # token stride 10, feature axis contiguous
    idx = np.array([[0, 6, 6, 2], [5, 1, 0, 3]])
    out = mor.gather(FakeGpuArray(h), idx)
    assert_close(out.numpy(), ref.gather(h, idx), tol=0)
    kw = _last(fake, "mor_gather")
    assert kw["h"] == h.ctypes.data and tuple(kw["h_stride"]) == (70, 10)
    didx = cuda.DeviceArray.from_numpy(idx.astype(np.int32))   # a DeviceArray cannot be converted: int64 only
    out = mor.gather(FakeGpuArray(h), cuda.DeviceArray.from_numpy(idx))
    assert_close(out.numpy(), ref.gather(h, idx), tol=0)
    with pytest.raises(TypeError, match="idx on the GPU must be int64"):
        mor.gather(FakeGpuArray(h), didx)
    with pytest.raises(ValueError) as gpu:
        mor.gather(FakeGpuArray(h), [[0, 7, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError) as cpu:
        mor.gather(h, [[0, 7, 0, 0], [0, 0, 0, 0]])
    assert str(gpu.value) == str(cpu.value) and "expected token positions in [0, T = 7)" in str(gpu.value)
    with pytest.raises(ValueError, match=r"idx has shape \(3, 4\)"):
        mor.gather(FakeGpuArray(h), np.zeros((3, 4), np.int64))


def test_glue_gather_device_index_out_of_range_is_safe(fake, rng):
    h = randn(rng, (1, 4, 3))
    out = mor.gather(FakeGpuArray(h), cuda.DeviceArray.from_numpy(np.array([[1, 9, -1]])))
    assert np.array_equal(out.numpy(), np.stack([h[0, 1], np.zeros(3), np.zeros(3)])[None])


@pytest.mark.parametrize("with_gate", [False, True])
def test_glue_scatter_repeated_indices(fake, rng, with_gate):
    h = randn(rng, (2, 6, 5))
    idx = np.array([[3, 3, 0, 3], [5, 1, 5, 1]])
    y = randn(rng, (2, 4, 5))
    gate = randn(rng, (2, 4)) if with_gate else None
    h0, y0 = h.copy(), y.copy()
    res = mor.scatter_residual(FakeGpuArray(h), idx, FakeGpuArray(y), FakeGpuArray(gate) if with_gate else None)
    assert_close(res.numpy(), ref.scatter_residual(h, idx, y, gate))
    assert np.array_equal(h, h0) and np.array_equal(y, y0)
    kw = _last(fake, "mor_scatter")
    assert kw["h"] == h.ctypes.data and kw["out"] != h.ctypes.data and (kw["gate"] is None) != with_gate


def test_glue_scatter_out_and_in_place(fake, rng):
    h = randn(rng, (2, 6, 4))
    idx = np.array([[1, 4], [0, 0]])
    y, gate = randn(rng, (2, 2, 4)), randn(rng, (2, 2))
    want = ref.scatter_residual(h, idx, y, gate)
    out = np.zeros_like(h)
    fo = FakeGpuArray(out)
    res = mor.scatter_residual(FakeGpuArray(h), idx, FakeGpuArray(y), FakeGpuArray(gate), out=fo)
    assert res is fo
    assert_close(out, want)
    # in place on a strided h (token stride 8): only the chosen rows change
    hbig = np.zeros((2, 6, 8), np.float32)
    hbig[..., :4] = h
    hv = hbig[..., :4]
    fh = FakeGpuArray(hv)
    assert mor.scatter_residual_(fh, idx, FakeGpuArray(y), FakeGpuArray(gate)) is fh
    assert_close(hv, want)
    assert np.all(hbig[..., 4:] == 0)
    kw = _last(fake, "mor_scatter")
    assert kw["h"] is None and kw["out"] == hv.ctypes.data and tuple(kw["out_stride"]) == (48, 8)
    # out= h through scatter_residual is in place too
    h2 = h.copy()
    f2 = FakeGpuArray(h2)
    assert mor.scatter_residual(f2, idx, FakeGpuArray(y), FakeGpuArray(gate), out=f2) is f2
    assert_close(h2, want)


def test_glue_scatter_out_overlapping_h_goes_through_a_temporary(fake, rng):
    # out = buf[:, 1:] and h = buf[:, :T] share rows: the kernel (which copies h's rows into out from
    # many threads at once) must not write where it still reads
    T, Dm = 5, 4
    buf = randn(rng, (1, T + 1, Dm))
    h = buf[:, :T].copy()
    idx = np.array([[0, 3]])
    y = randn(rng, (1, 2, Dm))
    want = ref.scatter_residual(h, idx, y)
    res = mor.scatter_residual(FakeGpuArray(buf[:, :T]), idx, FakeGpuArray(y), out=FakeGpuArray(buf[:, 1:]))
    assert_close(buf[:, 1:], want, tol=0)
    assert res.a.ctypes.data == buf[:, 1:].ctypes.data
    assert _last(fake, "mor_scatter")["out"] != buf[:, 1:].ctypes.data      # written to a temporary
    # a disjoint out is written directly
    out = np.zeros((1, T, Dm), np.float32)
    mor.scatter_residual(FakeGpuArray(h), idx, FakeGpuArray(y), out=FakeGpuArray(out))
    assert _last(fake, "mor_scatter")["out"] == out.ctypes.data
    assert_close(out, want, tol=0)


def test_glue_scatter_errors(fake, rng):
    h, y = FakeGpuArray(randn(rng, (1, 4, 3))), FakeGpuArray(randn(rng, (1, 2, 3)))
    idx = np.array([[0, 4]])
    with pytest.raises(ValueError) as gpu:
        mor.scatter_residual(h, idx, y)
    with pytest.raises(ValueError) as cpu:
        mor.scatter_residual(h.a, idx, y.a)
    assert str(gpu.value) == str(cpu.value)
    with pytest.raises(ValueError, match=r"mor.scatter_residual_: y has shape \(1, 3, 3\)"):
        mor.scatter_residual_(h, [[0, 1]], FakeGpuArray(randn(rng, (1, 3, 3))))
    with pytest.raises(TypeError, match="gate has dtype float16"):
        mor.scatter_residual(h, [[0, 1]], y, FakeGpuArray(np.ones((1, 2), np.float16)))
    with pytest.raises(ValueError, match=r"out has shape \(1, 4, 2\)"):
        mor.scatter_residual(h, [[0, 1]], y, out=FakeGpuArray(np.zeros((1, 4, 2), np.float32)))
    with pytest.raises(TypeError, match="out has dtype float16"):
        mor.scatter_residual(h, [[0, 1]], y, out=FakeGpuArray(np.zeros((1, 4, 3), np.float16)))


def test_glue_zero_sized(fake, rng):
    D = cuda.DeviceArray.from_numpy  # (NumPy reports zero strides for some empty arrays; DeviceArray is C-ordered)
    idx, gate = mor.expert_choice(D(np.zeros((0, 4), np.float32)), 2)
    assert idx.shape == (0, 2) and gate.shape == (0, 2)
    idx, gate = mor.expert_choice(D(np.zeros((3, 0), np.float32)), 0)
    assert idx.shape == (3, 0)
    out = mor.gather(FakeGpuArray(randn(rng, (2, 3, 4))), np.zeros((2, 0), np.int64))
    assert out.shape == (2, 0, 4)
    z = mor.router_scores(D(np.zeros((1, 0, 4), np.float32)), FakeGpuArray(randn(rng, (4,))))
    assert z.shape == (1, 0)
    depth, gate = mor.token_choice(D(np.zeros((2, 0, 3), np.float32)))
    assert depth.shape == (2, 0)


# ------------------------------------------------------------------------------------------------
# a NumPy model of topk_kernel (kernels/cuda/mor_topk.cu), statement by statement at block level:
# the radix passes (histogram of matching keys, the warp-0 suffix search over 8 bins per lane) and
# the tiled stable compaction (packed 16-bit counts, exclusive scan, slots).  When the kernel
# changes, change the model with it.

THREADS, ITEMS = 512, 4


def _keys(s):
    u = np.asarray(s, np.float32).view(np.uint32).copy()
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    u[(u << 1) == 0] = 0
    key = np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)
    key[nan] = 0
    return key


def topk_kernel_model(s, k):
    n = s.shape[0]
    keys = _keys(s)
    thr, want = 0, n
    if k < n:
        prefix, pmask, w = 0, 0, k
        for shift in (24, 16, 8, 0):
            match = (keys & pmask) == prefix
            hist = np.bincount((keys[match] >> shift) & 0xFF, minlength=256)
            lane_sums = [sum(hist[255 - 8 * lane - u] for u in range(8)) for lane in range(32)]
            incl = np.cumsum(lane_sums)
            owners = np.nonzero(incl >= w)[0]
            assert owners.size
            lane = int(owners[0])
            above = int(incl[lane] - lane_sums[lane])
            u = 0
            for v in range(7):
                if u == v and above + hist[255 - 8 * lane - v] < w:
                    above += hist[255 - 8 * lane - v]
                    u = v + 1
            digit = 255 - 8 * lane - u
            prefix |= digit << shift
            pmask |= 0xFF << shift
            w -= above
        thr, want = prefix, w
    idx = np.full(k, -1, np.int64)
    gt_done = eq_done = 0
    for tile in range(0, n, THREADS * ITEMS):
        if gt_done + min(eq_done, want) >= k:
            break
        packed = []
        tkeys = []
        for tid in range(THREADS):
            i0 = tile + tid * ITEMS
            ks = [int(keys[i]) if i < n else 0 for i in range(i0, i0 + ITEMS)]
            ngt = sum(1 for i, key in zip(range(i0, i0 + ITEMS), ks) if i < n and key > thr)
            neq = sum(1 for i, key in zip(range(i0, i0 + ITEMS), ks) if i < n and key == thr)
            packed.append(ngt | (neq << 16))
            tkeys.append(ks)
        excl = np.concatenate([[0], np.cumsum(packed)[:-1]]).astype(np.int64)
        total = int(sum(packed))
        assert (total & 0xFFFF) <= THREADS * ITEMS and (total >> 16) <= THREADS * ITEMS
        for tid in range(THREADS):
            gt_b, eq_b = gt_done + (int(excl[tid]) & 0xFFFF), eq_done + (int(excl[tid]) >> 16)
            for u in range(ITEMS):
                i = tile + tid * ITEMS + u
                if i >= n:
                    break
                slot = k
                key = tkeys[tid][u]
                if key > thr:
                    slot = gt_b + min(eq_b, want)
                    gt_b += 1
                elif key == thr:
                    if eq_b < want:
                        slot = gt_b + eq_b
                    eq_b += 1
                if slot < k:
                    assert idx[slot] == -1
                    idx[slot] = i
        gt_done += total & 0xFFFF
        eq_done += total >> 16
    return idx


@pytest.mark.parametrize("n,k,kind", [
    (9, 4, "ties"), (8, 8, "nan"), (8, 1, "nan"), (1, 1, "rand"), (2049, 682, "rand"),
    (4100, 2050, "ties"), (4100, 4099, "const"), (3000, 1, "const"), (700, 300, "nan"), (5000, 17, "sigmoid"),
])
def test_topk_kernel_model(rng, n, k, kind):
    if kind == "rand":
        s = randn(rng, (n,))
    elif kind == "ties":
        s = rng.integers(0, 4, n).astype(np.float32)
    elif kind == "const":
        s = np.full(n, 0.25, np.float32)
    elif kind == "sigmoid":  # router scores share their exponent byte: deep radix passes
        s = (0.1 / (1 + np.exp(-randn(rng, (n,))))).astype(np.float32)
    else:
        s = randn(rng, (n,))
        s[rng.random(n) < 0.3] = np.nan
        s[: min(3, n)] = [np.inf, -np.inf, -0.0][: min(3, n)]
    want, _ = ref.expert_choice(s[None], k)
    assert np.array_equal(topk_kernel_model(s, k), want[0])


# ------------------------------------------------------------------------------------------------
# the kernels on a GPU (torch CUDA tensors) against the twins


DTYPES = ["float32", "float16", "bfloat16"]


def _torch(a, dtype):
    torch = torch_cuda()
    if torch is None:
        pytest.skip("torch without CUDA")
    return torch.as_tensor(np.asarray(a, np.float32)).to(getattr(torch, dtype)).cuda()


def _np(t):
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n,k", [(1, 1, 1), (3, 7, 0), (3, 7, 7), (2, 2048, 1365), (5, 2049, 1),
                                   (2, 5000, 2500), (1, 100000, 33333)])
def test_gpu_expert_choice(rng, dtype, B, n, k):
    s = randn(rng, (B, n))
    s[:, ::7] = 0.5                                   # ties at the cutoff
    if n > 3:
        s[0, 1:3] = np.nan
        s[-1, 0] = -0.0
    st = _torch(s, dtype)
    sr = _np(st)
    idx, gate = mor.expert_choice(st, k)
    want_idx, want_gate = ref.expert_choice(sr, k)
    assert np.array_equal(_np(idx), want_idx)
    assert np.array_equal(_np(gate), want_gate, equal_nan=True)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_expert_choice_candidates_and_strides(rng, dtype):
    torch = torch_cuda() or pytest.skip("torch without CUDA")
    B, T = 4, 300
    s0 = _torch(randn(rng, (B, 2 * T)), dtype)[:, ::2]     # non-contiguous: copied by torch
    idx0, _ = mor.expert_choice(s0, 200)
    s1 = _torch(randn(rng, (B, 200)), dtype)
    idx1, gate1 = mor.expert_choice(s1, 37, candidates=idx0)
    r0, _ = ref.expert_choice(_np(s0), 200)
    r1, g1 = ref.expert_choice(_np(s1), 37, candidates=r0)
    assert np.array_equal(_np(idx1), r1) and np.array_equal(_np(gate1), g1)
    empty, _ = mor.expert_choice(s1, 0, candidates=idx0)
    assert tuple(empty.shape) == (B, 0)
    assert isinstance(idx1, torch.Tensor)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "tanh", "none"])
@pytest.mark.parametrize("C", [None, 1, 3, 19])
def test_gpu_router_scores(rng, dtype, activation, C):
    h = _torch(randn(rng, (3, 33, 70)), dtype)
    w = _torch(randn(rng, (70,) if C is None else (70, C)) / 8, dtype)
    z = mor.router_scores(h, w, activation=activation, alpha=0.1, temperature=1.5)
    want = ref.router_scores(_np(h), _np(w), activation=activation, alpha=0.1, temperature=1.5)
    assert_close(_np(z), want, tol=GPU_TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_token_choice(rng, dtype):
    p = randn(rng, (3, 41, 4))
    p[0, 0] = np.nan
    p[1, 1, 1:] = p[1, 1, 0]
    pt, bt = _torch(p, dtype), _torch([0.0, 0.1, -0.1, 0.05], dtype)
    depth, gate = mor.token_choice(pt, bias=bt)
    wd, wg = ref.token_choice(_np(pt), bias=_np(bt))
    assert np.array_equal(_np(depth), wd) and np.array_equal(_np(gate), wg, equal_nan=True)


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Dm", [1, 8, 67, 256])
def test_gpu_gather_scatter(rng, dtype, Dm):
    torch = torch_cuda() or pytest.skip("torch without CUDA")
    B, T, k = 3, 50, 23
    h = _torch(randn(rng, (B, T, Dm)), dtype)
    idx = np.stack([np.sort(rng.choice(T, k, replace=False)) for _ in range(B)])
    idx[1, :5] = 7                                          # repeated indices accumulate in j order
    y = _torch(randn(rng, (B, k, Dm)), dtype)
    g = _torch(randn(rng, (B, k)), dtype)
    x = mor.gather(h, torch.as_tensor(idx).cuda())
    assert_close(_np(x), ref.gather(_np(h), idx), tol=0)
    res = mor.scatter_residual(h, idx, y, g)
    hr, yr, gr = _np(h), _np(y), _np(g)
    assert_close(_np(res), ref.scatter_residual(hr, idx, yr, gr), tol=GPU_TOL[dtype])
    hs = torch.zeros((B, T, Dm + 3), dtype=h.dtype, device=h.device)[..., :Dm]   # strided, in place
    hs.copy_(h)
    assert mor.scatter_residual_(hs, idx, y) is hs
    assert_close(_np(hs), ref.scatter_residual(hr, idx, yr), tol=GPU_TOL[dtype])


# ------------------------------------------------------------------------------------------------
# the real bindings' argument handling (no GPU needed: size errors come before any CUDA call)


@pytest.mark.skipif(cuda._cuda is None, reason="built without CUDA")
def test_bindings_parse_and_check_sizes():
    m = cuda._cuda
    zero = [
        ("mor_topk", dict(dtype="float16", B=0, n=3, k=2, scores=None, scores_stride=3, candidates=None, idx=None,
                          gate=None)),
        ("mor_router", dict(dtype="bfloat16", B=0, T=2, Dm=3, C=2, h=None, h_stride=(6, 3), w=None,
                            w_stride=(2, 1), z=None, activation=3, alpha=0.1, temperature=1.0)),
        ("mor_token_choice", dict(B=0, T=2, C=2, probs=None, probs_stride=(4, 2), bias=None, depth=None, gate=None)),
        ("mor_gather", dict(B=0, T=2, k=2, Dm=3, h=None, h_stride=(6, 3), idx=None, out=None, out_stride=(6, 3))),
        ("mor_scatter", dict(B=0, T=2, k=2, Dm=3, h=None, h_stride=(6, 3), idx=None, y=None, y_stride=(6, 3),
                             gate=None, out=None, out_stride=(6, 3))),
    ]
    for name, kw in zero:
        try:  # no work: returns, or (no GPU / driver) a RuntimeError from selecting the device; never a parse error
            getattr(m, name)(device=0, stream=0, **kw)
        except RuntimeError:
            pass
    with pytest.raises(ValueError, match="0 <= k <= n"):
        m.mor_topk(B=1, n=2, k=3)
    with pytest.raises(ValueError, match="at most 1024"):
        m.mor_router(B=1, T=1, Dm=4, C=2000)
    with pytest.raises(ValueError, match="C >= 1"):
        m.mor_token_choice(B=1, T=1, C=0)
    with pytest.raises(ValueError, match="null device pointer"):
        m.mor_gather(B=1, T=2, k=1, Dm=3, h_stride=(6, 3), out_stride=(3, 3))
    with pytest.raises(ValueError, match="h and out must differ"):
        m.mor_scatter(B=1, T=2, k=1, Dm=3, h=4096, idx=8192, y=4096, out=4096, h_stride=(6, 3), y_stride=(3, 3),
                      out_stride=(6, 3))
    with pytest.raises(ValueError, match="2 entries"):
        m.mor_gather(B=0, h_stride=(1, 2, 3))
    with pytest.raises(TypeError, match="float64"):
        m.mor_topk(dtype="float64")


def test_glue_losses_reduce_on_the_host(fake, rng):
    """The losses return a Python float: CUDA inputs come to the host and give the CPU path's value."""
    B, T, C = 2, 7, 3
    probs = rng.random((B, T, C)).astype(np.float32)
    depth = rng.integers(1, C + 1, (B, T))
    logits = rng.standard_normal((B, T)).astype(np.float32)
    sel = rng.random((B, T)) < 0.5
    elig = rng.random((B, T)) < 0.8
    D = cuda.DeviceArray.from_numpy
    assert mor.balance_loss(D(probs), D(depth)) == mor.balance_loss(probs, depth)
    assert mor.z_loss(D(logits)) == mor.z_loss(logits)
    assert mor.z_loss(D(probs)) == mor.z_loss(probs)
    assert mor.router_bce(D(logits), D(sel.astype(np.float32)), eligible=D(elig.astype(np.int64))) == \
        mor.router_bce(logits, sel.astype(np.float32), eligible=elig)
    with pytest.raises(ValueError, match="depth"):
        mor.balance_loss(D(probs), D(depth + C))


def test_glue_stream_ordering(fake, rng):
    # on a stream other than the framework's: outputs (allocated on stream 0) are waited for before the
    # launch and released after it, uploaded index arrays too
    h, w = randn(rng, (2, 5, 8)), randn(rng, (8, 3))
    idx = np.array([[0, 4], [3, 1]])
    with cuda.use_stream(66):
        mor.router_scores(FakeGpuArray(h), FakeGpuArray(w), activation="softmax")
        assert_stream_ordered(fake, "mor_router", 66)
        mor.token_choice(FakeGpuArray(randn(rng, (2, 5, 3))))
        assert_stream_ordered(fake, "mor_token_choice", 66)
        out = mor.gather(FakeGpuArray(h), idx)
        assert_stream_ordered(fake, "mor_gather", 66)
        res = mor.scatter_residual(FakeGpuArray(h), idx, FakeGpuArray(out.numpy()))
        assert_stream_ordered(fake, "mor_scatter", 66)
    assert_close(res.numpy(), ref.scatter_residual(h, idx, out.numpy()), tol=0)
