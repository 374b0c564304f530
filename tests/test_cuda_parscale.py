"""lmkern.parscale on CUDA: expand, aggregate and prefix_attention.

Glue tests run everywhere over a host-memory fake of lmkern._cuda (FakeCuda of test_cuda, plus the two
aggregate kernels) and a NumPy stand-in for the caller's framework (aggregate's GEMMs run in the
framework); the ``@requires_gpu`` tests run the real kernels on torch CUDA tensors against the twins."""
import contextlib

import numpy as np
import pytest

import lmkern
from lmkern import _cuda_parscale, cuda
from lmkern import parscale as ps
from lmkern.reference import core as ref_core
from lmkern.reference import parscale as ref

from conftest import GPU_TOL, assert_close, noncontig, randn, requires_gpu, torch_cuda
from test_cuda import FakeCuda, FakeGpuArray, _arr_at, assert_stream_ordered


def agg_params(rng, P, Hd, Hh, dtype=np.float32, scale=1.0):
    w1 = randn(rng, (Hh, P * Hd), dtype) * dtype(scale / np.sqrt(max(P * Hd, 1)))
    b1 = randn(rng, (Hh,), dtype)
    w2 = randn(rng, (P, Hh), dtype) * dtype(1 / np.sqrt(max(Hh, 1)))
    b2 = randn(rng, (P,), dtype)
    return w1, b1, w2, b2


def _silu(a):
    return a / (1 + np.exp(-a))


# ------------------------------------------------------------------------------------------------
# the fake: two kernels computed on the host, and NumPy as the caller's "framework"

class FakeParscaleCuda(FakeCuda):
    def parscale_bias_silu(self, **kw):
        self.calls.append(("parscale_bias_silu", kw))
        Hh, R, dt = kw["Hh"], kw["R"], kw["dtype"]
        x = _arr_at(kw["x"], dt, (Hh, R), (R, 1)).astype(np.float32)
        b = _arr_at(kw["bias"], dt, (Hh,), (1,)).astype(np.float32)
        if dt != "float32":
            assert kw["out"] != kw["x"]        # float32 out is a separate buffer for half inputs
        _arr_at(kw["out"], np.float32, (Hh, R), (R, 1))[...] = _silu(x + b[:, None])

    def parscale_mix(self, **kw):
        self.calls.append(("parscale_mix", kw))
        P, B, T, Hd, dt = kw["P"], kw["B"], kw["T"], kw["Hd"], kw["dtype"]
        assert Hd <= 1 or (kw["h_stride"][2] == 1 and kw["y_stride"][2] == 1)
        h = _arr_at(kw["h"], dt, (P * B, T, Hd), tuple(kw["h_stride"])).astype(np.float32)
        z = _arr_at(kw["z"], np.float32, (P, B * T), (B * T, 1)).T
        b2 = _arr_at(kw["b2"], dt, (P,), (1,)).astype(np.float32)
        logits = z + b2
        e = np.exp(logits - logits.max(-1, keepdims=True))
        w = e / e.sum(-1, keepdims=True) * np.float32(1 - kw["smoothing"]) + np.float32(kw["smoothing"] / P)
        y = np.einsum("pbtj,btp->btj", h.reshape(P, B, T, Hd), w.reshape(B, T, P))
        _arr_at(kw["y"], dt, (B, T, Hd), tuple(kw["y_stride"]))[...] = y
        if kw["weights"]:
            _arr_at(kw["weights"], np.float32, (B * T, P), (P, 1))[...] = w


class NumpyOps(_cuda_parscale._Ops):
    """The caller's framework for FakeGpuArray: NumPy on the wrapped host arrays (GEMMs in float32,
    rounded to the inputs' dtype, as cuBLAS does)."""

    streams = []

    def on_stream(self):
        NumpyOps.streams.append(self.stream)
        return contextlib.nullcontext()

    def gemm_input(self, h, P, B, T, Hd, interleaved):
        u = super().gemm_input(h.a, P, B, T, Hd, interleaved)
        return G(np.ascontiguousarray(u))

    def mm(self, a, b, transpose_b=False):
        bb = b.a.T if transpose_b else b.a
        return G(np.ascontiguousarray((a.a.astype(np.float32) @ bb.astype(np.float32))
                                      .astype(np.result_type(a.a, b.a))))

    def float32(self, a):
        return G(a.a.astype(np.float32))

    def empty(self, shape, dtype):
        return G(np.full(shape, np.nan, np.dtype(dtype)))

    def ones_f32(self, shape):
        return G(np.ones(shape, np.float32))

    def copy_(self, dst, src):
        dst.a[...] = src.a


@pytest.fixture
def fake(monkeypatch):
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    f = FakeParscaleCuda(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())  # its blocks go back to the fake, never to the GPU pool
    monkeypatch.setitem(_cuda_parscale._OPS, "other", NumpyOps)
    NumpyOps.streams = []
    yield f
    import gc
    gc.collect()


