# Two entry points: `make demo` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# PyTorch is installed first so a GPU user can choose the build, e.g.
#   make demo TORCH="torch torchvision --index-url <your CUDA wheel index>"
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint benchmark clean

$(BIN)/braindino: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/braindino
	$(BIN)/braindino demo

lint: $(BIN)/braindino
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

benchmark: $(BIN)/braindino
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/indexing.py

clean:
	rm -rf $(VENV) braindino-demo .pytest_cache .ruff_cache
