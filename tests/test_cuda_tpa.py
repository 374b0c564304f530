"""lmkern.tpa on CUDA: the Python glue over a host-memory fake of lmkern._cuda (runs everywhere), and the
GPU kernels against the NumPy twin (``@requires_gpu``, torch CUDA tensors)."""
import numpy as np
import pytest

import lmkern
from lmkern import cuda, tpa
from lmkern.reference import tpa as ref

from conftest import GPU_TOL, assert_close, randn, requires_gpu, torch_cuda
from test_cuda import FakeCuda, FakeGpuArray, _arr_at, assert_stream_ordered


def factors(rng, B, N, M, H, Rq, Rk, Rv, D, E, dtype=np.float32):
    """aq, bq (B, N, ...) and ak, bk, av, bv (B, M, ...) in the T6 layout."""
    return (randn(rng, (B, N, H, Rq), dtype), randn(rng, (B, N, Rq, D), dtype),
            randn(rng, (B, M, H, Rk), dtype), randn(rng, (B, M, Rk, D), dtype),
            randn(rng, (B, M, H, Rv), dtype), randn(rng, (B, M, Rv, E), dtype))


# ------------------------------------------------------------------------------------------------
# the glue, over a fake lmkern._cuda whose "device memory" is host memory

class FakeCudaTPA(FakeCuda):
    """FakeCuda plus host versions of the tpa bindings (computing with the NumPy twin)."""

    def tpa_decode_plan(self, **kw):
        return self.real.tpa_decode_plan(**kw, num_sms=4)  # the real planner (no device access)

    def tpa_decode(self, **kw):
        self.calls.append(("tpa_decode", kw))
        dt = kw["dtype"]
        B, M, H, Rq, Rk, Rv, D, E = (kw[x] for x in ("B", "M", "H", "Rq", "Rk", "Rv", "D", "E"))

        def arr(name, shape, inner):
            st = tuple(kw[name + "_stride"])
            assert len(st) == 3 and st[2] == 1
            return _arr_at(kw[name], dt, shape, st[:2] + inner).astype(np.float32)

        aq = arr("aq", (B, H, Rq), (1,))
        bq = arr("bq", (B, Rq, D), (1,))
        ak = arr("ak", (B, M, H, Rk), (Rk, 1))   # each token's block contiguous, as the kernel reads it
        bk = arr("bk", (B, M, Rk, D), (D, 1))
        av = arr("av", (B, M, H, Rv), (Rv, 1))
        bv = arr("bv", (B, M, Rv, E), (E, 1))
        lens = None
        if kw["kv_lens"]:
            lens = np.clip(_arr_at(kw["kv_lens"], np.int64, (B,), (1,)).copy(), 0, M)  # the device clamps
        if kw["num_splits"] > 1:
            assert self.block_bytes(kw["scratch"]) >= B * H * kw["num_splits"] * (E + 2) * 4
        o, lse = ref.decode(aq, bq, ak, bk, av, bv, kv_lens=lens, scale=kw["scale"], return_lse=True)
        ost = tuple(kw["out_stride"])
        _arr_at(kw["out"], dt, (B, H, E), ost[:2] + (1,))[...] = o
        if kw["lse"]:
            _arr_at(kw["lse"], np.float32, (B, H), (H, 1))[...] = lse

    def tpa_materialize(self, **kw):
        self.calls.append(("tpa_materialize", kw))
        dt = kw["dtype"]
        rows, H, R, D = kw["rows"], kw["H"], kw["R"], kw["D"]
        a = _arr_at(kw["a"], dt, (rows, H, R), (H * R, R, 1)).astype(np.float32)
        b = _arr_at(kw["b"], dt, (rows, R, D), (R * D, D, 1)).astype(np.float32)
        _arr_at(kw["out"], dt, (rows, H, D), (H * D, D, 1))[...] = ref.materialize(a, b, scale=kw["scale"])


@pytest.fixture
def fake(monkeypatch):
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    import gc
    f = FakeCudaTPA(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())
    yield f
    gc.collect()


def _calls(fake, name):
    return [c[1] for c in fake.calls if c[0] == name]


G = FakeGpuArray

