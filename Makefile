# fedota — the two commands the README opens with:
#   make demo   set everything up, then run the main job (`fedota simulate` on defaults)
#   make test   set everything up, then run lint, type checks and the whole test suite
.PHONY: setup demo test lint typecheck pytest postgres clean print-llama-cmake-args

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedota-installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

# How pip builds llama-cpp-python (the `device` extra; a source distribution that
# compiles llama.cpp with CMake). Defined once, in .ci/llama-cmake-args, which
# tests/test_device_install.py reads too; `make -s print-llama-cmake-args` shows it.
# The first build takes a few minutes on 2 cores (docs/benchmarks.md, "Device install").
# pip's wheel cache keeps the wheel, so later installs of the same release take seconds.
# pip keys that cache by the sdist's URL, not by CMAKE_ARGS: after changing the flags,
# run `$(BIN)/pip cache remove llama_cpp_python` to force a rebuild.
LLAMA_CMAKE_ARGS := $(strip $(shell grep -v '^\#' .ci/llama-cmake-args))

$(STAMP): pyproject.toml .ci/llama-cmake-args
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the machine's pip finds a CPU build of exactly this version.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# Everything (device, server, train, sim extras) plus the development tools.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fedota simulate --out $(OUT)

# PostgreSQL server binaries for the database tests (Debian's package; tests start
# their own throwaway cluster). Installed only when missing and when we may.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "postgresql binaries not found and cannot be installed: PostgreSQL tests will fail"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup postgres
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -q --durations=15

test: lint typecheck pytest

print-llama-cmake-args:
	@echo '$(LLAMA_CMAKE_ARGS)'

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
