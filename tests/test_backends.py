"""Backend selection, forcing, fallback and the info report."""
import subprocess
import sys
import warnings

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"use_backend\(name\): got 'fast', expected one of auto"):
        with lk.use_backend("fast"):
            pass


def test_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"LORA_KERNELS_BACKEND: got 'gpu'"):
        backends.requested()


def test_env_var_selects_the_reference(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    assert backends.resolved_name("cpu") == "reference"


def test_forcing_an_unavailable_backend_raises_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = lk.Linear(4, 3, r=2)
    with lk.use_backend("cuda"):
        with pytest.raises(backends.BackendUnavailableError,
                           match=r"backend 'cuda' cannot run on cpu: runs on cuda tensors only"):
            layer(torch.randn(2, 4))
    if not backends.reasons("triton", "cpu"):
        pytest.skip("triton runs on cpu here")
    with lk.use_backend("triton"):
        with pytest.raises(backends.BackendUnavailableError,
                           match="no GPU and TRITON_INTERPRET is not set"):
            layer(torch.randn(2, 4))


def test_use_backend_nests_and_restores():
    assert backends.requested() == "auto"
    with lk.use_backend("reference"):
        assert backends.requested() == "reference"
        with lk.use_backend("auto"):
            assert backends.requested() == "auto"
        assert backends.requested() == "reference"
    assert backends.requested() == "auto"


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    from lora_kernels.backends import cpu
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", ImportError("not built"))
    monkeypatch.setattr(backends, "_warned", set())
    layer = lk.Linear(4, 3, r=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(2, 4))
        layer(torch.randn(2, 4))
    msgs = [str(w.message) for w in caught if "unfused reference" in str(w.message)]
    assert len(msgs) == 1 and "not built" in msgs[0]
    assert backends.resolved_name("cpu") == "reference"


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True).stdout
    for name in backends.NAMES:
        assert f"  {name} " in out
    assert "cpu: auto picks" in out
    assert "cpu row kernels" in out


def test_info_says_whether_the_row_kernels_run():
    import os

    env = dict(os.environ, LORA_KERNELS_CPU_SIMD="0")
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    line = next(x for x in out.splitlines() if x.startswith("cpu row kernels"))
    assert "off" in line
    if "lora_kernels._C is not built" not in line and "no AVX-512F" not in line:
        assert "LORA_KERNELS_CPU_SIMD=0" in line


def test_info_reports_the_simd_level_and_its_cap():
    import os

    env = dict(os.environ, LORA_KERNELS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    line = next(x for x in out.splitlines() if x.startswith("cpu SIMD"))
    if "not built" not in line:
        assert line.startswith("cpu SIMD: scalar"), line


def test_backward_uses_the_backend_of_its_forward_on_another_thread():
    """Autograd runs CUDA backward on a device thread, which does not see the
    forward thread's use_backend(); the backward ops take the forward's choice."""
    import threading

    import lora_kernels as lk
    from lora_kernels import backends

    seen = []
    ref = backends.get("reference")
    real = ref.lora_linear_bwd

    def spy(*args):
        seen.append(threading.get_ident())
        return real(*args)

    layer = lk.Linear(6, 4, r=2)
    with lk.use_backend("reference"):
        y = layer(torch.randn(3, 6))
    result = {}

    def run_backward():  # no use_backend() on this thread
        try:
            ref.lora_linear_bwd = spy
            y.sum().backward()
        except Exception as e:  # pragma: no cover - reported below
            result["error"] = e
        finally:
            ref.lora_linear_bwd = real

    t = threading.Thread(target=run_backward)
    t.start()
    t.join()
    assert "error" not in result, result.get("error")
    assert len(seen) == 1 and layer.lora_A.grad is not None
