"""Tolerances per dtype for comparisons against a float64 reference."""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
