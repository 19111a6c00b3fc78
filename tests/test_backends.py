"""Backend selection, forcing, fallback and the info report."""
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"use_backend\(name\): got 'fast', expected one of auto"):
        with lk.use_backend("fast"):
            pass


def _python(code: str, **env):
    """Run ``code`` in a fresh interpreter (LORA_KERNELS_BACKEND is read when
    lora_kernels is imported); its stdout, stderr and exit code."""
    import os
    full = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)
    return proc.stdout, proc.stderr, proc.returncode


def test_env_var_is_validated():
    _, err, rc = _python("import lora_kernels", LORA_KERNELS_BACKEND="gpu")
    assert rc != 0 and "LORA_KERNELS_BACKEND: got 'gpu', expected one of auto" in err


def test_env_var_selects_the_reference_for_forward_and_backward():
    """With LORA_KERNELS_BACKEND=reference at import, the dispatcher's CPU
    kernels are the reference backend's: a layer's forward and backward run it."""
    out, err, rc = _python(
        "import torch, lora_kernels as lk\n"
        "from lora_kernels import backends\n"
        "ref = backends.get('reference')\n"
        "calls = []\n"
        "for n in ('lora_linear_fwd', 'lora_linear_bwd'):\n"
        "    f = getattr(ref, n)\n"
        "    setattr(ref, n, lambda *a, _n=n, _f=f: (calls.append(_n), _f(*a))[1])\n"
        "layer = lk.Linear(6, 4, r=2, lora_dropout=0.1)\n"
        "layer(torch.randn(3, 6)).sum().backward()\n"
        "print(backends.resolved_name('cpu'), calls)\n", LORA_KERNELS_BACKEND="reference")
    assert rc == 0, err
    assert out.strip() == "reference ['lora_linear_fwd', 'lora_linear_bwd']"


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


def test_missing_extension_falls_back_to_reference_with_one_warning():
    """Without the compiled extension the ops are defined in Python and run on
    the reference backend, with one warning saying why."""
    out, err, rc = _python(
        "import sys, warnings\n"
        "sys.modules['lora_kernels._C'] = None  # import fails: as if not built\n"
        "import torch, lora_kernels as lk\n"
        "from lora_kernels import backends, ops\n"
        "layer = lk.Linear(4, 3, r=2, lora_dropout=0.1)\n"
        "torch.nn.init.normal_(layer.lora_B)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    layer(torch.randn(2, 4)).sum().backward()\n"
        "    layer(torch.randn(2, 4))\n"
        "msgs = [str(w.message) for w in caught if 'unfused reference' in str(w.message)]\n"
        "print(ops.NATIVE, len(msgs), 'not built' in msgs[0], backends.resolved_name('cpu'),\n"
        "      layer.lora_A.grad is not None)\n")
    assert rc == 0, err
    assert out.split() == ["False", "1", "True", "reference", "True"]


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True).stdout
    for name in backends.NAMES:
        assert f"  {name} " in out
    assert "cpu: auto picks" in out
    assert "cpu row kernels" in out
    from lora_kernels import ops
    assert ("ops: compiled" if ops.NATIVE else "ops: defined in Python") in out


def test_info_says_whether_the_row_kernels_run():
    import os

    env = dict(os.environ, LORA_KERNELS_CPU_SIMD="0")
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    line = next(x for x in out.splitlines() if x.startswith("cpu row kernels"))
    assert "off" in line
    if "lora_kernels._C is not built" not in line and "neither AVX-512F nor AVX2" not in line:
        assert "LORA_KERNELS_CPU_SIMD=0" in line


def test_info_reports_the_simd_level_and_its_cap():
    import os

    env = dict(os.environ, LORA_KERNELS_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    line = next(x for x in out.splitlines() if x.startswith("cpu SIMD"))
    if "not built" not in line:
        assert line.startswith("cpu SIMD: scalar"), line
    rows = next(x for x in out.splitlines() if x.startswith("cpu row kernels"))
    if "not built" not in rows:
        assert "off" in rows, rows


def test_info_names_the_row_kernels_variant():
    """With the level capped at avx2, the AVX2 row kernels run on any CPU that
    has AVX2 (AVX-512 ones included)."""
    import os

    env = dict(os.environ, LORA_KERNELS_CPU_ISA="avx2")
    env.pop("LORA_KERNELS_CPU_SIMD", None)
    out = subprocess.run([sys.executable, "-m", "lora_kernels.info"], capture_output=True,
                         text=True, check=True, env=env).stdout
    isa = next(x for x in out.splitlines() if x.startswith("cpu SIMD"))
    rows = next(x for x in out.splitlines() if x.startswith("cpu row kernels"))
    if isa.startswith("cpu SIMD: avx2"):
        assert rows.endswith("on (AVX2)"), rows


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
