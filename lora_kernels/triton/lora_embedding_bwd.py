"""``lora_embedding_bwd``: dB = scaling·gᵀ·s and dS = scaling·g·B from one
read of g (rank_r_grads.py); dA[:, idx[t]] += dS[t] is a scatter of the
small tokens × r dS (torch's index_add_), skipping padding_idx. The frozen
weight's gradient, when asked for, is torch's dense embedding backward."""
from typing import List, Tuple

import torch
from torch.library import triton_op

from .common import NAMESPACE
from .rank_r_grads import rank_r_grads


@triton_op(f"{NAMESPACE}::lora_embedding_bwd", mutates_args=())
def lora_embedding_bwd(grad: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                       lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor,
                       scaling: float, padding_idx: int, output_mask: List[bool]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    want_w, want_a, want_bb = output_mask
    num = weight.shape[0]
    dw = torch.ops.aten.embedding_dense_backward(grad, indices, num, padding_idx, False) \
        if want_w else weight.new_empty(0)
    d_s, d_b = rank_r_grads(grad, s if want_bb else None, lora_B, scaling,
                            want_ds=want_a, want_db=want_bb)
    da = lora_A.new_empty(0)
    if want_a:
        if padding_idx >= 0:
            d_s = d_s * (indices != padding_idx).unsqueeze(1).to(d_s.dtype)
        da_t = d_s.new_zeros(num, lora_A.shape[0]).index_add_(0, indices, d_s)
        da = da_t.t().to(lora_A.dtype).contiguous()
    dB = d_b.to(lora_B.dtype).contiguous() if want_bb else lora_B.new_empty(0)
    return dw, da, dB
