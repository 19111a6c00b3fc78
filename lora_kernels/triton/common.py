"""Host-side helpers shared by the Triton ops: launch configurations, dtype
mapping, the dropout threshold, and the grouped B of MergedLinear."""
from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import reference as R

NAMESPACE = "lora_kernels_triton"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    """Autotuning needs a GPU; ``LORA_KERNELS_TRITON_AUTOTUNE=0`` keeps the
    first (safe) config of each list."""
    return not interpreting() and os.environ.get("LORA_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def configs(gpu: Sequence[dict], interpret: dict, warps: Sequence[int] = (),
            stages: Sequence[int] = ()):
    """Autotune configs: the GPU list (Ampere and Hopper sizes), or a single
    small config under the interpreter (small blocks so the tests' odd shapes
    span several tiles). With autotuning off, the kernels' pruning keeps the
    first config of the list (see prune_first / prune_gemm_configs)."""
    if interpreting():
        return [triton.Config(dict(interpret), num_warps=1, num_stages=1)]
    out = []
    for i, kw in enumerate(gpu):
        out.append(triton.Config(dict(kw), num_warps=warps[i] if warps else 4,
                                 num_stages=stages[i] if stages else 3))
    return out


# Shared memory a GEMM config may take for its pipelined tiles: below the
# opt-in maximum of Ampere (163 KiB) and Hopper (227 KiB) with room for the
# epilogue's tiles.
SMEM_BUDGET = 150 * 1024


def gemm_smem(config, elem_size: int) -> int:
    """Bytes of shared memory for the pipelined x and W tiles of a config."""
    kw = config.kwargs
    return config.num_stages * (kw["BM"] * kw["BK"] + kw["BK"] * kw["BN"]) * elem_size


def prune_gemm_configs(configs, named_args, **_):
    """Drop configs whose tiles do not fit for this call's dtype (fp32 and fp64
    tiles are 2× and 4× bf16's); without autotuning keep the first that fits."""
    elem = next(a.element_size() for a in named_args.values() if isinstance(a, torch.Tensor))
    fitting = [c for c in configs if gemm_smem(c, elem) <= SMEM_BUDGET]
    if not fitting:  # the smallest one, with a single stage
        small = min(configs, key=lambda c: gemm_smem(c, elem))
        fitting = [triton.Config(dict(small.kwargs), num_warps=small.num_warps, num_stages=1)]
    return fitting if autotune_enabled() else fitting[:1]


def prune_first(configs, named_args, **_):
    """Without autotuning, the first config of the list (a safe size)."""
    return configs if autotune_enabled() else configs[:1]


PRUNE_FIRST = dict(early_config_prune=prune_first)
PRUNE_GEMM = dict(early_config_prune=prune_gemm_configs)


def acc_type(dtype: torch.dtype):
    """Accumulator: fp64 for fp64 inputs, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products run as TF32 on the GPU (as torch's default matmul does
    with allow_tf32) unless LORA_KERNELS_TRITON_TF32=0; other dtypes exact."""
    if dtype == torch.float32 and not interpreting() \
            and os.environ.get("LORA_KERNELS_TRITON_TF32", "1") != "0":
        return "tf32"
    return "ieee"


def dropout_args(p: float):
    """(threshold, keep scale) of the mask defined in ``lora_kernels.reference``."""
    return R.dropout_threshold(p), R.dropout_keep_scale(p)


def pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_programs(device: torch.device) -> int:
    """Programs that keep the device busy (4 per SM); small under the
    interpreter, where programs run one after another."""
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else
                         torch.cuda.current_device())


def grouped_b(lora_B: torch.Tensor, out_features: int, num_groups: int,
              groups: Sequence[int]) -> torch.Tensor:
    """B laid out over all output features: (out, r·len(groups)), with group
    ``groups[i]``'s rows of B_i in columns i·r..(i+1)·r and zeros elsewhere.
    A plain Linear (one group, all enabled) uses lora_B itself. This is the
    only padded tensor, out × r·G, never tokens × out."""
    e = len(groups)
    if num_groups == 1 and e == 1:
        return lora_B
    size = out_features // num_groups
    r = lora_B.shape[1]
    full = lora_B.new_zeros(out_features, r * e)
    for i, g in enumerate(groups):
        full[g * size:(g + 1) * size, i * r:(i + 1) * r] = lora_B[i * size:(i + 1) * size]
    return full


def ungroup_db(dB_full: torch.Tensor, out_features: int, num_groups: int,
               groups: Sequence[int], r: int) -> torch.Tensor:
    """The inverse of ``grouped_b`` for a gradient: lora_B's (size·G, r) rows."""
    e = len(groups)
    if num_groups == 1 and e == 1:
        return dB_full
    size = out_features // num_groups
    return torch.cat([dB_full[g * size:(g + 1) * size, i * r:(i + 1) * r]
                      for i, g in enumerate(groups)])
