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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a sqlite store and proxied artifacts; yields its http URI."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--artifacts-destination",
        str(tmp / "artifacts"),
        "--workers",
        "1",
    ]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{uri}/health", proc)
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


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
    exp_id = exp.experiment_id if exp else c.create_experiment("tests", artifact_location=local)
    run = c.create_run(exp_id, run_name=f"{name}-{seed}")
    ckpt = write_checkpoint(tmp / f"{name}-{seed}", seed, data)
    scores = {"miou": miou, "global_accuracy": 0.8, "class_accuracy": 0.6, "bf": 0.5}
    kw.setdefault("log", lambda _: None)
    return registry.register(uri, name, ckpt, scores, "0" * 64, run.info.run_id, **kw)