DECODE_CASES = [
    # B, M, H, Rq, Rk, Rv, D, E, kv_lens
    (2, 2049, 34, 6, 2, 2, 64, 64, None),          # T6-small ranks, split cache
    (1, 2047, 47, 6, 2, 2, 64, 64, None),          # T6-medium
    (2, 300, 61, 6, 2, 2, 64, 64, [300, 17]),      # T6-large, ragged
    (1, 40, 78, 6, 2, 2, 64, 64, None),            # T6-XL
    (1, 1000, 32, 16, 1, 1, 64, 64, None),         # the paper's decode configuration
    (3, 9, 5, 1, 1, 1, 24, 40, [9, 0, 4]),         # rank 1, D != E, an empty row
    (2, 1, 3, 2, 3, 2, 8, 8, None),                # M = 1
    (2, 0, 3, 2, 1, 1, 8, 8, None),                # M = 0
]


@pytest.mark.parametrize("B,M,H,Rq,Rk,Rv,D,E,lens", DECODE_CASES)
def test_glue_decode_matches_twin(fake, rng, B, M, H, Rq, Rk, Rv, D, E, lens):
    aq, bq, ak, bk, av, bv = factors(rng, B, 1, M, H, Rq, Rk, Rv, D, E)
    aq, bq = aq[:, 0], bq[:, 0]
    kv_lens = None if lens is None else np.array(lens)
    copies = [x.copy() for x in (aq, bq, ak, bk, av, bv)]
    want, want_lse = ref.decode(aq, bq, ak, bk, av, bv, kv_lens=kv_lens, return_lse=True)
    out, lse = tpa.decode(G(aq), G(bq), G(ak), G(bk), G(av), G(bv), kv_lens=kv_lens, return_lse=True)
    assert isinstance(out, cuda.DeviceArray) and out.shape == (B, H, E) and out.dtype == "float32"
    assert lse.dtype == "float32" and lse.shape == (B, H)
    assert_close(out.numpy(), want)
    assert_close(lse.numpy(), want_lse)
    for x, x0 in zip((aq, bq, ak, bk, av, bv), copies):
        assert np.array_equal(x, x0)
    kw = _calls(fake, "tpa_decode")[-1]
    assert (kw["B"], kw["M"], kw["H"], kw["Rq"], kw["Rk"], kw["Rv"], kw["D"], kw["E"]) == (B, M, H, Rq, Rk, Rv, D, E)
    assert kw["scale"] == pytest.approx(D ** -0.5)
    assert kw["aq"] == aq.ctypes.data and kw["bv"] == bv.ctypes.data   # zero copy
    if M > 1000:   # few rows on the fake's 4 SMs: the cache is split
        assert kw["num_splits"] > 1 and kw["scratch"]
    if M <= 256:
        assert kw["num_splits"] == 1 and kw["scratch"] is None


def test_glue_decode_path_choice(fake, rng):
    aq, bq, ak, bk, av, bv = factors(rng, 2, 1, 40, 3, 2, 1, 1, 16, 16)
    args = [G(x) for x in (aq[:, 0], bq[:, 0], ak, bk, av, bv)]
    with pytest.raises(ValueError, match="_path"):
        tpa.decode(*args, _path="bogus")
    with pytest.raises(ValueError, match="tensor-core kernel takes float16"):   # float32: CUDA cores only
        tpa.decode(*args, _path="tensor_cores")
    want = ref.decode(aq[:, 0], bq[:, 0], ak, bk, av, bv)
    for path, code in (("factor", 1), ("auto", 0)):
        assert_close(tpa.decode(*args, _path=path).numpy(), want)
        assert _calls(fake, "tpa_decode")[-1]["path"] == code


def test_glue_decode_views_of_a_larger_cache_are_read_in_place(fake, rng):
    B, S, M, H, Rq, Rk, Rv, D, E = 2, 16, 11, 5, 3, 2, 2, 8, 12
    aq, bq, ak, bk, av, bv = factors(rng, B, 1, S, H, Rq, Rk, Rv, D, E)
    views = [x[:, :M] for x in (ak, bk, av, bv)]
    # the query factors with permuted (batch, head) strides, rank axis contiguous
    aqs = np.ascontiguousarray(np.swapaxes(aq[:, 0], 0, 1)).swapaxes(0, 1)
    want = ref.decode(aq[:, 0], bq[:, 0], *views, kv_lens=[11, 6])
    out = tpa.decode(G(aqs), G(bq[:, 0]), *[G(v) for v in views], kv_lens=np.array([11, 6]))
    assert_close(out.numpy(), want)
    kw = _calls(fake, "tpa_decode")[-1]
    assert kw["ak"] == views[0].ctypes.data and kw["bv"] == views[3].ctypes.data
    assert tuple(kw["ak_stride"]) == (S * H * Rk, H * Rk, 1)
    assert tuple(kw["bv_stride"]) == (S * Rv * E, Rv * E, 1)
    assert tuple(kw["aq_stride"]) == (Rq, B * Rq, 1)


