"""lmkern.cuda: import without a GPU, DLPack parsing, the Python glue (over a host-memory fake of
lmkern._cuda, so it runs everywhere), and the GPU kernels themselves (``@requires_gpu``)."""
import ctypes
import gc

import numpy as np
import pytest

import lmkern
from lmkern import cuda
from lmkern.reference import core as ref

from conftest import GPU_TOL, assert_close, randn, requires_gpu, torch_cuda

compiled = pytest.mark.skipif(cuda._cuda is None, reason="built without CUDA")


# ------------------------------------------------------------------------------------------------
# without a GPU

def test_import_and_config():
    info = cuda.config()
    assert info["CUDA compiled"] == (cuda._cuda is not None)
    assert info["GPUs"] == cuda.device_count()
    assert cuda.available() == (cuda._cuda is not None and cuda.device_count() > 0)
    assert "CUDA compiled" in lmkern._config.config()


@pytest.mark.skipif(cuda.device_count() > 0, reason="a GPU is visible")
def test_not_available_without_gpu():
    assert cuda.available() is False
    assert cuda.device_count() == 0


@compiled
def test_dlpack_cpu_capsule_is_rejected():
    cap = np.ones(3).__dlpack__()
    with pytest.raises(ValueError, match="CPU.*CUDA device"):
        cuda._cuda.dlpack_info(cap)
    # the capsule was not consumed: NumPy can still import it
    assert np.from_dlpack(np.ones(3)).sum() == 3


@compiled
def test_dlpack_info_reads_cpu_capsule_when_allowed():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    info = cuda._cuda.dlpack_info(a.__dlpack__(), require_cuda=False)
    assert info["shape"] == (3, 2)
    assert info["strides"] == (4, 2)
    assert info["dtype"] == "float32"
    assert info["device_type"] == 1
    assert info["ptr"] == a.ctypes.data
    b = np.zeros((2, 3), np.int64)
    info = cuda._cuda.dlpack_info(b.__dlpack__(), require_cuda=False)
    assert info["dtype"] == "int64" and info["shape"] == (2, 3)


@compiled
def test_dlpack_info_rejects_non_capsules():
    with pytest.raises(TypeError, match="DLPack capsule"):
        cuda._cuda.dlpack_info(np.ones(3))


def test_view_of_cpu_array_is_rejected():
    if cuda._cuda is None:
        pytest.skip("built without CUDA")

    class CpuDL:
        def __dlpack__(self, stream=None):
            return np.ones(3).__dlpack__()

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(ValueError, match="x is not on a CUDA device"):
        cuda.View.of(CpuDL(), "x", "f")


@pytest.mark.skipif(cuda.device_count() > 0, reason="a GPU is visible")
def test_device_array_without_gpu_is_a_clear_error():
    if cuda._cuda is None:
        with pytest.raises(RuntimeError, match="without CUDA"):
            cuda.DeviceArray.from_numpy(np.ones(3))
    else:
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            cuda.DeviceArray.from_numpy(np.ones(3))


def test_parse_device():
    assert cuda.parse_device(None) is None
    assert cuda.parse_device("cpu") is None
    assert cuda.parse_device("cuda") == 0
    assert cuda.parse_device("cuda:3") == 3
    assert cuda.parse_device(1) == 1
    with pytest.raises(ValueError, match="device"):
        cuda.parse_device("gpu")


@pytest.mark.skipif(cuda.device_count() > 0, reason="a GPU is visible")
def test_gpu_kvcache_without_gpu_is_a_clear_error():
    with pytest.raises((ValueError, RuntimeError), match="not visible|without CUDA"):
        lmkern.KVCache(1, 4, 1, 8, device="cuda")


def test_reference_kvcache_stays_on_host():
    with pytest.raises(ValueError, match="device"):
        ref.KVCache(1, 4, 1, 8, device="cuda")


