"""``python -m lora_kernels.info``: versions and which backend can run where."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends


def _cuda_extension_line() -> str:
    """Whether lora_kernels._C_cuda is built, with which toolkit, for which GPUs."""
    try:
        cuda = backends.get("cuda")
    except Exception as e:  # the backend module itself failed to import
        return f"cuda extension: unavailable ({e})"
    if not cuda.built():
        return f"cuda extension: not built (build it with `{cuda.BUILD_HINT}`)"
    archs = ", ".join(f"sm_{a.replace('.', '').replace('+PTX', '')}"
                      + (" (+PTX)" if a.endswith("+PTX") else "") for a in cuda.arch_list())
    return (f"cuda extension: built (lora_kernels._C_cuda, CUDA {cuda.cuda_version()}, "
            f"architectures {archs or 'unknown'})")


def _cpu_lines() -> list:
    """The cpu backend's SIMD level and whether its row kernels (float32
    embedding; AVX-512 or AVX2) run."""
    try:
        backends.get("cpu")  # loads lora_kernels._C when it is built
        isa = torch.ops.lora_kernels_cpu._cpu_isa()
        rows = torch.ops.lora_kernels_cpu._row_kernels()
    except Exception:  # the extension is not built
        return ["cpu SIMD: none (lora_kernels._C is not built)",
                "cpu row kernels: off (lora_kernels._C is not built)"]
    return [f"cpu SIMD: {isa}", f"cpu row kernels (float32 embedding): {rows}"]


def _ops_line() -> str:
    """How the ops reach their kernels."""
    from . import ops
    if not ops.NATIVE:
        return ("ops: defined in Python (lora_kernels._C is not built): the reference "
                "backend, Python autograd")
    line = "ops: compiled (lora_kernels._C): the dispatcher runs the C++ kernels and autograd"
    env = backends.env_choice()
    if env != "auto":
        line += f"; LORA_KERNELS_BACKEND={env}: the CPU and CUDA kernels are {env}'s"
    return line


def report() -> str:
    lines = [f"lora_kernels {__version__}", f"torch {torch.__version__}",
             f"python {sys.version.split()[0]} ({platform.machine()})",
             f"requested backend: {backends.requested()}", _ops_line(),
             _cuda_extension_line(), *_cpu_lines()]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        try:
            chosen = backends.resolved_name(dev)
        except Exception as e:  # a forced backend that cannot run
            chosen = f"none ({e})"
        lines.append(f"\n{dev}: auto picks {chosen}" if backends.requested() == "auto"
                     else f"\n{dev}: runs {chosen}")
        for name in backends.NAMES:
            why = backends.reasons(name, dev)
            lines.append(f"  {name:<10} " + ("available" if not why
                                             else "unavailable: " + "; ".join(why)))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
