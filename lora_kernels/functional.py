"""Functional LoRA: the ``lora_kernels`` ops with Python's conveniences.

These are what the modules call; they can also be used directly::

    y = lora_kernels.functional.lora_linear(x, W, b, A, B, scaling=2.0,
                                            dropout_p=0.05, training=True)

Inputs may have any number of leading batch dimensions. A dropout seed is
drawn from the default generator of x's device on every training forward with
dropout, so ``torch.manual_seed`` makes runs repeatable and activation
checkpointing's recompute (which restores the RNG state) regenerates the same
mask. Under ``torch.autocast`` the operands are cast to the autocast dtype.

With the compiled extension, ``lora_linear``/``lora_grouped_linear``,
``lora_embedding``, ``lora_delta`` and ``dora_linear`` are one call of the
C++ composite ops ``torch.ops.lora_kernels.lora_linear`` (and so on;
``csrc/<op>.cpp``), which do all of the above. ``_linear_composite`` and its
siblings below are the same in Python: they run without the extension, and
when a backend is asked for by name (the ops' Python routes,
``lora_kernels.routes``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import distributed, dora, ops, routes

_lk = torch.ops.lora_kernels


def _fail(name: str, got, expected) -> None:
    raise ValueError(f"{name}: got {got}, expected {expected}")


def check_dropout(p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        _fail("lora_dropout", repr(p), "a float in [0, 1)")
    return float(p)


def _check_same(x: Tensor, others, x_name: str = "x") -> None:
    for name, t in others:
        if t is None:
            continue
        if t.device != x.device:
            _fail(f"{name}.device", t.device, f"{x_name}'s device {x.device}")
        if t.dtype != x.dtype:
            cast = " (cast x or the layer)" if x_name == "x" else ""
            _fail(f"{name}.dtype", t.dtype, f"{x_name}'s dtype {x.dtype}{cast}")


def draw_seed(device) -> Tensor:
    """A fresh 64-bit dropout seed from ``device``'s default generator."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64, device=device)


def _no_seed(x: Tensor) -> Tensor:
    return x.new_zeros((), dtype=torch.int64)


def _autocast(x: Tensor, *tensors):
    """Under torch.autocast, cast the operands to the autocast dtype as
    F.linear's autocast rule does (the op itself is not on autocast's lists)."""
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return (x,) + tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t
                 for t in (x,) + tensors)


def _check_linear_x(x: Tensor, weight: Tensor, fan_in_fan_out: bool):
    """A linear layer's W (2-D; (in, out) with fan_in_fan_out) and x (..., in):
    (out_features, in_features)."""
    if weight.dim() != 2:
        _fail("weight.dim()", weight.dim(), 2)
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        _fail("x.shape", tuple(x.shape), f"(..., {in_f}) (in_features={in_f})")
    return out_f, in_f


def enabled_groups(enable_lora: Sequence[bool]):
    return [i for i, on in enumerate(enable_lora) if on]


def lora_grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                        lora_B: Tensor, scaling: float, enable_lora: Sequence[bool],
                        dropout_p: float = 0.0, training: bool = True,
                        fan_in_fan_out: bool = False) -> Tensor:
    """MergedLinear's form: out features in ``len(enable_lora)`` equal groups,
    each enabled group with its own rank-r update (A: r·E×in, B: out/G·E×r)."""
    dropout_p = check_dropout(dropout_p)
    groups = enabled_groups(enable_lora)
    if ops.NATIVE:
        return _lk.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p,
                               bool(training), bool(fan_in_fan_out), len(enable_lora), groups)
    return _linear_composite(_lk.lora_linear_fwd, x, weight, bias, lora_A, lora_B,
                             float(scaling), dropout_p, bool(training), bool(fan_in_fan_out),
                             len(enable_lora), groups)