def G(a):
    """a as a fake CUDA array.  NumPy gives zero-sized arrays all-zero strides, which
    lmkern.cuda.View.c_contiguous does not accept (and cannot copy for a FakeGpuArray): they get the
    strides that check expects (the C formula, zero in front of a zero-length axis)."""
    if a.size == 0 and a.ndim:
        c, acc = [], a.itemsize
        for n in reversed(a.shape):
            c.insert(0, acc)
            acc *= n
        a = np.lib.stride_tricks.as_strided(a, a.shape, c)
    return FakeGpuArray(a)


def host(x):
    return x.numpy() if isinstance(x, cuda.DeviceArray) else x.a


def calls(f, name):
    return [kw for c, kw in ((c[0], c[-1]) for c in f.calls) if c == name]


# ------------------------------------------------------------------------------------------------
# glue: aggregate

GLUE_SHAPES = [
    # P, B, T, Hd, Hh
    (2, 1, 1, 8, 8),
    (2, 3, 5, 37, 29),
    (8, 1, 7, 300, 64),
    (3, 2, 4, 1, 3),
]


@pytest.mark.parametrize("shape", GLUE_SHAPES)
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_glue_aggregate_matches_twin(fake, rng, shape, layout):
    P, B, T, Hd, Hh = shape
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh, scale=3.0)
    copies = [a.copy() for a in (h,) + params]
    y, w = ps.aggregate(G(h), *map(G, params), P=P, layout=layout, return_weights=True)
    want_y, want_w = ref.aggregate(h, *params, P=P, layout=layout, return_weights=True)
    assert isinstance(y, cuda.DeviceArray) and y.dtype == "float32" and y.shape == (B, T, Hd)
    assert w.dtype == "float32" and w.shape == (B, T, P)
    assert_close(host(y), want_y, tol=1e-5)
    assert_close(host(w), want_w, tol=1e-5)
    for a, a0 in zip((h,) + params, copies):
        np.testing.assert_array_equal(a, a0)
    silu, = calls(fake, "parscale_bias_silu")
    mix, = calls(fake, "parscale_mix")
    assert silu["dtype"] == "float32" and (silu["Hh"], silu["R"]) == (Hh, B * T)
    assert silu["out"] == silu["x"]                      # float32: in place on the GEMM output
    assert mix["h"] == h.ctypes.data                     # h read in place
    assert tuple(mix["h_stride"]) == (T * Hd, Hd, 1)
    assert (mix["P"], mix["B"], mix["T"], mix["Hd"]) == (P, B, T, Hd)
    assert mix["smoothing"] == 0.1 and mix["b2"] == params[3].ctypes.data
    y2 = ps.aggregate(G(h), *map(G, params), P=P, layout=layout)
    assert calls(fake, "parscale_mix")[-1]["weights"] is None
    np.testing.assert_array_equal(host(y2), host(y))


def test_glue_aggregate_float16(fake, rng):
    P, B, T, Hd, Hh = 4, 2, 3, 16, 12
    h = randn(rng, (P * B, T, Hd), np.float16)
    params = agg_params(rng, P, Hd, Hh, np.float16, scale=2.0)
    y, w = ps.aggregate(G(h), *map(G, params), P=P, smoothing=0.0, return_weights=True)
    assert y.dtype == "float16" and w.dtype == "float32"
    want_y, want_w = ref.aggregate(h.astype(np.float32), *(a.astype(np.float32) for a in params), P=P,
                                   smoothing=0.0, return_weights=True)
    assert_close(host(y).astype(np.float32), want_y, tol=GPU_TOL["float16"])
    assert_close(host(w), want_w, tol=5e-3)
    silu, = calls(fake, "parscale_bias_silu")
    mix, = calls(fake, "parscale_mix")
    assert silu["dtype"] == mix["dtype"] == "float16" and mix["smoothing"] == 0.0


def test_glue_aggregate_layouts_agree_with_permuted_w1(fake, rng):
    P, B, T, Hd, Hh = 4, 2, 3, 6, 10
    h = randn(rng, (P * B, T, Hd))
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh, scale=4.0)
    perm = (np.arange(Hd)[None, :] * P + np.arange(P)[:, None]).reshape(-1)
    yi, wi = ps.aggregate(G(h), G(w1), G(b1), G(w2), G(b2), P=P, layout="interleaved", return_weights=True)
    yc, wc = ps.aggregate(G(h), G(np.ascontiguousarray(w1[:, perm])), G(b1), G(w2), G(b2), P=P, layout="concat",
                          return_weights=True)
    assert_close(host(yc), host(yi), tol=1e-5)
    assert_close(host(wc), host(wi), tol=1e-5)
    _, wwrong = ps.aggregate(G(h), G(w1), G(b1), G(w2), G(b2), P=P, layout="concat", return_weights=True)
    assert np.abs(host(wwrong) - host(wi)).max() > 1e-2


