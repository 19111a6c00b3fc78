"""The op surface: every kernel is reached through these ``lora_kernels`` ops.

The ops are defined by the compiled extension ``lora_kernels._C``
(``csrc/op_schemas.h``), and the dispatcher picks each op's kernel from the
tensors' device, as PyTorch's own ops do: a training step with plain tensors
runs only C++ below the module (``csrc/lora_linear.cpp``: the user-facing
composite ``lora_linear`` with its argument checks and dropout seed, the
autograd of ``lora_linear_fwd``, and the device kernel). This module adds
what Python has to:

* the fake (meta) kernels, so torch.compile and meta-device tracing see
  shapes without running anything;
* a fallback kernel for devices without a C++ one (CUDA without the CUDA
  extension: the Triton backend; anything else: the reference), which picks
  the backend with ``lora_kernels.backends.for_device``;
* the ops that run once per train()/eval() switch: ``merge_``/``unmerge_``
  (``custom_op``s, which also bump W's version counter) and
  ``merged_weight``;
* with ``LORA_KERNELS_BACKEND`` set when lora_kernels is imported, the
  device kernels of the ops become that backend's, for the whole process.

A backend asked for by name with ``use_backend`` takes the Python path of
``lora_kernels.routes`` (autograd.Functions that keep it for backward), as
do the ops when the compiled extension is not built (every op is then
defined here, on the reference backend). Asking for a device's own C++
backend (cpu on CPU tensors, cuda on CUDA tensors) takes the C++ path.

The backends implement the same functions with the same arguments:
``lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
fan_in_fan_out, num_groups, groups) -> (y, s)``
    ``x`` is 2-D (tokens, in), any strides. ``weight`` is (out, in), or
    (in, out) with ``fan_in_fan_out``. The ``out`` features form
    ``num_groups`` equal groups; ``groups`` lists the ones with a low-rank
    update, in the order of A's row blocks and B's row blocks (a plain Linear
    is ``num_groups=1, groups=[0]``). ``s = dropout(x)·Aᵀ`` (tokens, r·len(groups)),
    in float32 for half inputs and x's dtype otherwise, is kept for backward.
    ``seed`` is an int64 tensor of one element on x's device; the mask is the
    one defined in ``lora_kernels.reference``. ``dropout_p == 0`` means no
    dropout (eval mode passes 0).
``lora_linear_bwd(grad, x, weight, lora_A, lora_B, s, seed, scaling,
dropout_p, fan_in_fan_out, num_groups, groups, output_mask) -> (dx, dweight,
dbias, dA, dB)``
    ``output_mask`` has five flags in that order; an output not asked for is
    an empty tensor. ``x`` may be empty (numel 0) when neither dA nor dweight
    is asked for.
``lora_embedding_fwd(indices, weight, lora_A, lora_B, scaling) -> (y, s)``
    (the op also takes ``padding_idx``, which only its backward uses)
    ``indices`` is 1-D int64, ``weight`` (num, dim), A (r, num), B (dim, r);
    ``s = Aᵀ[indices]`` (tokens, r).
``lora_embedding_bwd(grad, indices, weight, lora_A, lora_B, s, scaling,
padding_idx, output_mask) -> (dweight, dA, dB)``
    ``padding_idx`` is -1 for none; the padding row gets no gradient.
``merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups)``
    In place, ``W += scaling·ΔW`` in W's layout (unmerge passes ``-scaling``).
``dropout(x, seed, p) -> Tensor``
    ``x`` times the mask of x's shape (a new tensor).
``lora_delta_fwd(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups,
groups) -> (y, s)``
    ``y = base + scaling·dropout(x)·Aᵀ·Bᵀ``: the branch around a base layer
    computed elsewhere, whose output ``base`` is (tokens, out) in x's dtype;
    groups, ``s`` and the mask as in ``lora_linear_fwd``.
``lora_delta_bwd(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p,
num_groups, groups, output_mask) -> (dx, dA, dB)``
    The branch's gradients (base's is ``grad`` itself); three flags.

DoRA's ops are composed from the kernels above, on every device
(``csrc/dora_linear.cpp``; ``lora_kernels.dora`` is the same in Python, for a
backend asked for by name, and has the math and the memory plan):
``dora_linear_fwd(x, weight, bias, lora_A, lora_B, mag, seed, scaling,
dropout_p, fan_in_fan_out) -> (y, s, z)``
    ``y = x·Wᵀ + bias + (m − 1)·(x̂·Wᵀ) + m·scaling·(x̂·Aᵀ)·Bᵀ`` with
    x̂ = dropout(x) and ``mag`` = m = magnitude / ‖W + scaling·B·A‖ (out,), in
    x's dtype; ``s`` as in ``lora_linear_fwd``, ``z = x̂·Wᵀ + scaling·x̂·Aᵀ·Bᵀ``
    (tokens, out) is kept for m's gradient.
``dora_linear_bwd(grad, x, weight, lora_A, lora_B, mag, s, z, seed, scaling,
dropout_p, fan_in_fan_out, output_mask) -> (dx, dweight, dbias, dA, dB, dmag)``
    Six flags.

The frozen GEMM over dropout's dropped entries (``csrc/dropped_linear.h``),
how DoRA's composite gets x̂·Wᵀ from x·Wᵀ on the CPU; internal, no autograd.
With 1 − D the dropped entries of x's shape and ``weight`` (out, in):
``dropped_linear(input, x, weight, seed, p, beta, alpha) -> Tensor``
    ``beta·input + alpha·((1 − D) ⊙ x)·weightᵀ`` (beta = 0 ignores input).
``dropped_linear_bwd_(dx, grad, weight, seed, p, alpha) -> ()``
    ``dx += alpha·(1 − D) ⊙ (grad·weight)``, in place.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
from torch import Tensor

from . import backends, dora as _dora

try:
    from . import _C  # noqa: F401  (defines the lora_kernels library: the C++ path)
    NATIVE = True
except ImportError:  # not built: the ops are defined here, on the reference backend
    NATIVE = False
if NATIVE:
    try:  # the CUDA kernels, where the CUDA extension is built (LORA_KERNELS_CUDA=1)
        from . import _C_cuda  # noqa: F401
    except ImportError:
        pass

_NS = "lora_kernels"
LIB = torch.library.Library(_NS, "FRAGMENT")
# The ops the compiled extension defines (csrc/op_schemas.h); the others
# (merge_, unmerge_, merged_weight) are always defined here.
NATIVE_OPS = ("lora_linear_fwd", "lora_linear_bwd", "lora_embedding_fwd",
               "lora_embedding_bwd", "dropout", "lora_delta_fwd", "lora_delta_bwd",
               "lora_linear", "lora_embedding", "lora_delta", "dora_linear_fwd",
               "dora_linear_bwd", "dora_linear", "dropped_linear", "dropped_linear_bwd_")
# Of those, the ones whose kernel for every device is the extension's own
# (csrc/dora_linear.cpp, csrc/dropped_linear.cpp): no Python kernel is added.
NATIVE_COMPOSITES = ("dora_linear_fwd", "dora_linear_bwd", "dropped_linear",
                     "dropped_linear_bwd_")


def lowrank_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the tokens×r product kept for backward (fp32 for half inputs)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _out_features(weight: Tensor, fan_in_fan_out: bool) -> int:
    return weight.shape[1] if fan_in_fan_out else weight.shape[0]


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _define(schema: str, impl, fake):
    """The op ``lora_kernels::<schema>`` with ``impl`` as its kernel for the
    devices that have no C++ one (``impl`` picks the backend;
    CompositeExplicitAutograd: every device, when the op is defined here) and
    ``fake`` as its fake kernel; returns the op (its default overload)."""
    name = schema.split("(", 1)[0]
    if not (NATIVE and name in NATIVE_OPS):
        LIB.define(schema)
    if not (NATIVE and name in NATIVE_COMPOSITES):
        LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{name}", fake, lib=LIB)
    return getattr(getattr(torch.ops, _NS), name).default


# ---------------------------------------------------------------------------
# Linear and MergedLinear
# ---------------------------------------------------------------------------

def _linear_fwd_impl(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out,
                     num_groups, groups):
    return backends.for_device(x.device).lora_linear_fwd(
        x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out,
        num_groups, groups)


def _linear_fwd_fake(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out,
                     num_groups, groups):
    torch._check(x.dim() == 2, lambda: f"lora_linear_fwd: x must be 2-D, got {x.dim()}-D")
    y = x.new_empty(x.shape[0], _out_features(weight, fan_in_fan_out))
    s = x.new_empty(x.shape[0], lora_A.shape[0], dtype=lowrank_dtype(x.dtype))
    return y, s


lora_linear_fwd = _define(
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, int num_groups, "
    "int[] groups) -> (Tensor, Tensor)", _linear_fwd_impl, _linear_fwd_fake)


def _linear_bwd_impl(grad, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p,
                     fan_in_fan_out, num_groups, groups, output_mask):
    return backends.for_device(grad.device).lora_linear_bwd(
        grad, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p, fan_in_fan_out,
        num_groups, groups, output_mask)


def _linear_grads_fake(grad, weight, lora_A, lora_B, fan_in_fan_out, wants):
    """(dx, dweight, dbias, dA, dB) of a linear layer's backward, empty where not wanted."""
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    dx = grad.new_empty(grad.shape[0], in_features) if wants[0] else _empty(grad)
    dw = weight.new_empty(weight.shape) if wants[1] else _empty(weight)
    db = grad.new_empty(grad.shape[1]) if wants[2] else _empty(grad)
    da = lora_A.new_empty(lora_A.shape) if wants[3] else _empty(lora_A)
    dB = lora_B.new_empty(lora_B.shape) if wants[4] else _empty(lora_B)
    return dx, dw, db, da, dB