def test_bf16_host_conversion():
    x = np.array([1.0, -2.5, 3.140625, 1e-3, np.inf, -np.inf, 65504.0], np.float32)
    back = cuda._f32_from_bf16(cuda._bf16_from_f32(x))
    assert np.array_equal(back[:3], x[:3])  # exactly representable
    assert np.all(np.abs(back[np.isfinite(x)] - x[np.isfinite(x)]) <= np.abs(x[np.isfinite(x)]) * 2 ** -8)
    assert np.array_equal(back[4:6], x[4:6])
    assert np.isnan(cuda._f32_from_bf16(cuda._bf16_from_f32(np.array([np.nan], np.float32))))[0]


# ------------------------------------------------------------------------------------------------
# the Python glue over a fake lmkern._cuda whose "device memory" is host memory

def _arr_at(ptr, dtype, shape, strides):
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape):
        return np.zeros(shape, dtype)
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    buf = (ctypes.c_char * (extent * dtype.itemsize)).from_address(ptr)
    base = np.frombuffer(buf, dtype=dtype)
    return np.lib.stride_tricks.as_strided(base, shape, [st * dtype.itemsize for st in strides])


class FakeCuda:
    """Host-memory stand-in for lmkern._cuda: checks what the glue passes and computes with the CPU path."""

    max_head_dim = 256

    def __init__(self, real):
        self.real = real
        self.blocks = {}
        self.calls = []

    def device_count(self):
        return 1

    def versions(self):
        return {"runtime": 13000, "driver": 13000, "compiled": 13000}

    def device_properties(self, i):
        return {"name": "Fake", "major": 9, "minor": 0, "multiprocessors": 4, "total_memory": 1 << 30, "device": i}

    def current_device(self):
        return 0

    def pointer_device(self, ptr):
        return 0

    def malloc(self, n, device):
        buf = np.zeros(n + 256, np.uint8)
        ptr = (buf.ctypes.data + 255) // 256 * 256
        self.blocks[ptr] = (buf, n)
        return ptr

    def free(self, ptr, device):
        del self.blocks[ptr]

    def memcpy_htod(self, dst, host, device, stream=0):
        h = np.ascontiguousarray(host)
        ctypes.memmove(dst, h.ctypes.data, h.nbytes)

    def memcpy_dtoh(self, host, src, device):
        ctypes.memmove(host.ctypes.data, src, host.nbytes)

    def memcpy_dtod(self, dst, src, n, device, stream):
        self.calls.append(("memcpy_dtod", {"n": n, "stream": stream}))
        ctypes.memmove(dst, src, n)

    def synchronize(self, device, stream=None):
        self.calls.append(("synchronize", stream))

    def stream_wait(self, consumer, producer, device):
        self.calls.append(("stream_wait", consumer, producer))

    def dlpack_info(self, *a, **k):
        return self.real.dlpack_info(*a, **k)

    def dlpack_capsule(self, *a):
        return self.real.dlpack_capsule(*a)

    def attention_plan(self, **kw):
        return self.real.attention_plan(**kw, num_sms=4)

    def block_bytes(self, ptr):
        for start, (_, n) in self.blocks.items():
            if start <= ptr < start + n:
                return start + n - ptr
        return None

    def attention(self, **kw):
        self.calls.append(("attention", kw))
        dt = kw["dtype"]
        B, N, M, Hq, Hkv, D, E = (kw[x] for x in ("B", "N", "M", "Hq", "Hkv", "D", "E"))
        q = _arr_at(kw["q"], dt, (B, N, Hq, D), tuple(kw["q_stride"]) + (1,)).astype(np.float32)
        k = _arr_at(kw["k"], dt, (B, M, Hkv, D), tuple(kw["k_stride"]) + (1,)).astype(np.float32)
        v = _arr_at(kw["v"], dt, (B, M, Hkv, E), tuple(kw["v_stride"]) + (1,)).astype(np.float32)

        def idx(ptr, bstride, n):
            if not ptr:
                return None
            return _arr_at(ptr, np.int64, (B, n) if bstride else (n,), (bstride, 1) if bstride else (1,)).copy()

        q_pos, kv_pos = idx(kw["q_pos"], kw["q_pos_bstride"], N), idx(kw["kv_pos"], kw["kv_pos_bstride"], M)
        kv_lens = _arr_at(kw["kv_lens"], np.int64, (B,), (1,)).copy() if kw["kv_lens"] else None
        L = kw["prefix_len"]
        pk = pv = None
        if L:
            P = B // kw["prefix_rows"]
            pk = _arr_at(kw["prefix_k"], dt, (P, L, Hkv, D), (L * Hkv * D, Hkv * D, D, 1)).astype(np.float32)
            pv = _arr_at(kw["prefix_v"], dt, (P, L, Hkv, E), (L * Hkv * E, Hkv * E, E, 1)).astype(np.float32)
        if kw["num_splits"] > 1:
            need = self.real.attention_plan(**{**kw, "num_splits": 1}, num_sms=4)[1] * 4 // 1
            assert self.block_bytes(kw["scratch"]) >= need
        o, lse = ref.attention(q, k, v, causal=kw["causal"], scale=kw["scale"], q_pos=q_pos, kv_pos=kv_pos,
                               kv_lens=kv_lens, return_lse=True, prefix_k=pk, prefix_v=pv)
        out = _arr_at(kw["out"], dt, (B, N, Hq, E), tuple(kw["out_stride"]) + (1,))
        out[...] = o
        if kw["lse"]:
            _arr_at(kw["lse"], np.float32, (B, N, Hq), (N * Hq, Hq, 1))[...] = lse

    def rope(self, **kw):
        self.calls.append(("rope", kw))
        B, T, G, D = kw["B"], kw["T"], kw["G"], kw["D"]
        x = _arr_at(kw["x"], kw["dtype"], (B, T, G, D), tuple(kw["x_stride"]) + (1,))
        pb = kw["pos_bstride"]
        pos = _arr_at(kw["positions"], np.int64, (B, T) if pb else (T,), (pb, 1) if pb else (1,)).copy()
        x[...] = ref.rope(x.astype(np.float32), pos, base=kw["base"], rotary_dim=kw["rotary_dim"],
                          style="interleaved" if kw["interleaved"] else "half", inverse=kw["inverse"])