def test_glue_aggregate_strided_h_zero_copy_and_out(fake, rng):
    P, B, T, Hd, Hh = 3, 2, 6, 10, 7
    hfull = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    h = hfull[:, -1:]                                    # decode: the last position, token stride T·Hd
    want = ref.aggregate(np.ascontiguousarray(h), *params, P=P)
    out = np.zeros((B, 1, Hd), np.float32)
    res = ps.aggregate(G(h), *map(G, params), P=P, out=G(out))
    assert isinstance(res, FakeGpuArray) and res.a is out
    assert_close(out, want, tol=1e-5)
    mix = calls(fake, "parscale_mix")[-1]
    assert mix["h"] == h.ctypes.data and tuple(mix["h_stride"]) == (T * Hd, Hd, 1)
    assert mix["y"] == out.ctypes.data
    # an out whose feature axis is strided: written through a temporary, then copied
    out_nc = noncontig(np.zeros((B, 1, Hd), np.float32))
    res = ps.aggregate(G(h), *map(G, params), P=P, out=G(out_nc))
    assert res.a is out_nc
    assert_close(out_nc, want, tol=1e-5)
    assert calls(fake, "parscale_mix")[-1]["y"] != out_nc.ctypes.data


def test_glue_aggregate_smoothing_limits(fake, rng):
    P, B, T, Hd, Hh = 4, 2, 3, 9, 7
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh, scale=3.0)
    y1, w1 = ps.aggregate(G(h), *map(G, params), P=P, smoothing=1.0, return_weights=True)
    assert_close(host(w1), np.full((B, T, P), 0.25, np.float32), tol=1e-7)
    assert_close(host(y1), h.reshape(P, B, T, Hd).mean(0), tol=1e-5)
    assert calls(fake, "parscale_mix")[-1]["smoothing"] == 1.0


def test_glue_aggregate_P1_returns_h(fake, rng):
    h = randn(rng, (3, 4, 5))
    w1, b1, w2, b2 = agg_params(rng, 1, 5, 6)
    gh = G(h)
    assert ps.aggregate(gh, G(w1), G(b1), G(w2), G(b2), P=1) is gh
    y, w = ps.aggregate(gh, G(w1), G(b1), G(w2), G(b2), P=1, return_weights=True)
    assert y is gh
    np.testing.assert_array_equal(host(w), np.ones((3, 4, 1), np.float32))
    out = np.zeros_like(h)
    gout = G(out)
    assert ps.aggregate(gh, G(w1), G(b1), G(w2), G(b2), P=1, out=gout) is gout
    np.testing.assert_array_equal(out, h)
    assert not calls(fake, "parscale_mix")


@pytest.mark.parametrize("shape", [(2, 0, 3, 4, 5), (2, 2, 0, 4, 5), (2, 2, 3, 0, 5), (2, 2, 3, 4, 0)])
def test_glue_aggregate_zero_sized(fake, rng, shape):
    P, B, T, Hd, Hh = shape
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    y, w = ps.aggregate(G(h), *map(G, params), P=P, return_weights=True)
    want_y, want_w = ref.aggregate(h, *params, P=P, return_weights=True)
    assert y.shape == (B, T, Hd) and w.shape == (B, T, P)
    assert_close(host(y), want_y, tol=1e-5)
    assert_close(host(w), want_w, tol=1e-5)


def test_glue_aggregate_stream(fake, rng):
    P, B, T, Hd, Hh = 2, 1, 2, 4, 3
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh)
    with cuda.use_stream(77):
        ps.aggregate(G(h), *map(G, params), P=P)
    assert_stream_ordered(fake, "parscale_mix", 77)      # y allocated on stream 0, released after
    assert calls(fake, "parscale_bias_silu")[-1]["stream"] == 77
    assert NumpyOps.streams == [77]                      # the framework's GEMMs ran on that stream too


