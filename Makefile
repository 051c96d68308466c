# The README's commands. `make setup` is idempotent: re-running only installs what is missing.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slow test-all test-torch211 lint quickstart ablations ablations-shapes bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	# torch first: deepspeed is a source package that imports torch while building.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PIN)
	$(BIN)/python -c "import deepspeed" 2>/dev/null || $(BIN)/python -m pip install --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $@

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-slow: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow

test-all: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "slow or not slow"

# The compile tests on torch 2.11 (the GPU image's torch), in a throwaway CPU venv outside the repo
# (~5 GB with torch's CUDA libraries, about a minute to install): not part of CI.
VENV211     ?= /tmp/venv211
TORCH211    := torch==2.11.0 torchvision==0.26.0
test-torch211:
	test -x $(VENV211)/bin/python || $(PY) -m venv $(VENV211)
	$(VENV211)/bin/python -c "import sys, torch; sys.exit(not torch.__version__.startswith('2.11.'))" 2>/dev/null || \
		$(VENV211)/bin/python -m pip install $(TORCH211) timm pillow pytest pytest-timeout
	OMP_NUM_THREADS=1 $(VENV211)/bin/python -m pytest -q -p no:cacheprovider \
		tests/models/test_compile_counts.py tests/models/test_compile.py tests/models/test_attention_products.py

lint: setup
	$(BIN)/ruff check models pipeline tests benchmarks

quickstart: setup
	$(BIN)/python -m pipeline run jobs/quickstart.yaml

# the paper's ablations on digits (SSL vs scratch x labels x 3 seeds, SSA vs softmax, SCS vs SPS, T 1 vs 4)
ablations: setup
	$(BIN)/python -m pipeline run jobs/ablations.yaml

# the same grid on the generated shapes (1%/10%/100% labels x 3 seeds, the no-LIF control), then its
# dated section in docs/ABLATIONS.md; MLflow store: outputs/ablations_shapes/mlflow.db
ablations-shapes: setup
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/outputs/ablations_shapes/mlflow.db $(BIN)/python -m pipeline run jobs/ablations_shapes.yaml
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/outputs/ablations_shapes/mlflow.db $(BIN)/python benchmarks/ablations_report.py --spec jobs/ablations_shapes.yaml

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