def assert_stream_ordered(fake, kernel, stream, *, released=True):
    """The last ``kernel`` launch of a call made on ``stream`` (other than the caller's stream 0): the
    stream first waited for stream 0 (where outputs and scratch were allocated), and, when ``released``,
    was synchronized after the launch (what release_scratch does for arrays without record_stream)."""
    names = [c[0] for c in fake.calls]
    assert kernel in names, f"{kernel} was not launched"
    at = len(names) - 1 - names[::-1].index(kernel)
    assert fake.calls[at][1]["stream"] == stream
    assert ("stream_wait", stream, 0) in fake.calls[:at], f"{kernel}: stream {stream} never waited for stream 0"
    if released:
        assert ("synchronize", stream) in fake.calls[at + 1:], f"{kernel}: outputs not released on stream {stream}"


class FakeGpuArray:
    """A host array dressed as a CUDA array through __cuda_array_interface__ / __dlpack_device__."""

    def __init__(self, a):
        self.a = a
        self.shape = a.shape
        self.dtype = a.dtype
        self.ndim = a.ndim

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.a.shape, "typestr": self.a.dtype.str, "data": (self.a.ctypes.data, False),
                "strides": self.a.strides, "version": 3}

    def __dlpack_device__(self):
        return (2, 0)


@pytest.fixture
def fake(monkeypatch):
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    f = FakeCuda(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())  # its blocks go back to the fake, never to the GPU pool
    yield f
    gc.collect()  # fake DeviceArrays die while the fake is installed


