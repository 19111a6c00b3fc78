import warnings

import pytest

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
