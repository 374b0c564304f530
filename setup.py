"""Build lmkern with plain setuptools.

* ``lmkern._core``: C11 + OpenMP, every ``csrc/*.c`` binding and every ``kernels/cpu/*.c`` kernel.
  ``-O3``; ``-march=native`` unless ``LMKERN_NATIVE=0`` (portable build).
* ``lmkern._cuda``: built when nvcc is found (PATH or ``CUDA_HOME``) and ``LMKERN_CUDA`` is not ``0``.
  ``kernels/cuda/*.cu`` are compiled by nvcc into objects inside ``build_ext`` and handed to the linker
  with the bindings in ``csrc/cuda/*.c``; the CUDA runtime is linked statically.  Architectures come
  from ``LMKERN_CUDA_ARCHS`` (default ``80;90``, plus PTX of the newest).  ``LMKERN_CUDA=1`` fails
  loudly when nvcc is missing.  ``LMKERN_NVCC_FLAGS`` adds flags to every nvcc call (tuning A/B).
"""
import concurrent.futures
import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cuda_home(nvcc):
    """The toolkit root (with include/cuda_runtime_api.h): CUDA_HOME, else next to the real nvcc, else
    where `nvcc -dryrun` says it lives (nvcc may be a wrapper script on PATH)."""
    candidates = [os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        dry = subprocess.run([nvcc, "-dryrun", "--version"], capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if "TOP=" in line:
                candidates.append(os.path.realpath(line.split("TOP=", 1)[1].strip().strip('"')))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    sys.exit(f"lmkern: found nvcc at {nvcc} but no CUDA toolkit headers; set CUDA_HOME")


def cuda_mode():
    mode = os.environ.get("LMKERN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"LMKERN_CUDA must be auto, 0 or 1; got {mode!r}")
    return mode


NATIVE = os.environ.get("LMKERN_NATIVE", "1") != "0"
NUMPY_MACROS = [
    ("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION"),
    ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION"),
]
C_FLAGS = ["-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-psabi"]
if NATIVE:
    C_FLAGS.append("-march=native")
INCLUDES = [np.get_include(), os.path.join("kernels", "include"), "csrc"]


class BuildExt(build_ext):
    """Compiles the .cu sources of the CUDA extension with nvcc, then lets setuptools link."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + self.nvcc_compile(cu_sources)
        super().build_extension(ext)

    # kernels whose float32 results are promised equal to the CPU's (compares, residual updates): keep
    # subnormals, which --use_fast_math would flush to zero (the attention kernels keep the fast setting)
    KEEP_SUBNORMALS = {"mor_scatter.cu", "mor_token_choice.cu", "mor_router.cu", "parscale_aggregate.cu"}

    def nvcc_compile(self, sources):
        nvcc = find_nvcc()
        archs = [a.strip() for a in os.environ.get("LMKERN_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        headers = rel("kernels/include/lmkern/*.h") + rel("kernels/cuda/*.cuh")
        objects, jobs = [], []
        for src in sources:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            if not self.force and os.path.exists(obj) and all(os.path.getmtime(d) <= os.path.getmtime(obj) for d in [src] + headers):
                continue
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                   "-Xcompiler", "-fPIC", "-Ikernels/include", "-Ikernels/cuda",
                   "--expt-relaxed-constexpr", "-lineinfo"] + gencode
            if os.path.basename(src) in self.KEEP_SUBNORMALS:
                cmd.append("-ftz=false")
            cmd += shlex.split(os.environ.get("LMKERN_NVCC_FLAGS", ""))   # e.g. -DLK_TPA_MIN_BLOCKS=3 for A/B
            jobs.append(cmd)
        # nvcc is single-threaded per file: compile the files side by side (LMKERN_NVCC_JOBS, default one
        # per core)
        n_jobs = max(1, int(os.environ.get("LMKERN_NVCC_JOBS", "0") or 0) or os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
            for cmd in jobs:
                print(" ".join(cmd), flush=True)
            for f in [pool.submit(subprocess.check_call, cmd, cwd=HERE) for cmd in jobs]:
                f.result()
        return objects


def extensions():
    exts = [
        Extension(
            "lmkern._core",
            sources=rel("csrc/*.c") + rel("kernels/cpu/*.c"),
            include_dirs=INCLUDES,
            define_macros=NUMPY_MACROS + [("LMKERN_NATIVE", "1" if NATIVE else "0")],
            extra_compile_args=C_FLAGS + [f'-DLMKERN_CFLAGS="{" ".join(C_FLAGS)}"'],
            extra_link_args=["-fopenmp"],
            depends=rel("kernels/include/lmkern/*.h") + rel("csrc/*.h") + rel("kernels/cpu/*.h"),
        )
    ]
    mode = cuda_mode()
    nvcc = find_nvcc() if mode != "0" else None
    if mode == "1" and nvcc is None:
        sys.exit("LMKERN_CUDA=1 but nvcc was not found on PATH or in CUDA_HOME")
    cu = rel("kernels/cuda/*.cu")
    if nvcc and cu:
        cuda_home = find_cuda_home(nvcc)
        libdirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
                               os.path.join(cuda_home, "targets", "x86_64-linux", "lib")) if os.path.isdir(d)]
        exts.append(
            Extension(
                "lmkern._cuda",
                sources=rel("csrc/cuda/*.c") + cu,
                include_dirs=INCLUDES + [os.path.join(cuda_home, "include"), "csrc/cuda"],
                define_macros=NUMPY_MACROS,
                extra_compile_args=["-std=c11", "-O2", "-Wall"],
                library_dirs=libdirs,
                libraries=["cudart_static", "rt", "pthread", "dl", "stdc++"],
                depends=rel("kernels/include/lmkern/*.h") + rel("kernels/cuda/*.cuh") + rel("csrc/cuda/*.h"),
            )
        )
    elif mode == "auto":
        print("lmkern: nvcc not found (or no .cu sources); building without CUDA", flush=True)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