def _linear_bwd_fake(grad, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p,
                     fan_in_fan_out, num_groups, groups, output_mask):
    return _linear_grads_fake(grad, weight, lora_A, lora_B, fan_in_fan_out, list(output_mask))


lora_linear_bwd = _define(
    "lora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor s, Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, "
    "int num_groups, int[] groups, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor)", _linear_bwd_impl, _linear_bwd_fake)


# ---------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------

def _embedding_fwd_impl(indices, weight, lora_A, lora_B, scaling, padding_idx):
    return backends.for_device(weight.device).lora_embedding_fwd(
        indices, weight, lora_A, lora_B, scaling)


def _embedding_fwd_fake(indices, weight, lora_A, lora_B, scaling, padding_idx):
    tokens = indices.shape[0]
    y = weight.new_empty(tokens, weight.shape[1])
    s = weight.new_empty(tokens, lora_A.shape[0], dtype=lowrank_dtype(weight.dtype))
    return y, s


lora_embedding_fwd = _define(
    "lora_embedding_fwd(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "float scaling, int padding_idx) -> (Tensor, Tensor)",
    _embedding_fwd_impl, _embedding_fwd_fake)


def _embedding_bwd_impl(grad, indices, weight, lora_A, lora_B, s, scaling, padding_idx,
                        output_mask):
    return backends.for_device(grad.device).lora_embedding_bwd(
        grad, indices, weight, lora_A, lora_B, s, scaling, padding_idx, output_mask)


