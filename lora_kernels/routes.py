"""The Python path of the ops: autograd.Functions that run a backend asked for by name.

Normally the dispatcher runs each op's C++ autograd and device kernel
(``lora_kernels.ops``). The ops take this path instead

* when a backend is asked for by name with ``use_backend(name)`` (a backend
  other than the tensors' device's own C++ one): ``use_backend`` pushes
  ``_Route``, a TorchFunctionMode that sends the ``lora_kernels`` ops to
  their routes (``ROUTES``). The forward runs that backend below autograd;
  the autograd.Function keeps the backend for its backward, which may run on
  another thread (CUDA's device thread) or outside the block;
* when the compiled extension is not built: these Functions are then the
  ops' autograd kernels, on the backend ``auto`` picks (the reference).

The user-facing composites' routes (``lora_linear``, ``lora_embedding``) are
their Python versions in ``lora_kernels.functional``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from . import backends, ops

# op -> its Python route, used when a backend is asked for by name (_Route).
ROUTES: Dict[object, Callable] = {}


def route(op, fn) -> None:
    """``fn`` runs ``op`` when a backend is asked for by name (see _Route)."""
    ROUTES[op] = fn
    ROUTES[op.overloadpacket] = fn


def _register_autograd(op, function, differentiable_args, impl) -> None:
    """The Python autograd of ``op``: ``function.apply`` (an autograd.Function
    whose forward runs ``impl``, the backend asked for, below autograd) when
    a graph is needed, ``impl`` directly otherwise. It is the op's route for
    a backend asked for by name, and, when the op is defined here, its
    autograd kernel (the compiled extension has its own, in C++)."""
    def autograd_kernel(*args):
        if torch.is_grad_enabled() and any(
                args[i] is not None and args[i].requires_grad for i in differentiable_args):
            return function.apply(*args)
        return _run(op, impl, *args)

    route(op, autograd_kernel)
    name = op._schema.name.split("::", 1)[1]
    if not (ops.NATIVE and name in ops.NATIVE_OPS):
        ops.LIB.impl(name, autograd_kernel, "Autograd")


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


_PLAIN = (Tensor, torch.nn.Parameter)


def _run(op, impl, *args):
    """``op(*args)`` below autograd, from inside the op's own autograd.Function.

    With plain tensors and no Python dispatch mode active (no FakeTensor, no
    functionalization, no user mode that must see the op), the op's
    implementation ``impl`` is called directly: the second trip through the
    dispatcher into Python would only lead there, and costs ~0.1 ms per call
    with the interpreter's caches cold. Otherwise the op is redispatched."""
    if torch._C._len_torch_dispatch_stack() == 0 and all(
            type(a) in _PLAIN for a in args if isinstance(a, Tensor)):
        return impl(*args)
    return _below_autograd(op, *args)


def _run_backward(ctx, op, impl, *args):
    """``_run`` for a backward op, on the backend its forward asked for
    (``ctx.backend``): backward may run on another thread (CUDA's device
    thread) or outside the forward's use_backend() block."""
    with backends.use_backend(ctx.backend):
        return _run(op, impl, *args)


def _hold(ctx, s, *saved) -> None:
    """The end of a forward: its output s (tokens×r) gets no gradient (and no
    zeros are made for it), ``saved`` is held for backward, and so is the
    backend asked for (see _run_backward)."""
    ctx.mark_non_differentiable(s)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved)
    ctx.backend = backends.requested()


def _asked(grads, mask):
    """The gradients asked for (``mask``), None for the others."""
    return tuple(g if want else None for g, want in zip(grads, mask))


# The kernels' own routes: the backend asked for, below autograd (the
# forward ops' routes, with their autograd, follow).
for _op, _impl in ((ops.lora_linear_bwd, ops._linear_bwd_impl),
                   (ops.lora_embedding_bwd, ops._embedding_bwd_impl),
                   (ops.lora_delta_bwd, ops._delta_bwd_impl),
                   (ops.dora_linear_bwd, ops._dora_bwd_impl)):
    route(_op, lambda *args, _op=_op, _impl=_impl: _run(_op, _impl, *args))


