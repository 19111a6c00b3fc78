"""The CUDA C++ backend: kernels from ``csrc/cuda`` (extension ``lora_kernels._C_cuda``,
built with ``LORA_KERNELS_CUDA=1``).

They are registered under ``torch.ops.lora_kernels_cuda`` with the argument
lists of the op contract in ``lora_kernels/ops.py`` (the schemas of
``lora_kernels_cpu``), for the CUDA dispatch key only: the user-facing
``lora_kernels`` ops keep choosing the backend here, in Python.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .forward import forwarders

NAME = "cuda"

_IMPORT_ERROR = None
try:
    from .. import _C_cuda  # loads the library; registers the kernels
except ImportError as e:  # not built: import still works, auto falls back
    _C_cuda = None
    _IMPORT_ERROR = e

BUILD_HINT = "LORA_KERNELS_CUDA=1 pip install --no-build-isolation -e ."


def built() -> bool:
    return _C_cuda is not None


def arch_list() -> Tuple[str, ...]:
    """The TORCH_CUDA_ARCH_LIST entries the extension was built for ("9.0", "8.6+PTX")."""
    if _C_cuda is None:
        return ()
    return tuple(a for a in getattr(_C_cuda, "arch_list", "").split(",") if a)


def cuda_version() -> Optional[str]:
    """The CUDA toolkit version the extension was built with."""
    return getattr(_C_cuda, "cuda_version", None) if _C_cuda is not None else None


def _runs_on(capability: Tuple[int, int], archs) -> bool:
    """Whether code built for ``archs`` (TORCH_CUDA_ARCH_LIST entries) runs on a
    GPU of ``capability``: a cubin for X.Y runs on X.Z with Z >= Y (an "a"
    target only on X.Y itself); "+PTX" code is compiled by the driver for any
    later GPU."""
    for arch in archs:
        ptx = arch.endswith("+PTX")
        name = arch[:-4] if ptx else arch
        try:
            built = tuple(int(v) for v in name.rstrip("af").split("."))
        except ValueError:  # a named architecture (Ampere, ...): not checked
            return True
        if ptx and built <= tuple(capability):
            return True
        if name.endswith("a"):
            if built == tuple(capability):
                return True
        elif built[0] == capability[0] and built[1] <= capability[1]:
            return True
    return False


def not_supported_reasons(device: torch.device):
    why = []
    if device.type != "cuda":
        why.append(f"runs on cuda tensors only, got {device.type}")
    if _IMPORT_ERROR is not None:
        why.append(f"the CUDA extension lora_kernels._C_cuda is not built ({_IMPORT_ERROR}); "
                   f"build it with `{BUILD_HINT}`")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why.append("CUDA is not available")
        elif _C_cuda is not None and arch_list():
            index = device.index if device.index is not None else torch.cuda.current_device()
            cap = torch.cuda.get_device_capability(index)
            if not _runs_on(cap, arch_list()):
                why.append(f"built for TORCH_CUDA_ARCH_LIST={';'.join(arch_list())}, which "
                           f"does not run on this GPU (compute capability {cap[0]}.{cap[1]}); "
                           "rebuild with its architecture in TORCH_CUDA_ARCH_LIST")
    return why


def _ops():
    return torch.ops.lora_kernels_cuda


(lora_linear_fwd, lora_linear_bwd, lora_embedding_fwd, lora_embedding_bwd, merge_,
 dropout, lora_delta_fwd, lora_delta_bwd) = forwarders(_ops)
