"""A real MLflow server on 127.0.0.1 for the registry, serving and export tests, and checkpoints to
register in it (segnet-basic with seeded random weights: different seeds give different labels)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException

from pipelines.tracking import registry, runs
from segnet import build_model
from tests.helpers import free_port, wait_for_url

# As infra/local-cluster.sh and infra/mlflow-server.sh run it: without MLflow 3's job runner, 8 more Python
# processes (27 s of CPU a start here) that outlive the server's stop.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SIZE = (90, 120)  # the models' training size: inference at any input size is resized to it


def start_mlflow_server(
    folder: Path, port: int, *args: str, env: dict | None = None, artifacts: str | None = None
) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with a sqlite store and proxied artifacts in `folder` (started
    again on the same folder, it serves the same runs), or in `artifacts` (a bucket); returns once it
    answers."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--workers", "1", *args]
    cmd += ["--artifacts-destination", artifacts or str(folder / "artifacts")]
    env = {**(env or os.environ), **NO_JOB_RUNNER}
    with open(folder / "server.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", proc)
    except BaseException:
        stop_mlflow_server(proc)
        raise
    return proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def start_mlflow():
    """`start_mlflow(folder, port, *args, env=None, artifacts=None)` starts `mlflow server`
    (start_mlflow_server) for one test; whatever is still running afterwards is stopped."""
    procs = []

    def start(folder: Path, port: int, *args: str, **kw) -> subprocess.Popen:
        procs.append(start_mlflow_server(folder, port, *args, **kw))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite store and proxied artifacts; yields its http URI."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


def write_checkpoint(folder: Path, seed: int, data: Path, dropout: float = 0.0) -> Path:
    torch.manual_seed(seed)
    model = build_model("segnet-basic", num_classes=11)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    config = {"model": "segnet-basic", "data": str(data), "dropout": dropout}
    meta = {"config": config, "num_classes": 11, "image_size": SIZE}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def register_seeded(camvid_dir):
    """A function registering the checkpoint of `seed` as a new version of `name` with test mIoU `miou`
    (`dropout=0.5`: a Bayesian SegNet-Basic, whose weights are those of its seed)."""
    return lambda uri, name, seed, miou, tmp, **kw: _register(uri, name, seed, miou, tmp, camvid_dir, **kw)


def _register(uri: str, name: str, seed: int, miou: float, tmp: Path, data: Path, dropout=0.0, **kw) -> dict:
    c = runs.client(uri)
    exp = c.get_experiment_by_name("tests")
    local = None if uri.startswith("http") else (tmp / "artifacts").as_uri()  # a server proxies them
    try:
        exp_id = exp.experiment_id if exp else c.create_experiment("tests", artifact_location=local)
    except MlflowException:  # another process registering at the same moment created it
        exp_id = c.get_experiment_by_name("tests").experiment_id
    run = c.create_run(exp_id, run_name=f"{name}-{seed}")
    ckpt = write_checkpoint(tmp / f"{name}-{seed}", seed, data, dropout)
    scores = {"miou": miou, "global_accuracy": 0.8, "class_accuracy": 0.6, "bf": 0.5}
    kw.setdefault("log", lambda _: None)
    return registry.register(uri, name, ckpt, scores, "0" * 64, run.info.run_id, **kw)