def _message(exc_type, f, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        f(*args, **kwargs)
    return str(info.value)


def test_glue_aggregate_errors_match_the_cpu_path(fake, rng):
    P, B, T, Hd, Hh = 2, 2, 3, 4, 5
    h = randn(rng, (P * B, T, Hd))
    w1, b1, w2, b2 = agg_params(rng, P, Hd, Hh)
    bad = [
        (ValueError, dict(w1=randn(rng, (Hh, P * Hd + 1)))),          # w1 columns != P·Hd
        (ValueError, dict(b1=randn(rng, (Hh + 1,)))),
        (ValueError, dict(w2=randn(rng, (P + 1, Hh)))),
        (ValueError, dict(b2=randn(rng, (P, 1)))),
        (ValueError, dict(h=randn(rng, (P * B + 1, T, Hd)))),          # P·B not divisible by P
        (ValueError, dict(h=randn(rng, (P * B, T)))),
        (ValueError, dict(P=0)),
        (TypeError, dict(P=2.0)),
        (ValueError, dict(layout="columns")),
        (ValueError, dict(smoothing=1.5)),
        (TypeError, dict(smoothing="x")),
    ]
    for exc, change in bad:
        args = dict(h=h, w1=w1, b1=b1, w2=w2, b2=b2, P=P)
        args.update(change)
        arrays = {k: args.pop(k) for k in ("h", "w1", "b1", "w2", "b2")}
        cpu = _message(exc, ps.aggregate, *arrays.values(), **args)
        gpu = _message(exc, ps.aggregate, *(G(a) for a in arrays.values()), **args)
        assert gpu == cpu, change
    with pytest.raises(TypeError, match="w2 has dtype float16 but h has dtype float32"):
        ps.aggregate(G(h), G(w1), G(b1), G(w2.astype(np.float16)), G(b2), P=P)
    with pytest.raises(TypeError, match="h has dtype float64"):
        ps.aggregate(G(h.astype(np.float64)), G(w1), G(b1), G(w2), G(b2), P=P)
    with pytest.raises(ValueError, match="different devices"):
        ps.aggregate(G(h), w1, G(b1), G(w2), G(b2), P=P)
    with pytest.raises(ValueError, match=r"parscale.aggregate: out has shape \(2, 3, 5\)"):
        ps.aggregate(G(h), G(w1), G(b1), G(w2), G(b2), P=P, out=G(randn(rng, (B, T, Hd + 1))))
    with pytest.raises(TypeError, match="out has dtype float16; expected float32"):
        ps.aggregate(G(h), G(w1), G(b1), G(w2), G(b2), P=P, out=G(randn(rng, (B, T, Hd), np.float16)))
    with pytest.raises(TypeError, match="out is a DeviceArray; expected the inputs' array type"):
        ps.aggregate(G(h), G(w1), G(b1), G(w2), G(b2), P=P, out=cuda.DeviceArray.from_numpy(np.zeros((B, T, Hd))))
    # P beyond what one block's shared memory holds
    Pbig = _cuda_parscale.MAX_P + 1
    with pytest.raises(ValueError, match="P = 8193 exceeds 8192"):
        ps.aggregate(G(randn(rng, (Pbig, 1, 1))), G(randn(rng, (1, Pbig))), G(randn(rng, (1,))),
                     G(randn(rng, (Pbig, 1))), G(randn(rng, (Pbig,))), P=Pbig)
    assert not calls(fake, "parscale_mix")


def test_glue_aggregate_device_array_is_a_clear_type_error(fake, rng):
    P, B, T, Hd, Hh = 2, 1, 2, 4, 3
    D = cuda.DeviceArray.from_numpy
    arrays = (randn(rng, (P * B, T, Hd)),) + agg_params(rng, P, Hd, Hh)
    with pytest.raises(TypeError, match="aggregate needs torch or CuPy arrays.*cuBLAS.*DeviceArray"):
        ps.aggregate(*map(D, arrays), P=P)


# ------------------------------------------------------------------------------------------------
# glue: expand

@pytest.mark.parametrize("P", [1, 2, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32])
def test_glue_expand(fake, rng, P, dtype):
    x = (randn(rng, (3, 4, 5)) * 100).astype(dtype)
    x0 = x.copy()
    y = ps.expand(G(x), P)
    assert isinstance(y, cuda.DeviceArray) and y.dtype == np.dtype(dtype).name and y.shape == (3 * P, 4, 5)
    np.testing.assert_array_equal(y.numpy(), ref.expand(x, P))
    np.testing.assert_array_equal(x, x0)
    d = ps.expand(cuda.DeviceArray.from_numpy(x), P)      # lmkern's own arrays work too (no framework needed)
    np.testing.assert_array_equal(d.numpy(), ref.expand(x, P))


def test_glue_expand_stream_zero_sized_and_errors(fake, rng):
    x = randn(rng, (0, 3))
    assert ps.expand(G(x), 3).shape == (0, 3)
    x = randn(rng, (2, 3))
    with cuda.use_stream(55):
        np.testing.assert_array_equal(ps.expand(G(x), 2).numpy(), ref.expand(x, 2))
    # the copies ran on the caller's stream, after it waited for stream 0, and the output was released
    assert_stream_ordered(fake, "memcpy_dtod", 55)
    assert [kw["stream"] for kw in calls(fake, "memcpy_dtod")][-2:] == [55, 55]
    for exc, args in ((ValueError, (x, 0)), (TypeError, (x, 2.0)), (ValueError, (np.float32(1.0), 2))):
        cpu = _message(exc, ps.expand, *args)
        gpu = _message(exc, ps.expand, G(np.asarray(args[0])), args[1])
        assert gpu == cpu
    with pytest.raises(ValueError, match="not contiguous and lmkern cannot copy"):
        ps.expand(G(randn(rng, (2, 6))[:, ::2]), 2)


# ------------------------------------------------------------------------------------------------
# glue: prefix_attention (the core CUDA attention with the prefix fields)

def test_glue_prefix_attention_positions_lse_and_errors(fake, rng):
    P, B, N, M, L, Hq, Hkv = 3, 2, 3, 5, 4, 4, 2
    q, k, v = randn(rng, (P * B, N, Hq, 8)), randn(rng, (P * B, M, Hkv, 8)), randn(rng, (P * B, M, Hkv, 6))
    pk, pv = randn(rng, (P, L, Hkv, 8)), randn(rng, (P, L, Hkv, 6))
    q_pos = rng.integers(0, 6, (P * B, N))
    kv_lens = np.array([5, 1, 0, 3, 4, 2])
    out, lse = ps.prefix_attention(G(q), G(k), G(v), G(pk), G(pv), causal=True, q_pos=q_pos, kv_lens=kv_lens,
                                   return_lse=True)
    want, want_lse = ref.prefix_attention(q, k, v, pk, pv, causal=True, q_pos=q_pos, kv_lens=kv_lens,
                                          return_lse=True)
    assert_close(out.numpy(), want, tol=1e-5)
    assert_close(lse.numpy(), want_lse, tol=1e-5)
    kw = [c for c in fake.calls if c[0] == "attention"][-1][1]
    assert kw["prefix_len"] == L and kw["prefix_rows"] == B
    assert kw["prefix_k"] == pk.ctypes.data                # the prefix is read in place, never copied per row
    with pytest.raises(ValueError, match="not divisible by P = 4"):
        ps.prefix_attention(G(q), G(k), G(v), G(randn(rng, (4, L, Hkv, 8))), G(randn(rng, (4, L, Hkv, 6))))
    cpu = _message(ValueError, ps.prefix_attention, q, k, v, pk[:, :, :1], pv)
    gpu = _message(ValueError, ps.prefix_attention, G(q), G(k), G(v), G(np.ascontiguousarray(pk[:, :, :1])), G(pv))
    assert "prefix_k" in gpu and "prefix_k" in cpu


def test_glue_prefix_attention_empty_prefix_is_attention(fake, rng):
    P, B, N, M, H = 2, 2, 3, 4, 2
    q, k, v = randn(rng, (P * B, N, H, 8)), randn(rng, (P * B, M, H, 8)), randn(rng, (P * B, M, H, 8))
    pk, pv = np.zeros((P, 0, H, 8), np.float32), np.zeros((P, 0, H, 8), np.float32)
    out = ps.prefix_attention(G(q), G(k), G(v), G(pk), G(pv), causal=True)
    assert_close(out.numpy(), ref_core.attention(q, k, v, causal=True), tol=1e-5)


# ------------------------------------------------------------------------------------------------
# on the GPU (torch CUDA tensors)

def _torch():
    t = torch_cuda()
    if t is None:
        pytest.skip("torch with CUDA is not installed")
    return t


def _to(torch, a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda").to(getattr(torch, dtype))


def _h(x):
    return x.float().cpu().numpy()


DTYPES = ["float32", "float16", "bfloat16"]
# weights: the first GEMM's output is rounded to the input dtype before SiLU (as torch.nn.Linear does)
W_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}

GPU_SHAPES = [
    # P, B, T, Hd, Hh
    (1, 2, 3, 16, 8),
    (2, 1, 1, 64, 64),        # one token row: the concat GEMM input is a view
    (2, 3, 5, 37, 29),        # Hd != Hh, odd sizes: the scalar path of the mix
    (8, 1, 7, 300, 64),       # P = 8, Hd beyond one block of features
    (8, 2, 3, 1024, 96),      # 16-byte loads, several feature blocks
    (3, 2, 4, 1, 3),
    (5, 1, 2, 513, 16),
    (4, 70, 1000, 8, 8),      # R = 70000 token rows: more than the 65535 grid rows
]


def _agg_inputs(rng, torch, dtype, P, B, T, Hd, Hh, scale=3.0):
    h = randn(rng, (P * B, T, Hd))
    params = agg_params(rng, P, Hd, Hh, scale=scale)
    th = _to(torch, h, dtype)
    tparams = [_to(torch, a, dtype) for a in params]
    return th, tparams, _h(th), [_h(t) for t in tparams]     # the twin sees the rounded inputs


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_gpu_aggregate_matches_twin(rng, dtype, shape, layout):
    torch = _torch()
    P, B, T, Hd, Hh = shape
    th, tp, rh, rp = _agg_inputs(rng, torch, dtype, *shape)
    copies = [t.clone() for t in [th] + tp]
    y, w = ps.aggregate(th, *tp, P=P, layout=layout, return_weights=True)
    want_y, want_w = ref.aggregate(rh, *rp, P=P, layout=layout, return_weights=True)
    assert isinstance(y, torch.Tensor) and y.dtype == th.dtype and y.device == th.device and y.shape == (B, T, Hd)
    assert w.dtype == torch.float32 and w.shape == (B, T, P)
    assert_close(_h(y), want_y, tol=GPU_TOL[dtype])
    assert_close(_h(w), want_w, tol=W_TOL[dtype])
    np.testing.assert_allclose(_h(w).sum(-1), 1, rtol=1e-5)
    for t, t0 in zip([th] + tp, copies):
        assert torch.equal(t, t0)
    y2 = ps.aggregate(th, *tp, P=P, layout=layout)
    assert torch.equal(y2, y)                            # return_weights changes nothing else
    if P == 1:
        assert y is th


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_aggregate_layouts_agree_with_permuted_w1(rng, dtype):
    torch = _torch()
    P, B, T, Hd, Hh = 4, 2, 3, 64, 40
    th, (w1, b1, w2, b2), _, _ = _agg_inputs(rng, torch, dtype, P, B, T, Hd, Hh, scale=4.0)
    perm = torch.from_numpy((np.arange(Hd)[None, :] * P + np.arange(P)[:, None]).reshape(-1)).cuda()
    yi, wi = ps.aggregate(th, w1, b1, w2, b2, P=P, layout="interleaved", return_weights=True)
    yc, wc = ps.aggregate(th, w1[:, perm].contiguous(), b1, w2, b2, P=P, layout="concat", return_weights=True)
    assert_close(_h(yc), _h(yi), tol=GPU_TOL[dtype])
    assert_close(_h(wc), _h(wi), tol=W_TOL[dtype])
    _, wwrong = ps.aggregate(th, w1, b1, w2, b2, P=P, layout="concat", return_weights=True)
    assert np.abs(_h(wwrong) - _h(wi)).max() > 1e-2


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_aggregate_smoothing_limits(rng, dtype):
    torch = _torch()
    P, B, T, Hd, Hh = 4, 2, 3, 48, 24
    th, tp, rh, rp = _agg_inputs(rng, torch, dtype, P, B, T, Hd, Hh)
    y1, w1 = ps.aggregate(th, *tp, P=P, smoothing=1.0, return_weights=True)
    np.testing.assert_array_equal(_h(w1), np.full((B, T, P), 0.25, np.float32))
    assert_close(_h(y1), rh.reshape(P, B, T, Hd).mean(0), tol=GPU_TOL[dtype])
    y0, w0 = ps.aggregate(th, *tp, P=P, smoothing=0.0, return_weights=True)
    want_y, want_w = ref.aggregate(rh, *rp, P=P, smoothing=0.0, return_weights=True)
    assert_close(_h(y0), want_y, tol=GPU_TOL[dtype])
    assert_close(_h(w0), want_w, tol=W_TOL[dtype])


@requires_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])     # float16 cannot hold 1e30
def test_gpu_aggregate_extreme_logits_stay_finite(rng, dtype):
    torch = _torch()
    P, B, T, Hd, Hh = 4, 1, 3, 8, 5
    th, (w1, b1, w2, _), rh, _ = _agg_inputs(rng, torch, dtype, P, B, T, Hd, Hh, scale=1.0)
    b2 = _to(torch, np.array([1e30, -1e30, 3e29, -3e38], np.float32), dtype)
    y, w = ps.aggregate(th, w1, b1, w2, b2, P=P, smoothing=0.1, return_weights=True)
    assert torch.isfinite(y).all() and torch.isfinite(w).all()
    assert_close(_h(w), np.broadcast_to(np.array([0.925, 0.025, 0.025, 0.025], np.float32), (B, T, P)), tol=1e-6)
    assert_close(_h(y), 0.925 * rh[0:1] + 0.025 * (rh[1:2] + rh[2:3] + rh[3:4]), tol=GPU_TOL[dtype])
    if dtype == "float32":    # silu of huge pre-activations stays finite too
        y2 = ps.aggregate(th, w1 * 1e30, b1, w2 * 1e-30, b2, P=P)
        assert torch.isfinite(y2).all()


