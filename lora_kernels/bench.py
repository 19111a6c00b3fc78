"""``python -m lora_kernels.bench``: time one LoRA layer's forward+backward, provider by provider.

Providers (each skipped with a note when its package is missing or it has no
such layer):

``floor``
    The frozen work every LoRA layer must do anyway: ``nn.Linear`` /
    ``nn.Embedding`` / ``nn.Conv2d`` with frozen weights, forward plus the
    backward to the input (an embedding has no input gradient: forward only).
``reference``
    ``lora_kernels.reference`` (plain PyTorch, torch autograd): the unfused
    reference.
``lora_kernels``
    This package's layer, on whatever backend ``auto`` picks (the header says which).
``triton``, ``cuda``
    This package's layer with that backend forced (``lora_kernels.use_backend``)
    for the forward and the backward; skipped with the backend's reasons where
    it cannot run (triton: a CUDA device, or CPU only under ``TRITON_INTERPRET=1``,
    the interpreter, far too slow for anything but tiny shapes; cuda: the CUDA
    C++ kernels, not built yet).
``loralib``
    loralib's layer of the same name.
``peft``
    PEFT's LoRA layer wrapped around the same base layer (no MergedLinear).

Default providers depend on the device (``DEFAULT_PROVIDERS``): on CPU
floor, reference, lora_kernels, loralib, peft (no triton: the interpreter is
far too slow); on CUDA floor, reference, triton, cuda, loralib, peft (there
``lora_kernels`` is ``auto``, which is cuda or else triton, so it would
duplicate one of them).

Every provider gets the same W, bias, A and B (B non-zero, so the low-rank
branch is really computed), the same input values and the same upstream
gradient; frozen W and bias, trainable LoRA parameters, train mode. One
repetition times ``y = layer(x); y.backward(g)`` with the gradients set to
None beforehand. On CPU, providers take turns within each repetition (round
robin, the starting provider rotating) so machine noise falls on all of them
alike, timed with ``time.perf_counter``. On CUDA each provider is timed in turn
by ``triton.testing.do_bench`` (CUDA events, L2 cache cleared before each run;
the timed callable sets the grads to None and then runs the step), which
reports the median, p20 and p80.

On CPU the benchmark first makes glibc keep freed memory for reuse
(``--heap kept``, the default; ``keep_freed_memory``): with glibc's adaptive
defaults a large block freed by one provider is returned to the OS inside
whichever provider's step frees the last block above it, and faulted in again
by the next large allocation, which made the medians of interleaved runs
bimodal. The header's ``heap:`` line says what was set; ``--heap default``
leaves the allocator alone.

Bytes held for backward
-----------------------
Measured, not computed: during one extra forward, outside the timed
repetitions, ``torch.autograd.graph.saved_tensors_hooks`` records every tensor
autograd saves for backward: ``save_for_backward`` in torch's own ops, in
``autograd.Function`` and in ``torch.library`` custom ops (the ``lora_kernels``
ops save through it). The figure is the total size of the distinct storages
among them, leaving out the layer's parameters and buffers, the input and the
output (memory the caller holds anyway). A tensor kept on ``ctx`` as a plain
attribute is not seen; none of the providers here does that.

The setup is shared with ``benchmarks/test_bench_layers.py`` (pytest-benchmark):
``make_providers`` builds the cases, ``Case.step`` is what gets timed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import importlib
import itertools
import math
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, backends
from . import reference as R

LAYERS = ("linear", "merged", "embedding", "conv2d")
PROVIDERS = ("floor", "reference", "lora_kernels", "triton", "cuda", "loralib", "peft")
# Providers that are the lora_kernels layer with one backend forced.
BACKEND_PROVIDERS = ("triton", "cuda")
# Default --providers per device type: no triton on CPU (the interpreter is far
# too slow); no lora_kernels on CUDA (auto is cuda or triton, listed already).
DEFAULT_PROVIDERS = {
    "cpu": ("floor", "reference", "lora_kernels", "loralib", "peft"),
    "cuda": ("floor", "reference", "triton", "cuda", "loralib", "peft"),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "median", "p20", "p80",
               "device", "version")
# (in_features, out_features) when not given: embedding is (num_embeddings,
# embedding_dim), conv2d (in_channels, out_channels); merged holds 3 groups.
DEFAULT_FEATURES = {"linear": (1024, 1024), "merged": (1024, 3072),
                    "embedding": (8192, 1024), "conv2d": (128, 128)}
MODE = "full"  # forward + backward

def default_providers(device) -> tuple:
    return DEFAULT_PROVIDERS.get(torch.device(device).type, DEFAULT_PROVIDERS["cpu"])


def forced_backend(name: Optional[str]):
    """The context that runs the block's ops on backend ``name`` (``None``:
    no change). Backward follows: each op's autograd keeps the backend its
    forward ran on, also when autograd runs backward on another thread."""
    return contextlib.nullcontext() if name is None else backends.use_backend(name)


HELD_METHOD = ("held MB: bytes of the distinct storages autograd saves for backward during one "
               "forward (torch.autograd.graph.saved_tensors_hooks; sees save_for_backward of "
               "torch ops, autograd.Functions and torch.library custom ops), less the layer's "
               "parameters/buffers, the input and the output")


# ---------------------------------------------------------------------------
# Setup (shared with benchmarks/test_bench_layers.py)
# ---------------------------------------------------------------------------

@dataclass
class Case:
    """One provider's layer, ready to run: ``step()`` is what is timed."""
    provider: str
    description: str
    forward: Optional[Callable[[], torch.Tensor]] = None
    x: Optional[torch.Tensor] = None          # the input (leaf with grad, or indices)
    grad: Optional[torch.Tensor] = None       # upstream gradient, shared by all providers
    trainable: List[torch.Tensor] = field(default_factory=list)
    owned: List[torch.Tensor] = field(default_factory=list)  # parameters and buffers
    backward: bool = True                     # False: forward only (embedding floor)
    tokens: int = 0
    version: str = ""
    skip: Optional[str] = None                # why it does not run here
    backend: Optional[str] = None             # lora_kernels backend forced for fwd + bwd

    def using_backend(self):
        """The context that forces ``backend`` (a no-op when it is None)."""
        return forced_backend(self.backend)

    def zero_grad(self) -> None:
        for t in self.trainable:
            t.grad = None
        if self.x is not None and self.x.requires_grad:
            self.x.grad = None

    def step(self) -> None:
        # Backward dispatches the ops again: the backend must cover it too.
        with forced_backend(self.backend):
            y = self.forward()
            if self.backward:
                y.backward(self.grad)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_enable_lora(text) -> List[bool]:
    """'1,0,1' (or true/false words, or a list) -> [True, False, True]."""
    if not isinstance(text, str):
        return [bool(v) for v in text]
    words = {"1": True, "true": True, "t": True, "0": False, "false": False, "f": False}
    out = []
    for w in text.split(","):
        w = w.strip().lower()
        if w not in words:
            raise ValueError(f"enable_lora: got {text!r}, expected comma-separated 0/1 "
                             "such as '1,0,1'")
        out.append(words[w])
    return out


