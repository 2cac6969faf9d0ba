# The two quick-start commands of the README. Both are idempotent: a second run reuses .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel on machines without CUDA; override with TORCH_SPEC="torch==2.13.0 --index-url ..." for CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lad demo --out demo-output

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output