ATTN_CASES = [
    # B, N, M, Hq, Hkv, D, E, causal, kwargs
    (2, 5, 7, 4, 2, 16, 8, True, {}),
    (1, 1, 2049, 3, 1, 24, 24, False, {}),                       # decode: split-KV plan
    (2, 3, 6, 2, 2, 8, 8, True, {"kv_lens": [6, 2]}),
    (2, 4, 5, 2, 1, 8, 12, True, {"q_pos": [[0, 1, 2, 3], [4, 4, 0, 9]], "kv_pos": [0, 2, 4, 6, 8]}),
    (2, 3, 4, 2, 2, 8, 8, False, {"q_pos": [1, 2, 3]}),
]


@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,E,causal,extra", ATTN_CASES)
def test_glue_attention_matches_reference(fake, rng, B, N, M, Hq, Hkv, D, E, causal, extra):
    q, k, v = randn(rng, (B, N, Hq, D)), randn(rng, (B, M, Hkv, D)), randn(rng, (B, M, Hkv, E))
    extra = {key: np.asarray(val) for key, val in extra.items()}
    want, want_lse = ref.attention(q, k, v, causal=causal, return_lse=True, **extra)
    q0 = q.copy()
    out, lse = lmkern.attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v), causal=causal,
                                return_lse=True, **extra)
    assert isinstance(out, cuda.DeviceArray) and out.dtype == "float32" and lse.dtype == "float32"
    assert_close(out.numpy(), want)
    assert_close(lse.numpy(), want_lse)
    assert np.array_equal(q, q0)
    kw = [c for c in fake.calls if c[0] == "attention"][-1][1]
    if M > 512 and N == 1:
        assert kw["num_splits"] > 1


def test_glue_attention_float16_out_and_lse(fake, rng):
    q, k, v = (randn(rng, s).astype(np.float16) for s in ((1, 3, 2, 8), (1, 5, 1, 8), (1, 5, 1, 6)))
    out, lse = lmkern.attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v), causal=True, return_lse=True)
    assert out.dtype == "float16" and lse.dtype == "float32"   # lse in float32, as FlashAttention
    want, want_lse = ref.attention(q, k, v, causal=True, return_lse=True)
    assert_close(out.numpy(), want, tol=GPU_TOL["float16"])
    assert_close(lse.numpy(), want_lse, tol=1e-6)
    kw = [c for c in fake.calls if c[0] == "attention"][-1][1]
    assert kw["dtype"] == "float16"


def test_glue_attention_strided_inputs_zero_copy(fake, rng):
    q, k, v = randn(rng, (2, 3, 4, 8)), randn(rng, (2, 5, 2, 8)), randn(rng, (2, 5, 2, 8))
    qs = np.ascontiguousarray(np.swapaxes(q, 1, 2)).swapaxes(1, 2)   # token/head strides permuted
    kbig = np.zeros((2, 5, 2, 16), np.float32)
    kbig[..., :8] = k                                                   # feature axis contiguous, padded rows
    ks = kbig[..., :8]
    out = lmkern.attention(FakeGpuArray(qs), FakeGpuArray(ks), FakeGpuArray(v), causal=True)
    assert_close(out.numpy(), ref.attention(q, k, v, causal=True))
    kw = [c for c in fake.calls if c[0] == "attention"][-1][1]
    assert kw["q"] == qs.ctypes.data and kw["k"] == ks.ctypes.data          # no copies
    assert tuple(kw["k_stride"]) == (5 * 2 * 16, 2 * 16, 16)


def test_glue_attention_prefix(fake, rng):
    P, B, N, M, L, H = 2, 2, 3, 4, 5, 2
    q, k, v = randn(rng, (P * B, N, H, 8)), randn(rng, (P * B, M, H, 8)), randn(rng, (P * B, M, H, 8))
    pk, pv = randn(rng, (P, L, H, 8)), randn(rng, (P, L, H, 8))
    out = cuda.attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v), causal=True,
                         prefix_k=FakeGpuArray(pk), prefix_v=FakeGpuArray(pv), P=P)
    assert_close(out.numpy(), ref.attention(q, k, v, causal=True, prefix_k=pk, prefix_v=pv))


