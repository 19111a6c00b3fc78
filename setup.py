"""Build of lora_kernels and its compiled extensions.

``lora_kernels._C`` holds the C++ kernels of ``csrc/cpu`` and
``lora_kernels._C_cuda`` (only with ``LORA_KERNELS_CUDA=1``) the CUDA kernels
of ``csrc/cuda``. Each registers its kernels with the PyTorch dispatcher
(TORCH_LIBRARY, namespaces ``lora_kernels_cpu`` / ``lora_kernels_cuda``) and
has no pybind11 module, only an empty ``PyInit_*`` whose import loads the
library. Both are therefore built against the limited Python API
(``py_limited_api``; torch's BuildExtension then defines Py_LIMITED_API for
CPython 3.10): one abi3 build serves every CPython >= 3.10 for a given torch.

    pip install --no-build-isolation -e .                           # CPU extension
    LORA_KERNELS_CUDA=1 pip wheel --no-build-isolation . -w dist    # one wheel, CPU + CUDA

Environment: ``MAX_JOBS`` bounds the parallel compile jobs (ninja);
``LORA_KERNELS_DEBUG=1`` builds with -O0 -g.
``LORA_KERNELS_CUDA``: ``0`` (default) builds no CUDA code and needs no nvcc;
``1`` also builds the CUDA extension; ``only`` builds just the CUDA
extension (the Makefile's quick CUDA build check).
``TORCH_CUDA_ARCH_LIST`` (default "8.0;8.6;8.9;9.0"): the GPU architectures.
``CUDA_HOME``: the toolkit; when unset, the one of the ``nvcc`` on PATH (from
``nvcc --dryrun``). ``NVCC_THREADS``: nvcc's --threads (architectures
compiled in parallel within one file).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Wheel tag of the abi3 build: torch.utils.cpp_extension compiles
# py_limited_api extensions with -DPy_LIMITED_API=<its min_supported_cpython>,
# CPython 3.10 (0x030A0000) for the torch versions we build against.
ABI3_TAG = "cp310"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cpu_extension():
    debug = os.environ.get("LORA_KERNELS_DEBUG", "0") == "1"
    # -g0 drops the debug info that Python's own CFLAGS (-g) would add.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # at::parallel_for is header code built on OpenMP (as torch is): compile
    # and link with -fopenmp; at run time libgomp resolves to torch's copy.
    cxx += ["-fopenmp"]
    return CppExtension(
        name="lora_kernels._C",
        # csrc/*.cpp: the lora_kernels library, its autograd and composites
        # (device-independent); csrc/cpu: the CPU kernels.
        sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                     + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"


def cuda_mode():
    mode = os.environ.get("LORA_KERNELS_CUDA", "0").strip().lower() or "0"
    if mode not in ("0", "1", "only"):
        sys.exit(f"setup.py: LORA_KERNELS_CUDA must be 0, 1 or only, got {mode!r}")
    return mode


def find_cuda_home():
    """CUDA_HOME if set, else the toolkit of the nvcc on PATH: `nvcc --dryrun`
    prints the toolkit folder as TOP= (nvcc may be a wrapper or a link
    outside the toolkit, so its own folder's parent is not a safe guess)."""
    home = os.environ.get("CUDA_HOME")
    if home:
        if not os.path.exists(os.path.join(home, "bin", "nvcc")):
            sys.exit(f"setup.py: CUDA_HOME={home} has no bin/nvcc")
        return os.path.abspath(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("setup.py: LORA_KERNELS_CUDA is set but nvcc is not on PATH; "
                 "install the CUDA toolkit or set CUDA_HOME")
    run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", run.stdout + run.stderr, re.MULTILINE)
    if top is None or not os.path.exists(os.path.join(top.group(1).strip(), "bin", "nvcc")):
        sys.exit(f"setup.py: could not find the CUDA toolkit of {nvcc} (no TOP= line in "
                 "`nvcc --dryrun`); set CUDA_HOME")
    return os.path.realpath(top.group(1).strip())


def cuda_extension():
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import CUDAExtension

    home = find_cuda_home()
    # torch.utils.cpp_extension guessed its CUDA_HOME at import (from nvcc's
    # folder); it reads the module global when it builds.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    arch_items = [a for a in re.split(r"[;\s]+", archs) if a]
    print(f"lora_kernels: building the CUDA extension with the toolkit at {home} "
          f"for TORCH_CUDA_ARCH_LIST={archs}", flush=True)
    debug = os.environ.get("LORA_KERNELS_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # The arch list, recorded in the module (registration.cpp); commas keep
    # the define free of characters the build's shell would interpret.
    cxx += ["-DLK_CUDA_ARCH_LIST=" + ",".join(arch_items)]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    if os.environ.get("NVCC_THREADS"):
        nvcc += ["--threads", os.environ["NVCC_THREADS"]]
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    sources += glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", "*.cu"))
    return CUDAExtension(
        name="lora_kernels._C_cuda",
        sources=_rel(sources),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        py_limited_api=True,
    )


def get_extensions():
    """The CPU extension, and with LORA_KERNELS_CUDA=1 the CUDA one (=only: that alone)."""
    mode = cuda_mode()
    exts = [] if mode == "only" else [cpu_extension()]
    if mode in ("1", "only"):
        exts.append(cuda_extension())
    return exts


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension (ninja), which also drops a CUDA extension left in
    the build folder by an earlier LORA_KERNELS_CUDA build when this build has
    none: setuptools reuses build/lib, and a CPU-only wheel must not pick it up."""

    def run(self):
        if not any(ext.name == "lora_kernels._C_cuda" for ext in self.extensions):
            for stale in glob.glob(os.path.join(self.build_lib, "lora_kernels", "_C_cuda*")):
                os.remove(stale)
        super().run()


TEST_REQUIRES = ["pytest", "pytest-benchmark", "hypothesis", "loralib", "peft", "transformers",
                 "safetensors", "expecttest",
                 # QLoRA tests: 4-bit NF4 and 8-bit layers (they run on x86 CPUs too)
                 "bitsandbytes>=0.50; platform_system == 'Linux'"]
BENCH_REQUIRES = ["tqdm", "matplotlib", "loralib", "peft"]

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA layers (Linear, MergedLinear, Embedding) for PyTorch",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch"],
    extras_require={"test": TEST_REQUIRES, "bench": BENCH_REQUIRES},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
    zip_safe=False,
)
