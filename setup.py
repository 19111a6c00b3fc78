"""Build of lora_kernels and its compiled extension ``lora_kernels._C``.

The extension holds the C++ kernels of ``csrc/`` and registers them with the
PyTorch dispatcher (TORCH_LIBRARY); it has no pybind11 module, only an empty
``PyInit__C`` whose import loads the library. It is therefore built against
the limited Python API (``py_limited_api``; torch's BuildExtension then
defines Py_LIMITED_API for CPython 3.10): one abi3 build serves every
CPython >= 3.10 for a given torch.

    pip install --no-build-isolation -e .      # editable, needs torch already installed

Environment: ``MAX_JOBS`` bounds the parallel compile jobs (ninja);
``LORA_KERNELS_DEBUG=1`` builds with -O0 -g.
"""
import glob
import os

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
        sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


def get_extensions():
    """The extensions to build (a CUDAExtension for csrc/cuda joins here later)."""
    return [cpu_extension()]


TEST_REQUIRES = ["pytest", "pytest-benchmark", "hypothesis", "loralib", "peft", "transformers",
                 "safetensors", "expecttest"]
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
    zip_safe=False,
)
