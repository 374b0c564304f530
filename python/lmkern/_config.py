"""Threads and introspection (SPEC 0): set_num_threads, get_num_threads, show_config."""
from __future__ import annotations

import operator

import platform
import sys

from . import _core


def set_num_threads(n: int) -> None:
    """Threads used by every CPU kernel (default: all cores, or LMKERN_NUM_THREADS)."""
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"set_num_threads: n must be an int; got {type(n).__name__}")
    _core.set_num_threads(operator.index(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def config() -> dict:
    """The build and runtime configuration as a dict (what show_config prints)."""
    from . import __version__, cuda
    import numpy as np
    info = {
        "lmkern": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "compiler": _core.compiler,
        "cflags": _core.cflags,
        "native build": bool(_core.native),
        "SIMD": _core.simd,
        "OpenMP": _core.openmp,
        "threads": get_num_threads(),
    }
    info.update(cuda.config())
    return info


def show_config() -> None:
    """Prints the version, compiler and flags, SIMD level, threads, CUDA build and visible GPUs."""
    for key, val in config().items():
        print(f"{key:>16}: {val}")