def test_glue_decode_forced_splits_scale_and_float16(fake, rng):
    aq, bq, ak, bk, av, bv = (x.astype(np.float16) for x in factors(rng, 2, 1, 70, 4, 3, 2, 1, 16, 8))
    aq, bq = aq[:, 0], bq[:, 0]
    out, lse = tpa.decode(*(G(x) for x in (aq, bq, ak, bk, av, bv)), scale=0.3, return_lse=True, _splits=5)
    assert out.dtype == "float16" and lse.dtype == "float32"
    want, want_lse = ref.decode(aq, bq, ak, bk, av, bv, scale=0.3, return_lse=True)
    assert_close(out.numpy(), want, tol=GPU_TOL["float16"])
    assert_close(lse.numpy(), want_lse, tol=1e-5)
    kw = _calls(fake, "tpa_decode")[-1]
    assert kw["num_splits"] == 5 and kw["dtype"] == "float16" and kw["scale"] == 0.3


def test_glue_decode_out_stream_and_device_kv_lens(fake, rng):
    aq, bq, ak, bk, av, bv = factors(rng, 2, 1, 9, 3, 2, 1, 1, 8, 8)
    aq, bq = aq[:, 0], bq[:, 0]
    out = np.zeros((2, 3, 8), np.float32)
    res = tpa.decode(*(G(x) for x in (aq, bq, ak, bk, av, bv)), out=G(out), kv_lens=[5, 9])
    assert isinstance(res, FakeGpuArray) and res.a is out
    assert_close(out, ref.decode(aq, bq, ak, bk, av, bv, kv_lens=[5, 9]))
    assert _calls(fake, "tpa_decode")[-1]["out"] == out.ctypes.data
    with cuda.use_stream(77):
        tpa.decode(*(G(x) for x in (aq, bq, ak, bk, av, bv)), kv_lens=[4, 9])
        assert_stream_ordered(fake, "tpa_decode", 77)
        tpa.materialize(G(ak), G(bk))
        assert_stream_ordered(fake, "tpa_materialize", 77)
    D = cuda.DeviceArray.from_numpy
    lens = D(np.array([3, 7], np.int64))
    res = tpa.decode(*(D(x) for x in (aq, bq, ak, bk, av, bv)), kv_lens=lens)
    assert isinstance(res, cuda.DeviceArray)
    assert_close(res.numpy(), ref.decode(aq, bq, ak, bk, av, bv, kv_lens=[3, 7]))
    assert _calls(fake, "tpa_decode")[-1]["kv_lens"] == lens.ptr   # device index array used in place


def test_glue_decode_errors(fake, rng):
    aq, bq, ak, bk, av, bv = factors(rng, 2, 1, 5, 3, 2, 2, 1, 8, 8)
    aq, bq = aq[:, 0], bq[:, 0]
    g = [G(x) for x in (aq, bq, ak, bk, av, bv)]
    with pytest.raises(ValueError, match=r"tpa.decode: bq has shape \(2, 2, 6\); expected \(B, Rq, D\) = \(2, 2, 8\)"):
        tpa.decode(g[0], G(randn(rng, (2, 2, 6))), *g[2:])
    with pytest.raises(TypeError, match="bk has dtype float16 but aq has dtype float32"):
        tpa.decode(*g[:3], G(bk.astype(np.float16)), *g[4:])
    with pytest.raises(TypeError, match="aq has dtype float64"):
        tpa.decode(G(aq.astype(np.float64)), *g[1:])
    with pytest.raises(ValueError, match="different devices"):
        tpa.decode(g[0], bq, *g[2:])
    with pytest.raises(ValueError, match=r"kv_lens must be in \[0, M = 5\]"):
        tpa.decode(*g, kv_lens=[6, 1])
    with pytest.raises(ValueError, match="kv_lens"):
        tpa.decode(*g, kv_lens=[1, 2, 3])
    with pytest.raises(ValueError, match="av has rank Rv = 0"):
        tpa.decode(*g[:4], G(randn(rng, (2, 5, 3, 0))), G(randn(rng, (2, 5, 0, 8))))
    with pytest.raises(ValueError, match="exceed 256"):
        tpa.decode(g[0], G(randn(rng, (2, 2, 264))), g[2], G(randn(rng, (2, 5, 2, 264))), *g[4:])
    assert not _calls(fake, "tpa_decode")


