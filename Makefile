# Two commands set up a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned to the local CPU wheel: any other version pulls gigabytes of CUDA.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Nothing in demo or tests may reach a model hub or install behind our back
# (TransformerLens tries `pip install torchvision` when it cannot build a processor).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install install-dev lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0

# every extra (nnsight, tl, sae, gguf): make demo exports a llama.cpp control vector
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e ".[all]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

DEMO_OUT ?= out/demo

# The whole pipeline on the organism: phenomena -> trace -> probe -> steer + evaluate -> export + deploy,
# a summary table and one HTML report ($(DEMO_OUT)/report.html).
demo: install
	PIP_NO_INDEX=1 $(BIN)/haltrace demo --out $(DEMO_OUT)

test: install-dev
	$(BIN)/lint-imports --no-cache --no-logo  # the layer contracts in pyproject.toml ([tool.importlinter])
	PIP_NO_INDEX=1 $(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check haltrace tests bench

clean:
	rm -rf $(VENV) build *.egg-info
