"""Backend registry and selection.

A backend implements the kernels behind the ``lora_kernels`` ops (see
``lora_kernels/ops.py`` for the contract) and says, for a given device, why it
cannot run there (``not_supported_reasons``), as xformers' operators do. A new
backend is a new module in this package added to ``_BACKEND_MODULES``.

Selection: ``LORA_KERNELS_BACKEND`` (``auto`` by default; read once, when
lora_kernels is imported) or the ``use_backend(name)`` context manager (per
thread, at run time). ``auto`` is what the dispatcher runs: a device's C++
kernels where the compiled extensions have them (CPU; CUDA with the CUDA
extension), else the first backend in ``_AUTO_ORDER`` with no reasons; the
reference backend runs everywhere. Forcing a backend that cannot run raises
with its reasons. How a named backend reaches the ops: ``lora_kernels.ops``.
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
# On CUDA the C++ kernels of the CUDA extension (opt-in: LORA_KERNELS_CUDA=1 at
# build time) are the dispatcher's, as on the CPU; without them the Triton
# kernels run (and torch.compile traces into them where Triton can run).
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

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


def _env() -> str:
    return _check_name(os.environ.get("LORA_KERNELS_BACKEND", "auto").strip().lower() or "auto",
                       "LORA_KERNELS_BACKEND")


_ENV = _env()  # read once: the process-wide choice
_route_mode = None  # lora_kernels.ops._Route, set when the ops are registered


def env_choice() -> str:
    """The backend ``LORA_KERNELS_BACKEND`` asked for when lora_kernels was imported."""
    return _ENV


def set_route_mode(mode_class) -> None:
    global _route_mode
    _route_mode = mode_class


def requested() -> str:
    """The backend asked for: the innermost use_backend(), else the env var."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _ENV


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (or ``"auto"``): the
    forward and the backward of what the block runs (each op's autograd keeps
    the backend its forward ran on, also when autograd runs backward on
    another thread)."""
    _check_name(name, "use_backend(name)")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    mode = _route_mode() if _route_mode is not None and name != "auto" else None
    try:
        if mode is None:
            yield
        else:
            with mode:
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


# (requested name, device type, device index) -> the backend module: the
# choice is made once per device and setting, not per call (the Python
# kernels of devices without C++ ones ask on every call).
_resolved: Dict[tuple, object] = {}


def for_device(device):
    """The backend module that runs ops on tensors of ``device``."""
    device = torch.device(device)
    name = requested()
    key = (name, device.type, device.index)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _choose(name, device)
    return backend


def _choose(name: str, device: torch.device):
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
