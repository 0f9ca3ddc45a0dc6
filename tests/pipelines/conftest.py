"""A real MLflow server on 127.0.0.1 for the registry, serving and export tests, and checkpoints to
register in it (segnet-basic with seeded random weights: different seeds give different labels)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException

from pipelines import registry, tracking
from segnet import build_model

SIZE = (90, 120)  # the models' training size: inference at any input size is resized to it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function giving a free TCP port on 127.0.0.1."""
    return _free_port


@pytest.fixture(scope="session")
def wait_for():
    """A function waiting until a server process answers at a URL (or fails if it exits)."""
    return _wait_for


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def start_mlflow_server(folder: Path, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with a sqlite store and proxied artifacts in `folder` (started
    again on the same folder, it serves the same runs); returns once it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--workers", "1", *args]
    cmd += ["--artifacts-destination", str(folder / "artifacts")]
    with open(folder / "server.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", proc)
    except BaseException:
        stop_mlflow_server(proc)
        raise
    return proc


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def start_mlflow():
    """`start_mlflow(folder, port, *args, env=None)` starts `mlflow server` (start_mlflow_server) for one
    test; whatever is still running afterwards is stopped."""
    procs = []

    def start(folder: Path, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
        procs.append(start_mlflow_server(folder, port, *args, env=env))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite store and proxied artifacts; yields its http URI."""
    port = _free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


def write_checkpoint(folder: Path, seed: int, data: Path) -> Path:
    torch.manual_seed(seed)
    model = build_model("segnet-basic", num_classes=11)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    meta = {"config": {"model": "segnet-basic", "data": str(data)}, "num_classes": 11, "image_size": SIZE}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def register_seeded(camvid_dir):
    """A function registering the checkpoint of `seed` as a new version of `name` with test mIoU `miou`."""
    return lambda uri, name, seed, miou, tmp, **kw: _register(uri, name, seed, miou, tmp, camvid_dir, **kw)


def _register(uri: str, name: str, seed: int, miou: float, tmp: Path, data: Path, **kw) -> dict:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("tests")
    local = None if uri.startswith("http") else (tmp / "artifacts").as_uri()  # a server proxies them
    try:
        exp_id = exp.experiment_id if exp else c.create_experiment("tests", artifact_location=local)
    except MlflowException:  # another process registering at the same moment created it
        exp_id = c.get_experiment_by_name("tests").experiment_id
    run = c.create_run(exp_id, run_name=f"{name}-{seed}")
    ckpt = write_checkpoint(tmp / f"{name}-{seed}", seed, data)
    scores = {"miou": miou, "global_accuracy": 0.8, "class_accuracy": 0.6, "bf": 0.5}
    kw.setdefault("log", lambda _: None)
    return registry.register(uri, name, ckpt, scores, "0" * 64, run.info.run_id, **kw)