# ---------------------------------------------------------------------------
# Linear and MergedLinear
# ---------------------------------------------------------------------------

class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, fan_in_fan_out,
                num_groups, groups):
        y, s = _run(ops.lora_linear_fwd, ops._linear_fwd_impl, x, weight, bias, lora_A,
                    lora_B, seed, scaling, dropout_p, fan_in_fan_out, num_groups, groups)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        ctx.output_mask = [need_x, need_w, need_b, need_a, need_bb]
        ctx.args = (scaling, dropout_p, fan_in_fan_out, num_groups, list(groups))
        # Held for backward: x only when dA or dW needs it; s (tokens×r); the
        # seed (8 bytes) so the mask is regenerated, never stored. weight, A
        # and B are parameters.
        _hold(ctx, s, x if (need_a or need_w) else None, weight, lora_A, lora_B, s, seed)
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_s):
        if grad_y is None:
            return (None,) * 11
        x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
        if x is None:
            x = grad_y.new_empty(0)
        grads = _run_backward(ctx, ops.lora_linear_bwd, ops._linear_bwd_impl, grad_y, x, weight,
                              lora_A, lora_B, s, seed, *ctx.args, ctx.output_mask)
        return _asked(grads, ctx.output_mask) + (None,) * 6


_register_autograd(ops.lora_linear_fwd, _LinearFunction, (0, 1, 2, 3, 4), ops._linear_fwd_impl)


# ---------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------

class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, lora_A, lora_B, scaling, padding_idx):
        y, s = _run(ops.lora_embedding_fwd, ops._embedding_fwd_impl, indices, weight,
                    lora_A, lora_B, scaling, padding_idx)
        ctx.output_mask = list(ctx.needs_input_grad[1:4])
        ctx.scaling = scaling
        ctx.padding_idx = padding_idx
        # Held for backward: the indices, s = Aᵀ[indices] (tokens×r) and the
        # parameters.
        _hold(ctx, s, indices, weight, lora_A, lora_B, s)
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_s):
        if grad_y is None:
            return (None,) * 6
        indices, weight, lora_A, lora_B, s = ctx.saved_tensors
        grads = _run_backward(ctx, ops.lora_embedding_bwd, ops._embedding_bwd_impl, grad_y, indices,
                              weight, lora_A, lora_B, s, ctx.scaling, ctx.padding_idx,
                              ctx.output_mask)
        return (None,) + _asked(grads, ctx.output_mask) + (None, None)


_register_autograd(ops.lora_embedding_fwd, _EmbeddingFunction, (1, 2, 3), ops._embedding_fwd_impl)


# ---------------------------------------------------------------------------
# The branch around a base layer computed elsewhere
# ---------------------------------------------------------------------------

class _DeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups):
        y, s = _run(ops.lora_delta_fwd, ops._delta_fwd_impl, x, base, lora_A, lora_B, seed,
                    scaling, dropout_p, num_groups, groups)
        need_x, need_base, need_a, need_bb = ctx.needs_input_grad[:4]
        ctx.output_mask = [need_x, need_a, need_bb]
        ctx.need_base = need_base
        ctx.args = (scaling, dropout_p, num_groups, list(groups))
        # Held for backward: x only when dA needs it; s (tokens×r); the seed
        # (8 bytes); A and B. Not the base layer's output.
        _hold(ctx, s, x if need_a else None, lora_A, lora_B, s, seed)
        return y, s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_s):
        if grad_y is None:
            return (None,) * 9
        x, lora_A, lora_B, s, seed = ctx.saved_tensors
        if x is None:
            x = grad_y.new_empty(0)
        dx = dA = dB = None
        if any(ctx.output_mask):
            dx, dA, dB = _asked(_run_backward(ctx, ops.lora_delta_bwd, ops._delta_bwd_impl,
                                              grad_y, x, lora_A, lora_B, s, seed, *ctx.args,
                                              ctx.output_mask), ctx.output_mask)
        return (dx, grad_y if ctx.need_base else None, dA, dB) + (None,) * 5


_register_autograd(ops.lora_delta_fwd, _DeltaFunction, (0, 1, 2, 3), ops._delta_fwd_impl)


