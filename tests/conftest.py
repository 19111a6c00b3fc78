import os
import warnings

import pytest
import torch

import lora_kernels
from lora_kernels import backends

warnings.filterwarnings("ignore", message="lora_kernels: running the unfused reference")


def cpu_backends():
    """Backends that can run on CPU tensors here (reference always)."""
    return [name for name in backends.NAMES if not backends.reasons(name, "cpu")]


@pytest.fixture(params=list(backends.NAMES))
def backend(request):
    """Each backend that runs on CPU tensors in this environment."""
    name = request.param
    why = backends.reasons(name, "cpu")
    if why:
        pytest.skip(f"{name}: {'; '.join(why)}")
    with lora_kernels.use_backend(name):
        yield name


# Tolerances per dtype for comparisons against a float64 reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
