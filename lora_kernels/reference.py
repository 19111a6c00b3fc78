"""Plain-PyTorch LoRA: the oracle every backend is tested against.

Nothing here is fused or clever. Each function is the textbook formula

    y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ

written with ordinary torch operations, differentiated by torch's own autograd.
The only non-obvious piece is the dropout mask, which every backend must
reproduce bit for bit, so it is defined here once.

Dropout mask: counter layout
----------------------------
The mask of a tensor ``x`` is a pure function of ``(seed, p, element position)``.
``x`` is viewed as a matrix of ``rows = x.numel() // cols`` rows and
``cols = x.shape[-1]`` columns (row-major over the leading dimensions).

* Each row is split into ``words = ceil(cols / 8)`` groups of 8 columns.
  Element ``(i, j)`` belongs to Philox counter ``n = i * words + j // 8`` and
  uses lane ``l = j % 8`` of that counter's output.
* One Philox4x32-10 call (Random123 constants, 10 rounds) with
  counter ``(n mod 2³², n div 2³², 0, 0)`` and key ``(seed mod 2³², seed div 2³²)``
  (the 64-bit seed's low and high words) returns four 32-bit words
  ``o0, o1, o2, o3``. Lane ``l`` is the 16-bit value
  ``(o[l // 2] >> (16 * (l % 2))) & 0xFFFF``: lanes 0..7 are
  ``lo(o0), hi(o0), lo(o1), hi(o1), lo(o2), hi(o2), lo(o3), hi(o3)``.
  For ``n < 2³²`` this is exactly Triton's ``tl.randint4x(seed, n)``.
* With ``threshold = round(p · 2¹⁶)``, the element is kept when its lane value
  is ``>= threshold`` and kept elements are multiplied by
  ``2¹⁶ / (2¹⁶ − threshold)``. The drop probability is ``threshold / 2¹⁶``
  exactly, so the scaled branch is exactly unbiased. (``p`` is thereby
  quantised to multiples of 2⁻¹⁶; 0.05 becomes 3277/65536 = 0.050003.)

Because each row starts a fresh counter, a kernel that tiles x in blocks whose
column offsets are multiples of 8 owns whole counters and never needs a
neighbour's random numbers.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Random123 / Triton Philox4x32 constants.
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
LANES = 8            # 16-bit lanes per Philox call
LANE_BITS = 16
LANE_RANGE = 1 << LANE_BITS
_M32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and an
    int64 tensor ``b`` holding unsigned 32-bit values, without 64-bit overflow."""
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    ll = al * bl
    mid = al * bh + ah * bl + (ll >> 16)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = ah * bh + (mid >> 16)
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: Optional[torch.Tensor] = None,
               c2: Optional[torch.Tensor] = None, c3: Optional[torch.Tensor] = None,
               rounds: int = PHILOX_ROUNDS):
    """Philox4x32-``rounds`` on int64 tensors holding unsigned 32-bit words.

    ``seed`` is a Python int taken as a 64-bit unsigned value; its low word is
    key 0 and its high word key 1. Returns the four output words (int64 tensors
    with values in [0, 2³²)).
    """
    zero = torch.zeros_like(c0)
    c1 = zero if c1 is None else c1
    c2 = zero if c2 is None else c2
    c3 = zero if c3 is None else c3
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Lane values below this are dropped (see the module docstring)."""
    return int(math.floor(p * LANE_RANGE + 0.5))


def dropout_keep_scale(p: float) -> float:
    """Factor applied to kept elements: 2¹⁶ / (2¹⁶ − threshold)."""
    t = dropout_threshold(p)
    return LANE_RANGE / (LANE_RANGE - t) if t < LANE_RANGE else 0.0


def dropout_lanes(rows: int, cols: int, seed: int, device=None) -> torch.Tensor:
    """The 16-bit random lane of every element of a rows×cols matrix (int64)."""
    words = (cols + LANES - 1) // LANES
    n = torch.arange(rows * words, dtype=torch.int64, device=device)
    outs = philox4x32(seed, n & _M32, n >> 32)
    lanes = []
    for o in outs:
        lanes += [o & 0xFFFF, o >> 16]
    lanes = torch.stack(lanes, dim=-1).reshape(rows, words * LANES)
    return lanes[:, :cols]


def seed_to_int(seed) -> int:
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)


def dropout_mask(shape: Sequence[int], seed, p: float, dtype=torch.float32,
                 device=None) -> torch.Tensor:
    """0 for dropped elements and ``dropout_keep_scale(p)`` for kept ones."""
    shape = tuple(shape)
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape) // cols if cols else 0
    lanes = dropout_lanes(rows, cols, seed_to_int(seed), device)
    keep = lanes >= dropout_threshold(p)
    return (keep.to(dtype) * dropout_keep_scale(p)).reshape(shape)


def dropout(x: torch.Tensor, seed, p: float) -> torch.Tensor:
    if p == 0.0:
        return x
    return x * dropout_mask(x.shape, seed, p, x.dtype, x.device)


def _group_rows(out_rows: int, num_groups: int, groups: Sequence[int]):
    size = out_rows // num_groups
    return [(g * size, (g + 1) * size) for g in groups]


def delta_weight(lora_A, lora_B, num_groups: int = 1, groups: Sequence[int] = (0,),
                 out_rows: Optional[int] = None) -> torch.Tensor:
    """ΔW = B·A laid out as (out, in); groups not in ``groups`` are zero."""
    if out_rows is None:
        out_rows = lora_B.shape[0] * num_groups // max(len(groups), 1)
    size = out_rows // num_groups
    r = lora_A.shape[0] // max(len(groups), 1)
    delta = lora_A.new_zeros(out_rows, lora_A.shape[1])
    for i, (lo, hi) in enumerate(_group_rows(out_rows, num_groups, groups)):
        b = lora_B[i * size:(i + 1) * size]
        a = lora_A[i * r:(i + 1) * r]
        delta = delta.index_add(0, torch.arange(lo, hi, device=delta.device), b @ a)
    return delta


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                seed=0, fan_in_fan_out: bool = False, num_groups: int = 1,
                groups: Sequence[int] = (0,)) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ, group by group.

    ``weight`` is (out, in), or (in, out) with ``fan_in_fan_out``. The output
    features are split into ``num_groups`` equal groups; group ``groups[i]``
    gets the update from rows ``i·r:(i+1)·r`` of A and its slice of B (plain
    Linear is ``num_groups=1, groups=(0,)``). ``dropout_p`` is applied as given
    (pass 0 in eval mode).
    """
    w = weight.t() if fan_in_fan_out else weight
    y = F.linear(x, w, bias)
    return lora_delta(x, y, lora_A, lora_B, scaling, dropout_p, seed, num_groups, groups)