def _linear_composite(fwd, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                      lora_B: Tensor, scaling: float, dropout_p: float, training: bool,
                      fan_in_fan_out: bool, num_groups: int, groups: List[int]) -> Tensor:
    """The lora_linear op in Python, with ``fwd`` as lora_linear_fwd."""
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    check_dropout(dropout_p)
    out_f, in_f = _check_linear_x(x, weight, fan_in_fan_out)
    if num_groups == 0 or out_f % num_groups:
        _fail("len(enable_lora)", num_groups, f"a divisor of out_features={out_f}")
    if not groups:
        raise ValueError("enable_lora: no group is enabled; call F.linear instead")
    r = lora_A.shape[0] // len(groups) if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or r == 0 or lora_A.shape != (r * len(groups), in_f):
        _fail("lora_A.shape", tuple(lora_A.shape), f"(r*{len(groups)}, {in_f})")
    if lora_B.shape != (out_f // num_groups * len(groups), r):
        _fail("lora_B.shape", tuple(lora_B.shape), (out_f // num_groups * len(groups), r))
    if bias is not None and bias.shape != (out_f,):
        _fail("bias.shape", tuple(bias.shape), (out_f,))
    _check_same(x, [("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)])

    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0 else _no_seed(x)
    x2 = x.reshape(-1, in_f)
    weight, fan_in_fan_out = _standard_layout(weight, fan_in_fan_out)
    y, _ = fwd(x2, weight, bias, lora_A, lora_B, seed, float(scaling), p, fan_in_fan_out,
               num_groups, list(groups))
    return _unflatten(y, (*x.shape[:-1], out_f))


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, scaling: float, dropout_p: float = 0.0, training: bool = True,
                fan_in_fan_out: bool = False) -> Tensor:
    """``x·Wᵀ + bias + scaling·dropout(x)·Aᵀ·Bᵀ`` (W is (in, out) with fan_in_fan_out)."""
    return lora_grouped_linear(x, weight, bias, lora_A, lora_B, scaling, [True], dropout_p,
                               training, fan_in_fan_out)


def lora_embedding(indices: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                   scaling: float, padding_idx: Optional[int] = None) -> Tensor:
    """``W[idx] + scaling·Aᵀ[idx]·Bᵀ`` (A: r×num_embeddings, B: embedding_dim×r)."""
    if ops.NATIVE:
        return _lk.lora_embedding(indices, weight, lora_A, lora_B, float(scaling), padding_idx)
    return _embedding_composite(_lk.lora_embedding_fwd, indices, weight, lora_A, lora_B,
                                float(scaling), padding_idx)


def _embedding_composite(fwd, indices: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                         scaling: float, padding_idx: Optional[int]) -> Tensor:
    """The lora_embedding op in Python, with ``fwd`` as lora_embedding_fwd."""
    if indices.dtype not in (torch.int64, torch.int32):
        _fail("indices.dtype", indices.dtype, "torch.int64 or torch.int32")
    if weight.dim() != 2:
        _fail("weight.dim()", weight.dim(), 2)
    num, dim = weight.shape
    r = lora_A.shape[0] if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or lora_A.shape != (r, num) or r == 0:
        _fail("lora_A.shape", tuple(lora_A.shape), f"(r, {num})")
    if lora_B.shape != (dim, r):
        _fail("lora_B.shape", tuple(lora_B.shape), (dim, r))
    _check_same(weight, [("lora_A", lora_A), ("lora_B", lora_B)], "weight")
    if indices.device != weight.device:
        _fail("indices.device", indices.device, f"weight's device {weight.device}")
    flat = indices.reshape(-1).long()
    if flat.numel() and flat.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(flat)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num:
            _fail("indices", f"values in [{lo}, {hi}]", f"values in [0, {num - 1}]")
    pad = -1 if padding_idx is None else padding_idx % num
    y, _ = fwd(flat, weight, lora_A, lora_B, float(scaling), pad)
    return _unflatten(y, (*indices.shape, dim))


def lora_delta(x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
               dropout_p: float = 0.0, training: bool = True,
               enable_lora: Sequence[bool] = (True,)) -> Tensor:
    """``base + scaling·dropout(x)·Aᵀ·Bᵀ``: the LoRA branch added to the output
    ``base`` (..., out) of a base layer computed elsewhere (a quantized layer,
    a module with hooks), which runs as its own module. x, base, A and B have
    one dtype (cast the r×in and out×r adapters to x's, not x to theirs);
    ``enable_lora`` groups the out features as in ``lora_grouped_linear``."""
    dropout_p = check_dropout(dropout_p)
    groups = enabled_groups(enable_lora)
    if ops.NATIVE:
        return _lk.lora_delta(x, base, lora_A, lora_B, float(scaling), dropout_p,
                              bool(training), len(enable_lora), groups)
    return _delta_composite(_lk.lora_delta_fwd, x, base, lora_A, lora_B, float(scaling),
                            dropout_p, bool(training), len(enable_lora), groups)


def _delta_composite(fwd, x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, training: bool, num_groups: int,
                     groups: List[int]) -> Tensor:
    """The lora_delta op in Python, with ``fwd`` as lora_delta_fwd."""
    x, base, lora_A, lora_B = _autocast(x, base, lora_A, lora_B)
    check_dropout(dropout_p)
    if x.dim() == 0:
        _fail("x.dim()", 0, "at least 1")
    in_f = x.shape[-1]
    if base.dim() != x.dim() or base.shape[:-1] != x.shape[:-1]:
        _fail("base.shape", tuple(base.shape),
              f"x's leading dimensions {tuple(x.shape)} with the out features last")
    out_f = base.shape[-1]
    if num_groups == 0 or out_f % num_groups:
        _fail("len(enable_lora)", num_groups, f"a divisor of out_features={out_f}")
    if not groups:
        raise ValueError("enable_lora: no group is enabled")
    r = lora_A.shape[0] // len(groups) if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or r == 0 or lora_A.shape != (r * len(groups), in_f):
        _fail("lora_A.shape", tuple(lora_A.shape), f"(r*{len(groups)}, {in_f})")
    if lora_B.shape != (out_f // num_groups * len(groups), r):
        _fail("lora_B.shape", tuple(lora_B.shape), (out_f // num_groups * len(groups), r))
    _check_same(x, [("base", base), ("lora_A", lora_A), ("lora_B", lora_B)])
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0 else _no_seed(x)
    y, _ = fwd(x.reshape(-1, in_f), base.reshape(-1, out_f), lora_A, lora_B, seed,
               float(scaling), p, num_groups, list(groups))
    return _unflatten(y, tuple(base.shape))


# W -> (W's version, data pointer, fan_in_fan_out, ‖W_i‖²): a frozen W's row
# norms are computed once, and again only when W changes in place.
_ROW_SQ = WeakIdKeyDictionary()


def weight_row_sq(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """‖W_i‖² per output row, cached on W (keyed on its version counter and
    storage: an in-place change made through ``W.data``, which has a version
    counter of its own, is not seen; change W itself under ``torch.no_grad()``)."""
    if torch.compiler.is_compiling() or distributed.is_dtensor(weight):
        return dora.weight_row_sq(weight, fan_in_fan_out)
    key = (weight._version, weight.data_ptr(), bool(fan_in_fan_out))
    hit = _ROW_SQ.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    sq = dora.weight_row_sq(weight.detach(), fan_in_fan_out)
    _ROW_SQ[weight] = (key, sq)
    return sq


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     fan_in_fan_out: bool = False, lora_bias: Optional[Tensor] = None) -> Tensor:
    """‖W + scaling·(B·A + b_B·1ᵀ)‖ per output row (detached; float32, or
    float64 for a float64 W) without building the out×in sum; ‖W_i‖² is cached."""
    sq = weight_row_sq(weight, fan_in_fan_out)
    return dora.weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), sq,
                            float(scaling), bool(fan_in_fan_out),
                            None if lora_bias is None else lora_bias.detach())


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, magnitude: Tensor, scaling: float, dropout_p: float = 0.0,
                training: bool = True, fan_in_fan_out: bool = False,
                lora_bias: Optional[Tensor] = None) -> Tensor:
    """DoRA, PEFT's math: with x̂ = dropout(x) and m = magnitude / ‖W + s·ΔW‖
    (rows, detached; ``dora_weight_norm``),

        y = x·Wᵀ + bias + (m − 1)·(x̂·Wᵀ) + m·s·(x̂·Aᵀ·Bᵀ + lora_bias)

    ``lora_bias`` is PEFT's ``lora_B.bias`` (``lora_bias=True``), ΔW = B·A + b_B·1ᵀ.
    Differentiable in x, A, B, magnitude, lora_bias (and W, bias)."""
    dropout_p = check_dropout(dropout_p)
    if weight.dim() != 2:
        _fail("weight.dim()", weight.dim(), 2)
    weight_sq = weight_row_sq(weight, fan_in_fan_out)
    args = (x, weight, bias, lora_A, lora_B, magnitude, weight_sq, float(scaling), dropout_p,
            bool(training), bool(fan_in_fan_out), lora_bias)
    if ops.NATIVE:
        return _lk.dora_linear(*args)
    return _dora_composite(_lk.dora_linear_fwd, *args)


def _dora_composite(fwd, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, magnitude: Tensor, weight_sq: Tensor, scaling: float,
                    dropout_p: float, training: bool, fan_in_fan_out: bool,
                    lora_bias: Optional[Tensor]) -> Tensor:
    """The dora_linear op in Python, with ``fwd`` as dora_linear_fwd and
    ``weight_sq`` = ‖W_i‖² (``weight_row_sq``)."""
    x, weight, bias, lora_A, lora_B, magnitude, lora_bias = _autocast(
        x, weight, bias, lora_A, lora_B, magnitude, lora_bias)
    check_dropout(dropout_p)
    out_f, in_f = _check_linear_x(x, weight, fan_in_fan_out)
    r = lora_A.shape[0] if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or r == 0 or lora_A.shape != (r, in_f):
        _fail("lora_A.shape", tuple(lora_A.shape), f"(r, {in_f})")
    if lora_B.shape != (out_f, r):
        _fail("lora_B.shape", tuple(lora_B.shape), (out_f, r))
    for name, t in (("bias", bias), ("magnitude", magnitude), ("lora_bias", lora_bias),
                    ("weight_sq", weight_sq)):
        if t is not None and t.shape != (out_f,):
            _fail(f"{name}.shape", tuple(t.shape), (out_f,))
    _check_same(x, [("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("magnitude", magnitude), ("lora_bias", lora_bias)])
    acc = dora.acc_dtype(weight.dtype)
    norm = dora.weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(),
                            weight_sq.to(acc), scaling, fan_in_fan_out,
                            None if lora_bias is None else lora_bias.detach())
    # m in x's dtype, the norm rounded to it first, as PEFT does.
    mag = magnitude / norm.to(x.dtype)
    p = dropout_p if training else 0.0
    seed = draw_seed(x.device) if p > 0 else _no_seed(x)
    weight, fan_in_fan_out = _standard_layout(weight, fan_in_fan_out)
    y, _, _ = fwd(x.reshape(-1, in_f), weight, bias, lora_A, lora_B, mag, seed, scaling, p,
                  fan_in_fan_out)
    if lora_bias is not None:
        y = y + (mag * scaling) * lora_bias
    return _unflatten(y, (*x.shape[:-1], out_f))


def _unflatten(y: Tensor, shape) -> Tensor:
    """The op's 2-D output in the caller's shape, as a tensor of its own
    rather than a view (as F.linear returns): FSDP2 warns about modules that
    return views, since an in-place op on one would skip its backward hook."""
    if y.shape == shape:
        return y
    return torch.ops.aten._unsafe_view(y, shape)


def _standard_layout(weight: Tensor, fan_in_fan_out: bool):
    """A fan_in_fan_out weight that is the transpose of a contiguous (out, in)
    matrix (loralib stores it so) is passed as that matrix."""
    if fan_in_fan_out and weight.dim() == 2 and not weight.is_contiguous() \
            and weight.t().is_contiguous():
        return weight.t(), False
    return weight, bool(fan_in_fan_out)


def _check_merge(weight, lora_A, lora_B, fan_in_fan_out, enable_lora):
    if weight.dim() > 2:  # a conv weight: ΔW = (B·A).view(W.shape)
        rows = lora_B.shape[0] if lora_B.dim() == 2 else 0
        if fan_in_fan_out or list(enable_lora) != [True] or lora_A.dim() != 2 \
                or rows * lora_A.shape[1] != weight.numel():
            _fail("weight.shape", tuple(weight.shape),
                  "a 2-D weight, or a conv weight of lora_B.shape[0] * lora_A.shape[1] "
                  "elements (no fan_in_fan_out, one group)")
        return 1, [0]
    if weight.dim() != 2:
        _fail("weight.dim()", weight.dim(), 2)
    out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    groups = enabled_groups(enable_lora)
    if not groups or out_f % len(enable_lora):
        _fail("enable_lora", list(enable_lora), f"groups dividing out_features={out_f}, "
              "at least one enabled")
    r = lora_A.shape[0] // len(groups) if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or r == 0 or lora_A.shape != (r * len(groups), in_f):
        _fail("lora_A.shape", tuple(lora_A.shape), f"(r*{len(groups)}, {in_f})")
    if lora_B.shape != (out_f // len(enable_lora) * len(groups), r):
        _fail("lora_B.shape", tuple(lora_B.shape), (out_f // len(enable_lora) * len(groups), r))
    if lora_A.device != weight.device or lora_B.device != weight.device:
        _fail("lora_A.device/lora_B.device", (lora_A.device, lora_B.device), weight.device)
    return len(enable_lora), groups


def _merge_target(weight: Tensor, lora_A: Tensor, lora_B: Tensor, fan_in_fan_out: bool):
    """The (weight, fan_in_fan_out) the merge op takes: a conv weight viewed as
    B's rows × A's columns (a DTensor one as it is: lora_kernels.distributed
    views each rank's block), a loralib-style transposed W as its transpose."""
    if weight.dim() > 2:
        if distributed.is_dtensor(weight):
            return weight, False
        return weight.view(lora_B.shape[0], lora_A.shape[1]), False
    return _standard_layout(weight, fan_in_fan_out)


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
           fan_in_fan_out: bool = False, enable_lora: Sequence[bool] = (True,)) -> None:
    """In place: W += scaling·ΔW (in W's layout; a conv weight of any shape
    takes (B·A).view(W.shape)). W, A and B may be DTensors (FSDP2): each rank
    updates its own shard (``lora_kernels.distributed``)."""
    distributed.register()
    num_groups, groups = _check_merge(weight, lora_A, lora_B, fan_in_fan_out, enable_lora)
    weight, fan_in_fan_out = _merge_target(weight, lora_A, lora_B, fan_in_fan_out)
    _lk.merge_(weight, lora_A, lora_B, float(scaling), fan_in_fan_out, num_groups, groups)


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             fan_in_fan_out: bool = False, enable_lora: Sequence[bool] = (True,)) -> None:
    """In place: W -= scaling·ΔW (in W's layout); shapes and DTensors as in ``merge_``."""
    distributed.register()
    num_groups, groups = _check_merge(weight, lora_A, lora_B, fan_in_fan_out, enable_lora)
    weight, fan_in_fan_out = _merge_target(weight, lora_A, lora_B, fan_in_fan_out)
    _lk.unmerge_(weight, lora_A, lora_B, float(scaling), fan_in_fan_out, num_groups, groups)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``W + scaling·(B·A).view(W.shape)``, differentiable in W, A and B (conv layers)."""
    if lora_B.shape[0] * lora_A.shape[1] != weight.numel():
        _fail("lora_B.shape[0] * lora_A.shape[1]", lora_B.shape[0] * lora_A.shape[1],
              f"weight.numel()={weight.numel()}")
    _check_same(weight, [("lora_A", lora_A), ("lora_B", lora_B)])
    return _lk.merged_weight(weight, lora_A, lora_B, float(scaling))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Dropout with the Philox mask of ``lora_kernels.reference`` (fresh seed)."""
    p = check_dropout(p)
    if not training or p == 0.0:
        return x
    return _lk.dropout(x.contiguous(), draw_seed(x.device), p)


# The composites are the routes of the C++ composite ops when a backend is
# asked for by name: they call the kernels' own routes (that backend).
if ops.NATIVE:
    routes.route(_lk.lora_linear.default,
                 lambda *a: _linear_composite(routes.ROUTES[ops.lora_linear_fwd], *a))
    routes.route(_lk.lora_embedding.default,
                 lambda *a: _embedding_composite(routes.ROUTES[ops.lora_embedding_fwd], *a))
    routes.route(_lk.lora_delta.default,
                 lambda *a: _delta_composite(routes.ROUTES[ops.lora_delta_fwd], *a))
    routes.route(_lk.dora_linear.default,
                 lambda *a: _dora_composite(routes.ROUTES[ops.dora_linear_fwd], *a))