@requires_gpu
def test_gpu_aggregate_nan_propagates(rng):
    torch = _torch()
    P, B, T, Hd, Hh = 2, 1, 2, 4, 3
    th, (w1, b1, w2, _), _, _ = _agg_inputs(rng, torch, "float32", P, B, T, Hd, Hh)
    y = ps.aggregate(th, w1, b1, w2, torch.tensor([float("nan"), 0.0], device="cuda"), P=P)
    assert torch.isnan(y).all()


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_aggregate_strided_inputs_out_and_stream(rng, dtype):
    torch = _torch()
    P, B, T, Hd, Hh = 3, 2, 6, 40, 24
    th, tp, rh, rp = _agg_inputs(rng, torch, dtype, P, B, T, Hd, Hh)
    want = ref.aggregate(rh, *rp, P=P)
    # the last position (token stride T·Hd), a column-major w1, a strided b1, a transposed-then-back h
    last = ps.aggregate(th[:, -1:], *tp, P=P)
    assert_close(_h(last), want[:, -1:], tol=GPU_TOL[dtype])
    w1cm = tp[0].t().contiguous().t()
    b1s = torch.zeros(2 * Hh, dtype=th.dtype, device="cuda")[::2]
    b1s.copy_(tp[1])
    hperm = th.transpose(0, 1).contiguous().transpose(0, 1)
    got = ps.aggregate(hperm, w1cm, b1s, tp[2], tp[3], P=P)
    assert_close(_h(got), want, tol=GPU_TOL[dtype])
    hnc = torch.zeros((P * B, T, 2 * Hd), dtype=th.dtype, device="cuda")[..., ::2]   # feature axis strided
    hnc.copy_(th)
    assert_close(_h(ps.aggregate(hnc, *tp, P=P)), want, tol=GPU_TOL[dtype])
    out = torch.zeros((B, T, Hd), dtype=th.dtype, device="cuda")
    assert ps.aggregate(th, *tp, P=P, out=out) is out
    assert_close(_h(out), want, tol=GPU_TOL[dtype])
    out_nc = torch.zeros((B, T, 2 * Hd), dtype=th.dtype, device="cuda")[..., ::2]
    assert ps.aggregate(th, *tp, P=P, out=out_nc) is out_nc
    assert_close(_h(out_nc), want, tol=GPU_TOL[dtype])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with lmkern.cuda.use_stream(s):
        ys = ps.aggregate(th, *tp, P=P)
    s.synchronize()
    assert_close(_h(ys), want, tol=GPU_TOL[dtype])
    with torch.cuda.stream(s):
        yt = ps.aggregate(th, *tp, P=P)
    s.synchronize()
    assert_close(_h(yt), _h(ys), tol=1e-6)       # cuBLAS need not be bitwise equal across streams


