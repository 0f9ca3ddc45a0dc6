"""--init-from: a checkpoint of another dataset (another class count) starts a run; its encoder and decoder
load, the classifier starts anew. The loading function in-process, one `segnet train` end to end."""

import json
from dataclasses import asdict

import pytest
import torch

from data_prep import prepare
from pipelines.config import TrainConfig
from pipelines.core import checkpoint as ckpt_io
from pipelines.train.driver import stage_init_weights
from segnet import SegNetError
from segnet.models import build_model
from tests.data_prep.test_datasets import make_generic
from tests.helpers import mlflow_store


def _checkpoint(folder, model_name: str = "segnet-basic", num_classes: int = 11):
    torch.manual_seed(1)
    model = build_model(model_name, num_classes=num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = {"config": asdict(TrainConfig(model=model_name)), "num_classes": num_classes}
    ckpt_io.save(folder, model, optimizer, 0, meta)
    return model


def test_an_11_class_checkpoint_initialises_a_3_class_model_but_its_classifier(tmp_path):
    trained = _checkpoint(tmp_path).state_dict()
    torch.manual_seed(2)
    model = build_model("segnet-basic", num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, skipped = ckpt_io.load_matching(tmp_path, model)
    assert skipped == ["classifier.weight", "classifier.bias"]
    assert loaded == len(fresh) - 2
    for name, value in model.state_dict().items():
        expected = fresh[name] if name.startswith("classifier.") else trained[name]
        assert torch.equal(value, expected), name
    assert model.classifier.out_channels == 3


def test_a_checkpoint_of_another_model_family_is_refused(tmp_path):
    _checkpoint(tmp_path, "fcn-basic")
    with pytest.raises(SegNetError, match="holds a 'fcn-basic' model whose tensors differ"):
        ckpt_io.load_matching(tmp_path, build_model("segnet-basic", num_classes=3))


def test_a_damaged_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not tensors")
    with pytest.raises(SegNetError, match="has sha256"):
        ckpt_io.load_matching(tmp_path, build_model("segnet-basic", num_classes=3))


def _run_config(tmp_path, init_from) -> TrainConfig:
    return TrainConfig(init_from=str(init_from), storage_path=str(tmp_path / "runs"), name="tuned")


def test_a_checkpoint_is_staged_in_the_run_folder_and_tried_on_the_driver(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt")
    stage_init_weights(_run_config(tmp_path, tmp_path / "ckpt"), "unused", 3)
    staged = tmp_path / "runs" / "tuned" / "init_weights"
    assert (staged / "model.pt").read_bytes() == (tmp_path / "ckpt" / "model.pt").read_bytes()
    assert "initialised from" in capsys.readouterr().out
    with pytest.raises(SegNetError, match="not a checkpoint that verifies"):
        stage_init_weights(_run_config(tmp_path / "other", tmp_path / "nothing"), "unused", 3)


@pytest.mark.slow  # MLflow's registry: 20 s
def test_a_registered_model_is_downloaded_and_staged(register_seeded, tmp_path, capsys):
    uri = mlflow_store(tmp_path / "mlruns.db")
    register_seeded(uri, "segnet-camvid", 1, 0.5, tmp_path)
    stage_init_weights(_run_config(tmp_path, "models:/segnet-camvid/1"), uri, 3)
    model = build_model("segnet-basic", num_classes=3)
    assert ckpt_io.load_matching(tmp_path / "runs" / "tuned" / "init_weights", model)[1] == [
        "classifier.weight",
        "classifier.bias",
    ]
    assert "2 skipped; new: classifier.weight, classifier.bias" in capsys.readouterr().out


@pytest.mark.slow
def test_segnet_train_starts_a_3_class_run_from_an_11_class_checkpoint(segnet_cli, tmp_path):
    make_generic(tmp_path / "src", "color")
    shards = tmp_path / "shards"
    prepare(tmp_path / "src", shards, shard_size=2, workers=1, dataset=str(tmp_path / "src" / "dataset.yaml"))
    _checkpoint(tmp_path / "ckpt")
    args = ["--data", shards, "--init-from", tmp_path / "ckpt", "--workers", 1, "--epochs", 1]
    args += ["--batch-size", 1, "--image-size", "16x16", "--loader-workers", 0, "--class-weighting", "none"]
    args += ["--storage-path", tmp_path / "runs", "--name", "tuned", "--json"]
    args += ["--mlflow-uri", mlflow_store(tmp_path / "mlruns.db")]
    done = segnet_cli("train", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tensors loaded, 2 skipped; new: classifier.weight, classifier.bias" in done.stderr, done.stderr
    lines = done.stderr.splitlines()  # not a terminal: no bar redrawn, no blank padding between the lines
    assert not [line for line in lines if "img/s]" in line or (line and not line.strip())], done.stderr
    staged = tmp_path / "runs" / "tuned" / "init_weights" / "model.pt"  # where the workers read it
    assert staged.read_bytes() == (tmp_path / "ckpt" / "model.pt").read_bytes()
    best = json.loads(done.stdout)  # with --json, stdout is the document and the lines go to stderr
    model, meta = ckpt_io.load(best["best_checkpoint"])
    assert meta["num_classes"] == 3 and model.classifier.out_channels == 3