def test_glue_parscale_prefix_attention_routes_to_cuda(fake, rng):
    P, B, N, M, L, H = 2, 3, 4, 6, 5, 2
    q, k, v = randn(rng, (P * B, N, H, 8)), randn(rng, (P * B, M, H, 8)), randn(rng, (P * B, M, H, 8))
    pk, pv = randn(rng, (P, L, H, 8)), randn(rng, (P, L, H, 8))
    out = lmkern.parscale.prefix_attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v), FakeGpuArray(pk),
                                           FakeGpuArray(pv), causal=True, kv_lens=[6, 5, 4, 3, 2, 1])
    expected = lmkern.reference.parscale.prefix_attention(q, k, v, pk, pv, causal=True, kv_lens=[6, 5, 4, 3, 2, 1])
    assert_close(out.numpy(), expected)


def test_glue_attention_errors(fake, rng):
    q, k, v = randn(rng, (1, 2, 2, 8)), randn(rng, (1, 3, 2, 8)), randn(rng, (1, 3, 2, 8))
    fq, fk, fv = FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v)
    with pytest.raises(TypeError, match="k has dtype float16 but q has dtype float32"):
        lmkern.attention(fq, FakeGpuArray(k.astype(np.float16)), fv)
    with pytest.raises(TypeError, match="q has dtype float64"):
        lmkern.attention(FakeGpuArray(q.astype(np.float64)), fk, fv)
    with pytest.raises(ValueError, match="different devices"):
        lmkern.attention(fq, k, fv)
    with pytest.raises(ValueError, match=r"attention: v has shape \(1, 4, 2, 8\)"):
        lmkern.attention(fq, fk, FakeGpuArray(randn(rng, (1, 4, 2, 8))))
    with pytest.raises(ValueError, match="kv_lens"):
        lmkern.attention(fq, fk, fv, kv_lens=[4])
    big = randn(rng, (1, 2, 1, 264))
    with pytest.raises(ValueError, match="exceed 256"):
        lmkern.attention(FakeGpuArray(big), FakeGpuArray(randn(rng, (1, 3, 1, 264))),
                         FakeGpuArray(randn(rng, (1, 3, 1, 8))))


def test_glue_attention_out_and_stream(fake, rng):
    q, k, v = randn(rng, (1, 4, 2, 8)), randn(rng, (1, 6, 2, 8)), randn(rng, (1, 6, 2, 8))
    out = np.zeros((1, 4, 2, 8), np.float32)
    res = cuda.attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v), out=FakeGpuArray(out), stream=1234)
    assert isinstance(res, FakeGpuArray) and res.a is out
    assert_close(out, ref.attention(q, k, v))
    kw = [c for c in fake.calls if c[0] == "attention"][-1][1]
    assert kw["stream"] == 1234 and kw["out"] == out.ctypes.data
    with cuda.use_stream(99):
        lmkern.attention(FakeGpuArray(q), FakeGpuArray(k), FakeGpuArray(v))
    assert_stream_ordered(fake, "attention", 99)
    # DeviceArray inputs and an uploaded kv_lens: the same ordering
    fake.calls.clear()
    with cuda.use_stream(99):
        lmkern.attention(cuda.DeviceArray.from_numpy(q), cuda.DeviceArray.from_numpy(k),
                         cuda.DeviceArray.from_numpy(v), kv_lens=np.array([3]))
    assert_stream_ordered(fake, "attention", 99)


def test_glue_device_array_round_trip_and_attention(fake, rng):
    x = randn(rng, (2, 3, 4))
    d = cuda.DeviceArray.from_numpy(x)
    assert d.shape == (2, 3, 4) and d.dtype == "float32" and d.__dlpack_device__() == (2, 0)
    assert np.array_equal(d.numpy(), x)
    h = cuda.DeviceArray.from_numpy(x, dtype="float16")
    assert np.array_equal(h.numpy(), x.astype(np.float16))
    b = cuda.DeviceArray.from_numpy(x, dtype="bfloat16")
    assert_close(b.numpy(), x, tol=2 ** -8)
    info = fake.real.dlpack_info(b.__dlpack__(), require_cuda=True)
    assert info["dtype"] == "bfloat16" and info["shape"] == (2, 3, 4) and info["ptr"] == b.ptr
    assert d.__cuda_array_interface__["data"][0] == d.ptr
    q, k, v = randn(rng, (1, 3, 2, 8)), randn(rng, (1, 5, 1, 8)), randn(rng, (1, 5, 1, 8))
    D = cuda.DeviceArray.from_numpy
    out = lmkern.attention(D(q), D(k), D(v), causal=True, kv_lens=np.array([4]))
    assert isinstance(out, cuda.DeviceArray)
    assert_close(out.numpy(), ref.attention(q, k, v, causal=True, kv_lens=[4]))


