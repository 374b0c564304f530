"""The command line: info, demo (small setting), bench dispatch."""
import os
import subprocess
import sys

import numpy as np
import pytest

import lmkern
from lmkern import demo

from conftest import requires_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=600):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "lmkern", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_info_prints_configuration():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for key in ("lmkern", "compiler", "cflags", "SIMD", "OpenMP", "threads", "CUDA compiled", "GPUs"):
        assert key in res.stdout


def test_show_config_matches_core(capsys):
    lmkern.show_config()
    out = capsys.readouterr().out
    assert lmkern._core.simd in out
    assert str(lmkern.get_num_threads()) in out


@pytest.mark.parametrize("name", demo.CONFIGS)
def test_demo_configuration_within_bound(name):
    row = demo.run(name, tokens=8, prompt_len=128)
    assert row["kv_bytes"] > 0
    assert row["tokens_per_s"] > 0
    assert np.isfinite(row["max_dev"])
    assert row["max_dev"] <= row["bound"], row


def test_demo_cli_table():
    res = run_cli("demo", "--tokens", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    header = [line for line in res.stdout.splitlines() if line.startswith("| configuration")]
    assert header and "KV-cache bytes" in header[0] and "tokens/s" in header[0] and "logit dev" in header[0] and "vs baseline" in header[0]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert len(rows) == len(demo.CONFIGS)
    assert all("| ok" in r for r in rows), res.stdout


def test_demo_rejects_unknown_configuration():
    with pytest.raises(ValueError, match="unknown configuration"):
        demo.run("nonsense", tokens=2, prompt_len=8)


def test_demo_help():
    res = run_cli("demo", "--help")
    assert res.returncode == 0 and "--tokens" in res.stdout and "--device" in res.stdout


def test_every_public_module_is_reachable_from_a_fresh_import():
    code = ("import lmkern; mods = [lmkern.tpa, lmkern.mor, lmkern.kv, lmkern.parscale, lmkern.cuda, lmkern.reference];"
            "print(lmkern.cuda.available() in (True, False))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


@pytest.mark.skipif(lmkern.cuda.available(), reason="a GPU is present: the demo runs there (test below)")
def test_demo_device_cuda_without_a_gpu_is_refused_clearly():
    res = run_cli("demo", "--device", "cuda")
    assert res.returncode != 0
    assert "--device cuda" in res.stderr and "Traceback" not in res.stderr


@requires_gpu
def test_demo_device_cuda_runs_every_configuration_within_bound():
    pytest.importorskip("torch")
    res = run_cli("demo", "--device", "cuda", "--tokens", "4", "--prompt", "160")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "device cuda" in res.stdout and "FAIL" not in res.stdout
    for name in demo.CONFIGS:
        assert f"| {name}" in res.stdout


def test_demo_torch_backend_primitives_match_numpy():
    """--device cuda runs the demo model in torch: its primitives are the NumPy backend's math
    (checked here on CPU tensors; the GPU run itself needs a device)."""
    torch = pytest.importorskip("torch")
    from lmkern import demo

    xb = demo.TorchCudaBackend.__new__(demo.TorchCudaBackend)
    xb.torch = torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(xb.host(xb.rmsnorm(t)), demo.NP.rmsnorm(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xb.host(xb.silu(t)), demo.NP.silu(x), rtol=1e-5, atol=1e-6)
    idx = np.array([4, 0, 2])
    np.testing.assert_array_equal(xb.host(xb.take(t, idx, 1)), demo.NP.take(x, idx, 1))
    np.testing.assert_array_equal(xb.host(xb.cat([t, t[:, :2]], 1)), demo.NP.cat([x, x[:, :2]], 1))
    assert xb.host(xb.contiguous(t.transpose(0, 1))).flags.c_contiguous
