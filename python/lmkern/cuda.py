"""CUDA side of lmkern: DLPack / __cuda_array_interface__ interop and the GPU kernels' Python face.

Built only when nvcc was found at install time (``lmkern._cuda``); importing lmkern never fails
because a GPU, a driver or the extension is absent.
"""
from __future__ import annotations

try:
    from . import _cuda
except ImportError as exc:  # built without CUDA, or no driver
    _cuda = None
    _import_error = exc
else:
    _import_error = None


def available() -> bool:
    """True when the CUDA extension was built and a GPU is visible."""
    return _cuda is not None and device_count() > 0


def device_count() -> int:
    if _cuda is None:
        return 0
    try:
        return int(_cuda.device_count())
    except Exception:
        return 0


def config() -> dict:
    return {"CUDA compiled": _cuda is not None, "GPUs": device_count()}


def _require():
    if _cuda is None:
        raise RuntimeError(f"lmkern was built without CUDA support ({_import_error}); reinstall with nvcc on PATH")


def attention(*args, **kwargs):
    _require()
    raise NotImplementedError("cuda.attention")


def rope(*args, **kwargs):
    _require()
    raise NotImplementedError("cuda.rope")