# ---------------------------------------------------------------------------
# DoRA (the ops are composed from the backend's kernels: lora_kernels.dora)
# ---------------------------------------------------------------------------

class _DoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
                fan_in_fan_out):
        y, s, z = _run(ops.dora_linear_fwd, ops._dora_fwd_impl, x, weight, bias, lora_A, lora_B,
                       mag, seed, scaling, dropout_p, fan_in_fan_out)
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        ctx.output_mask = [need_x, need_w, need_b, need_a, need_bb, need_m]
        ctx.args = (scaling, dropout_p, fan_in_fan_out)
        ctx.mark_non_differentiable(z)
        # Held for backward: x only when dA or dW needs it (x̂ is regenerated
        # from the seed); s (tokens×r); z (tokens×out) only for m's gradient;
        # m, the parameters and the seed.
        _hold(ctx, s, x if (need_a or need_w) else None, weight, lora_A, lora_B, mag, s,
              z if need_m else None, seed)
        return y, s, z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_s, grad_z):
        if grad_y is None:
            return (None,) * 10
        x, weight, lora_A, lora_B, mag, s, z, seed = ctx.saved_tensors
        x = grad_y.new_empty(0) if x is None else x
        z = grad_y.new_empty(0) if z is None else z
        grads = _run_backward(ctx, ops.dora_linear_bwd, ops._dora_bwd_impl, grad_y, x, weight,
                              lora_A, lora_B, mag, s, z, seed, *ctx.args, ctx.output_mask)
        return _asked(grads, ctx.output_mask) + (None,) * 4


_register_autograd(ops.dora_linear_fwd, _DoraFunction, (0, 1, 2, 3, 4, 5), ops._dora_fwd_impl)


# ---------------------------------------------------------------------------
# Merged weight (conv), dropout
# ---------------------------------------------------------------------------

class _MergedWeightFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, lora_A, lora_B, scaling):
        out = _below_autograd(ops.merged_weight, weight, lora_A, lora_B, scaling)
        ctx.scaling = scaling
        ctx.save_for_backward(lora_A, lora_B)
        return out

    @staticmethod
    def backward(ctx, grad):
        lora_A, lora_B = ctx.saved_tensors
        g = grad.reshape(lora_B.shape[0], lora_A.shape[1]).to(lora_A.dtype) * ctx.scaling
        need_w, need_a, need_b = ctx.needs_input_grad[:3]
        return (grad if need_w else None,
                lora_B.t() @ g if need_a else None,
                g @ lora_A.t() if need_b else None,
                None)


_register_autograd(ops.merged_weight, _MergedWeightFunction, (0, 1, 2), ops._merged_weight_impl)


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, p):
        out = _run(ops.dropout, ops._dropout_impl, x, seed, p)
        ctx.p = p
        ctx.save_for_backward(seed)
        ctx.backend = backends.requested()
        return out

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        # The mask depends only on (seed, position): the gradient is the same map.
        with backends.use_backend(ctx.backend):
            return ops.dropout(grad.contiguous(), seed, ctx.p), None, None


_register_autograd(ops.dropout, _DropoutFunction, (0,), ops._dropout_impl)


# ---------------------------------------------------------------------------
# A backend asked for by name
# ---------------------------------------------------------------------------

def _native_backend(device: torch.device):
    """The backend whose C++ kernels the dispatcher runs on ``device``."""
    if not ops.NATIVE:
        return None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and not backends.reasons("cuda", device):
        return "cuda"
    return None


def _device_of(args):
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


class _Route(TorchFunctionMode):
    """Pushed by ``use_backend(name)``: the lora_kernels ops run through their
    Python routes (the autograd.Functions above, on backend ``name``, kept for
    backward) unless ``name`` is auto or the device's own C++ backend, where
    they take the C++ path. Everything else passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = ROUTES.get(func)
        # While torch.compile traces, the op itself goes into the graph; the
        # compiled code's op calls come through here again when they run.
        if route is not None and not torch.compiler.is_compiling():
            name = backends.requested()
            device = _device_of(args)
            if name != "auto" and (device is None or name != _native_backend(device)):
                return route(*args, **kwargs)
        return func(*args, **kwargs)


backends.set_route_mode(_Route)
