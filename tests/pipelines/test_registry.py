"""The registered model: MLflow 3 metrics on the LoggedModel, the champion rule, image inputs, and loading
it where the project is not installed (a fresh venv; `mlflow models serve`)."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.tracking import registry, runs
from segnet import SegNetError
from tests.helpers import free_port, mlflow_store, wait_for_url


@pytest.fixture(scope="module")
def store(register_seeded, tmp_path_factory):
    """A sqlite registry with v1 (mIoU 0.5, champion), v2 (0.4) and v3 (0.6, the new champion)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = mlflow_store(tmp / "mlflow.db")
    results = [register_seeded(uri, "m", seed, miou, tmp) for seed, miou in ((1, 0.5), (2, 0.4), (3, 0.6))]
    return uri, results


@pytest.fixture(scope="module")
def image(camvid_dir) -> bytes:
    return sorted((camvid_dir / "test").iterdir())[0].read_bytes()


def test_test_metrics_are_logged_on_the_logged_model_linked_to_the_test_data(store):
    uri, results = store
    c = runs.client(uri)
    metrics = {m.key: m for m in c.get_logged_model(results[0]["model_id"]).metrics}
    assert metrics["test_miou"].value == 0.5
    assert (metrics["test_miou"].dataset_name, metrics["test_miou"].dataset_digest) == (
        "camvid-test",
        "0" * 32,
    )
    assert not [k for k in c.get_model_version("m", "1").tags if k.startswith("test_")]


def test_champion_moves_only_to_a_version_whose_logged_model_scores_higher(store):
    _, results = store
    assert [r["champion"] for r in results] == [True, False, True]
    assert "0.6000 beats v1's 0.5000" in results[2]["reason"]


def test_show_and_list_read_metrics_versions_and_aliases(store):
    uri, _ = store
    shown = registry.show(uri, "models:/m@champion")
    assert (shown["version"], shown["metrics"]["test_miou"]) == ("3", 0.6)
    assert registry.list_models(uri) == [
        {"name": "m", "versions": ["1", "2", "3"], "aliases": {"champion": "3"}}
    ]


def test_registering_prints_the_ui_address(register_seeded, tmp_path):
    lines = []
    register_seeded(f"sqlite:///{tmp_path}/mlflow.db", "ui", 1, 0.5, tmp_path, log=lines.append)
    assert any("#/models/ui/versions/1" in line for line in lines)


def test_the_model_logs_its_code_and_exact_requirements_with_torch(store):
    uri, _ = store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    reqs = open(mlflow.pyfunc.get_model_dependencies("models:/m@champion")).read().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs
    assert not [r for r in reqs if r.startswith("segnet")]
    local = mlflow.artifacts.download_artifacts("models:/m@champion")
    assert os.path.isfile(os.path.join(local, "code", "segnet", "layers.py"))


def test_every_input_form_gives_the_same_labels_at_the_images_size(store, image):
    uri, _ = store
    model = registry.load(uri, "m@champion")
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    jpeg = io.BytesIO()
    Image.fromarray(rgb[:200, :300]).save(jpeg, format="JPEG")
    cells = [
        image,
        base64.b64encode(image).decode(),
        rgb,
        (rgb.transpose(2, 0, 1)[None] / 255).astype("float32"),
    ]
    labels = model.predict(pd.DataFrame({"image": [*cells, jpeg.getvalue()]}))
    assert [lb.shape for lb in labels] == [(360, 480)] * 4 + [(200, 300)]
    assert all(np.array_equal(labels[0], lb) for lb in labels[1:4])