def test_glue_kvcache_on_device(fake, rng, monkeypatch):
    """tpa.KVCache(device="cuda"): ragged appends are device copies, decode runs the kernel over the
    buffers in place, and everything agrees with the CPU cache (DeviceArray storage: torch hidden)."""
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)
    B, S, H, Rk, Rv, D, E = 2, 16, 3, 2, 1, 8, 6
    Dv = cuda.DeviceArray.from_numpy
    c = tpa.KVCache(B, S, H, Rk, Rv, D, E, device="cuda")
    cpu = tpa.KVCache(B, S, H, Rk, Rv, D, E)
    assert c.dtype == "float32"
    for T, lens in ((5, [5, 3]), (2, None), (1, [1, 0])):
        f = [randn(rng, (B, T) + s) for s in ((H, Rk), (Rk, D), (H, Rv), (Rv, E))]
        c.append(*[Dv(x) for x in f], lengths=lens)
        cpu.append(*f, lengths=lens)
    assert np.array_equal(c.lengths, cpu.lengths)
    assert c.nbytes == cpu.nbytes and c.mha_nbytes == cpu.mha_nbytes
    for name in ("ak", "bk", "av", "bv"):
        got, want = getattr(c, name).numpy(), getattr(cpu, name)
        for b in range(B):
            n = int(cpu.lengths[b])
            assert np.array_equal(got[b, :n], want[b, :n])
    aq, bq = randn(rng, (B, H, 4)), randn(rng, (B, 4, D))
    out, lse = c.decode(Dv(aq), Dv(bq), return_lse=True)
    want, want_lse = cpu.decode(aq, bq, return_lse=True)
    assert_close(out.numpy(), want)
    assert_close(lse.numpy(), want_lse)
    with pytest.raises(ValueError, match="max_len"):
        c.append(*[Dv(randn(rng, (B, 10) + s)) for s in ((H, Rk), (Rk, D), (H, Rv), (Rv, E))])
    with pytest.raises(ValueError, match="bk has shape"):
        c.append(*[Dv(randn(rng, (B, 1) + s)) for s in ((H, Rk), (Rk + 1, D), (H, Rv), (Rv, E))])
    with pytest.raises(ValueError, match="different devices"):
        c.append(*[randn(rng, (B, 1) + s) for s in ((H, Rk), (Rk, D), (H, Rv), (Rv, E))])
    with pytest.raises(TypeError, match="dtype"):
        tpa.KVCache(1, 4, 2, 1, 1, 4, dtype=np.float64, device="cuda")
    assert np.array_equal(c.lengths, cpu.lengths)   # failed appends wrote nothing


@pytest.mark.parametrize("lead,H,R,D", [((2, 3), 5, 1, 7), ((4,), 34, 6, 64), ((), 3, 2, 5)])
def test_glue_materialize(fake, rng, lead, H, R, D):
    a, b = randn(rng, lead + (H, R)), randn(rng, lead + (R, D))
    out = tpa.materialize(G(a), G(b))
    assert isinstance(out, cuda.DeviceArray) and out.shape == lead + (H, D)
    assert_close(out.numpy(), ref.materialize(a, b))
    assert_close(tpa.materialize(G(a), G(b), scale=0.25).numpy(), ref.materialize(a, b, scale=0.25))
    kw = _calls(fake, "tpa_materialize")[-1]
    assert kw["scale"] == 0.25 and kw["rows"] == int(np.prod(lead, dtype=np.int64)) and (kw["H"], kw["R"], kw["D"]) == (H, R, D)
    o = np.zeros(lead + (H, D), np.float32)
    res = tpa.materialize(G(a), G(b), out=G(o))
    assert res.a is o and _calls(fake, "tpa_materialize")[-1]["out"] == o.ctypes.data
    assert_close(o, ref.materialize(a, b))


