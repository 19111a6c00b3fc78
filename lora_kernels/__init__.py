"""Fused LoRA layers for PyTorch: a drop-in replacement for loralib.

    import lora_kernels as lora   # instead of: import loralib as lora
"""
from . import ops  # noqa: F401  (registers torch.ops.lora_kernels)
from . import distributed, functional, reference
from .backends import use_backend
from .layers import (Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, LoRALayer, Linear,
                     MergedLinear)
from . import adalora
from .adapters import load_adapter, save_adapter
from .initialize import reset_lora_parameters
from .inject import inject
from .peft_patch import is_patched, patch_peft, unpatch_peft
from .utils import lora_state_dict, mark_only_lora_as_trainable
from .wrapped import WrappedLinear
from .dora_layer import DoraLinear
from .unload import merge_and_unload

__version__ = "0.1.0"

distributed.register()  # merge_/unmerge_ on DTensors, if torch.distributed.tensor is in use

__all__ = [
    "LoRALayer", "Linear", "MergedLinear", "Embedding", "ConvLoRA", "Conv1d", "Conv2d",
    "Conv3d", "WrappedLinear", "DoraLinear", "merge_and_unload", "mark_only_lora_as_trainable",
    "lora_state_dict", "use_backend",
    "functional",
    "reference", "ops", "adalora", "patch_peft", "unpatch_peft", "is_patched", "inject",
    "save_adapter", "load_adapter", "reset_lora_parameters", "__version__",
]
