# Two commands: `make train` and `make test`. Each creates/reuses .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned so a CPU machine takes the local CPU wheel instead of the multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: train test install clean ext cmake-test

# --no-build-isolation: setup.py sees the venv's torch and builds the native extension awm_fast._C (csrc/,
# ~20 s on 2 cores; skipped with a one-line notice without a compiler or with AWM_FAST_NO_EXT=1), and pip never
# pulls another torch into an isolated build environment. `make train` installs what training needs; `make test`
# adds the test tools and the optional packages the tests exercise (the `dev` extra: triton's interpreter, OCR,
# wandb).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=77" wheel
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/awm-fast train $(ARGS)

# The suite on one pytest-xdist worker per core (TEST_WORKERS=1: one process); a module's tests stay on one worker
# (--dist loadfile), and so do the modules sharing a session fixture (tests/conftest.py), so each is built once.
# PYTHONDONTWRITEBYTECODE cleared: the suite starts ~60 Python processes (workers, torchrun ranks, command lines),
# and each would compile the package's sources again (~0.6 s) where it can read the first one's __pycache__.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

ext: $(STAMP)  # rebuild the native extension in place after editing csrc/
	$(PY) setup.py build_ext --inplace

cmake-test: $(STAMP)  # the CMake build (libtorch, CUDA sources with nvcc when present) and its ctest
	cmake -S . -B build -DAWM_FAST_PYTHON=$(abspath $(PY)) && cmake --build build -j2 && ctest --test-dir build --output-on-failure

clean:
	rm -rf $(VENV) runs .pytest_cache
