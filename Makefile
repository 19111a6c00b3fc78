# Quick start:  make bench   (set up .venv, build, run the side-by-side benchmark)
#               make test    (set up .venv, build, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
STAMP  := $(VENV)/.lora_kernels-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp)

.PHONY: setup bench test cuda-check info clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH) ninja pybind11
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

bench: $(STAMP)
	$(PY) -m lora_kernels.bench $(ARGS)

# The second run puts the Triton kernels through the interpreter on CPU tensors;
# the third runs the CPU kernels' tests as on an x86 machine without AVX-512
# (lora_kernels' kernels, ATen's dispatch and oneDNN all capped at AVX2).
AVX2_ONLY := LORA_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
CPU_TESTS := tests/test_cpu_kernels.py tests/test_dropout_mask.py tests/test_layers.py \
             tests/test_layers_vs_loralib.py tests/test_ops.py tests/test_ops_properties.py \
             tests/test_backends.py tests/test_dropped_linear.py

test: $(STAMP) cuda-check
	$(PY) -m pytest -q tests benchmarks --benchmark-disable $(ARGS)
	TRITON_INTERPRET=1 LORA_KERNELS_BACKEND=triton $(PY) -m pytest -q -p no:cacheprovider \
	    tests -k triton $(ARGS)
	$(AVX2_ONLY) $(PY) -m pytest -q -p no:cacheprovider $(CPU_TESTS) $(ARGS)

# The CUDA build check: where nvcc is on PATH, build the CUDA extension in
# place for one architecture (sm_90) and check that it imports and registers
# a CUDA kernel for every op, as the dispatcher's kernel of the lora_kernels
# op and as the cuda backend's (merge_ is a Python op that calls the latter;
# no GPU needed). Without nvcc it is skipped.
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_OPS := lora_linear_fwd lora_linear_bwd lora_embedding_fwd lora_embedding_bwd merge_ dropout \
            lora_delta_fwd lora_delta_bwd
define CUDA_CHECK_PY
import sys, torch
import lora_kernels
import lora_kernels._C_cuda as ext
missing = [ns + op for op in sys.argv[1:] for ns in ("lora_kernels::", "lora_kernels_cuda::")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(ns + op, "CUDA")
           and not (ns == "lora_kernels::" and op == "merge_")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"cuda-check: lora_kernels._C_cuda (CUDA {ext.cuda_version}, TORCH_CUDA_ARCH_LIST={ext.arch_list})"
      f" registers a CUDA kernel for {len(sys.argv) - 1} ops")
endef
export CUDA_CHECK_PY

cuda-check: $(STAMP)
ifeq ($(NVCC),)
	@echo "cuda-check: skipped (nvcc is not on PATH: no CUDA code built)"
else
	LORA_KERNELS_CUDA=only TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$${MAX_JOBS:-2} \
	    $(PY) setup.py -q build_ext --inplace
	$(PY) -c "$$CUDA_CHECK_PY" $(CUDA_OPS)
endif

info: $(STAMP)
	$(PY) -m lora_kernels.info

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so
