# One-command setup: a fresh machine with only the package registries gets a working venv.
# `make setup` installs exactly requirements/lock.txt (with uv) and redoes it only when the lock changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
LOCK_IN := requirements/lock.in
EXCLUDES := requirements/excludes.txt
STAMP := $(VENV)/.lock-stamp
UV_VERSION := $(shell sed -n 's/^uv==//p' $(LOCK))
FASHION_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -q
# The two extra venvs of the supported-range checks (issue: fresh machines).
LATEST_VENV := .venv-latest
OLDEST_VENV := .venv-oldest

.PHONY: setup data test demo lint bench clean lock test-latest test-oldest gpu-check gpu-wheels

setup: $(STAMP) data

# uv is pinned in the lock: pip bootstraps that version once, then uv syncs the venv to the lock
# (adding, upgrading and removing packages) and keeps itself, since it is in the lock too.
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip sync -q --python $(PY) $(LOCK)
	@touch $(STAMP)

# Refresh the lock to today's releases within pyproject's ranges; a refreshed lock must pass `make test`.
lock:
	uv pip compile -q --universal --python-version 3.11 --upgrade $(LOCK_IN) --excludes $(EXCLUDES) -o $(LOCK)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The supported range, each end in its own venv, resolved now (not from the lock):
# test-latest takes the newest release of every dependency within pyproject's ranges,
# test-oldest the lowest bound of each direct dependency (the GPU machine's stack).
test-latest: $(STAMP) data
	@test -x $(LATEST_VENV)/bin/python || $(VENV)/bin/uv venv -q --python $(PY) $(LATEST_VENV)
	$(VENV)/bin/uv pip install -q --python $(LATEST_VENV)/bin/python --upgrade --reinstall-package defocus-vlm \
		--excludes $(EXCLUDES) -r $(LOCK_IN)
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-oldest: $(STAMP) data
	@test -x $(OLDEST_VENV)/bin/python || $(VENV)/bin/uv venv -q --python $(PY) $(OLDEST_VENV)
	$(VENV)/bin/uv pip install -q --python $(OLDEST_VENV)/bin/python --resolution lowest-direct \
		--reinstall-package defocus-vlm --excludes $(EXCLUDES) -r $(LOCK_IN)
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/defocus-vlm demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/defocus-vlm bench kernels --device cpu

# The prepared GPU check (benchmarks/gpu/README.md). On the device machine the `run` tool calls
# benchmarks/gpu/run.sh directly (no make, no venv there); here `make gpu-check DRY_RUN=1` runs the same
# script end to end on CPU. gpu-wheels downloads / builds what the device machine lacks into .whl/.
DRY_RUN ?= 0
GPU_CHECK_OUT ?= outputs/gpu-check
gpu-check: $(if $(filter 1,$(DRY_RUN)),$(STAMP))
	DRY_RUN=$(DRY_RUN) OUT=$(abspath $(GPU_CHECK_OUT)) PYTHON=$(if $(filter 1,$(DRY_RUN)),$(PY),python3) \
		benchmarks/gpu/run.sh

gpu-wheels:
	benchmarks/gpu/prepare_wheels.sh

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache .ruff_cache
