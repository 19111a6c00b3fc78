"""DoRA's kernels: the ``dora_linear`` op contract composed from a backend's own kernels.

DoRA (Liu et al. 2024, arXiv 2402.09353) as PEFT computes it, with
x̂ = dropout(x), s the LoRA scaling and m = magnitude / ‖W + s·B·A‖ per output
row (the norm detached, paper §4.3; ``m`` arrives here already divided):

    y = x·Wᵀ + bias + (m − 1)·(x̂·Wᵀ) + m·s·(x̂·Aᵀ)·Bᵀ

Every backend runs it the same way, on its own ``lora_linear`` and ``dropout``
kernels (the fused frozen GEMM + low-rank branch, the regenerated Philox
mask), so DoRA needs no new device kernels:

* dropout off (x̂ = x): ``y = m ⊙ z + bias`` with ``z = x·Wᵀ + s·x·Aᵀ·Bᵀ``:
  one ``lora_linear_fwd`` and one elementwise pass; no second frozen GEMM.
* dropout on: ``y = x·Wᵀ + bias + (m − 1) ⊙ z + s·(x̂·Aᵀ)·Bᵀ`` with
  ``z = x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ``: two frozen GEMMs (x and x̂ differ: inherent), x̂
  is a temporary, never kept.

Held for backward (``lora_kernels.routes``): x (only when dA or dW need it;
x̂ is regenerated from the seed), ``s = x̂·Aᵀ`` (tokens×r), ``z`` (tokens×out:
``dm = Σ_tokens g ⊙ z``, and recomputing z would cost a frozen GEMM), m and
the seed. PEFT holds x̂·Wᵀ, B·A·x̂ and the dropped x with its mask instead.

Backward, with ``g`` the output gradient, ``gm = g ⊙ m`` and D the mask:

* dropout off: ``(dx, dW, dA, dB) = lora_linear_bwd(gm)``: y is m ⊙ a LoRA layer;
* dropout on: ``dx = g·W + D ⊙ ((gm − g)·W + s·(gm·B)·A)``, ``dA = s·(gm·B)ᵀ·x̂``,
  ``dB = s·gmᵀ·S``, ``dW = gᵀ·x + (gm − g)ᵀ·x̂``: two frozen GEMMs; D is
  generated once (a tokens×in temporary) for dx and x̂, and the rank-r
  products run in the backend's fused ``lora_delta_bwd`` on x̂;
* ``dm = Σ_tokens g ⊙ z``; ``dbias = Σ_tokens g``.

The row norms never build W + s·B·A (out×in):
``‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·(W·Aᵀ)_i·B_iᵀ + s²·B_i·(A·Aᵀ)·B_iᵀ``, where
‖W_i‖² depends on W alone (the caller caches it) and W·Aᵀ is one pass over W.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_ROWS = 1024  # rows of W upcast at a time for ‖W_i‖² (bounds the temporary)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_row_sq(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """‖W_i‖² per output row (float32, float64 for a float64 W), in blocks of
    rows so a half W is never upcast whole."""
    acc = _acc(weight.dtype)
    w = weight.t() if fan_in_fan_out else weight
    with torch.no_grad():
        return torch.cat([torch.linalg.vector_norm(w[i:i + _ROWS], dim=1, dtype=acc).square()
                          for i in range(0, w.shape[0], _ROWS)]) if w.shape[0] else \
            w.new_zeros(0, dtype=acc)


def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sq: Tensor,
                scaling: float, fan_in_fan_out: bool,
                lora_bias: Optional[Tensor] = None) -> Tensor:
    """‖W + s·(B·A + b_B·1ᵀ)‖ per output row (float32; float64 for float64),
    from ‖W_i‖² (``weight_sq``), one pass over W (W·Aᵀ) and r-sized products.
    PEFT's ``lora_bias`` b_B is ΔW's column of ones: A gains a row of ones and
    B the column b_B (and W·1 is W's row sums)."""
    acc = _acc(weight.dtype)
    with torch.no_grad():
        a, b = lora_A.to(acc), lora_B.to(acc)
        # W·Aᵀ taken as (A·Wᵀ)ᵀ: BLAS is faster with r rows of output than r columns.
        a_w = lora_A.to(weight.dtype)
        wa = (a_w @ weight if fan_in_fan_out else F.linear(a_w, weight)).t().to(acc)
        if lora_bias is not None:
            ones = a.new_ones(1, a.shape[1])
            row_sums = weight.sum(0 if fan_in_fan_out else 1, dtype=acc)
            a = torch.cat([a, ones])
            b = torch.cat([b, lora_bias.to(acc)[:, None]], dim=1)
            wa = torch.cat([wa, row_sums[:, None]], dim=1)
        # ‖W_i‖² + B_i·(2s·(W·Aᵀ)_i + s²·(A·Aᵀ)·B_iᵀ), B_i's product in one vecdot
        p = torch.addmm(wa, b, a @ a.t(), beta=2.0 * scaling, alpha=scaling * scaling)
        sq = torch.linalg.vecdot(p, b).add_(weight_sq)
        return sq.clamp_min_(0).sqrt_()


def _frozen_t(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """W as (out, in) (a view)."""
    return weight.t() if fan_in_fan_out else weight


def linear_fwd(backend, x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
               fan_in_fan_out):
    """(y, s, z): see the module docstring; ``mag`` is m (out,), in x's dtype."""
    if dropout_p == 0.0:
        z, s = backend.lora_linear_fwd(x, weight, None, lora_A, lora_B, seed, scaling, 0.0,
                                       fan_in_fan_out, 1, [0])
        y = torch.addcmul(bias, z, mag) if bias is not None else z * mag
        return y, s, z
    xd = backend.dropout(x.contiguous(), seed, dropout_p)
    z, s = backend.lora_linear_fwd(xd, weight, None, lora_A, lora_B, seed, scaling, 0.0,
                                   fan_in_fan_out, 1, [0])
    del xd
    y = F.linear(x, _frozen_t(weight, fan_in_fan_out), bias)
    y.addcmul_(z, mag - 1)
    y.addmm_(s.to(x.dtype), lora_B.t(), alpha=scaling)
    return y, s, z


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def linear_bwd(backend, grad, x, weight, lora_A, lora_B, mag, s, z, seed, scaling, dropout_p,
               fan_in_fan_out, output_mask):
    """(dx, dweight, dbias, dA, dB, dmag), an empty tensor for each output not
    asked for (``output_mask``: six flags in that order). The rank-r work
    (dS = s·gm·B, dA, dB, D ⊙ dS·A) runs in the backend's fused low-rank
    backward (``lora_linear_bwd``, ``lora_delta_bwd``): skinny GEMMs through
    torch would cost a pass over a tokens×out tensor each."""
    want_x, want_w, want_b, want_a, want_bb, want_m = output_mask
    tmp = None
    dmag = _empty(mag)
    if want_m:
        tmp = torch.mul(grad, z)
        dmag = tmp.sum(0, dtype=_acc(grad.dtype)).to(mag.dtype)
    dbias = grad.sum(0) if want_b else _empty(grad)
    if not any((want_x, want_w, want_a, want_bb)):
        return _empty(grad), _empty(weight), dbias, _empty(lora_A), _empty(lora_B), dmag
    gm = grad * mag if tmp is None else torch.mul(grad, mag, out=tmp)
    if dropout_p == 0.0:
        dx, dw, _, da, db = backend.lora_linear_bwd(
            gm, x, weight, lora_A, lora_B, s, seed, scaling, 0.0, fan_in_fan_out, 1, [0],
            [want_x, want_w, False, want_a, want_bb])
        return dx, dw, dbias, da, db, dmag
    # Dropout on: dx = g·W + D ⊙ (h·W + s·gm·B·A) with h = gm − g (the gradient
    # of x̂·Wᵀ), dA = s·(gm·B)ᵀ·x̂, dB = s·gmᵀ·S. The mask D (tokens×in, a
    # temporary) is generated once and serves both dx and x̂; the rank-r
    # products run in the backend's fused low-rank backward without dropout,
    # on x̂.
    need_mask = want_x or want_a or want_w
    mask = backend.dropout(grad.new_ones(grad.shape[0], lora_A.shape[1]), seed,
                           dropout_p) if need_mask else None
    xd = x * mask if (want_a or want_w) else x.new_empty(0)
    dx_low, da, db = backend.lora_delta_bwd(gm, xd, lora_A, lora_B, s, seed, scaling, 0.0, 1,
                                            [0], [want_x, want_a, want_bb])
    h = gm.sub_(grad)
    w = _frozen_t(weight, fan_in_fan_out)                          # (out, in)
    dx = dw = None
    if want_x:
        dx = torch.mm(h, w)
        dx.add_(dx_low).mul_(mask).addmm_(grad, w)
    if want_w:
        dw = grad.t() @ x
        dw.addmm_(h.t(), xd)
        dw = dw.t() if fan_in_fan_out else dw
    return (_empty(grad) if dx is None else dx, _empty(weight) if dw is None else dw, dbias,
            da, db, dmag)
