"""The reference backend: the op contract computed from ``lora_kernels.reference``.

Forward pieces evaluate the reference formula; backward pieces are its
gradients written out in plain torch. Slow and memory-hungry by design; it runs on every
device and is what ``auto`` falls back to when no compiled backend is there.
"""
from __future__ import annotations

import torch

from .. import reference as R
from ..ops import lowrank_dtype

NAME = "reference"


def not_supported_reasons(device: torch.device):
    return []


def _lowrank_input(x, lora_A, seed, dropout_p):
    return R.dropout(x, seed, dropout_p) @ lora_A.t()


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                    fan_in_fan_out, num_groups, groups):
    y = R.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                      fan_in_fan_out, num_groups, groups)
    s = _lowrank_input(x, lora_A, seed, dropout_p).to(lowrank_dtype(x.dtype))
    return y, s


def _empty(t):
    return t.new_empty(0)


def _lowrank_grads(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, num_groups, groups,
                   want_x, want_a, want_bb):
    """The low-rank branch's gradients: (its dx term, dA, dB), each None when
    not asked for."""
    size = grad.shape[1] // num_groups
    r = lora_A.shape[0] // len(groups)
    cols = [slice(g * size, (g + 1) * size) for g in groups]
    a_blocks = [lora_A[i * r:(i + 1) * r] for i in range(len(groups))]
    b_blocks = [lora_B[i * size:(i + 1) * size] for i in range(len(groups))]
    # dS_i = scaling · g_i · B_i, the gradient of the branch's tokens×r product.
    d_s = [scaling * grad[:, c] @ b for c, b in zip(cols, b_blocks)]
    dx = da = dB = None
    if want_x:
        dx = R.dropout(sum(ds @ a for ds, a in zip(d_s, a_blocks)), seed, dropout_p)
    if want_a:
        xd = R.dropout(x, seed, dropout_p)
        da = torch.cat([ds.t() @ xd for ds in d_s])
    if want_bb:
        s = s.to(grad.dtype)
        dB = torch.cat([scaling * grad[:, c].t() @ s[:, i * r:(i + 1) * r]
                        for i, c in enumerate(cols)])
    return dx, da, dB


def lora_linear_bwd(grad, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p,
                    fan_in_fan_out, num_groups, groups, output_mask):
    want_x, want_w, want_b, want_a, want_bb = output_mask
    w = weight.t() if fan_in_fan_out else weight          # (out, in)
    dx_low, da, dB = _lowrank_grads(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p,
                                    num_groups, groups, want_x, want_a, want_bb)
    dx = grad @ w + dx_low if want_x else _empty(grad)
    dw = _empty(weight)
    if want_w:
        dw = grad.t() @ x
        dw = dw.t() if fan_in_fan_out else dw
    db = grad.sum(0) if want_b else _empty(grad)
    return (dx, dw, db, _empty(lora_A) if da is None else da,
            _empty(lora_B) if dB is None else dB)


def lora_delta_fwd(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups):
    y = R.lora_delta(x, base, lora_A, lora_B, scaling, dropout_p, seed, num_groups, groups)
    s = _lowrank_input(x, lora_A, seed, dropout_p).to(lowrank_dtype(x.dtype))
    return y, s


def lora_delta_bwd(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, num_groups, groups,
                   output_mask):
    want_x, want_a, want_bb = output_mask
    dx, da, dB = _lowrank_grads(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p,
                                num_groups, groups, want_x, want_a, want_bb)
    return (_empty(grad) if dx is None else dx, _empty(lora_A) if da is None else da,
            _empty(lora_B) if dB is None else dB)


def lora_embedding_fwd(indices, weight, lora_A, lora_B, scaling):
    y = R.lora_embedding(indices, weight, lora_A, lora_B, scaling)
    s = lora_A.t()[indices].to(lowrank_dtype(weight.dtype))
    return y, s


def lora_embedding_bwd(grad, indices, weight, lora_A, lora_B, s, scaling, padding_idx,
                       output_mask):
    want_w, want_a, want_bb = output_mask
    live = (indices != padding_idx).unsqueeze(1).to(grad.dtype)
    dw = _empty(weight)
    if want_w:
        dw = torch.zeros_like(weight).index_add_(0, indices, grad * live)
    da = _empty(lora_A)
    if want_a:
        d_s = scaling * (grad @ lora_B) * live
        da = torch.zeros_like(lora_A.t()).index_add_(0, indices, d_s).t().contiguous()
    dB = scaling * grad.t() @ lora_A.t()[indices] if want_bb else _empty(lora_B)
    return dw, da, dB


def merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups):
    with torch.no_grad():
        weight.copy_(R.merged_weight(weight, lora_A, lora_B, scaling, fan_in_fan_out,
                                     num_groups, groups))


def dropout(x, seed, p):
    return R.dropout(x, seed, p).clone()
