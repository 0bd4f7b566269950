# The two newcomer commands (see README):  make demo   |   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-all lint format toolchains arm-emulator clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: LUT -> latency model -> search -> AMC -> HAQ -> artifact + report,
# for the tiny space on mnist5k on this CPU (9-16 minutes on 2 cores).
demo: setup
	$(BIN)/codesign pipeline --out $(OUT)

# The default tier (README, CI): everything but tests marked slow (12-16 minutes on 2 cores).
test: setup
	$(BIN)/python -m pytest

# The quick tier while editing: no tuning, no RPC farms, no whole-network runs (about 3 minutes).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not tuning and not rpc and not network"

# Everything, including tests marked slow (minutes each).
test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Optional system toolchains: the aarch64 cross compiler for ARM artifacts (Debian/Ubuntu, root).
toolchains:
	command -v aarch64-linux-gnu-gcc >/dev/null || \
	  (apt-get update -q && apt-get install -y -q gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)

# Optional: an emulated arm64 board for the device farm (qemu-user chroot, ~360 MB, once).
arm-emulator: setup toolchains
	command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || \
	  (apt-get update -q && apt-get install -y -q qemu-user-static debootstrap binfmt-support)
	$(BIN)/codesign farm arm-emulator setup

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
