"""Datasets that are not CamVid, end to end: a 3-class inspection set in the generic layout with colour masks,
and a small set in the Cityscapes layout (19 classes, void 255), each generated here, go prepare -> tune ->
registration -> serve -> predict; the served JSON and the overlay's legend name that dataset's classes, and
`evaluate` refuses a model of one dataset on the shards of the other."""

import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

from data_prep import prepare, read_manifest
from data_prep.datasets import read_description
from data_prep.datasets.cityscapes import TRAIN_IDS
from data_prep.shards import dataset_of
from pipelines.config import TuneConfig, trial_defaults
from pipelines.core.plots import legend
from pipelines.evaluate import evaluate
from pipelines.predict import predict
from pipelines.search.tune import tune_search
from pipelines.tracking import registry
from segnet import SegNetError
from tests.helpers import free_port, mlflow_store, start_segnet, wait_for_url

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
INSPECTION = {"crack": [255, 0, 0], "rust": [0, 255, 0], "paint": [0, 0, 255]}
WHITE = [255, 255, 255]  # the inspection set's void colour
SPLITS = {"train": 6, "val": 2, "test": 2}


def scene(seed: int, h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour follows its label (so a model can learn something), labels 0..k-1 and void k."""
    rng = np.random.default_rng(seed)
    label = (np.arange(w)[None, :] * k // w + rng.integers(0, 2, (h, 1))) % (k + 1)
    label = np.broadcast_to(label, (h, w)).astype(np.uint8)
    image = (label[..., None] * (255 // (k + 1)) + rng.integers(0, 20, (h, w, 3))).astype(np.uint8)
    return image, label


def make_inspection(root: Path) -> Path:
    palette = np.array([*INSPECTION.values(), WHITE], np.uint8)
    for split, count in SPLITS.items():
        for folder in ("images", "masks"):
            (root / folder / split).mkdir(parents=True)
        for i in range(count):
            # two sizes in every split: training crops each to the training size, and a validation or test
            # batch of two scores each label at its own size
            image, label = scene(i, 40 + 8 * (i % 2), 64, 3)
            Image.fromarray(image).save(root / "images" / split / f"{split}{i}.jpg", quality=95)
            Image.fromarray(palette[label]).save(root / "masks" / split / f"{split}{i}.png")
    classes = "\n".join(f"  - {{name: {n}, color: {c}}}" for n, c in INSPECTION.items())
    text = f"name: inspection\nlayout: generic\nmasks: color\nclasses:\n{classes}\nvoid_color: {WHITE}\n"
    (root / "dataset.yaml").write_text(text)
    return root / "dataset.yaml"


def make_cityscapes(root: Path) -> Path:
    """leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and gtFine/SPLIT/CITY/*_gtFine_labelIds.png (label ids)."""
    ids_of = {train_id: label_id for label_id, train_id in TRAIN_IDS.items()}
    for s, (split, count) in enumerate(SPLITS.items()):
        for i in range(count):
            name, city = f"city{i % 2}_00000{s}_{i:06d}", f"city{i % 2}"  # a name belongs to one split
            for folder in ("leftImg8bit", "gtFine"):
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
            image, label = scene(i, 32, 64, 19)
            ids = np.vectorize(lambda t: ids_of.get(int(t), 0))(label).astype(np.uint8)  # 19 (void) -> id 0
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
    # configs/datasets/cityscapes.yaml as shipped reads train and val only (Cityscapes' test labels are not
    # public): the search scores its best trial on val
    return ROOT / "configs" / "datasets" / "cityscapes.yaml"


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """Each dataset prepared, searched (1 trial, 1 epoch) and its best registered as segnet-NAME."""
    out = {}
    for name, make in (("inspection", make_inspection), ("cityscapes", make_cityscapes)):
        tmp = tmp_path_factory.mktemp(name)
        description = make(tmp / "data")
        prepare(tmp / "data", tmp / "shards", shard_size=4, dataset=read_description(description))
        train = dict(data=str(tmp / "shards"), epochs=1, image_size="32x64", batch_size=2, workers=1)
        train |= dict(loader_workers=0, storage_path=str(tmp / "runs"), mlflow_uri=mlflow_store(tmp / "m.db"))
        cfg = TuneConfig(train=replace(trial_defaults(), **train), num_samples=1, max_concurrent=1)
        out[name] = {"tmp": tmp, "cfg": cfg, "search": tune_search(cfg, log=lambda _: None)}
    return out


@pytest.mark.parametrize("name", ["inspection", "cityscapes"])
def test_a_described_dataset_is_registered_under_its_name_with_its_classes(trained, name):
    got = trained[name]
    classes = [c["name"] for c in read_manifest(got["cfg"].train.data)["dataset"]["classes"]]
    assert len(classes) == (3 if name == "inspection" else 19)
    assert got["search"]["registered"]["name"] == f"segnet-{name}"
    shown = registry.show(got["cfg"].train.mlflow_uri, f"segnet-{name}@champion")
    assert shown["version"] == got["search"]["registered"]["version"]
    splits = read_manifest(got["cfg"].train.data)["splits"]
    assert ("test" in splits) == (name == "inspection")  # Cityscapes' scores are val's, and the run says so
    parent = MlflowClient(got["cfg"].train.mlflow_uri).get_run(got["search"]["parent_run_id"])
    assert parent.data.tags["scored_on"] == ("test" if name == "inspection" else "val")


@pytest.mark.parametrize("name", ["inspection", "cityscapes"])
def test_serve_and_predict_name_the_datasets_classes(trained, name, tmp_path):
    """`segnet serve` as a user starts it (its own Ray), then predict's overlay of the same image."""
    got = trained[name]
    uri, ref = got["cfg"].train.mlflow_uri, f"models:/segnet-{name}@champion"
    manifest = read_manifest(got["cfg"].train.data)
    classes = [c["name"] for c in manifest["dataset"]["classes"]]
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    Image.fromarray(scene(99, 48, 80, len(classes))[0]).save(image)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_segnet("serve", ref, "--port", port, "--mlflow-uri", uri, env={"RAY_ADDRESS": ""})
    try:
        wait_for_url(f"{url}/healthz", server, 300)
        png = {"Content-Type": "image/png"}
        r = requests.post(f"{url}/predict?format=json", data=image.read_bytes(), headers=png, timeout=120)
        assert r.status_code == 200, r.text
        counts = r.json()["counts"]
        assert list(counts) == classes and sum(counts.values()) == 48 * 80, r.json()
        assert requests.get(f"{url}/model", timeout=30).json()["classes"] == classes
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=120)
    job = predict(uri, ref, str(image.parent), str(tmp_path / "out"), with_overlay=True, log=lambda _: None)
    assert not job["skipped"]
    labels = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert labels.shape == (48, 80) and labels.max() < len(classes)
    overlay = np.asarray(Image.open(tmp_path / "out" / "photo_overlay.png").convert("RGB"))
    strip = legend(80, dataset_of(manifest))  # this dataset's names beside its colours, under the image
    assert overlay.shape == (48 + strip.shape[0], 80, 3) and np.array_equal(overlay[48:], strip)


def test_evaluate_refuses_a_model_of_another_class_table(trained):
    inspection, cityscapes = trained["inspection"], trained["cityscapes"]
    checkpoint = inspection["search"]["best"]["checkpoint"]
    with pytest.raises(SegNetError) as e:
        evaluate(checkpoint, cityscapes["cfg"].train.data, split="val")
    message = str(e.value)
    assert "\n" not in message and "inspection" in message and "cityscapes" in message, message
