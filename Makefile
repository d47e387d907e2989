# The two commands of the README. Both create .venv when missing and install everything first.
#   make demo   runs recipes/quickstart.toml (offline, under a minute on 2 CPU cores)
#   make test   runs the test suite
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
NVCC   := $(shell command -v nvcc 2>/dev/null)
# The toolkit root is the `cuda` folder under nvcc's prefix (its lib/ holds libcudart).
CUDA_HOME ?= $(if $(NVCC),$(abspath $(dir $(NVCC))/../cuda),)
# GPU architectures of the CUDA build. Where a GPU answers `nvidia-smi -L`, TORCH_CUDA_ARCH_LIST is left as the
# user has it (unset: torch builds for the visible GPUs, so the build matches the machine); without one there is
# nothing to detect, and 9.0 (the project's H200s) is the default rather than every architecture torch knows.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_GPU),)
TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCH_CUDA_ARCH_LIST
endif
export CUDA_HOME

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

demo: setup
	$(BIN)/bcdcore run recipes/quickstart.toml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf build *.egg-info bcdcore/*.so
