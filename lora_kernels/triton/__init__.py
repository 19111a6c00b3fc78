"""Triton kernels behind the ``lora_kernels`` ops (GPU; CPU tensors under
``TRITON_INTERPRET=1``).

One op per module, each a ``torch.library.triton_op`` in the namespace
``lora_kernels_triton`` that launches its kernels through ``wrap_triton`` (so
torch.compile can trace into them). The triton backend
(``lora_kernels/backends/triton.py``) calls these ops; modules never do.

``load()`` imports (and so registers) them. Import this package only after
``TRITON_INTERPRET`` has its final value: Triton reads it when a kernel is
defined.
"""
from __future__ import annotations

_MODULES = ("dropout", "merge", "lora_linear_fwd", "lora_linear_bwd", "lora_embedding_fwd",
            "lora_embedding_bwd", "lora_delta_fwd", "lora_delta_bwd")


def load():
    import importlib

    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")
