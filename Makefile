# Quick start:  make bench   (set up .venv, build, run the side-by-side benchmark)
#               make test    (set up .venv, build, run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
STAMP  := $(VENV)/.lora_kernels-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/cpu/*.h csrc/cpu/*.cpp)

.PHONY: setup bench test info clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH) ninja pybind11
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	touch $@

bench: $(STAMP)
	$(PY) -m lora_kernels.bench $(ARGS)

# The second run puts the Triton kernels through the interpreter on CPU tensors.
test: $(STAMP)
	$(PY) -m pytest -q tests benchmarks --benchmark-disable $(ARGS)
	TRITON_INTERPRET=1 LORA_KERNELS_BACKEND=triton $(PY) -m pytest -q -p no:cacheprovider \
	    tests -k triton $(ARGS)

info: $(STAMP)
	$(PY) -m lora_kernels.info

clean:
	rm -rf build *.egg-info lora_kernels/_C*.so