def test_mc_params_add_the_uncertainty_beside_the_labels_and_leave_the_default_output_alone(
    register_seeded, image, tmp_path
):
    """A Bayesian SegNet-Basic: without params, one uint8 label map per image as ever; with mc_samples and
    uncertainty, a dict of labels and a float32 map in [0, 1] per image, at each image's size. The same
    weights without dropout refuse mc_samples, naming why."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    register_seeded(uri, "bayes", 1, 0.5, tmp_path, dropout=0.5)
    register_seeded(uri, "plain", 1, 0.5, tmp_path)
    model, plain = registry.load(uri, "bayes@champion"), registry.load(uri, "plain@champion")
    crop = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[:200, :300])
    frame = pd.DataFrame({"image": [image, crop]})
    labels = model.predict(frame)
    assert [(lb.dtype, lb.shape) for lb in labels] == [(np.uint8, (360, 480)), (np.uint8, (200, 300))]
    assert np.array_equal(labels[0], plain.predict(frame)[0])  # dropout is off without params
    out = model.predict(frame, params={"mc_samples": 4, "mc_batch": 3, "uncertainty": True})
    assert [sorted(o) for o in out] == [["labels", "uncertainty"]] * 2
    assert out[0]["labels"].shape == out[0]["uncertainty"].shape == (360, 480)
    assert out[1]["labels"].shape == out[1]["uncertainty"].shape == (200, 300)
    assert out[0]["labels"].dtype == np.uint8 and out[0]["uncertainty"].dtype == np.float32
    assert 0 <= out[0]["uncertainty"].min() < out[0]["uncertainty"].max() <= 1
    with pytest.raises(SegNetError, match="mc_samples 4: model 'segnet-basic' has no dropout"):
        plain.predict(frame, params={"mc_samples": 4})


@pytest.mark.parametrize(
    "cell, message",
    [
        (b"not an image", "image 1 cannot be decoded"),
        ("@@not base64@@", "image 1 is a string but not base64"),
        (np.zeros((4, 5), np.uint8), "image 1 is a uint8 array of shape (4, 5)"),
        (np.zeros((8, 8, 3), np.float64), "image 1 is a float64 array"),
        (np.zeros((8000, 6000, 3), np.uint8), "image 1 has 6000x8000 pixels, over the limit"),
    ],
)
def test_a_bad_input_is_refused_naming_it(store, image, cell, message):
    model = registry.load(store[0], "m@champion")
    with pytest.raises(SegNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.predict(pd.DataFrame({"image": [image, cell]}))


def test_a_pixel_bomb_png_is_refused_before_decoding(store):
    bomb = io.BytesIO()
    Image.new("1", (8000, 6000)).save(bomb, format="PNG")  # 48 MP in a few kB
    with pytest.raises(SegNetError, match="image 0 has 8000x6000 pixels, over the limit"):
        registry.load(store[0], "m@champion").predict(pd.DataFrame({"image": [bomb.getvalue()]}))


def test_registry_list_prints_versions_and_aliases(store, capsys):
    assert main(["registry", "list", "--mlflow-uri", store[0]]) == 0
    assert "1,2,3" in capsys.readouterr().out
    assert main(["registry", "list", "--mlflow-uri", store[0], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # stdout: the document alone
    assert [(r["name"], r["versions"]) for r in rows] == [("m", ["1", "2", "3"])]


def test_registry_show_json_is_the_only_thing_on_stdout(store, capsys):
    assert main(["registry", "show", "m@champion", "--mlflow-uri", store[0], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["aliases"]) == ("3", ["champion"])
    assert main(["registry", "show", "m/2", "--mlflow-uri", store[0]]) == 0
    assert re.search(r"^version +2$", capsys.readouterr().out, re.M)  # a person's view: a line per key


@pytest.mark.slow
def test_the_champion_loads_and_predicts_in_a_fresh_venv_without_the_project(
    mlflow_server, register_seeded, image, camvid_dir, tmp_path
):
    register_seeded(mlflow_server, "fresh", 7, 0.5, tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    requirements = mlflow.pyfunc.get_model_dependencies("models:/fresh@champion")
    venv = tmp_path / "venv"
    (tmp_path / "pin.txt").write_text("torch==2.13.0\n")  # the CPU wheel pip has; never a CUDA build
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # no byte-compiling of every installed module (most of pip's time here): Python compiles what it imports
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pip += ["--no-compile"]
    subprocess.run([*pip, "-c", str(tmp_path / "pin.txt"), "-r", requirements], check=True, timeout=900)
    print(f"fresh venv from the model's requirements in {time.monotonic() - t0:.0f} s")
    test_image = sorted((camvid_dir / "test").iterdir())[0]
    script = f"""
import importlib.util, json, mlflow, numpy as np, pandas as pd
assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("data_prep") is None
model = mlflow.pyfunc.load_model("models:/fresh@champion")
labels = model.predict(pd.DataFrame({{"image": [open({str(test_image)!r}, "rb").read()]}}))[0]
np.save("labels.npy", labels)
"""
    env = {
        "PATH": os.environ["PATH"],
        "MLFLOW_TRACKING_URI": mlflow_server,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HOME": str(tmp_path),
    }
    subprocess.run([str(venv / "bin/python"), "-c", script], cwd=tmp_path, env=env, check=True, timeout=300)
    ours = registry.load(mlflow_server, "fresh@champion").predict(pd.DataFrame({"image": [image]}))[0]
    assert np.array_equal(np.load(tmp_path / "labels.npy"), ours)


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(store, image, tmp_path):
    uri, _ = store
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/m@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    log = open(tmp_path / "serve.log", "w")
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # it runs `uvicorn` from this venv
    env = {
        **os.environ,  # mlflow.set_*_uri in this process also set these variables: both name this store
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PATH": path,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/ping", proc)
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert r.status_code == 200, (r.text, (tmp_path / "serve.log").read_text()[-2000:])
    labels = np.asarray(json.loads(r.text)["predictions"][0])
    assert np.array_equal(
        labels, registry.load(uri, "m@champion").predict(pd.DataFrame({"image": [image]}))[0]
    )


def test_a_new_run_prints_its_ui_address(tmp_path, capsys):
    from pipelines.config import TrainConfig

    (tmp_path / "manifest.json").write_text("{}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rid = runs.start_run(uri, "e", "r", TrainConfig(data=str(tmp_path)), tmp_path / "manifest.json", "0" * 64)
    assert f"/runs/{rid} (after: mlflow ui --backend-store-uri {uri})" in capsys.readouterr().out