def test_glue_materialize_errors(fake, rng):
    a, b = G(randn(rng, (2, 4, 3))), G(randn(rng, (2, 3, 8)))
    with pytest.raises(ValueError, match=r"tpa.materialize: b has shape \(2, 4, 8\); expected \(L0, R, D\)"):
        tpa.materialize(a, G(randn(rng, (2, 4, 8))))
    z = tpa.materialize(G(randn(rng, (2, 4, 0))), G(randn(rng, (2, 0, 8))))   # a rank of 0: an empty sum
    assert np.array_equal(z.numpy(), np.zeros((2, 4, 8), np.float32))
    with pytest.raises(TypeError, match="b has dtype float16 but a has dtype float32"):
        tpa.materialize(a, G(randn(rng, (2, 3, 8)).astype(np.float16)))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        tpa.materialize(G(randn(rng, (3,))), b)


@pytest.mark.parametrize("causal,extra", [
    (True, {}),
    (False, {"kv_lens": [7, 3]}),
    (True, {"q_pos": [[3, 4, 5], [0, 1, 6]], "kv_lens": [7, 7]}),
])
def test_glue_attention_materializes_then_core_attention(fake, rng, causal, extra):
    B, N, M, H, Rq, Rk, Rv, D, E = 2, 3, 7, 5, 4, 2, 1, 8, 12
    fs = factors(rng, B, N, M, H, Rq, Rk, Rv, D, E)
    extra = {k: np.asarray(v) for k, v in extra.items()}
    want, want_lse = ref.attention(*fs, causal=causal, return_lse=True, **extra)
    out, lse = tpa.attention(*(G(x) for x in fs), causal=causal, return_lse=True, **extra)
    assert isinstance(out, cuda.DeviceArray) and out.shape == (B, N, H, E)
    assert_close(out.numpy(), want)
    assert_close(lse.numpy(), want_lse)
    assert len(_calls(fake, "tpa_materialize")) == 3
    kw = _calls(fake, "attention")[-1]
    assert kw["scale"] == pytest.approx(D ** -0.5) and kw["causal"] == causal
    o = np.zeros((B, N, H, E), np.float32)
    res = tpa.attention(*(G(x) for x in fs), causal=causal, out=G(o), **extra)
    assert res is not None and res.a is o
    assert_close(o, want)


def test_glue_attention_errors(fake, rng):
    fs = [G(x) for x in factors(rng, 1, 2, 3, 2, 2, 1, 1, 8, 8)]
    with pytest.raises(ValueError, match=r"tpa.attention: bq has shape \(1, 2, 2, 6\); expected \(B, N, Rq, D\) = \(1, 2, 2, 8\)"):
        tpa.attention(fs[0], G(randn(rng, (1, 2, 2, 6))), *fs[2:])
    with pytest.raises(ValueError, match=r"kv_lens must be in \[0, M = 3\]"):
        tpa.attention(*fs, kv_lens=[4])
    with pytest.raises(TypeError, match="dtype float16"):
        tpa.attention(*fs[:5], G(randn(rng, (1, 3, 1, 8)).astype(np.float16)))
    assert not _calls(fake, "attention")


# ------------------------------------------------------------------------------------------------
# on the GPU (torch CUDA tensors)

GPU_DTYPES = ["float32", "float16", "bfloat16"]


def _torch():
    torch = torch_cuda()
    if torch is None:
        pytest.skip("torch with CUDA is not installed")
    return torch


def _dev(torch, xs, dtype):
    """torch CUDA tensors of xs in dtype, and the dtype-rounded float32 host copies for the twin."""
    ts = [torch.from_numpy(x).to("cuda").to(getattr(torch, dtype)) for x in xs]
    return ts, [t.float().cpu().numpy() for t in ts]


GPU_DECODE_CASES = DECODE_CASES + [
    (1, 4097, 32, 16, 1, 1, 64, 64, None),
    (2, 33, 3, 1, 1, 1, 1, 3, [33, 31]),            # D = 1, odd E (scalar loads)
    (1, 100, 300, 2, 1, 1, 128, 256, None),          # head groups (H E too large for one block)
    (2, 64, 4, 5, 3, 4, 256, 200, [64, 1]),
]