def _embedding_bwd_fake(grad, indices, weight, lora_A, lora_B, s, scaling, padding_idx,
                        output_mask):
    wants = list(output_mask)
    dw = weight.new_empty(weight.shape) if wants[0] else _empty(weight)
    da = lora_A.new_empty(lora_A.shape) if wants[1] else _empty(lora_A)
    dB = lora_B.new_empty(lora_B.shape) if wants[2] else _empty(lora_B)
    return dw, da, dB


lora_embedding_bwd = _define(
    "lora_embedding_bwd(Tensor grad, Tensor indices, Tensor weight, Tensor lora_A, "
    "Tensor lora_B, Tensor s, float scaling, int padding_idx, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor)", _embedding_bwd_impl, _embedding_bwd_fake)


# ---------------------------------------------------------------------------
# Merge / unmerge, merged weight (conv), dropout
# ---------------------------------------------------------------------------

# merge_ / unmerge_ stay custom_ops: the decorator also registers the
# ADInplaceOrView kernel that bumps W's version counter, so autograd notices a
# merge between a forward that saved W and its backward. They run once per
# train()/eval() switch, not per step.

@torch.library.custom_op(f"{_NS}::merge_", mutates_args=("weight",))
def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
           fan_in_fan_out: bool, num_groups: int, groups: List[int]) -> None:
    backends.for_device(weight.device).merge_(weight, lora_A, lora_B, scaling,
                                              fan_in_fan_out, num_groups, groups)