@requires_gpu
@pytest.mark.parametrize("shape", [(2, 0, 3, 4, 5), (2, 2, 0, 4, 5), (2, 2, 3, 0, 5), (2, 2, 3, 4, 0)])
def test_gpu_aggregate_zero_sized(rng, shape):
    torch = _torch()
    P, B, T, Hd, Hh = shape
    th, tp, rh, rp = _agg_inputs(rng, torch, "float32", *shape)
    y, w = ps.aggregate(th, *tp, P=P, return_weights=True)
    want_y, want_w = ref.aggregate(rh, *rp, P=P, return_weights=True)
    assert tuple(y.shape) == (B, T, Hd) and tuple(w.shape) == (B, T, P)
    assert_close(_h(y), want_y, tol=GPU_TOL["float32"])
    assert_close(_h(w), want_w, tol=W_TOL["float32"])


@requires_gpu
def test_gpu_aggregate_device_array_is_a_type_error(rng):
    D = cuda.DeviceArray.from_numpy
    arrays = (randn(rng, (4, 2, 8)),) + agg_params(rng, 2, 8, 4)
    with pytest.raises(TypeError, match="torch or CuPy"):
        ps.aggregate(*map(D, arrays), P=2)


@requires_gpu
@pytest.mark.parametrize("P", [1, 2, 8])
def test_gpu_expand(rng, P):
    torch = _torch()
    ids = torch.from_numpy(rng.integers(0, 1000, (3, 7))).cuda()
    e = ps.expand(ids, P)
    assert e.dtype == torch.int64 and torch.equal(e, ids.repeat(P, 1))
    x = _to(torch, randn(rng, (2, 5, 33)), "bfloat16")
    assert torch.equal(ps.expand(x, P), x.repeat(P, 1, 1))
    xs = x[:, ::2]                                        # non-contiguous
    assert torch.equal(ps.expand(xs, P), xs.repeat(P, 1, 1))
    d = ps.expand(cuda.DeviceArray.from_numpy(randn(rng, (2, 3))), P)
    assert isinstance(d, cuda.DeviceArray) and d.shape == (2 * P, 3)


