"""`segnet evaluate`: G, C, mIoU, BF and per-class IoU of a checkpoint on a split, with PNGs; with
`--mc-samples N` (a model trained with dropout), Bayesian SegNet's Monte Carlo labels and calibration."""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_prep import storage
from data_prep.augment import eval_loader
from data_prep.datasets import DatasetDescription
from data_prep.shards import dataset_of, read_manifest_and_id, verify_shards
from pipelines.core import checkpoint as ckpt_io
from pipelines.core import engine
from pipelines.core.plots import display_image, save_confusion_matrix, save_overlay, save_uncertainty_curve
from segnet.bayesian import MAX_MC_SAMPLES, MC_BATCH, check_samples, has_dropout
from segnet.errors import SegNetError


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 4,
    overlays: int = 4,
    compile: str = "auto",
    mc_samples: int = 1,
    mc_batch: int = MC_BATCH,
    max_mc_samples: int = MAX_MC_SAMPLES,
) -> dict:
    """Score a checkpoint (folder or URI) on a split at the size it was trained at, full-resolution labels;
    the PNGs and metrics.json go to `out` (a folder or URI), default CHECKPOINT/eval-SPLIT. With
    `mc_samples` > 1 the labels are Bayesian SegNet's (mean softmax of that many dropout samples), and the
    result holds their ECE and accuracy by uncertainty decile, plotted in uncertainty_SPLIT.png."""
    manifest, sha = read_manifest_and_id(data)
    verify_shards(data, manifest, split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = ckpt_io.load(checkpoint, device)
    check_samples(mc_samples, max_mc_samples, has_dropout(model), f"checkpoint {checkpoint}")
    dataset = same_classes(
        dataset_of(meta, f"{checkpoint}/meta.json"), dataset_of(manifest), checkpoint, data
    )
    if engine.use_compile(compile, device):
        engine.compile_model(model)
    loader = eval_loader(str(data), split, meta["image_size"], batch_size, manifest=manifest)
    mc = {"samples": mc_samples, "mc_batch": mc_batch}
    meter, examples = engine.evaluate(model, loader, device, dataset.num_classes, keep=overlays, **mc)
    result = engine.scores(meter, dataset.classes, prefix="")
    cm = meter.matrix.cpu()
    result["split"] = split
    result["mc_samples"] = mc_samples
    result["checkpoint"] = str(checkpoint)
    result["data_manifest_sha256"] = sha
    result["trained_on_manifest_sha256"] = meta.get("manifest_sha256")
    out = storage.absolute(out or storage.join(checkpoint, f"eval-{split}"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        title = f"{meta['config']['model']}, {split}"
        save_confusion_matrix(cm.numpy(), folder / f"confusion_matrix_{split}.png", dataset.classes, title)
        np.savetxt(folder / f"confusion_matrix_{split}.csv", cm.numpy(), fmt="%d", delimiter=",")
        if "ece" in result:
            title = f"{title}, {mc_samples} Monte Carlo samples"
            curve = result["accuracy_by_uncertainty"]
            save_uncertainty_curve(curve, result["ece"], folder / f"uncertainty_{split}.png", title)
        for i, (x, pred, y) in enumerate(examples):
            picture = display_image(x, y.shape)
            save_overlay(picture, pred.numpy(), y.numpy(), folder / f"overlay_{split}_{i}.png", dataset)
        (folder / "metrics.json").write_text(json.dumps(result, indent=2))
        storage.copy_folder(folder, out)
    result["out"] = out
    return result


def same_classes(
    trained: DatasetDescription, scored: DatasetDescription, checkpoint, data
) -> DatasetDescription:
    """The dataset a model is scored on, when it has the class table the model was trained on."""
    if trained.classes != scored.classes:
        raise SegNetError(
            f"checkpoint {checkpoint} was trained on {trained.name!r} ({trained.num_classes} classes: "
            f"{', '.join(trained.classes)}), but {data} holds {scored.name!r} ({scored.num_classes} classes: "
            f"{', '.join(scored.classes)}); score a model on data of the class table it was trained on"
        )
    return scored


def evaluate_registered(uri: str, model_uri: str, data: str | Path, split: str = "test", out=None, **options):
    """Score a registered model (models:/NAME@ALIAS or /VERSION) as `evaluate` scores a checkpoint; the PNGs
    and metrics.json go to `out`, default ./eval-SPLIT."""
    from pipelines.tracking import registry

    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download_weights(uri, model_uri, tmp)
        return evaluate(folder, data, split, out or f"eval-{split}", **options)