def test_glue_device_index_arrays(fake, rng):
    q, k, v = randn(rng, (2, 2, 2, 8)), randn(rng, (2, 5, 2, 8)), randn(rng, (2, 5, 2, 8))
    lens = np.array([5, 3], np.int64)
    qp = np.array([[3, 4], [1, 2]], np.int64)
    D = cuda.DeviceArray.from_numpy
    out = lmkern.attention(D(q), D(k), D(v), causal=True, kv_lens=D(lens), q_pos=D(qp))
    assert_close(out.numpy(), ref.attention(q, k, v, causal=True, kv_lens=lens, q_pos=qp))


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_glue_rope(fake, rng, style):
    x = randn(rng, (2, 5, 3, 10))
    pos = np.array([[0, 7, 1 << 20, 3, 4], [5, 5, 5, 5, 5]])
    want = ref.rope(x, pos, rotary_dim=6, style=style)
    res = lmkern.rope(cuda.DeviceArray.from_numpy(x), pos, rotary_dim=6, style=style)
    assert_close(res.numpy(), want)
    y = x.copy()
    fy = FakeGpuArray(y)
    assert lmkern.rope_(fy, pos[0], style=style, inverse=True) is fy
    assert_close(y, ref.rope(x, pos[0], style=style, inverse=True))
    with pytest.raises(ValueError, match="rotary_dim"):
        lmkern.rope(FakeGpuArray(x), pos, rotary_dim=5)