@merge_.register_fake
def _(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups):
    return None


@torch.library.custom_op(f"{_NS}::unmerge_", mutates_args=("weight",))
def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             fan_in_fan_out: bool, num_groups: int, groups: List[int]) -> None:
    backends.for_device(weight.device).merge_(weight, lora_A, lora_B, -scaling,
                                              fan_in_fan_out, num_groups, groups)


@unmerge_.register_fake
def _(weight, lora_A, lora_B, scaling, fan_in_fan_out, num_groups, groups):
    return None


def _merged_weight_impl(weight, lora_A, lora_B, scaling):
    """W + scaling·(B·A) reshaped to W's shape (W may have any rank; conv)."""
    out = weight.contiguous().clone()
    backends.for_device(weight.device).merge_(
        out.view(lora_B.shape[0], lora_A.shape[1]), lora_A, lora_B, scaling, False, 1, [0])
    return out


def _merged_weight_fake(weight, lora_A, lora_B, scaling):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


merged_weight = _define(
    "merged_weight(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor",
    _merged_weight_impl, _merged_weight_fake)


def _dropout_impl(x, seed, p):
    return backends.for_device(x.device).dropout(x, seed, p)


def _dropout_fake(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


dropout = _define("dropout(Tensor x, Tensor seed, float p) -> Tensor", _dropout_impl,
                  _dropout_fake)


def _dropped_entries(like: Tensor, seed: Tensor, p: float) -> Tensor:
    """1 − D of ``like``'s shape: the entries dropout(·, seed, p) drops."""
    return (dropout(torch.ones_like(like, memory_format=torch.contiguous_format), seed, p) == 0
            ).to(like.dtype)


def _dropped_linear_impl(input, x, weight, seed, p, beta, alpha):
    prod = (x * _dropped_entries(x, seed, p)) @ weight.t()
    return prod * alpha if beta == 0 else input * beta + prod * alpha


def _dropped_linear_fake(input, x, weight, seed, p, beta, alpha):
    return x.new_empty(x.shape[0], weight.shape[0])


dropped_linear = _define(
    "dropped_linear(Tensor input, Tensor x, Tensor weight, Tensor seed, float p, float beta, "
    "float alpha) -> Tensor", _dropped_linear_impl, _dropped_linear_fake)


def _dropped_linear_bwd_impl(dx, grad, weight, seed, p, alpha):
    if p > 0 and dx.numel():
        dx.add_((grad @ weight) * _dropped_entries(dx, seed, p), alpha=alpha)


def _dropped_linear_bwd_fake(dx, grad, weight, seed, p, alpha):
    return None


dropped_linear_bwd_ = _define(
    "dropped_linear_bwd_(Tensor(a!) dx, Tensor grad, Tensor weight, Tensor seed, float p, "
    "float alpha) -> ()", _dropped_linear_bwd_impl, _dropped_linear_bwd_fake)


# ---------------------------------------------------------------------------
# The LoRA branch around a base layer computed elsewhere
# ---------------------------------------------------------------------------

def _delta_fwd_impl(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups):
    return backends.for_device(x.device).lora_delta_fwd(
        x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups)


def _delta_fwd_fake(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups):
    torch._check(x.dim() == 2, lambda: f"lora_delta_fwd: x must be 2-D, got {x.dim()}-D")
    y = base.new_empty(base.shape)
    s = x.new_empty(x.shape[0], lora_A.shape[0], dtype=lowrank_dtype(x.dtype))
    return y, s


lora_delta_fwd = _define(
    "lora_delta_fwd(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, Tensor seed, "
    "float scaling, float dropout_p, int num_groups, int[] groups) -> (Tensor, Tensor)",
    _delta_fwd_impl, _delta_fwd_fake)


def _delta_bwd_impl(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, num_groups, groups,
                    output_mask):
    return backends.for_device(grad.device).lora_delta_bwd(
        grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, num_groups, groups, output_mask)


def _delta_bwd_fake(grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, num_groups, groups,
                    output_mask):
    wants = list(output_mask)
    dx = grad.new_empty(grad.shape[0], lora_A.shape[1]) if wants[0] else _empty(grad)
    da = lora_A.new_empty(lora_A.shape) if wants[1] else _empty(lora_A)
    dB = lora_B.new_empty(lora_B.shape) if wants[2] else _empty(lora_B)
    return dx, da, dB


lora_delta_bwd = _define(
    "lora_delta_bwd(Tensor grad, Tensor x, Tensor lora_A, Tensor lora_B, Tensor s, Tensor seed, "
    "float scaling, float dropout_p, int num_groups, int[] groups, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor)", _delta_bwd_impl, _delta_bwd_fake)


# ---------------------------------------------------------------------------
# DoRA: composed from the kernels (the extension's composite, or the device
# backend's in Python)
# ---------------------------------------------------------------------------

def _dora_fwd_impl(x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
                   fan_in_fan_out):
    return _dora.linear_fwd(backends.for_device(x.device), x, weight, bias, lora_A, lora_B, mag,
                            seed, scaling, dropout_p, fan_in_fan_out)


def _dora_fwd_fake(x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
                   fan_in_fan_out):
    torch._check(x.dim() == 2, lambda: f"dora_linear_fwd: x must be 2-D, got {x.dim()}-D")
    y = x.new_empty(x.shape[0], _out_features(weight, fan_in_fan_out))
    s = x.new_empty(x.shape[0], lora_A.shape[0], dtype=lowrank_dtype(x.dtype))
    return y, s, torch.empty_like(y)


dora_linear_fwd = _define(
    "dora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor mag, Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out) -> "
    "(Tensor, Tensor, Tensor)", _dora_fwd_impl, _dora_fwd_fake)


def _dora_bwd_impl(grad, x, weight, lora_A, lora_B, mag, s, z, seed, scaling, dropout_p,
                   fan_in_fan_out, output_mask):
    return _dora.linear_bwd(backends.for_device(grad.device), grad, x, weight, lora_A, lora_B,
                            mag, s, z, seed, scaling, dropout_p, fan_in_fan_out, output_mask)


def _dora_bwd_fake(grad, x, weight, lora_A, lora_B, mag, s, z, seed, scaling, dropout_p,
                   fan_in_fan_out, output_mask):
    wants = list(output_mask)
    dm = mag.new_empty(mag.shape) if wants[5] else _empty(mag)
    return _linear_grads_fake(grad, weight, lora_A, lora_B, fan_in_fan_out, wants) + (dm,)


dora_linear_bwd = _define(
    "dora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor mag, Tensor s, Tensor z, Tensor seed, float scaling, float dropout_p, "
    "bool fan_in_fan_out, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)", _dora_bwd_impl, _dora_bwd_fake)


OPS: Sequence = (lora_linear_fwd, lora_linear_bwd, lora_embedding_fwd, lora_embedding_bwd,
                 merge_, unmerge_, merged_weight, dropout, lora_delta_fwd, lora_delta_bwd,
                 dora_linear_fwd, dora_linear_bwd)


def _route_devices_to_env_backend() -> None:
    """``LORA_KERNELS_BACKEND`` set when lora_kernels is imported: the CPU and
    CUDA kernels of the ops become that backend's, for the whole process
    (the C++ autograd above them stays, so backward runs it too)."""
    name = backends.env_choice()
    if not NATIVE or name == "auto":
        return
    impls = {"lora_linear_fwd": _linear_fwd_impl, "lora_linear_bwd": _linear_bwd_impl,
             "lora_embedding_fwd": _embedding_fwd_impl, "lora_embedding_bwd": _embedding_bwd_impl,
             "dropout": _dropout_impl, "lora_delta_fwd": _delta_fwd_impl,
             "lora_delta_bwd": _delta_bwd_impl, "dropped_linear": _dropped_linear_impl,
             "dropped_linear_bwd_": _dropped_linear_bwd_impl}
    with warnings.catch_warnings():  # "overriding a previously registered kernel"
        warnings.simplefilter("ignore")
        for key, native in (("CPU", "cpu"), ("CUDA", "cuda")):
            if name != native:
                for op, impl in impls.items():
                    LIB.impl(op, impl, key)


_route_devices_to_env_backend()


# ---------------------------------------------------------------------------
# torch.compile: let the compiler see a traceable backend's kernels
# ---------------------------------------------------------------------------

def _traceable_backend(device: torch.device):
    """The TRACEABLE backend (Triton: its kernels are triton_ops launched
    through wrap_triton) to compile the ops of a CUDA tensor with: the one
    asked for by name if it is traceable; under auto, Triton wherever it can
    run (also where the dispatcher's eager kernels are the CUDA extension's).
    None: the op stays an opaque call in the graph."""
    if device.type != "cuda":
        return None  # CPU tensors under the Triton interpreter: wrap_triton cannot trace
    if backends.requested() == "auto":
        return None if backends.reasons("triton", device) else backends.get("triton")
    backend = backends.for_device(device)
    return backend if getattr(backend, "TRACEABLE", False) else None


def _decompose_when_traceable(op, device_arg: int, call) -> None:
    """Under functionalization (AOTAutograd, i.e. torch.compile), the op is
    replaced by ``call(backend, *args)`` with a traceable backend (see
    _traceable_backend), so the compiler sees the Triton kernels instead of
    an opaque call."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def decompose(mode, op_overload, types, args, kwargs):
        backend = _traceable_backend(args[device_arg].device)
        if backend is None:
            return mode.__torch_dispatch__(op_overload, types, args, kwargs)
        with mode:
            return call(backend, *args, **kwargs)

    torch.library.register_torch_dispatch(op, FunctionalTensorMode, decompose, lib=LIB)


_decompose_when_traceable(lora_linear_fwd, 0, lambda b, *a: b.lora_linear_fwd(*a))
_decompose_when_traceable(lora_linear_bwd, 0, lambda b, *a: b.lora_linear_bwd(*a))
_decompose_when_traceable(lora_embedding_fwd, 1,  # padding_idx is for backward only
                          lambda b, *a: b.lora_embedding_fwd(*a[:5]))
_decompose_when_traceable(lora_embedding_bwd, 0, lambda b, *a: b.lora_embedding_bwd(*a))
_decompose_when_traceable(dropout, 0, lambda b, *a: b.dropout(*a))
_decompose_when_traceable(dora_linear_fwd, 0, lambda b, *a: _dora.linear_fwd(b, *a))
_decompose_when_traceable(dora_linear_bwd, 0, lambda b, *a: _dora.linear_bwd(b, *a))


from . import routes  # noqa: E402,F401  (the Python autograd and the named-backend routes)
