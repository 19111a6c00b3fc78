"""Tolerances per dtype for comparisons against a float64 reference."""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


def skip_unreliable(backend: str, dtype: torch.dtype) -> None:
    """The Triton interpreter's bf16 arithmetic is wrong (it has no bf16
    numpy type); bf16 on the triton backend is checked on a GPU only."""
    import os

    import pytest

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and dtype == torch.bfloat16 and interpreted:
        pytest.skip("triton interpreter: bf16 arithmetic is unreliable (checked on a GPU)")
