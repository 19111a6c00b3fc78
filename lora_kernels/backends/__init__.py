"""Backend registry and selection.

A backend implements the kernels behind the ``lora_kernels`` ops (see
``lora_kernels/ops.py`` for the contract) and says, for a given device, why it
cannot run there (``not_supported_reasons``), as xformers' operators do. A new
backend is a new module in this package added to ``_BACKEND_MODULES``.

Selection: ``LORA_KERNELS_BACKEND`` (``auto`` by default) or the
``use_backend(name)`` context manager. ``auto`` takes, for the tensor's device,
the first backend in ``_AUTO_ORDER`` with no reasons; the reference backend
runs everywhere. Forcing a backend that cannot run raises with its reasons.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Dict, List

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
CHOICES = ("auto",) + NAMES
_BACKEND_MODULES = {name: f"lora_kernels.backends.{name}" for name in NAMES}
# On CUDA the Triton kernels come first (tensor-core low-rank products, traced
# by torch.compile); the CUDA C++ extension is opt-in (LORA_KERNELS_CUDA=1 at
# build time) and chosen with LORA_KERNELS_BACKEND=cuda / use_backend("cuda"),
# or by auto where Triton cannot run.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}

_state = threading.local()
_loaded: Dict[str, object] = {}
_warned = set()


class BackendUnavailableError(RuntimeError):
    pass


def get(name: str):
    """The backend module ``name`` (imported on first use)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend: got {name!r}, expected one of {CHOICES}")
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_BACKEND_MODULES[name])
    return _loaded[name]


def _check_name(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source}: got {name!r}, expected one of {', '.join(CHOICES)}")
    return name


def requested() -> str:
    """The backend asked for: the innermost use_backend(), else the env var."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto",
                       "LORA_KERNELS_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (or ``"auto"``)."""
    _check_name(name, "use_backend(name)")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def reasons(name: str, device) -> List[str]:
    """Why backend ``name`` cannot run on ``device`` (empty when it can)."""
    try:
        backend = get(name)
    except Exception as e:  # a backend whose module fails to import
        return [f"failed to import: {e}"]
    return list(backend.not_supported_reasons(torch.device(device)))


def for_device(device):
    """The backend module that runs ops on tensors of ``device``."""
    device = torch.device(device)
    name = requested()
    if name != "auto":
        why = reasons(name, device)
        if why:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run on {device.type}: " + "; ".join(why))
        return get(name)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    skipped = []
    for candidate in order:
        why = reasons(candidate, device)
        if not why:
            if candidate == "reference" and skipped and device.type not in _warned:
                _warned.add(device.type)
                warnings.warn("lora_kernels: running the unfused reference on "
                              f"{device.type} ({' | '.join(skipped)})", stacklevel=3)
            return get(candidate)
        skipped.append(f"{candidate}: {'; '.join(why)}")
    raise BackendUnavailableError(f"no backend can run on {device.type}")


def resolved_name(device) -> str:
    return for_device(device).NAME