def conv_geometry(tokens: int, image_size: int = 32):
    """(batch, side) with batch·side² close to ``tokens``: square images of
    ``image_size`` (smaller when there are fewer tokens than one image holds)."""
    side = max(1, min(image_size, math.isqrt(tokens)))
    return max(1, round(tokens / (side * side))), side


def kernel_name(layer, in_features, out_features, rank, dropout, dtype, enable_lora=(1, 0, 1),
                kernel_size=3) -> str:
    """Shape in the name, as the CSV has no other column for it."""
    dt = str(_dtype(dtype)).replace("torch.", "")
    extra = ""
    if layer == "merged":
        extra = "_e" + "".join("1" if e else "0" for e in parse_enable_lora(enable_lora))
    elif layer == "conv2d":
        extra = f"_k{kernel_size}"
    return f"lora_{layer}_in{in_features}_out{out_features}{extra}_r{rank}_p{dropout:g}_{dt}"


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        mod = sys.modules.get(name)
        return getattr(mod, "__version__", "?")


def lora_kernels_backend(device) -> str:
    """The backend ``auto`` picks for ``device``, and why the faster ones were passed over."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            name = backends.resolved_name(device)
        except Exception as e:  # a forced backend that cannot run here
            return f"none ({e})"
    order = backends._AUTO_ORDER.get(torch.device(device).type, ())
    passed = []
    for cand in order:
        if cand == name:
            break
        passed.append(f"{cand}: {'; '.join(backends.reasons(cand, device))}")
    return name + (f" (passed over {' | '.join(passed)})" if passed else "")


def _freeze_all_but_lora(module: nn.Module) -> None:
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)


def _trainable(module: nn.Module) -> List[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _owned(module: nn.Module) -> List[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _import(name: str):
    """The module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(name), None
    except Exception as e:
        return None, f"{name} is not importable ({type(e).__name__}: {e})"


