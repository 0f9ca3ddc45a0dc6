# One venv in .venv; torch pinned by constraints.txt so no CUDA wheels are pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
CAMVID_DIR ?= ../shared/camvid
export CAMVID_DIR

.PHONY: install test test-fast lint run table1 camvid-compact gpu-check gpu-table1 clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'

# Two pytest processes side by side, each with its own session (Ray, S3 server, shards): most of a slow test is
# one process starting after another (imports, Ray's actors), so one core idles. The second holds modules that
# run Rays or clusters of their own, searches, or Table 1; its output follows the first's. (pytest-xdist, which deals
# files out at random, took as long as one process on 2 cores: 2026-12-02.) `tests/lanes.sh` says how.
LANE_B := tests/infra tests/pipelines/test_tune.py tests/pipelines/test_sigterm.py \
	tests/pipelines/test_flaky_bucket_runs.py tests/data_prep/test_flaky_bucket.py tests/pipelines/test_experiment.py
test: install
	PY=$(BIN)/python bash tests/lanes.sh $(LANE_B)

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
	python3 -m pipelines.bench.gpu_check --data .gpu/camvid --out gpu-check

# On a GPU machine (as gpu-check): Table 1's 8 variants, the paper's recipe, median-frequency balancing, in at
# most 7 minutes; rows in gpu-table1/rows/, the report in gpu-table1/report/. `--balancing none` (a second
# call) adds the natural-frequency rows.
gpu-table1:
	python3 -m pipelines.bench.gpu_table1 --data .gpu/camvid --out gpu-table1

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
