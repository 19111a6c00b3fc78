"""Whether bitsandbytes' 4-bit layers run on this machine (for skip reasons)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def bnb_reason():
    """None if a bitsandbytes 4-bit layer runs forward and backward here, else why not."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes is not installed ({e})"
    try:
        lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False,
                                       quant_type="nf4")
        lin = lin.to("cpu")
        x = torch.randn(3, 64, requires_grad=True)
        lin(x).sum().backward()
        return None if x.grad is not None else "no input gradient through Linear4bit"
    except Exception as e:  # bitsandbytes without a CPU backend for this machine
        return f"bitsandbytes 4-bit does not run on this CPU: {type(e).__name__}: {e}"