def _gpu_decode_case(torch, rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens):
    """Device factors in dtype, kv_lens, and the twin's out and lse over the dtype-rounded factors."""
    fs = factors(rng, B, 1, M, H, Rq, Rk, Rv, D, E)
    ts, hs = _dev(torch, (fs[0][:, 0], fs[1][:, 0]) + fs[2:], dtype)
    kv_lens = None if lens is None else np.array(lens)
    want, want_lse = ref.decode(*hs, kv_lens=kv_lens, return_lse=True)
    return ts, kv_lens, want, want_lse


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,M,H,Rq,Rk,Rv,D,E,lens", GPU_DECODE_CASES)
def test_gpu_decode_matches_twin(rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens):
    torch = _torch()
    ts, kv_lens, want, want_lse = _gpu_decode_case(torch, rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens)
    out, lse = tpa.decode(*ts, kv_lens=kv_lens, return_lse=True)
    torch.cuda.synchronize()
    assert isinstance(out, torch.Tensor) and out.dtype == getattr(torch, dtype) and lse.dtype == torch.float32
    assert_close(out.float().cpu().numpy(), want, tol=GPU_TOL[dtype])
    assert_close(lse.cpu().numpy(), want_lse, tol=GPU_TOL["float32"] * 10)
    for splits in (1, 3, 64):
        o = tpa.decode(*ts, kv_lens=kv_lens, _splits=splits)
        assert_close(o.float().cpu().numpy(), want, tol=GPU_TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("B,M,H,Rq,Rk,Rv,D,E,lens", GPU_DECODE_CASES)
def test_gpu_decode_tensor_cores_and_cuda_cores_agree(rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens):
    torch = _torch()
    ts, kv_lens, want, want_lse = _gpu_decode_case(torch, rng, dtype, B, M, H, Rq, Rk, Rv, D, E, lens)
    simt = tpa.decode(*ts, kv_lens=kv_lens, _path="factor")
    assert_close(simt.float().cpu().numpy(), want, tol=GPU_TOL[dtype])
    tiles = -(-H // 16) * -(-E // 8)            # accumulator tiles of 16 heads x 8 features
    if -(-tiles // 4) > 16:                     # more than 16 per warp: the CUDA-core kernel only
        with pytest.raises(ValueError, match="tensor-core"):
            tpa.decode(*ts, kv_lens=kv_lens, _path="tensor_cores")
        return
    for splits in (0, 1, 3):
        out, lse = tpa.decode(*ts, kv_lens=kv_lens, _path="tensor_cores", _splits=splits, return_lse=True)
        torch.cuda.synchronize()
        assert_close(out.float().cpu().numpy(), want, tol=GPU_TOL[dtype])
        assert_close(lse.cpu().numpy(), want_lse, tol=GPU_TOL["float32"] * 10)


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_decode_strided_views_device_lens_and_clamp(rng, dtype):
    torch = _torch()
    B, S, M, H, Rq, Rk, Rv, D, E = 3, 300, 257, 34, 6, 2, 2, 64, 64
    fs = factors(rng, B, 1, S, H, Rq, Rk, Rv, D, E)
    ts, hs = _dev(torch, (fs[0][:, 0], fs[1][:, 0]) + fs[2:], dtype)
    views = [t[:, :M] for t in ts[2:]]                          # a cache view: read in place
    aq_t = ts[0].transpose(0, 1).contiguous().transpose(0, 1)   # permuted strides
    bq_nc = torch.zeros(B, Rq, 2 * D, dtype=ts[1].dtype, device="cuda")[..., ::2]
    bq_nc.copy_(ts[1])                                          # feature axis not contiguous: copied
    lens = torch.tensor([257, 100, 1], device="cuda")
    want = ref.decode(hs[0], hs[1], *[h[:, :M] for h in hs[2:]], kv_lens=[257, 100, 1])
    out = tpa.decode(aq_t, bq_nc, *views, kv_lens=lens)
    assert_close(out.float().cpu().numpy(), want, tol=GPU_TOL[dtype])
    # device kv_lens are clamped to [0, M] on the device: never a read past the cache
    wild = torch.tensor([10 ** 9, -5, 3], device="cuda")
    got = tpa.decode(*ts[:2], *views, kv_lens=wild).float().cpu().numpy()
    assert_close(got, ref.decode(hs[0], hs[1], *[h[:, :M] for h in hs[2:]], kv_lens=[M, 0, 3]),
                 tol=GPU_TOL[dtype])
    out2 = torch.empty(B, H, E, dtype=ts[0].dtype, device="cuda")
    assert tpa.decode(*ts[:2], *views, kv_lens=lens, out=out2) is out2
    assert_close(out2.float().cpu().numpy(), want, tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_decode_masks_inf_past_kv_lens(rng):
    torch = _torch()
    fs = list(factors(rng, 1, 1, 40, 4, 2, 1, 1, 16, 16))
    fs[0], fs[1] = fs[0][:, 0], fs[1][:, 0]
    for x in fs[2:]:
        x[:, 30:] = np.inf                  # past kv_lens: must never contribute
    ts = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in fs]
    out = tpa.decode(*ts, kv_lens=np.array([30])).cpu().numpy()
    assert np.isfinite(out).all()
    assert_close(out, ref.decode(*[x[:, :30] if x.ndim == 4 else x for x in fs]), tol=GPU_TOL["float32"])


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("lead,H,R,D", [((2, 3), 5, 1, 7), ((4,), 34, 6, 64), ((), 3, 2, 5), ((2, 1, 3), 1, 16, 33)])
def test_gpu_materialize(rng, dtype, lead, H, R, D):
    torch = _torch()
    (a, b), (ha, hb) = _dev(torch, (randn(rng, lead + (H, R)), randn(rng, lead + (R, D))), dtype)
    out = tpa.materialize(a, b)
    assert out.dtype == getattr(torch, dtype) and tuple(out.shape) == lead + (H, D)
    assert_close(out.float().cpu().numpy(), ref.materialize(ha, hb), tol=GPU_TOL[dtype])
    o = tpa.materialize(a.transpose(-1, -2).contiguous().transpose(-1, -2), b, scale=0.5)  # strided input
    assert_close(o.float().cpu().numpy(), ref.materialize(ha, hb, scale=0.5), tol=GPU_TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,N,M,H,Rq,Rk,Rv,D,E,causal,lens", [
    (1, 64, 64, 34, 6, 2, 2, 64, 64, True, None),
    (2, 17, 40, 5, 1, 1, 1, 24, 40, True, [40, 19]),
    (2, 3, 2049, 32, 16, 1, 1, 64, 64, False, None),
])
def test_gpu_attention(rng, dtype, B, N, M, H, Rq, Rk, Rv, D, E, causal, lens):
    torch = _torch()
    ts, hs = _dev(torch, factors(rng, B, N, M, H, Rq, Rk, Rv, D, E), dtype)
    kv_lens = None if lens is None else np.array(lens)
    # the twin over the materialized factors rounded to the dtype, as the GPU path computes
    rq, rk, rv = (torch.from_numpy(ref.materialize(a, b)).cuda().to(getattr(torch, dtype)).float().cpu().numpy()
                  for a, b in ((hs[0], hs[1]), (hs[2], hs[3]), (hs[4], hs[5])))
    want = lmkern.reference.core.attention(rq, rk, rv, causal=causal, scale=D ** -0.5, kv_lens=kv_lens)
    out = tpa.attention(*ts, causal=causal, kv_lens=kv_lens)
    assert_close(out.float().cpu().numpy(), want, tol=GPU_TOL[dtype])


def test_glue_decode_reversed_cache_view_is_copied_not_read_backwards(fake, rng):
    aq, bq, ak, bk, av, bv = factors(rng, 1, 1, 6, 2, 2, 1, 1, 8, 8)
    aq, bq = aq[:, 0], bq[:, 0]
    # a reversed token axis (CuPy's x[:, ::-1]) goes through the framework's copy, never to the kernel
    # with a negative stride; this stand-in framework cannot copy, so the error names the argument
    with pytest.raises(ValueError, match="ak is not contiguous and lmkern cannot copy"):
        tpa.decode(G(aq), G(bq), G(ak[:, ::-1]), G(bk), G(av), G(bv))
    assert not _calls(fake, "tpa_decode")
