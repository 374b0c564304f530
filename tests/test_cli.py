"""The command line: info, demo (small setting), bench dispatch."""
import os
import subprocess
import sys

import numpy as np
import pytest

import lmkern
from lmkern import demo

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


def test_demo_device_cuda_is_refused_clearly():
    res = run_cli("demo", "--device", "cuda")
    assert res.returncode != 0
    assert "--device cuda" in res.stderr and "Traceback" not in res.stderr