class _Tensors:
    """The weights every provider copies, drawn once from a seeded generator."""

    def __init__(self, layer, in_f, out_f, rank, enable_lora, kernel_size, dtype, device, seed):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        k = kernel_size
        if layer == "linear":
            self.W, self.b = rnd(out_f, in_f, scale=in_f ** -0.5), rnd(out_f, scale=0.1)
            self.A, self.B = rnd(rank, in_f, scale=in_f ** -0.5), rnd(out_f, rank, scale=0.1)
        elif layer == "merged":
            n_on = sum(enable_lora)
            self.W, self.b = rnd(out_f, in_f, scale=in_f ** -0.5), rnd(out_f, scale=0.1)
            self.A = rnd(rank * n_on, in_f, scale=in_f ** -0.5)
            self.B = rnd(out_f // len(enable_lora) * n_on, rank, scale=0.1)
        elif layer == "embedding":
            # loralib/PEFT start A at zero; both factors non-zero here.
            self.W, self.b = rnd(in_f, out_f), None
            self.A, self.B = rnd(rank, in_f), rnd(out_f, rank, scale=0.1)
        elif layer == "conv2d":
            fan_in = in_f * k * k
            self.W, self.b = rnd(out_f, in_f, k, k, scale=fan_in ** -0.5), rnd(out_f, scale=0.1)
            # loralib's (and our) shapes: ΔW = (B·A).view(W.shape).
            self.A = rnd(rank * k, in_f * k, scale=fan_in ** -0.5)
            self.B = rnd(out_f * k, rank * k, scale=0.1)
            # PEFT's factorisation: A a k×k conv to r channels, B a 1×1 conv.
            self.peft_A = rnd(rank, in_f, k, k, scale=fan_in ** -0.5)
            self.peft_B = rnd(out_f, rank, 1, 1, scale=0.1)
        else:
            raise ValueError(f"layer: got {layer!r}, expected one of {', '.join(LAYERS)}")


@torch.no_grad()
def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.reshape(dst.shape))


