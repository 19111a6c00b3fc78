"""Backend functions for kernels registered as torch ops.

The compiled backends (cpu: ``torch.ops.lora_kernels_cpu``, triton:
``torch.ops.lora_kernels_triton``, cuda: ``torch.ops.lora_kernels_cuda``)
register one op per function of the contract in ``lora_kernels/ops.py``, with
the same name and arguments; their backend module forwards to them.
"""
from __future__ import annotations

from typing import Callable

OPS = ("lora_linear_fwd", "lora_linear_bwd", "lora_embedding_fwd", "lora_embedding_bwd",
       "merge_", "dropout", "lora_delta_fwd", "lora_delta_bwd")


def forwarders(namespace: Callable[[], object]):
    """The contract's functions in ``OPS`` order, each calling
    ``namespace().<name>.default(*args)`` (``namespace`` runs on the first
    call, so it may load the kernels then; the op is kept from there on)."""
    def make(name):
        op = None  # the op's default overload, looked up on first use

        def forward(*args):
            nonlocal op
            if op is None:
                op = getattr(namespace(), name).default
            return op(*args)
        forward.__name__ = forward.__qualname__ = name
        return forward
    return tuple(make(name) for name in OPS)