# prefix attention on the GPU, against lmkern.attention over the explicitly concatenated prefix

PREFIX_CASES = [
    # P, B, N, M, L, Hq, Hkv, D, E, causal, ragged kv_lens, explicit positions
    (2, 2, 19, 23, 5, 4, 2, 64, 64, True, False, False),
    (3, 2, 1, 700, 48, 8, 2, 64, 64, True, True, False),      # decode, split-KV
    (2, 3, 17, 30, 7, 2, 2, 40, 24, True, True, True),
    (4, 1, 3, 9, 0, 2, 1, 32, 32, True, False, False),        # L = 0: plain attention
    (2, 2, 20, 20, 16, 4, 4, 128, 128, False, True, False),
]


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,B,N,M,L,Hq,Hkv,D,E,causal,ragged,positions", PREFIX_CASES)
def test_gpu_prefix_attention(rng, dtype, P, B, N, M, L, Hq, Hkv, D, E, causal, ragged, positions):
    torch = _torch()
    R = P * B
    q, k, v = randn(rng, (R, N, Hq, D)), randn(rng, (R, M, Hkv, D)), randn(rng, (R, M, Hkv, E))
    pk, pv = randn(rng, (P, L, Hkv, D)), randn(rng, (P, L, Hkv, E))
    tq, tk, tv, tpk, tpv = (_to(torch, a, dtype) for a in (q, k, v, pk, pv))
    kv_lens = rng.integers(0, M + 1, R) if ragged else np.full(R, M)
    q_pos = rng.integers(0, M + 2, (R, N)) if positions else kv_lens[:, None] - N + np.arange(N)
    kw = dict(causal=causal)
    if ragged:
        kw["kv_lens"] = kv_lens
    if positions:
        kw["q_pos"] = q_pos
    out, lse = ps.prefix_attention(tq, tk, tv, tpk, tpv, return_lse=True, **kw)
    assert out.dtype == tq.dtype and tuple(out.shape) == (R, N, Hq, E)
    # the oracle: the twin (which concatenates the prefix per row) on the rounded inputs
    want, want_lse = ref.prefix_attention(_h(tq), _h(tk), _h(tv), _h(tpk), _h(tpv), return_lse=True, **kw)
    assert_close(_h(out), want, tol=GPU_TOL[dtype])
    assert_close(lse.cpu().numpy(), want_lse, tol=GPU_TOL[dtype])
    # and lmkern.attention over [prefix_k[r // B] | k[r]] with explicit positions: the prefix keys get a
    # position every query sees, the real keys j, the queries what prefix_attention used
    kcat = torch.cat([tpk.repeat_interleave(B, 0), tk], 1)
    vcat = torch.cat([tpv.repeat_interleave(B, 0), tv], 1)
    pos_cat = np.concatenate([np.full((R, L), np.iinfo(np.int64).min // 2), np.tile(np.arange(M), (R, 1))], 1)
    cat_out, cat_lse = lmkern.attention(tq, kcat, vcat, causal=causal, q_pos=q_pos, kv_pos=pos_cat,
                                        kv_lens=kv_lens + L, return_lse=True)
    assert_close(_h(out), _h(cat_out), tol=GPU_TOL[dtype])
    assert_close(lse.cpu().numpy(), cat_lse.cpu().numpy(), tol=GPU_TOL[dtype])


# ------------------------------------------------------------------------------------------------
# the torch adapter's own operations, on CPU tensors (no GPU needed)

@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_torch_ops_gemm_input_and_matmul_on_cpu_tensors(rng, layout):
    torch = pytest.importorskip("torch")
    P, B, T, Hd, Hh = 3, 2, 4, 5, 6
    h = randn(rng, (P * B, T, Hd))
    w1, _, w2, _ = agg_params(rng, P, Hd, Hh)
    ops = _cuda_parscale._TorchOps(torch.from_numpy(h), 0)
    th = torch.from_numpy(h)[:, :T]                         # a view, as callers pass
    u = ops.gemm_input(th, P, B, T, Hd, layout == "interleaved")
    hs = h.reshape(P, B, T, Hd)
    want = (hs.transpose(1, 2, 3, 0) if layout == "interleaved" else hs.transpose(1, 2, 0, 3)).reshape(B * T, -1)
    np.testing.assert_array_equal(u.numpy(), want)
    x = ops.mm(torch.from_numpy(w1), u, transpose_b=True)
    assert tuple(x.shape) == (Hh, B * T) and x.is_contiguous()
    assert_close(x.numpy(), w1 @ want.T, tol=1e-5)
    z = ops.mm(ops.float32(torch.from_numpy(w2).to(torch.bfloat16)), x)
    assert z.dtype == torch.float32 and tuple(z.shape) == (P, B * T)
    # one token row (decode, B = T = 1): the concat input is a view of h, the interleaved one a copy
    h1 = torch.from_numpy(randn(rng, (P, 1, Hd)))
    u1 = ops.gemm_input(h1, P, 1, 1, Hd, layout == "interleaved")
    assert (u1.data_ptr() == h1.data_ptr()) == (layout == "concat")