def lora_delta(x, base, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=0,
               num_groups: int = 1, groups: Sequence[int] = (0,)) -> torch.Tensor:
    """base + scaling · dropout(x)·Aᵀ·Bᵀ, group by group: the LoRA branch added
    to the output ``base`` (..., out) of a base layer computed elsewhere (a
    quantized layer, say). Groups and ``dropout_p`` as in ``lora_linear``."""
    out = base.shape[-1]
    xd = dropout(x, seed, dropout_p)
    size = out // num_groups
    r = lora_A.shape[0] // max(len(groups), 1)
    pieces = [torch.zeros_like(base[..., :size]) for _ in range(num_groups)]
    for i, g in enumerate(groups):
        a = lora_A[i * r:(i + 1) * r]
        b = lora_B[i * size:(i + 1) * size]
        pieces[g] = (xd @ a.t()) @ b.t() * scaling
    return base + torch.cat(pieces, dim=-1)


def lora_embedding(indices, weight, lora_A, lora_B, scaling: float,
                   padding_idx: Optional[int] = None) -> torch.Tensor:
    """y = W[idx] + scaling · Aᵀ[idx]·Bᵀ (A: r×num_embeddings, B: dim×r)."""
    y = F.embedding(indices, weight, padding_idx)
    after_a = F.embedding(indices, lora_A.t(), padding_idx)
    return y + (after_a @ lora_B.t()) * scaling


def merged_weight(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool = False,
                  num_groups: int = 1, groups: Sequence[int] = (0,)) -> torch.Tensor:
    """W + scaling·ΔW in the weight's own layout (out-of-place)."""
    out_rows = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    delta = delta_weight(lora_A, lora_B, num_groups, groups, out_rows) * scaling
    return weight + (delta.t() if fan_in_fan_out else delta).to(weight.dtype)


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool = False,
                     lora_bias=None) -> torch.Tensor:
    """‖W + scaling·(B·A + b_B·1ᵀ)‖ per output row, as PEFT's DoRA takes it
    (``lora_bias``, PEFT's ``lora_B.bias``, enters its ΔW on every column).
    Detached: DoRA treats the norm as a constant (paper §4.3)."""
    w = weight.t() if fan_in_fan_out else weight
    delta = lora_B @ lora_A
    if lora_bias is not None:
        delta = delta + lora_bias[:, None]
    return torch.linalg.norm(w + scaling * delta, dim=1).detach()


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float,
                dropout_p: float = 0.0, seed=0, fan_in_fan_out: bool = False,
                lora_bias=None) -> torch.Tensor:
    """DoRA (Liu et al. 2024) as PEFT computes it, with x̂ = dropout(x) and
    m = magnitude / ‖W + s·ΔW‖ (rows, detached):

        y = x·Wᵀ + bias + (m − 1)·(x̂·Wᵀ) + m·s·(x̂·Aᵀ·Bᵀ + b_B)
    """
    w = weight.t() if fan_in_fan_out else weight
    m = magnitude / dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out,
                                     lora_bias).to(x.dtype)
    xd = dropout(x, seed, dropout_p)
    branch = (xd @ lora_A.t()) @ lora_B.t()
    if lora_bias is not None:
        branch = branch + lora_bias
    return F.linear(x, w, bias) + (m - 1) * F.linear(xd, w) + m * scaling * branch
