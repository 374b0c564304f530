"""lmkern.kv on the GPU: quantize / dequantize (SPEC 4.1) and QuantizedKVCache(device="cuda") (SPEC 4.2).

Glue tests run everywhere over FakeKvCuda (a host-memory stand-in for lmkern._cuda whose kv methods
implement the GPU layout with the NumPy twin); ``@requires_gpu`` tests run the kernels against the twin."""
import sys

import numpy as np
import pytest

import lmkern
from lmkern import cuda, kv
from lmkern.reference import core as ref_core
from lmkern.reference import kv as ref_kv

from conftest import GPU_TOL, assert_close, randn, requires_gpu, torch_cuda
from test_cuda import FakeCuda, FakeGpuArray, _arr_at, assert_stream_ordered


# ------------------------------------------------------------------------------------------------
# the fake

def _c_strides(shape):
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(st))


def _read(ptr, dtype, shape, strides=None):
    """float32 copy of a device array (bfloat16 read as its bits)."""
    strides = _c_strides(shape) if strides is None else tuple(strides)
    if dtype == "bfloat16":
        return cuda._f32_from_bf16(np.ascontiguousarray(_arr_at(ptr, np.uint16, shape, strides)))
    return _arr_at(ptr, dtype, shape, strides).astype(np.float32)


def _write(ptr, dtype, shape, values, strides=None):
    strides = _c_strides(shape) if strides is None else tuple(strides)
    if dtype == "bfloat16":
        _arr_at(ptr, np.uint16, shape, strides)[...] = cuda._bf16_from_f32(np.asarray(values, np.float32))
    else:
        _arr_at(ptr, dtype, shape, strides)[...] = values


