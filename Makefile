# One venv in .venv; torch pinned by constraints.txt so no CUDA wheels are pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
CAMVID_DIR ?= ../shared/camvid
export CAMVID_DIR

.PHONY: install test test-fast lint run table1 camvid-compact gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

run: install
	$(BIN)/segnet run

table1: install
	$(BIN)/segnet experiment table1 --config configs/table1-cpu.yaml --out docs/table1-cpu

# The compact CamVid copy a GPU machine gets (images re-encoded as JPEG q95, labels exact; ~53 MB).
camvid-compact: install
	$(BIN)/python -m data_prep.compact $(CAMVID_DIR) .gpu/camvid

# On a GPU machine (torch, numpy, pillow, pyarrow, scipy; no Ray, MLflow or albumentations needed):
# step rows, input path, device BF, a short training; gpu-check/gpu-check.{json,md}. Under 8 minutes.
gpu-check:
	python3 -m pipelines.gpu_check --data .gpu/camvid --out gpu-check

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
