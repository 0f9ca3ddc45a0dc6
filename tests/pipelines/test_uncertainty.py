"""Bayesian SegNet end to end: a briefly trained dropout model's Monte Carlo labels, their calibration in
`segnet evaluate` (the most uncertain pixels are the least accurate), uncertainty PNGs from `segnet
predict`, and the one-line refusals of too many samples or a model without dropout."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.device_augment import AugmentConfig, DeviceBatches
from pipelines.core import checkpoint as ckpt_io
from pipelines.core import engine
from pipelines.core.plots import colour_bar
from pipelines.predict import predict
from segnet import SegNetError, build_model, segmentation_loss
from tests.helpers import error_line, mlflow_store
from tests.helpers import segnet_here as segnet

SIZE = (64, 96)
EPOCHS = 5  # at lr 0.1 on 12 images: the least uncertain decile 0.91 accurate, the most uncertain 0.19


def save_checkpoint(folder, model, optimizer, dropout: float, data) -> str:
    meta = {"config": {"model": "segnet-basic", "dropout": dropout, "data": str(data)}}
    ckpt_io.save(folder, model, optimizer, EPOCHS, {**meta, "num_classes": 11, "image_size": list(SIZE)})
    return str(folder)


@pytest.fixture(scope="module")
def trained(shards_12, tmp_path_factory) -> dict:
    """SegNet-Basic with dropout 0.5 trained 5 epochs at 64x96 in this process (seeded, one thread, a few
    seconds), and the same weights saved as a model without dropout."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = DeviceBatches.from_shards(
            shards_12, "train", 4, SIZE, augment=AugmentConfig(*SIZE, jitter=0)
        )
        model = build_model("segnet-basic", num_classes=11, dropout=0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for epoch in range(EPOCHS):
            batches.set_epoch(epoch)
            engine.train_epoch(
                model, batches, segmentation_loss(ignore_index=11), optimizer, torch.device("cpu")
            )
    finally:
        torch.set_num_threads(threads)
    tmp = tmp_path_factory.mktemp("bayesian")
    return {
        "dropout": save_checkpoint(tmp / "dropout", model, optimizer, 0.5, shards_12),
        "plain": save_checkpoint(tmp / "plain", model, optimizer, 0.0, shards_12),
    }


def test_evaluate_with_mc_samples_reports_calibration_and_the_most_uncertain_pixels_are_least_accurate(
    trained, shards_4, tmp_path
):
    r = segnet("evaluate", "--checkpoint", trained["dropout"], "--data", shards_4, "--mc-samples", 8,
               "--mc-batch", 4, "--out", tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "metrics.json").read_text())
    deciles = result["accuracy_by_uncertainty"]
    assert result["mc_samples"] == 8 and len(deciles) == 10 and 0 < result["ece"] < 1
    assert deciles[-1] < deciles[0] - 0.3, deciles  # the paper's curve: accuracy falls with uncertainty
    assert f"8 Monte Carlo samples: ECE {result['ece']:.4f} (15 bins)" in r.stdout
    assert " ".join(f"{a:.3f}" for a in deciles) in r.stdout
    curve = Image.open(tmp_path / "uncertainty_test.png")
    assert curve.width > 300 and curve.height > 200


def test_a_model_without_dropout_is_refused_mc_samples_in_one_line(trained, shards_4, tmp_path):
    r = segnet("evaluate", "--checkpoint", trained["plain"], "--data", shards_4, "--mc-samples", 4,
               "--out", tmp_path)  # fmt: skip
    line = error_line(r, "evaluate", only=True)
    assert "mc_samples 4: checkpoint" in line and "has no dropout" in line
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "--input", "x", "--output", "y", "--mc-samples", 65], "mc_samples 65: expected 1 to 64"),
        (["predict", "--input", "x", "--output", "y", "--mc-samples", 9, "--max-mc-samples", 8], "1 to 8"),
        (["evaluate", "--checkpoint", "c", "--data", "d", "--max-mc-samples", 100], "max_mc_samples 100"),
        (["serve", "--mc-batch", 0], "mc_batch 0: must be at least 1"),
    ],
)
def test_too_many_samples_are_one_line_before_anything_runs(args, message, tmp_path):
    assert message in error_line(segnet(*args, cwd=tmp_path), args[0], only=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_predict_with_mc_samples_writes_labels_an_overlay_and_an_uncertainty_heat_map(
    ray_local, register_seeded, camvid_dir, tmp_path
):
    uri = mlflow_store(tmp_path / "mlflow.db")
    register_seeded(uri, "bayes", 1, 0.5, tmp_path, dropout=0.5)
    register_seeded(uri, "plain", 1, 0.5, tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "street.png").write_bytes(sorted((camvid_dir / "test").iterdir())[0].read_bytes())
    with pytest.raises(SegNetError, match="mc_samples 4: models:/plain/1 has no dropout"):
        predict(uri, "models:/plain@champion", str(photos), str(tmp_path / "no"), mc_samples=4)
    assert not (tmp_path / "no").exists()  # refused before any actor started
    out = tmp_path / "out"
    job = predict(
        uri, "models:/bayes@champion", str(photos), str(out), True, log=lambda _: None, mc_samples=4
    )
    assert not job["skipped"]
    labels = np.asarray(Image.open(out / "street.png"))
    assert labels.shape == (360, 480) and labels.max() < 11
    assert Image.open(out / "street_overlay.png").height > 360  # the image over its legend
    heat = np.asarray(Image.open(out / "street_uncertainty.png").convert("RGB"))
    bar = colour_bar(480, "uncertainty: predictive entropy / log K")
    assert heat.shape == (360 + bar.shape[0], 480, 3) and np.array_equal(heat[360:], bar)
    assert len(np.unique(heat[:360].reshape(-1, 3), axis=0)) > 10  # a map, not one colour