class FakeKvCuda(FakeCuda):
    """FakeCuda plus host versions of the kv bindings: quantization by the NumPy twin, the cache in the
    GPU layout of lmkern/kv.h (rings for the full-precision tokens), attend by dequantizing it all and
    running the reference attention.  Without a GPU, every call is also handed to the real binding,
    which must get past its argument parsing and checks (and fail only for want of a device)."""

    def _probe(self, name, kw):
        if self.real.device_count() == 0:
            with pytest.raises(RuntimeError, match="CUDA error"):
                getattr(self.real, name)(**kw)

    def kv_quantize(self, **kw):
        self.calls.append(("kv_quantize", kw))
        self._probe("kv_quantize", kw)
        B, T, H, D, G, bits = (kw[x] for x in ("B", "T", "H", "D", "G", "bits"))
        x = _read(kw["x"], kw["dtype"], (B, T, H, D))
        qt = ref_kv.quantize(x, bits=bits, group_size=G, axis="channel" if kw["channel"] else "token")
        _arr_at(kw["codes"], np.uint8, qt.codes.shape, _c_strides(qt.codes.shape))[...] = qt.codes
        _arr_at(kw["scale"], np.float32, qt.scale.shape, _c_strides(qt.scale.shape))[...] = qt.scale
        _arr_at(kw["zero"], np.float32, qt.zero.shape, _c_strides(qt.zero.shape))[...] = qt.zero

    def kv_dequantize(self, **kw):
        self.calls.append(("kv_dequantize", kw))
        self._probe("kv_dequantize", kw)
        B, T, H, D, G, bits = (kw[x] for x in ("B", "T", "H", "D", "G", "bits"))
        axis = "channel" if kw["channel"] else "token"
        per = 8 // bits
        cshape, sshape = ((B, T // per, H, D), (B, T // G, H, D)) if kw["channel"] else \
            ((B, T, H, D // per), (B, T, H, D // G))
        qt = kv.QuantizedTensor(_arr_at(kw["codes"], np.uint8, cshape, _c_strides(cshape)).copy(),
                                _arr_at(kw["scale"], np.float32, sshape, _c_strides(sshape)).copy(),
                                _arr_at(kw["zero"], np.float32, sshape, _c_strides(sshape)).copy(),
                                bits=bits, group_size=G, axis=axis, shape=(B, T, H, D), dtype=np.float64)
        _write(kw["x"], kw["dtype"], (B, T, H, D), ref_kv.dequantize(qt))

    def _cache(self, kw, H):
        G, S, KG, kcap, vcap, bits, D, E = (kw[x] for x in ("G", "S", "k_groups", "k_res_cap", "v_res_cap", "bits",
                                                            "D", "E"))
        B, per = kw["B"], 8 // bits
        shapes = {"k_codes": ((B, H, KG, D, G // per), np.uint8), "k_scale": ((B, H, KG, D), np.float32),
                  "k_zero": ((B, H, KG, D), np.float32), "k_res": ((B, H, kcap, D), np.float32),
                  "v_codes": ((B, H, S, E // per), np.uint8), "v_scale": ((B, H, S, E // G), np.float32),
                  "v_zero": ((B, H, S, E // G), np.float32), "v_res": ((B, H, vcap, E), np.float32)}
        for name, (shape, dt) in shapes.items():
            if kw[name] and int(np.prod(shape)):
                assert self.block_bytes(kw[name]) is None or self.block_bytes(kw[name]) >= np.prod(shape) * np.dtype(dt).itemsize
        return {n: _arr_at(kw[n], dt, shape, _c_strides(shape)) for n, (shape, dt) in shapes.items()}

    def kv_cache_append(self, **kw):
        self.calls.append(("kv_cache_append", kw))
        self._probe("kv_cache_append", kw)
        B, T, H, D, E, G, bits = (kw[x] for x in ("B", "T", "H", "D", "E", "G", "bits"))
        kcap, vcap = kw["k_res_cap"], kw["v_res_cap"]
        c = self._cache(kw, H)
        k = _read(kw["k"], kw["dtype"], (B, T, H, D), tuple(kw["k_stride"]) + (1,))
        v = _read(kw["v"], kw["dtype"], (B, T, H, E), tuple(kw["v_stride"]) + (1,))
        rows = _arr_at(kw["rows"], np.int64, (B, 6), (6, 1)).copy()
        for b in range(B):
            start, n, qk0, qk1, qv0, qv1 = (int(x) for x in rows[b])
            assert (qk1 - qk0) // G <= kw["max_kgroups"] and qv1 - qv0 <= kw["max_vtokens"] and n <= kw["max_new"]
            assert qk0 % G == 0 and qk1 % G == 0 and qk0 <= start and qv0 <= start and max(qk1, qv1) <= start + n

            def tok(ring, cap, new, j):
                return ring[b, :, j % cap] if j < start else new[b, j - start]   # (H, features)

            for grp in range(qk0 // G, qk1 // G):
                x = np.stack([tok(c["k_res"], kcap, k, j) for j in range(grp * G, grp * G + G)])[None]
                qt = ref_kv.quantize(x, bits=bits, group_size=G, axis="channel")
                c["k_codes"][b, :, grp] = qt.codes[0].transpose(1, 2, 0)
                c["k_scale"][b, :, grp] = qt.scale[0, 0]
                c["k_zero"][b, :, grp] = qt.zero[0, 0]
            for j in range(qv0, qv1):
                qt = ref_kv.quantize(tok(c["v_res"], vcap, v, j)[None, None], bits=bits, group_size=G, axis="token")
                c["v_codes"][b, :, j] = qt.codes[0, 0]
                c["v_scale"][b, :, j] = qt.scale[0, 0]
                c["v_zero"][b, :, j] = qt.zero[0, 0]
            for t in range(n):   # after the quantization, which read the old ring
                j = start + t
                if j >= qk1:
                    c["k_res"][b, :, j % kcap] = k[b, t]
                if j >= qv1:
                    c["v_res"][b, :, j % vcap] = v[b, t]

    def kv_attend_plan(self, **kw):
        return self.real.kv_attend_plan(**kw, num_sms=4)

    def kv_attend(self, **kw):
        self.calls.append(("kv_attend", kw))
        self._probe("kv_attend", kw)
        B, N, Hq, H, D, E, G, S, bits = (kw[x] for x in ("B", "N", "Hq", "Hkv", "D", "E", "G", "S", "bits"))
        per, mask = 8 // bits, (1 << bits) - 1
        c = self._cache(kw, H)
        rows = _arr_at(kw["rows"], np.int64, (B, 3), (3, 1)).copy()
        K = np.zeros((B, S, H, D), np.float32)
        V = np.zeros((B, S, H, E), np.float32)
        e = np.arange(E)
        for b in range(B):
            L, qk, qv = (int(x) for x in rows[b])
            for j in range(L):
                if j < qk:
                    grp, t = divmod(j, G)
                    code = (c["k_codes"][b, :, grp, :, t // per] >> (bits * (t % per))) & mask
                    K[b, j] = code * c["k_scale"][b, :, grp].astype(np.float64) + c["k_zero"][b, :, grp]
                else:
                    K[b, j] = c["k_res"][b, :, j % kw["k_res_cap"]]
                if j < qv:
                    code = (c["v_codes"][b, :, j][:, e // per] >> (bits * (e % per))) & mask
                    V[b, j] = code * c["v_scale"][b, :, j][:, e // G].astype(np.float64) + c["v_zero"][b, :, j][:, e // G]
                else:
                    V[b, j] = c["v_res"][b, :, j % kw["v_res_cap"]]
        q = _read(kw["q"], kw["dtype"], (B, N, Hq, D), tuple(kw["q_stride"]) + (1,))
        q_pos = _arr_at(kw["q_pos"], np.int64, (B, N), (N, 1)).copy()
        kv_pos = _arr_at(kw["kv_pos"], np.int64, (B, S), (S, 1)).copy() if S else np.zeros((B, 0), np.int64)
        if kw["num_splits"] > 1:
            need = self.real.kv_attend_plan(**{**kw, "num_splits": 1}, num_sms=4)[1] * 4
            assert self.block_bytes(kw["scratch"]) is None or self.block_bytes(kw["scratch"]) >= need
        o, lse = ref_core.attention(q, K, V, causal=kw["causal"], scale=kw["scale"], q_pos=q_pos, kv_pos=kv_pos,
                                    kv_lens=rows[:, 0].copy(), return_lse=True)
        _write(kw["out"], kw["dtype"], (B, N, Hq, E), o, tuple(kw["out_stride"]) + (1,))
        if kw["lse"]:
            _arr_at(kw["lse"], np.float32, (B, N, Hq), (N * Hq, Hq, 1))[...] = lse


@pytest.fixture
def fake(monkeypatch):
    if cuda._cuda is None:
        pytest.skip("built without CUDA")
    import gc
    f = FakeKvCuda(cuda._cuda)
    monkeypatch.setattr(cuda, "_cuda", f)
    monkeypatch.setattr(cuda, "_pool", cuda._Pool())
    monkeypatch.setitem(sys.modules, "torch", None)  # DeviceArray storage and outputs
    yield f
    gc.collect()


def _dev(a):
    return cuda.DeviceArray.from_numpy(a)


# ------------------------------------------------------------------------------------------------
# glue: quantize / dequantize

QUANT_CASES = [(bits, axis, G) for bits in (2, 4, 8) for axis in ("token", "channel") for G in (8, 16)]


@pytest.mark.parametrize("bits,axis,G", QUANT_CASES)
def test_glue_quantize_matches_cpu(fake, rng, bits, axis, G):
    x = randn(rng, (2, 32, 3, 16))
    x[0, :G, 1, :G] = 0.75                      # constant groups on both axes
    x0 = x.copy()
    qt = kv.quantize(FakeGpuArray(x), bits=bits, group_size=G, axis=axis)
    want = kv.quantize(x, bits=bits, group_size=G, axis=axis)
    assert isinstance(qt.codes, cuda.DeviceArray) and qt.codes.dtype == "uint8"
    assert qt.scale.dtype == "float32" and qt.zero.dtype == "float32"
    assert (qt.bits, qt.group_size, qt.axis, qt.shape, qt.dtype) == (bits, G, axis, x.shape, np.float32)
    assert np.array_equal(qt.codes.numpy(), want.codes)
    assert np.array_equal(qt.scale.numpy(), want.scale)
    assert np.array_equal(qt.zero.numpy(), want.zero)
    assert np.array_equal(x, x0)
    back = kv.dequantize(qt)
    assert isinstance(back, cuda.DeviceArray) and back.dtype == "float32"
    assert np.array_equal(back.numpy(), kv.dequantize(want))
    call = [c for c in fake.calls if c[0] == "kv_quantize"][-1][1]
    assert call["channel"] == (axis == "channel") and call["bits"] == bits and call["G"] == G


def test_glue_quantize_float16_and_noncontiguous(fake, rng):
    x = randn(rng, (1, 8, 2, 32))
    xh = x.astype(np.float16)
    qt = kv.quantize(FakeGpuArray(xh), bits=4, group_size=16, axis="token")
    want = kv.quantize(xh.astype(np.float32), bits=4, group_size=16, axis="token")
    assert qt.dtype == np.float16
    assert np.array_equal(qt.codes.numpy(), want.codes)
    back = kv.dequantize(qt)
    assert back.dtype == "float16"
    assert_close(back.numpy().astype(np.float32), kv.dequantize(want), tol=GPU_TOL["float16"])
    # a non-contiguous CUDA array is copied first (a DeviceArray copy cannot be made: clear error)
    buf = np.zeros((1, 8, 2, 64), np.float32)
    buf[..., ::2] = x
    with pytest.raises(ValueError, match="x is not contiguous"):
        kv.quantize(FakeGpuArray(buf[..., ::2]), bits=4, group_size=16, axis="token")


def test_glue_quantize_bfloat16_devicearray(fake, rng):
    x = randn(rng, (1, 16, 1, 8))
    xd = cuda.DeviceArray.from_numpy(x, dtype="bfloat16")
    qt = kv.quantize(xd, bits=2, group_size=8, axis="channel")
    assert qt.dtype == "bfloat16"
    widened = xd.numpy()                         # the bfloat16 values as float32
    want = kv.quantize(widened, bits=2, group_size=8, axis="channel")
    assert np.array_equal(qt.codes.numpy(), want.codes)
    back = kv.dequantize(qt)
    assert back.dtype == "bfloat16"
    assert_close(back.numpy(), kv.dequantize(want), tol=GPU_TOL["bfloat16"])


def test_glue_quantize_errors(fake, rng):
    x = FakeGpuArray(randn(rng, (1, 8, 2, 16)))
    with pytest.raises(ValueError, match="bits"):
        kv.quantize(x, bits=3, group_size=8, axis="token")
    with pytest.raises(ValueError, match="group_size"):
        kv.quantize(x, bits=2, group_size=6, axis="token")
    with pytest.raises(ValueError, match="axis"):
        kv.quantize(x, bits=2, group_size=8, axis="head")
    with pytest.raises(ValueError, match="T % group_size"):
        kv.quantize(x, bits=2, group_size=16, axis="channel")
    with pytest.raises(ValueError, match=r"x has shape \(8, 2, 16\)"):
        kv.quantize(FakeGpuArray(randn(rng, (8, 2, 16))), bits=2, group_size=8, axis="token")
    with pytest.raises(TypeError, match="x has dtype float64"):
        kv.quantize(FakeGpuArray(np.zeros((1, 8, 2, 16))), bits=2, group_size=8, axis="token")
    # the CPU path raises the same messages
    with pytest.raises(ValueError, match="T % group_size"):
        kv.quantize(randn(rng, (1, 8, 2, 16)), bits=2, group_size=16, axis="channel")
    qt = kv.quantize(x, bits=2, group_size=8, axis="token")
    mixed = kv.QuantizedTensor(qt.codes, qt.scale.numpy(), qt.zero, bits=2, group_size=8, axis="token",
                               shape=qt.shape, dtype=np.float32)
    with pytest.raises(ValueError, match="different devices"):
        kv.dequantize(mixed)
    bad = kv.QuantizedTensor(qt.codes, qt.zero, qt.scale, bits=4, group_size=8, axis="token", shape=qt.shape,
                             dtype=np.float32)
    with pytest.raises(ValueError, match="qt.codes has shape"):
        kv.dequantize(bad)
    wrong = kv.QuantizedTensor(qt.scale, qt.scale, qt.zero, bits=2, group_size=8, axis="token", shape=(1, 8, 2, 8),
                               dtype=np.float32)
    with pytest.raises(TypeError, match="qt.codes has dtype float32"):
        kv.dequantize(wrong)


def test_glue_quantize_zero_sized(fake):
    qt = kv.quantize(FakeGpuArray(np.zeros((0, 8, 2, 16), np.float32)), bits=2, group_size=8, axis="token")
    assert qt.codes.shape == (0, 8, 2, 4)
    assert kv.dequantize(qt).shape == (0, 8, 2, 16)
    qt = kv.quantize(cuda.DeviceArray.from_numpy(np.zeros((2, 0, 1, 16), np.float32)), bits=4, group_size=8,
                     axis="channel")
    assert qt.codes.shape == (2, 0, 1, 16) and qt.scale.shape == (2, 0, 1, 16)
    assert kv.dequantize(qt).shape == (2, 0, 1, 16)
    assert not [c for c in fake.calls if c[0].startswith("kv_")]


# ------------------------------------------------------------------------------------------------
# glue: the cache

def _fill(caches, rng, B, Hkv, D, E, chunks, lengths=None, to_dev=None):
    for T in chunks:
        k = randn(rng, (B, T, Hkv, D))
        v = randn(rng, (B, T, Hkv, E))
        lens = None if lengths is None else np.minimum(lengths, T)
        for c in caches:
            if c._gpu is not None:
                c.append(to_dev(k), to_dev(v), lengths=lens)
            else:
                c.append(k, v, lengths=lens)


CACHE_CASES = [
    # bits, group (Hq / Hkv), chunks, lengths: below the residual, crossing it, well past it, ragged rows
    (2, 1, [5, 3], None),
    (4, 4, [40, 1, 1, 30], None),
    (2, 8, [70, 9, 1], [70, 23]),
    (4, 1, [1] * 3 + [61, 2], [1, 0]),
]


@pytest.mark.parametrize("bits,group,chunks,lengths", CACHE_CASES)
def test_glue_cache_matches_cpu(fake, rng, bits, group, chunks, lengths):
    B, Hkv, D, E, G, R, S = 2, 2, 16, 8, 8, 16, 120
    Hq = Hkv * group
    gpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R, device="cuda")
    cpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R)
    _fill([gpu, cpu], rng, B, Hkv, D, E, chunks, lengths, to_dev=_dev)
    assert isinstance(gpu._gpu.k_codes, cuda.DeviceArray)
    assert np.array_equal(gpu.lengths, cpu.lengths) and gpu.nbytes == cpu.nbytes
    assert np.array_equal(gpu._qk, cpu._qk) and np.array_equal(gpu._qv, cpu._qv)
    # the quantized part is laid out as on the CPU, bit for bit
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        assert np.array_equal(getattr(gpu._gpu, name).numpy(), getattr(cpu, "_" + name[0] + name[2])), name
    for N in (1, 3):
        q = randn(rng, (B, N, Hq, D))
        q0 = q.copy()
        out, lse = gpu.attend(_dev(q), return_lse=True)
        want, want_lse = cpu.attend(q, return_lse=True)
        assert isinstance(out, cuda.DeviceArray) and out.dtype == "float32" and lse.dtype == "float32"
        assert_close(out.numpy(), want, tol=1e-5)
        assert_close(lse.numpy(), want_lse, tol=1e-5)
        assert np.array_equal(q, q0)
    got = gpu.attend(_dev(q), causal=False, q_pos=np.arange(N), scale=0.3)
    assert_close(got.numpy(), cpu.attend(q, causal=False, q_pos=np.arange(N), scale=0.3), tol=1e-5)


@pytest.mark.parametrize("bits,R,S", [(8, 0, 45), (2, 8, 13), (4, 24, 30)])
def test_glue_cache_geometry_edges(fake, rng, bits, R, S):
    """residual 0 (no value ring), max_len not a multiple of G, rings shorter than residual + G."""
    B, Hkv, D, E, G = 2, 1, 8, 16, 8
    gpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R, device="cuda")
    cpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R)
    _fill([gpu, cpu], rng, B, Hkv, D, E, [3, S // 2, S - 3 - S // 2], [3, S], to_dev=_dev)
    assert gpu._gpu.v_res_cap == min(S, R) and gpu._gpu.k_res_cap == min(S, R + G)
    assert np.array_equal(gpu.lengths, cpu.lengths) and gpu.nbytes == cpu.nbytes
    q = randn(rng, (B, 2, 2, D))
    out, lse = gpu.attend(_dev(q), return_lse=True)
    want, want_lse = cpu.attend(q, return_lse=True)
    assert_close(out.numpy(), want, tol=1e-5)
    assert_close(lse.numpy(), want_lse, tol=1e-5)


def test_glue_cache_empty(fake, rng):
    c = kv.QuantizedKVCache(2, 0, 1, 8, bits=2, group_size=8, residual=8, device="cuda")
    c.append(_dev(np.zeros((2, 0, 1, 8), np.float32)), _dev(np.zeros((2, 0, 1, 8), np.float32)))
    out, lse = c.attend(_dev(randn(rng, (2, 1, 3, 8))), return_lse=True)
    assert np.all(out.numpy() == 0) and np.all(np.isneginf(lse.numpy()))
    assert c.attend(_dev(np.zeros((2, 0, 3, 8), np.float32))).shape == (2, 0, 3, 8)


def test_glue_cache_split_plan(fake, rng):
    B, Hkv, D, E, G, R = 1, 1, 8, 8, 8, 16
    gpu = kv.QuantizedKVCache(B, 2100, Hkv, D, E, bits=2, group_size=G, residual=R, device="cuda")
    cpu = kv.QuantizedKVCache(B, 2100, Hkv, D, E, bits=2, group_size=G, residual=R)
    _fill([gpu, cpu], rng, B, Hkv, D, E, [2049], to_dev=_dev)
    q = randn(rng, (B, 1, 2, D))
    out = gpu.attend(_dev(q))
    kw = [c for c in fake.calls if c[0] == "kv_attend"][-1][1]
    assert kw["num_splits"] > 1 and kw["scratch"]
    assert kw["max_len"] == 2049
    assert_close(out.numpy(), cpu.attend(q), tol=1e-5)


def test_glue_cache_float16_inputs_and_empty_rows(fake, rng):
    B, Hkv, D, E, G, R, S = 2, 1, 8, 16, 8, 8, 40
    gpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=4, group_size=G, residual=R, device="cuda")
    cpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=4, group_size=G, residual=R)
    k, v = randn(rng, (B, 20, Hkv, D)).astype(np.float16), randn(rng, (B, 20, Hkv, E)).astype(np.float16)
    gpu.append(FakeGpuArray(k), FakeGpuArray(v), lengths=[20, 0])
    cpu.append(k, v, lengths=[20, 0])
    q = randn(rng, (B, 2, 2, D)).astype(np.float16)
    out, lse = gpu.attend(FakeGpuArray(q), return_lse=True)
    assert out.dtype == "float16" and lse.dtype == "float32"
    want, want_lse = cpu.attend(q.astype(np.float32), return_lse=True)
    assert_close(out.numpy().astype(np.float32), want, tol=GPU_TOL["float16"])
    assert np.all(out.numpy()[1] == 0) and np.all(np.isneginf(lse.numpy()[1]))   # the empty row
    assert_close(lse.numpy()[0], want_lse[0], tol=1e-5)


def test_glue_cache_errors(fake, rng):
    c = kv.QuantizedKVCache(1, 16, 2, 8, bits=2, group_size=8, residual=8, device="cuda")
    k, v = randn(rng, (1, 4, 2, 8)), randn(rng, (1, 4, 2, 8))
    with pytest.raises(ValueError, match="different devices"):
        c.append(k, v)
    with pytest.raises(ValueError, match=r"k has shape \(1, 4, 3, 8\)"):
        c.append(_dev(randn(rng, (1, 4, 3, 8))), _dev(v))
    with pytest.raises(TypeError, match="dtype"):
        c.append(FakeGpuArray(k.astype(np.float64)), FakeGpuArray(v.astype(np.float64)))
    c.append(_dev(k), _dev(v))
    with pytest.raises(ValueError, match="max_len"):
        c.append(_dev(randn(rng, (1, 13, 2, 8))), _dev(randn(rng, (1, 13, 2, 8))))
    assert c.lengths.tolist() == [4]                    # nothing written
    with pytest.raises(ValueError, match="different devices"):
        c.attend(randn(rng, (1, 1, 2, 8)))
    with pytest.raises(ValueError, match="Hq must be a multiple"):
        c.attend(_dev(randn(rng, (1, 1, 3, 8))))
    with pytest.raises(ValueError, match="q_pos"):
        c.attend(_dev(randn(rng, (1, 2, 2, 8))), q_pos=[1, 2, 3])
    with pytest.raises(ValueError, match="exceed"):
        kv.QuantizedKVCache(1, 16, 1, 512, 8, group_size=8, residual=8, device="cuda")
    with pytest.raises(ValueError, match="device"):
        kv.QuantizedKVCache(1, 16, 1, 8, group_size=8, residual=8, device="tpu")
    cpu = kv.QuantizedKVCache(1, 16, 2, 8, bits=2, group_size=8, residual=8)
    with pytest.raises(ValueError, match="cache is on the CPU"):
        cpu.attend(_dev(randn(rng, (1, 1, 2, 8))))
    c.reset()
    assert c.lengths.tolist() == [0] and c.nbytes == 0


@pytest.mark.skipif(cuda.device_count() > 0, reason="a GPU is visible")
def test_gpu_cache_without_gpu_is_a_clear_error():
    with pytest.raises((ValueError, RuntimeError), match="not visible|without CUDA"):
        kv.QuantizedKVCache(1, 16, 1, 8, group_size=8, residual=8, device="cuda")


# ------------------------------------------------------------------------------------------------
# on a GPU

def _torch():
    t = torch_cuda()
    if t is None:
        pytest.skip("torch with CUDA is not installed")
    return t


def _to(torch, a, dtype="float32"):
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda").to(getattr(torch, dtype))


def _host(t):
    return t.float().cpu().numpy()


@requires_gpu
@pytest.mark.parametrize("bits,axis,G", QUANT_CASES + [(2, "token", 32), (4, "channel", 64)])
def test_gpu_quantize_codes_equal_cpu(rng, bits, axis, G):
    torch = _torch()
    x = randn(rng, (2, 2 * G, 5, 2 * G)) * 3                  # two groups along both axes
    x[0, :G, 2, :G] = -1.25                                   # constant groups
    x[1, :G, 0, :G] = np.float32(1e-40)                       # subnormal constant groups
    x[1, G:2 * G, 1, G:2 * G] = rng.standard_normal((G, G)).astype(np.float32) * 1e-39   # subnormal spread
    xt = _to(torch, x)
    qt = kv.quantize(xt, bits=bits, group_size=G, axis=axis)
    want = kv.quantize(x, bits=bits, group_size=G, axis=axis)
    assert qt.codes.is_cuda and qt.codes.dtype == torch.uint8
    np.testing.assert_array_equal(qt.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(qt.scale.cpu().numpy(), want.scale)
    np.testing.assert_array_equal(qt.zero.cpu().numpy(), want.zero)
    back = kv.dequantize(qt)
    np.testing.assert_array_equal(back.cpu().numpy(), kv.dequantize(want))
    # SPEC 4.1 error bound per group, and nothing is NaN
    s = want.scale.astype(np.float64)
    s = np.repeat(s, G, axis=3 if axis == "token" else 1)
    err = np.abs(back.cpu().numpy().astype(np.float64) - x)
    assert np.all(err <= s / 2 + 1e-6 * np.abs(x) + 1e-45)
    assert not np.isnan(back.cpu().numpy()).any()
    assert np.all(back.cpu().numpy()[0, :G, 2, :G] == -1.25)


@requires_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_gpu_quantize_half_dtypes(rng, dtype, axis):
    torch = _torch()
    xt = _to(torch, randn(rng, (1, 32, 3, 48)), dtype)
    widened = _host(xt)
    qt = kv.quantize(xt, bits=4, group_size=16, axis=axis)
    want = kv.quantize(widened, bits=4, group_size=16, axis=axis)
    np.testing.assert_array_equal(qt.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(qt.scale.cpu().numpy(), want.scale)
    back = kv.dequantize(qt)
    assert back.dtype == getattr(torch, dtype)
    assert_close(_host(back), kv.dequantize(want), tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_quantize_noncontiguous_and_nan(rng):
    torch = _torch()
    x = randn(rng, (1, 16, 2, 32))
    full = _to(torch, np.concatenate([x, x], axis=-1))[..., ::2]
    xs = _host(full)
    qt = kv.quantize(full, bits=2, group_size=8, axis="token")
    np.testing.assert_array_equal(qt.codes.cpu().numpy(), kv.quantize(xs, bits=2, group_size=8, axis="token").codes)
    x[0, 3, 1, 5] = np.nan
    qt = kv.quantize(_to(torch, x), bits=2, group_size=8, axis="token")
    want = kv.quantize(x, bits=2, group_size=8, axis="token")
    np.testing.assert_array_equal(qt.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(np.isnan(qt.scale.cpu().numpy()), np.isnan(want.scale))


def _gpu_cache_case(rng, torch, bits, group, chunks, lengths, B=3, Hkv=2, D=64, E=48, G=16, R=32, S=700,
                    dtype="float32"):
    Hq = Hkv * group
    gpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R, device="cuda")
    cpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R)
    twin = ref_kv.QuantizedKVCache(B, S, Hkv, D, E, bits=bits, group_size=G, residual=R)
    for T in chunks:
        k, v = randn(rng, (B, T, Hkv, D)), randn(rng, (B, T, Hkv, E))
        lens = None if lengths is None else np.minimum(lengths, T)
        gpu.append(_to(torch, k), _to(torch, v), lengths=lens)
        cpu.append(k, v, lengths=lens)
        twin.append(k, v, lengths=lens)
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        np.testing.assert_array_equal(getattr(gpu._gpu, name).cpu().numpy(), getattr(cpu, "_" + name[0] + name[2]))
    return gpu, twin, Hq


@requires_gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("chunks,lengths", [([20], None), ([300, 1, 1], [300, 137, 5]), ([650], [650, 31, 0])])
def test_gpu_cache_attend_matches_twin(rng, bits, group, chunks, lengths):
    torch = _torch()
    gpu, twin, Hq = _gpu_cache_case(rng, torch, bits, group, chunks, lengths)
    for N in (1, 5, 37):
        q = randn(rng, (3, N, Hq, 64))
        out, lse = gpu.attend(_to(torch, q), return_lse=True)
        want, want_lse = twin.attend(q, return_lse=True)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert_close(_host(out), want, tol=GPU_TOL["float32"])
        assert_close(_host(lse), want_lse, tol=GPU_TOL["float32"])
    out = gpu.attend(_to(torch, q), causal=False, q_pos=np.arange(N), scale=0.05)
    assert_close(_host(out), twin.attend(q, causal=False, q_pos=np.arange(N), scale=0.05), tol=GPU_TOL["float32"])


@requires_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_cache_attend_half_queries_and_strided(rng, dtype):
    torch = _torch()
    gpu, twin, Hq = _gpu_cache_case(rng, torch, 2, 4, [400, 3], [400, 77, 1])
    q = randn(rng, (3, 2, Hq, 64))
    qt = _to(torch, np.concatenate([q, q], axis=2), dtype)[:, :, ::2]     # strided heads
    out = gpu.attend(qt)
    assert out.dtype == getattr(torch, dtype)
    assert_close(_host(out), twin.attend(_host(qt)), tol=GPU_TOL[dtype])


@requires_gpu
def test_gpu_cache_positions_and_reproducible(rng):
    torch = _torch()
    B, Hkv, D, E, G, R, S = 2, 1, 32, 32, 8, 16, 300
    gpu = kv.QuantizedKVCache(B, S, Hkv, D, E, bits=4, group_size=G, residual=R, device="cuda")
    twin = ref_kv.QuantizedKVCache(B, S, Hkv, D, E, bits=4, group_size=G, residual=R)
    pos = np.stack([np.arange(0, 500, 2)[:250], np.arange(250)[::-1]])
    k, v = randn(rng, (B, 250, Hkv, D)), randn(rng, (B, 250, Hkv, E))
    gpu.append(_to(torch, k), _to(torch, v), positions=pos)
    twin.append(k, v, positions=pos)
    q = randn(rng, (B, 4, 2, D))
    qp = np.array([[10, 100, 300, 499], [0, 5, 125, 249]])
    a = gpu.attend(_to(torch, q), q_pos=qp)
    assert_close(_host(a), twin.attend(q, q_pos=qp), tol=GPU_TOL["float32"])
    assert torch.equal(a, gpu.attend(_to(torch, q), q_pos=qp))


@requires_gpu
def test_gpu_cache_long_decode_split(rng):
    torch = _torch()
    gpu, twin, Hq = _gpu_cache_case(rng, torch, 2, 8, [3000], [3000, 2049, 700], B=3, S=3100)
    q = randn(rng, (3, 1, Hq, 64))
    out, lse = gpu.attend(_to(torch, q), return_lse=True)
    want, want_lse = twin.attend(q, return_lse=True)
    assert_close(_host(out), want, tol=GPU_TOL["float32"])
    assert_close(_host(lse), want_lse, tol=GPU_TOL["float32"])


def test_glue_stream_ordering(fake, rng):
    # quantize / dequantize / the cache on a stream other than the framework's: outputs allocated on
    # stream 0 are waited for before each launch and released after it
    x = randn(rng, (1, 16, 2, 16))
    with cuda.use_stream(88):
        qt = kv.quantize(FakeGpuArray(x), bits=2, group_size=8, axis="token")
        assert_stream_ordered(fake, "kv_quantize", 88)
        back = kv.dequantize(qt)
        assert_stream_ordered(fake, "kv_dequantize", 88)
    assert np.array_equal(back.numpy(), kv.dequantize(kv.quantize(x, bits=2, group_size=8, axis="token")))
    gpu = kv.QuantizedKVCache(1, 40, 2, 16, 16, bits=2, group_size=8, residual=8, device="cuda")
    with cuda.use_stream(88):
        gpu.append(FakeGpuArray(x), FakeGpuArray(x))
        assert_stream_ordered(fake, "kv_cache_append", 88)
        gpu.attend(FakeGpuArray(randn(rng, (1, 1, 4, 16))))
        assert_stream_ordered(fake, "kv_attend", 88)