def test_glue_kvcache_on_device(fake, rng, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # DeviceArray storage
    B, S, H, D = 2, 16, 2, 8
    c = lmkern.KVCache(B, S, H, D, device="cuda")
    cpu = lmkern.KVCache(B, S, H, D)
    for T, lens in ((5, [5, 3]), (2, None), (1, [1, 0])):
        k, v = randn(rng, (B, T, H, D)), randn(rng, (B, T, H, D))
        c.append(cuda.DeviceArray.from_numpy(k), cuda.DeviceArray.from_numpy(v), lengths=lens)
        cpu.append(k, v, lengths=lens)
    assert np.array_equal(c.lengths, cpu.lengths)
    assert c.nbytes == cpu.nbytes
    assert np.array_equal(c.k.numpy(), cpu.k) and np.array_equal(c.positions, cpu.positions)
    q = randn(rng, (B, 2, 4, D))
    got = c.attend(cuda.DeviceArray.from_numpy(q))
    assert_close(got.numpy(), cpu.attend(q))
    with pytest.raises(ValueError, match="max_len"):
        c.append(cuda.DeviceArray.from_numpy(randn(rng, (B, 10, H, D))),
                 cuda.DeviceArray.from_numpy(randn(rng, (B, 10, H, D))))
    with pytest.raises(TypeError, match="dtype"):
        lmkern.KVCache(1, 4, 1, 8, dtype=np.float64, device="cuda")


# ------------------------------------------------------------------------------------------------
# on a GPU

def _torch():
    t = torch_cuda()
    if t is None:
        pytest.skip("torch with CUDA is not installed")
    return t


def _to(torch, a, dtype):
    return torch.from_numpy(a).to("cuda").to(getattr(torch, dtype))


def _host(x):
    if isinstance(x, cuda.DeviceArray):
        return x.numpy()
    return x.float().cpu().numpy()


GPU_CASES = [
    # B, N, M, Hq, Hkv, D, E, causal, extra
    (2, 37, 53, 4, 2, 64, 64, True, {}),
    (1, 129, 200, 3, 1, 72, 40, True, {}),                  # D, E not multiples of 16, M not of 64
    (2, 64, 64, 8, 8, 128, 128, False, {"kv_lens": [64, 17]}),
    (1, 20, 30, 2, 2, 256, 256, True, {}),                  # the largest head dimension
    (2, 17, 21, 2, 1, 32, 32, True, {"q_pos": np.arange(17)[::-1].copy(), "kv_pos": np.arange(21) * 2}),
    (1, 3, 2049, 8, 2, 128, 128, True, {}),                 # decode-like: split-KV
    (2, 1, 777, 4, 4, 100, 20, False, {"kv_lens": [777, 0]}),  # empty row: 0 / -inf
]


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("B,N,M,Hq,Hkv,D,E,causal,extra", GPU_CASES)
def test_gpu_attention_torch(rng, dtype, B, N, M, Hq, Hkv, D, E, causal, extra):
    torch = _torch()
    q, k, v = randn(rng, (B, N, Hq, D)), randn(rng, (B, M, Hkv, D)), randn(rng, (B, M, Hkv, E))
    tq, tk, tv = _to(torch, q, dtype), _to(torch, k, dtype), _to(torch, v, dtype)
    # the oracle sees the rounded inputs
    rq, rk, rv = (_host(t) for t in (tq, tk, tv))
    want, want_lse = ref.attention(rq, rk, rv, causal=causal, return_lse=True, **extra)
    out, lse = lmkern.attention(tq, tk, tv, causal=causal, return_lse=True, **extra)
    assert isinstance(out, torch.Tensor) and out.device == tq.device and out.dtype == tq.dtype
    assert lse.dtype == torch.float32
    assert_close(_host(out), want, tol=GPU_TOL[dtype])
    assert_close(lse.cpu().numpy(), want_lse, tol=GPU_TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_attention_device_array(rng, dtype):
    q, k, v = randn(rng, (2, 33, 6, 64)), randn(rng, (2, 70, 3, 64)), randn(rng, (2, 70, 3, 48))
    dq, dk, dv = (cuda.DeviceArray.from_numpy(a, dtype=dtype) for a in (q, k, v))
    want = ref.attention(dq.numpy(), dk.numpy(), dv.numpy(), causal=True, kv_lens=[70, 41])
    out = lmkern.attention(dq, dk, dv, causal=True, kv_lens=[70, 41])
    assert isinstance(out, cuda.DeviceArray) and out.dtype == dtype and out.device == 0
    assert_close(out.numpy(), want, tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_device_array_round_trip():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    for dtype in ("float32", "float16", "bfloat16", "int64"):
        src = x if dtype != "int64" else (x * 100).astype(np.int64)
        d = cuda.DeviceArray.from_numpy(src, dtype=dtype)
        assert d.shape == (3, 5, 7) and d.dtype == dtype
        back = d.numpy()
        if dtype in ("float32", "int64"):
            assert np.array_equal(back, src)
        else:
            assert_close(back, src, tol=GPU_TOL[dtype])
    t = torch_cuda()
    if t is not None:
        d = cuda.DeviceArray.from_numpy(x)
        tt = t.from_dlpack(d)
        assert np.array_equal(tt.cpu().numpy(), x)


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_split_kv_decode_long(rng, dtype):
    torch = _torch()
    B, M, Hq, Hkv, D = 2, 32768, 8, 2, 128
    q, k, v = randn(rng, (B, 1, Hq, D)), randn(rng, (B, M, Hkv, D)), randn(rng, (B, M, Hkv, D))
    tq, tk, tv = _to(torch, q, dtype), _to(torch, k, dtype), _to(torch, v, dtype)
    lens = np.array([M, 12345])
    want, want_lse = ref.attention(_host(tq), _host(tk), _host(tv), causal=True, kv_lens=lens, return_lse=True)
    out, lse = lmkern.attention(tq, tk, tv, causal=True, kv_lens=lens, return_lse=True)
    assert_close(_host(out), want, tol=GPU_TOL[dtype])
    assert_close(lse.cpu().numpy(), want_lse, tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_strided_and_stream(rng):
    torch = _torch()
    qkv = torch.randn(2, 40, 3, 4, 64, device="cuda", dtype=torch.float16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]   # strided views, feature axis contiguous
    want = ref.attention(_host(q), _host(k), _host(v), causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = lmkern.attention(q, k, v, causal=True)   # the current stream is s
    s.synchronize()
    assert_close(_host(out), want, tol=GPU_TOL["float16"])
    out2 = cuda.attention(q, k, v, causal=True, stream=s)
    s.synchronize()
    assert torch.equal(out, out2)
    with cuda.use_stream(s):
        out3 = lmkern.attention(q, k, v, causal=True)
    s.synchronize()
    assert torch.equal(out, out3)
    # a non-contiguous feature axis: copied with torch, same result
    wide = torch.zeros(2, 40, 4, 128, device="cuda", dtype=torch.float16)
    wide[..., ::2] = q
    out4 = lmkern.attention(wide[..., ::2], k, v, causal=True)
    assert torch.equal(out, out4)
    # out= with strided (b, t, h) axes is written in place
    buf = torch.zeros(2, 4, 40, 64, device="cuda", dtype=torch.float16)
    res = lmkern.attention(q, k, v, causal=True, out=buf.transpose(1, 2))
    assert res.data_ptr() == buf.data_ptr() and torch.equal(res, out)


@requires_gpu
def test_gpu_errors(rng):
    torch = _torch()
    q = torch.randn(1, 4, 2, 16, device="cuda")
    k = torch.randn(1, 5, 2, 16, device="cuda")
    with pytest.raises(TypeError, match="k has dtype float16"):
        lmkern.attention(q, k.half(), k)
    with pytest.raises(ValueError, match="different devices"):
        lmkern.attention(q, k.cpu(), k)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="different devices"):
            lmkern.attention(q, k.to("cuda:1"), k)
    with pytest.raises(ValueError, match="exceed"):
        big = torch.randn(1, 4, 1, 300, device="cuda")
        lmkern.attention(big, big, big)


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_gpu_rope(rng, dtype, style):
    torch = _torch()
    x = randn(rng, (2, 9, 3, 20))
    pos = np.array([[0, 1, 2, 3, 1 << 20, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1]])
    tx = _to(torch, x, dtype)
    want = ref.rope(_host(tx), pos, rotary_dim=12, style=style)
    got = lmkern.rope(tx, pos, rotary_dim=12, style=style)
    assert isinstance(got, torch.Tensor) and got.dtype == tx.dtype
    assert_close(_host(got), want, tol=GPU_TOL[dtype])
    y = tx.clone()
    lmkern.rope_(y, pos, rotary_dim=12, style=style, inverse=True)
    assert_close(_host(y), ref.rope(_host(tx), pos, rotary_dim=12, style=style, inverse=True), tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_kvcache(rng):
    B, S, H, D = 2, 64, 2, 32
    c = lmkern.KVCache(B, S, H, D, device="cuda")
    cpu = lmkern.KVCache(B, S, H, D)
    t = torch_cuda()
    up = (lambda a: t.from_numpy(a).cuda()) if t is not None else cuda.DeviceArray.from_numpy
    for T, lens in ((20, [20, 7]), (1, None), (3, [0, 3])):
        k, v = randn(rng, (B, T, H, D)), randn(rng, (B, T, H, D))
        c.append(up(k), up(v), lengths=lens)
        cpu.append(k, v, lengths=lens)
    q = randn(rng, (B, 1, 4, D))
    got = c.attend(up(q))
    assert_close(_host(got), cpu.attend(q), tol=GPU_TOL["float32"])


def test_bench_cuda_quick(capsys):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_cuda
    assert bench_cuda.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out or "torch SDPA" in out
