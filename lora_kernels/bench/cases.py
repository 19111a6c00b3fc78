"""The providers, ready to time: ``make_providers`` builds one ``Case`` per
provider (floor, reference, lora_kernels, the forced backends, loralib, PEFT)
from the same weights, input and upstream gradient; ``Case.step`` is what gets
timed. Also the names the rest of the package shares: the layers, providers,
dtypes and default shapes, and the kernel name that identifies a setup.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__, backends
from .. import reference as R

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
                kernel_size=3, dora=False) -> str:
    """Shape in the name, as the CSV has no other column for it."""
    dt = str(_dtype(dtype)).replace("torch.", "")
    extra = "_dora" if dora else ""
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

    def __init__(self, layer, in_f, out_f, rank, enable_lora, kernel_size, dtype, device, seed,
                 scaling=1.0, dora=False):
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
        if dora:  # DoRA's magnitude: ‖W + s·B·A‖ rows, moved off its start
            norm = R.dora_weight_norm(self.W.double(), self.A.double(), self.B.double(),
                                      scaling)
            self.mag = (norm * (1 + 0.1 * torch.rand(out_f, generator=g, dtype=torch.float64))
                        .to(norm.device)).to(dtype)


@torch.no_grad()
def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.reshape(dst.shape))


def make_providers(layer: str = "linear", in_features: Optional[int] = None,
                   out_features: Optional[int] = None, tokens: int = 2048, rank: int = 16,
                   alpha: Optional[float] = None, dropout: float = 0.05, dtype="float32",
                   device="cpu", enable_lora="1,0,1", kernel_size: int = 3,
                   image_size: int = 32, providers: Optional[Sequence[str]] = None,
                   seed: int = 0, dora: bool = False) -> Dict[str, Case]:
    """One ``Case`` per provider (in ``providers`` order, default
    ``default_providers(device)``); a provider that cannot run has ``skip`` set
    to the reason and nothing else. ``dora``: DoRA layers (linear only)."""
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
    if dora and layer != "linear":
        raise ValueError(f"dora: got True with layer {layer!r}, expected layer 'linear'")
    p = 0.0 if layer == "embedding" else float(dropout)  # loralib's Embedding has no dropout

    T = _Tensors(layer, in_f, out_f, rank, enable, kernel_size, dtype, device, seed, scaling,
                 dora)
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
                                  case_for_module=case_for_module, torch_version=torch_version,
                                  dora=dora)
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
               torch_version, dora=False, **_):
    W, b = T.W.clone(), None if T.b is None else T.b.clone()
    A, B = T.A.clone().requires_grad_(True), T.B.clone().requires_grad_(True)
    x = new_x()
    if dora:
        mag = T.mag.clone().requires_grad_(True)

        def fwd():
            return R.dora_linear(x, W, b, A, B, mag, scaling, p, next(seeds))
        return Case("reference", "reference.dora_linear, plain PyTorch + autograd (unfused)",
                    fwd, x, grad, [A, B, mag], [W, b, A, B, mag], tokens=n_tokens,
                    version=torch_version)
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
                  case_for_module, dora=False, **_):
    import lora_kernels as lk
    version = f"lora_kernels {__version__} ({lora_kernels_backend(device).split()[0]} backend)"
    return _loralib_like(lk, "lora_kernels", layer, T, in_f, out_f, rank, alpha, p, enable, k,
                         pad, case_for_module, version, dora)


def _forced(name, layer, T, in_f, out_f, rank, alpha, p, enable, k, pad, device,
            case_for_module, dora=False, **_):
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
                         case_for_module, version + ")", dora)
    case.description = case.description.replace(f"{name}.", "lora_kernels.", 1) + (
        f", {name} backend forced (forward and backward)")
    case.backend = name
    return case


def _loralib(layer, T, in_f, out_f, rank, alpha, p, enable, k, pad, case_for_module,
             dora=False, **_):
    if dora:
        return Case("loralib", "", skip="loralib has no DoRA")
    mod, why = _import("loralib")
    if mod is None:
        return Case("loralib", "", skip=why)
    return _loralib_like(mod, "loralib", layer, T, in_f, out_f, rank, alpha, p, enable, k, pad,
                         case_for_module, f"loralib {_package_version('loralib')}")


def _loralib_like(lib, name, layer, T, in_f, out_f, rank, alpha, p, enable, k, pad,
                  case_for_module, version, dora=False):
    """lora_kernels and loralib share constructors and parameter names."""
    if dora:
        m = lib.DoraLinear(in_f, out_f, r=rank, lora_alpha=alpha, lora_dropout=p)
        what = f"{name}.DoraLinear"
    elif layer == "linear":
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
    if dora:
        _copy(m.lora_magnitude_vector, T.mag)
    return case


def _peft(layer, T, in_f, out_f, rank, alpha, p, k, pad, case_for_module, dora=False, **_):
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

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=p, target_modules=["layer"],
                             use_dora=dora)
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
        if dora:
            _copy(lora_layer.lora_magnitude_vector["default"].weight, T.mag)
            case.description += ", use_dora=True"
    else:
        _copy(lora_layer.lora_A["default"].weight, T.peft_A)
        _copy(lora_layer.lora_B["default"].weight, T.peft_B)
        case.description = case.description[:-1] + (
            "; its own factorisation: A a k×k conv to r channels, B a 1×1 conv)")
    return case