def make_providers(layer: str = "linear", in_features: Optional[int] = None,
                   out_features: Optional[int] = None, tokens: int = 2048, rank: int = 16,
                   alpha: Optional[float] = None, dropout: float = 0.05, dtype="float32",
                   device="cpu", enable_lora="1,0,1", kernel_size: int = 3,
                   image_size: int = 32, providers: Optional[Sequence[str]] = None,
                   seed: int = 0) -> Dict[str, Case]:
    """One ``Case`` per provider (in ``providers`` order, default
    ``default_providers(device)``); a provider that cannot run has ``skip`` set
    to the reason and nothing else."""
    if providers is None:
        providers = default_providers(device)
    if layer not in LAYERS:
        raise ValueError(f"layer: got {layer!r}, expected one of {', '.join(LAYERS)}")
    d_in, d_out = DEFAULT_FEATURES[layer]
    in_f = d_in if in_features is None else int(in_features)
    out_f = d_out if out_features is None else int(out_features)
    for name, v in (("in_features", in_f), ("out_features", out_f), ("tokens", tokens),
                    ("rank", rank), ("kernel_size", kernel_size), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: got {v!r}, expected a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: got {dropout!r}, expected a float in [0, 1)")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"providers: got {unknown}, expected names among {', '.join(PROVIDERS)}")
    alpha = 2 * rank if alpha is None else alpha
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    scaling = alpha / rank
    dtype = _dtype(dtype)
    device = torch.device(device)
    enable = parse_enable_lora(enable_lora)
    if layer == "merged":
        if not any(enable):
            raise ValueError(f"enable_lora: got {enable_lora!r}, expected at least one group on")
        if out_f % len(enable):
            raise ValueError(f"out_features: got {out_f}, expected a multiple of "
                             f"len(enable_lora)={len(enable)}")
    p = 0.0 if layer == "embedding" else float(dropout)  # loralib's Embedding has no dropout

    T = _Tensors(layer, in_f, out_f, rank, enable, kernel_size, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pad = kernel_size // 2
    if layer == "conv2d":
        batch, side = conv_geometry(tokens, image_size)
        n_tokens = batch * side * side
        x0 = torch.randn(batch, in_f, side, side, generator=g).to(device=device, dtype=dtype)
        out_side = side + 2 * pad - kernel_size + 1  # an even kernel grows the image by 1
        grad = torch.randn(batch, out_f, out_side, out_side, generator=g).to(device=device,
                                                                             dtype=dtype)
    elif layer == "embedding":
        n_tokens = tokens
        x0 = torch.randint(0, in_f, (tokens,), generator=g).to(device)
        grad = torch.randn(tokens, out_f, generator=g).to(device=device, dtype=dtype)
    else:
        n_tokens = tokens
        x0 = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype)
        grad = torch.randn(tokens, out_f, generator=g).to(device=device, dtype=dtype)

    def new_x():
        return x0.clone() if layer == "embedding" else x0.clone().requires_grad_(True)

    def case_for_module(name, module, description, version):
        module.to(device=device, dtype=dtype).train()
        _freeze_all_but_lora(module)
        x = new_x()
        return Case(name, description, lambda: module(x), x, grad, _trainable(module),
                    _owned(module), tokens=n_tokens, version=version)

    torch_version = f"torch {torch.__version__}"
    seeds = itertools.count(seed)
    cases: Dict[str, Case] = {}
    for name in providers:
        try:
            builder = {"floor": _floor, "reference": _reference, "lora_kernels": _lora_kernels,
                       "triton": _forced, "cuda": _forced, "loralib": _loralib,
                       "peft": _peft}[name]
            cases[name] = builder(name=name, layer=layer, T=T, in_f=in_f, out_f=out_f, rank=rank,
                                  alpha=alpha, scaling=scaling, p=p, enable=enable,
                                  k=kernel_size, pad=pad, device=device, dtype=dtype,
                                  new_x=new_x, grad=grad, n_tokens=n_tokens, seeds=seeds,
                                  case_for_module=case_for_module, torch_version=torch_version)
        except Exception as e:  # a provider that cannot even be built here
            cases[name] = Case(name, "", skip=f"setup failed: {type(e).__name__}: {e}",
                               tokens=n_tokens)
    return cases


def _floor(layer, T, in_f, out_f, k, pad, case_for_module, torch_version, **_):
    if layer in ("linear", "merged"):
        m = nn.Linear(in_f, out_f)
        what = "nn.Linear, frozen: forward + grad of x"
    elif layer == "embedding":
        m = nn.Embedding(in_f, out_f)
        what = "nn.Embedding, frozen: forward only (no input grad)"
    else:
        m = nn.Conv2d(in_f, out_f, k, padding=pad)
        what = "nn.Conv2d, frozen: forward + grad of x"
    case = case_for_module("floor", m, what, torch_version)
    _copy(m.weight, T.W)
    if T.b is not None:
        _copy(m.bias, T.b)
    case.backward = layer != "embedding"
    return case


def _reference(layer, T, scaling, p, enable, pad, device, new_x, grad, n_tokens, seeds,
               torch_version, **_):
    W, b = T.W.clone(), None if T.b is None else T.b.clone()
    A, B = T.A.clone().requires_grad_(True), T.B.clone().requires_grad_(True)
    x = new_x()
    if layer in ("linear", "merged"):
        groups = [i for i, on in enumerate(enable) if on] if layer == "merged" else [0]
        n_groups = len(enable) if layer == "merged" else 1

        def fwd():
            return R.lora_linear(x, W, b, A, B, scaling, p, next(seeds), num_groups=n_groups,
                                 groups=groups)
        what = "reference.lora_linear" + (" (grouped)" if layer == "merged" else "")
    elif layer == "embedding":
        def fwd():
            return R.lora_embedding(x, W, A, B, scaling)
        what = "reference.lora_embedding"
    else:
        w2d = W.view(B.shape[0], A.shape[1])

        if p == 0.0:
            def fwd():
                return F.conv2d(x, R.merged_weight(w2d, A, B, scaling).view(W.shape), b,
                                padding=pad)
        else:  # the layer's form: conv(x, W) + conv(dropout(x), ΔW)
            zero = torch.zeros_like(w2d)

            def fwd():
                delta = R.merged_weight(zero, A, B, scaling).view(W.shape)
                return (F.conv2d(x, W, b, padding=pad)
                        + F.conv2d(R.dropout(x, next(seeds), p), delta, None, padding=pad))
        what = "F.conv2d with reference.merged_weight"
    return Case("reference", what + ", plain PyTorch + autograd (unfused)", fwd, x, grad,
                [A, B], [t for t in (W, b, A, B) if t is not None], tokens=n_tokens,
                version=torch_version)


def _lora_kernels(layer, T, in_f, out_f, rank, alpha, p, enable, k, pad, device,
                  case_for_module, **_):
    import lora_kernels as lk
    version = f"lora_kernels {__version__} ({lora_kernels_backend(device).split()[0]} backend)"
    return _loralib_like(lk, "lora_kernels", layer, T, in_f, out_f, rank, alpha, p, enable, k,
                         pad, case_for_module, version)


def _forced(name, layer, T, in_f, out_f, rank, alpha, p, enable, k, pad, device,
            case_for_module, **_):
    """The lora_kernels layer with backend ``name`` forced for forward and backward."""
    why = backends.reasons(name, device)
    if why:
        return Case(name, "", skip=f"backend {name} cannot run on {device.type}: "
                                   + "; ".join(why), backend=name)
    import lora_kernels as lk
    version = f"lora_kernels {__version__} ({name} backend"
    if name == "triton":
        version += f", triton {_package_version('triton')}"
    case = _loralib_like(lk, name, layer, T, in_f, out_f, rank, alpha, p, enable, k, pad,
                         case_for_module, version + ")")
    case.description = case.description.replace(f"{name}.", "lora_kernels.", 1) + (
        f", {name} backend forced (forward and backward)")
    case.backend = name
    return case


def _loralib(layer, T, in_f, out_f, rank, alpha, p, enable, k, pad, case_for_module, **_):
    mod, why = _import("loralib")
    if mod is None:
        return Case("loralib", "", skip=why)
    return _loralib_like(mod, "loralib", layer, T, in_f, out_f, rank, alpha, p, enable, k, pad,
                         case_for_module, f"loralib {_package_version('loralib')}")


def _loralib_like(lib, name, layer, T, in_f, out_f, rank, alpha, p, enable, k, pad,
                  case_for_module, version):
    """lora_kernels and loralib share constructors and parameter names."""
    if layer == "linear":
        m = lib.Linear(in_f, out_f, r=rank, lora_alpha=alpha, lora_dropout=p)
        what = f"{name}.Linear"
    elif layer == "merged":
        m = lib.MergedLinear(in_f, out_f, r=rank, lora_alpha=alpha, lora_dropout=p,
                             enable_lora=list(enable))
        what = f"{name}.MergedLinear"
    elif layer == "embedding":
        m = lib.Embedding(in_f, out_f, r=rank, lora_alpha=alpha)
        what = f"{name}.Embedding"
    else:
        m = lib.Conv2d(in_f, out_f, k, r=rank, lora_alpha=alpha, lora_dropout=p, padding=pad)
        what = f"{name}.Conv2d"
        if name == "loralib" and p > 0:
            what += " (ignores lora_dropout: loralib's ConvLoRA never applies it)"
    case = case_for_module(name, m, what, version)
    base = m.conv if layer == "conv2d" else m
    _copy(base.weight, T.W)
    if T.b is not None:
        _copy(base.bias, T.b)
    _copy(m.lora_A, T.A)
    _copy(m.lora_B, T.B)
    return case


def _peft(layer, T, in_f, out_f, rank, alpha, p, k, pad, case_for_module, **_):
    if layer == "merged":
        return Case("peft", "", skip="PEFT has no MergedLinear (per-group LoRA on a fused "
                                     "qkv projection)")
    peft, why = _import("peft")
    if peft is None:
        return Case("peft", "", skip=why)
    if layer == "linear":
        base = nn.Linear(in_f, out_f)
    elif layer == "embedding":
        base = nn.Embedding(in_f, out_f)
    else:
        base = nn.Conv2d(in_f, out_f, k, padding=pad)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = base

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=p, target_modules=["layer"])
    model = peft.get_peft_model(Wrapper(), config)
    lora_layer = model.base_model.model.layer  # called directly: no PeftModel overhead
    what = f"{type(lora_layer).__module__}.{type(lora_layer).__name__} (get_peft_model)"
    case = case_for_module("peft", lora_layer, what, f"peft {peft.__version__}")
    _copy(lora_layer.base_layer.weight, T.W)
    if T.b is not None:
        _copy(lora_layer.base_layer.bias, T.b)
    if layer == "embedding":
        _copy(lora_layer.lora_embedding_A["default"], T.A)
        _copy(lora_layer.lora_embedding_B["default"], T.B)
    elif layer == "linear":
        _copy(lora_layer.lora_A["default"].weight, T.A)
        _copy(lora_layer.lora_B["default"].weight, T.B)
    else:
        _copy(lora_layer.lora_A["default"].weight, T.peft_A)
        _copy(lora_layer.lora_B["default"].weight, T.peft_B)
        case.description = case.description[:-1] + (
            "; its own factorisation: A a k×k conv to r channels, B a 1×1 conv)")
    return case


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def held_bytes(case: Case) -> int:
    """Bytes autograd holds for backward after one forward (see the module docstring)."""
    case.zero_grad()
    saved: Dict[tuple, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            saved[(t.device, st.data_ptr())] = st.nbytes()
        except Exception:  # a tensor without a plain storage: count its elements
            saved[("id", id(t))] = t.numel() * t.element_size()
        return t

    with case.using_backend(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = case.forward()
    mine = list(case.owned) + [t for t in (case.x, y) if t is not None]
    for t in mine:
        saved.pop((t.device, t.untyped_storage().data_ptr()), None)
    total = sum(saved.values())
    if case.backward:
        with case.using_backend():
            y.backward(case.grad)  # frees the graph
    del y
    case.zero_grad()
    return total


def _quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Result:
    provider: str
    tokens: int
    times_ms: List[float]
    held: int
    peak: Optional[int] = None
    # (median, p20, p80) when the timer reports quantiles (do_bench), not times
    quantiles: Optional[Tuple[float, float, float]] = None

    @property
    def median(self):
        return self.quantiles[0] if self.quantiles else _quantile(self.times_ms, 0.5)

    @property
    def p20(self):
        return self.quantiles[1] if self.quantiles else _quantile(self.times_ms, 0.2)

    @property
    def p80(self):
        return self.quantiles[2] if self.quantiles else _quantile(self.times_ms, 0.8)


# How the timed repetitions are run: "round_robin" (time.perf_counter, providers
# interleaved; the CPU default) or "do_bench" (triton.testing.do_bench, one
# provider after another; the CUDA default).
TIMINGS = ("round_robin", "do_bench")


def default_timing(device) -> str:
    return "do_bench" if torch.device(device).type == "cuda" else "round_robin"


def _do_bench(fn: Callable[[], None], warmup_ms: float, rep_ms: float) -> List[float]:
    """[median, p20, p80] in ms of ``fn`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench
    return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))


def timing_note(timing: str, repeat: int, warmup: int, warmup_ms: float, rep_ms: float) -> str:
    what = "`y = layer(x); y.backward(g)`"
    if timing == "do_bench":
        return (f"times: triton.testing.do_bench (CUDA events, L2 cache cleared before each run) "
                f"of {what} with the grads set to None inside the timed callable, "
                f"warmup {warmup_ms:g} ms, rep {rep_ms:g} ms, providers one after another "
                f"(after {warmup} untimed steps each); median, p20, p80 from "
                "quantiles=[0.5, 0.2, 0.8]; x floor = median / floor's median")
    return (f"times: wall clock (time.perf_counter) of {what} over {repeat} repetitions "
            f"(+{warmup} warmup), grads set to None between them, providers interleaved "
            "round robin; x floor = median / floor's median")


def run_cases(cases: Dict[str, Case], repeat: int, warmup: int, device, progress=None,
              timing: Optional[str] = None, warmup_ms: float = 25.0, rep_ms: float = 100.0
              ) -> Dict[str, Result]:
    """Warm up, measure held bytes (and peak memory on CUDA), then time: with
    ``timing="round_robin"`` (the CPU default) ``repeat`` round-robin repetitions
    timed by ``time.perf_counter``; with ``"do_bench"`` (the CUDA default)
    ``triton.testing.do_bench`` per provider (``warmup_ms``, ``rep_ms``;
    ``repeat`` unused). A provider that raises is marked skipped
    (``case.skip``) and left out."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    timing = default_timing(device) if timing is None else timing
    if timing not in TIMINGS:
        raise ValueError(f"timing: got {timing!r}, expected one of {', '.join(TIMINGS)}")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    active = [c for c in cases.values() if c.skip is None]
    held, peak = {}, {}
    for c in list(active):
        done = 0
        try:
            for _ in range(warmup):
                c.zero_grad()
                c.step()
                done += 1
                if progress is not None:
                    progress.update(1)
            held[c.provider] = held_bytes(c)
            if cuda:
                c.zero_grad()
                sync()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                c.step()
                sync()
                peak[c.provider] = torch.cuda.max_memory_allocated(device) - base
        except Exception as e:
            c.skip = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            active.remove(c)
            if progress is not None:
                progress.update(warmup + repeat - done)
    if timing == "do_bench":
        return _run_do_bench(active, held, peak, repeat, warmup_ms, rep_ms, progress)
    times = {c.provider: [] for c in active}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(repeat):
            shift = rep % max(len(active), 1)
            for c in active[shift:] + active[:shift]:
                c.zero_grad()
                sync()
                t0 = time.perf_counter()
                c.step()
                sync()
                times[c.provider].append((time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
    for c in active:
        c.zero_grad()
    return {c.provider: Result(c.provider, c.tokens, times[c.provider], held[c.provider],
                               peak.get(c.provider)) for c in active}


def _run_do_bench(active: List[Case], held, peak, repeat, warmup_ms, rep_ms, progress
                  ) -> Dict[str, Result]:
    out = {}
    for c in list(active):
        def fn(c=c):
            c.zero_grad()
            c.step()
        try:
            med, p20, p80 = _do_bench(fn, warmup_ms, rep_ms)
        except Exception as e:
            c.skip = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            active.remove(c)
        else:
            out[c.provider] = Result(c.provider, c.tokens, [], held[c.provider],
                                     peak.get(c.provider), (med, p20, p80))
        c.zero_grad()
        if progress is not None:
            progress.update(repeat)
    return out


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

MB = 1024 * 1024


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HEAPS = ("kept", "default")


def keep_freed_memory() -> Optional[str]:
    """Make glibc keep freed memory for reuse (no heap trimming, no blocks of
    their own mapped per allocation) for the rest of the process.

    With glibc's adaptive defaults, the providers' interleaved steps disturb
    one another: a large block freed by one provider is given back to the OS
    inside whichever provider's step frees the last block above it, and the
    next large allocation page-faults its memory in again (about 4 ms per
    16 MB on the 2-core development machine). Which step pays depends on the
    order of the providers' allocations, so the medians of a run come out
    bimodal. With freed memory kept, every step reuses warm memory and pays
    only for its own work. Returns what was set, or None where the C library
    is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return None
    return (f"glibc {version}, freed memory kept for reuse (mallopt M_MMAP_MAX=0, "
            "M_TRIM_THRESHOLD=2**31-1): no provider pays page faults for memory another freed")


def machine_line(device) -> str:
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
             f"{platform.system()} {platform.machine()}", f"python {platform.python_version()}",
             f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"device cuda ({torch.cuda.get_device_name(device)})")
    else:
        parts.append(f"device {device.type}")
    return ", ".join(parts)


def device_label(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def format_table(results: List[Result], floor: Dict[int, float], cuda: bool) -> str:
    head = ["tokens", "provider", "median ms", "p20 ms", "p80 ms", "x floor", "held MB"]
    if cuda:
        head.append("peak MB")
    rows = []
    for r in results:
        f = floor.get(r.tokens)
        row = [str(r.tokens), r.provider, f"{r.median:.3f}", f"{r.p20:.3f}", f"{r.p80:.3f}",
               f"{r.median / f:.2f}" if f else "-", f"{r.held / MB:.3f}"]
        if cuda:
            row.append("-" if r.peak is None else f"{r.peak / MB:.3f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    prev = None
    for r, row in zip(results, rows):
        if prev is not None and r.tokens != prev:
            lines.append("")
        prev = r.tokens
        lines.append(fmt(row))
    return "\n".join(lines)


def csv_rows(kernel: str, results: List[Result], versions: Dict[str, str], device) -> List[dict]:
    dev = device_label(device)
    out = []
    for r in results:
        common = dict(kernel=kernel, provider=r.provider, mode=MODE, x=r.tokens, device=dev,
                      version=versions[r.provider])
        out.append(dict(common, metric="speed", unit="ms", median=round(r.median, 6),
                        p20=round(r.p20, 6), p80=round(r.p80, 6)))
        held = round(r.held / MB, 6)
        out.append(dict(common, metric="memory", unit="MB", median=held, p20=held, p80=held))
        if r.peak is not None:
            peak = round(r.peak / MB, 6)
            out.append(dict(common, metric="peak_memory", unit="MB", median=peak, p20=peak,
                            p80=peak))
    return [{k: row[k] for k in CSV_COLUMNS} for row in out]


def append_csv(path: str, rows: List[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: List[dict], title: str) -> None:
    """Time (and held memory) vs tokens, one line per provider, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    # Distinct markers and dashes: providers with equal held bytes overlap exactly.
    styles = itertools.cycle([("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")])
    for prov, (marker, dash) in zip(providers, styles):
        for ax, metric in ((ax_t, "speed"), (ax_m, "memory")):
            pts = sorted((float(r["x"]), float(r["median"]), float(r["p20"]), float(r["p80"]))
                         for r in rows if r["provider"] == prov and r["metric"] == metric)
            if not pts:
                continue
            xs, med, lo, hi = zip(*pts)
            line, = ax.plot(xs, med, marker=marker, linestyle=dash, label=prov,
                            markerfacecolor="none")
            if metric == "speed":
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    xticks = sorted({float(r["x"]) for r in rows})
    ax_t.set_ylabel("forward + backward, ms (median; band p20-p80)")
    ax_m.set_ylabel("held for backward, MB")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _providers_arg(values: Sequence[str]) -> List[str]:
    out = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lora_kernels.bench",
        description="Time forward+backward of one LoRA layer for several providers "
                    f"({', '.join(PROVIDERS)}) and print a table. triton and cuda are the "
                    "lora_kernels layer with that backend forced for forward and backward "
                    "(skipped, with the reasons, where the backend cannot run).",
        epilog=HELD_METHOD + ". Times: `y = layer(x); y.backward(g)` with grads set to None "
               "before each run; on cpu wall clock (time.perf_counter) with providers "
               "interleaved round robin (--repeat, --warmup); on cuda "
               "triton.testing.do_bench per provider (--warmup-ms, --rep-ms; median, p20, p80 "
               "from its quantiles), plus torch.cuda.max_memory_allocated peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layer", choices=LAYERS, default="linear")
    ap.add_argument("--in-features", type=int, default=None,
                    help="in features (embedding: num_embeddings; conv2d: in channels); "
                         "default per layer: " + ", ".join(f"{k} {v[0]}" for k, v in
                                                           DEFAULT_FEATURES.items()))
    ap.add_argument("--out-features", type=int, default=None,
                    help="out features (embedding: embedding_dim; conv2d: out channels); "
                         "default per layer: " + ", ".join(f"{k} {v[1]}" for k, v in
                                                           DEFAULT_FEATURES.items()))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048],
                    help="rows of x (conv2d: batch*H*W with square HxW images of at most "
                         "--image-size); several values give several rows/points")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*rank)")
    ap.add_argument("--dropout", type=float, default=0.05,
                    help="lora_dropout (ignored for embedding, which loralib gives none)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--repeat", type=int, default=20,
                    help="cpu: timed repetitions (median, p20, p80 reported); unused on cuda")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed repetitions per provider (on cuda: before the peak-memory "
                         "step and do_bench's own warmup)")
    ap.add_argument("--warmup-ms", type=float, default=25.0,
                    help="cuda only: do_bench warmup time per provider, ms")
    ap.add_argument("--rep-ms", type=float, default=100.0,
                    help="cuda only: do_bench timed duration per provider, ms")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                    help=f"subset of {', '.join(PROVIDERS)} (space or comma separated). "
                         "Default per device: cpu: " + ", ".join(DEFAULT_PROVIDERS["cpu"])
                         + " (no triton: on cpu it needs TRITON_INTERPRET=1, the interpreter, "
                         "far too slow but for tiny shapes); cuda: "
                         + ", ".join(DEFAULT_PROVIDERS["cuda"]) + " (no lora_kernels: its "
                         "auto backend is cuda or else triton, listed already)")
    ap.add_argument("--enable-lora", default="1,0,1",
                    help="merged only: which output groups get LoRA")
    ap.add_argument("--kernel-size", type=int, default=3, help="conv2d only")
    ap.add_argument("--image-size", type=int, default=32,
                    help="conv2d only: side of the square images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own choice; "
                         "on a machine shared with other work, 1 avoids OpenMP stalls)")
    ap.add_argument("--heap", choices=HEAPS, default="kept",
                    help="CPU: 'kept' (default) makes glibc keep freed memory for reuse, so "
                         "one provider's freed memory is not unmapped and faulted in again "
                         "inside another provider's timed step; 'default' leaves glibc's "
                         "adaptive trimming on")
    ap.add_argument("--csv", metavar="PATH", help="append rows (Liger-Kernel long format)")
    ap.add_argument("--plot", metavar="PNG", help="plot time vs tokens of this run's rows")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    providers = (list(default_providers(args.device)) if args.providers is None
                 else _providers_arg(args.providers))
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        ap.error(f"--providers: got {bad or providers}, expected names among "
                 f"{', '.join(PROVIDERS)}")
    for name in ("repeat", "rank", "kernel_size", "image_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected >= 1")
    for name in ("warmup_ms", "rep_ms"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected > 0")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads: got {args.threads}, expected >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup: got {args.warmup}, expected >= 0")
    if any(t < 1 for t in args.tokens):
        ap.error(f"--tokens: got {args.tokens}, expected positive integers")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device: got cuda, but torch.cuda.is_available() is False")
    d_in, d_out = DEFAULT_FEATURES[args.layer]
    in_f = args.in_features or d_in
    out_f = args.out_features or d_out
    alpha = 2 * args.rank if args.alpha is None else args.alpha
    p = 0.0 if args.layer == "embedding" else args.dropout
    try:
        enable = parse_enable_lora(args.enable_lora)
        kernel = kernel_name(args.layer, in_f, out_f, args.rank, p, args.dtype, enable,
                             args.kernel_size)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, providers, in_f, out_f, alpha, p, enable, kernel, device, ap)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, providers, in_f, out_f, alpha, p, enable, kernel, device, ap) -> int:
    cuda = device.type == "cuda"
    timing = default_timing(device)
    print(f"lora_kernels.bench: {kernel} (mode {MODE}: forward + backward)")
    print(f"machine: {machine_line(device)}")
    print(f"lora_kernels {__version__}, backend: {lora_kernels_backend(device)}")
    print(f"command: python -m lora_kernels.bench {shlex.join(argv)}".rstrip())
    heap = keep_freed_memory() if args.heap == "kept" and not cuda else None
    print(f"heap: {heap or 'allocator defaults'}")
    print()

    from tqdm.auto import tqdm
    total = len(args.tokens) * (args.warmup + args.repeat) * len(providers)
    bar = tqdm(total=total, desc="bench", unit="step", leave=False,
               disable=args.no_progress or not sys.stderr.isatty())
    results: List[Result] = []
    notes: Dict[str, str] = {}
    versions: Dict[str, str] = {}
    try:
        for tokens in args.tokens:
            try:
                cases = make_providers(args.layer, in_f, out_f, tokens, args.rank, alpha, p,
                                       args.dtype, device, enable, args.kernel_size,
                                       args.image_size, providers, args.seed)
            except ValueError as e:
                bar.close()
                ap.error(str(e))
            for c in cases.values():
                if c.skip is not None:
                    bar.update(args.warmup + args.repeat)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="lora_kernels: running the unfused")
                res = run_cases(cases, args.repeat, args.warmup, device, bar, timing,
                                args.warmup_ms, args.rep_ms)
            for c in cases.values():
                if c.skip is not None:
                    failed = c.skip.startswith(("failed", "setup failed"))
                    notes.setdefault(c.provider, c.skip if failed else f"skipped: {c.skip}")
                else:
                    notes.setdefault(c.provider, c.description)
                    versions[c.provider] = c.version
            results += [res[name] for name in providers if name in res]
            del cases, res
            gc.collect()
    finally:
        bar.close()

    floor = {r.tokens: r.median for r in results if r.provider == "floor"}
    print(format_table(results, floor, cuda))
    print()
    print(timing_note(timing, args.repeat, args.warmup, args.warmup_ms, args.rep_ms))
    print(HELD_METHOD + (". peak MB: torch.cuda.max_memory_allocated during one step, less "
                         "what was allocated before it" if cuda else ""))
    if args.layer == "conv2d":
        b, side = conv_geometry(args.tokens[0], args.image_size)
        print(f"conv2d: tokens = batch*H*W with square images (e.g. {args.tokens[0]} -> "
              f"{b} x {side}x{side}), padding {args.kernel_size // 2}")
    if args.layer == "embedding" and args.dropout:
        print(f"embedding: --dropout {args.dropout} ignored (loralib's Embedding has no dropout)")
    for name in providers:
        if name in notes:
            print(f"  {name:<13} {notes[name]}")

    rows = csv_rows(kernel, results, versions, device)
    if args.csv:
        append_csv(args.csv, rows)
        print(f"csv: appended {len(rows)} rows to {args.csv}")
    if args.plot:
        plot(args.plot, rows, f"{kernel}, {MODE} (fwd+bwd), {device_label(device)}")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
