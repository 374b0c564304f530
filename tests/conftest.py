"""Shared test helpers: tolerance table per dtype, random data, GPU skip."""
import numpy as np
import pytest

import lmkern

# relative to the output scale (max |expected|, at least 1)
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
GPU_TOL = {"float32": 2e-4, "float16": 2e-2, "bfloat16": 6e-2}


def assert_close(actual, expected, dtype=None, tol=None, err_msg=""):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise; inf/nan must match exactly."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    dtype = np.dtype(dtype or expected.dtype)
    tol = TOL.get(dtype, 2e-5) if tol is None else tol
    fin = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), fin), f"finite pattern differs {err_msg}"
    # inf must match in sign, NaN with NaN (a +inf where -inf is expected is an error)
    assert np.array_equal(actual[~fin], expected[~fin], equal_nan=True), f"non-finite values differ {err_msg}"
    if fin.any():
        scale = max(1.0, float(np.abs(expected[fin]).max()))
        err = float(np.abs(actual[fin].astype(np.float64) - expected[fin].astype(np.float64)).max())
        assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} * {scale:.3g} {err_msg}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def noncontig(a):
    """The same values as a, in a non-contiguous view (every other element of a doubled last axis)."""
    buf = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    buf[..., ::2] = a
    view = buf[..., ::2]
    assert not view.flags.c_contiguous or a.size <= 1
    return view


def gpu_available():
    try:
        return lmkern.cuda.available()
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU visible (or built without CUDA)")


def torch_cuda():
    """torch when it is installed and sees a GPU, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None
