import pytest

import lora_kernels
from lora_kernels import backends


@pytest.fixture(params=list(backends.NAMES))
def backend(request):
    """Each backend that runs on CPU tensors in this environment."""
    name = request.param
    why = backends.reasons(name, "cpu")
    if why:
        pytest.skip(f"{name}: {'; '.join(why)}")
    with lora_kernels.use_backend(name):
        yield name
