"""`segnet evaluate`: G, C, mIoU, BF and per-class IoU of a checkpoint on a split, with PNGs."""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_prep import storage
from data_prep.augment import eval_loader
from data_prep.shards import manifest_id, read_manifest, verify_shards
from pipelines import checkpoint as ckpt_io
from pipelines import engine
from pipelines.plots import display_image, save_confusion_matrix, save_overlay
from segnet import CLASSES
from segnet.errors import SegNetError


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 4,
    overlays: int = 4,
    compile: str = "auto",
) -> dict:
    """Score a checkpoint (folder or URI) on a split at the size it was trained at, full-resolution labels;
    the PNGs and metrics.json go to `out` (a folder or URI), default CHECKPOINT/eval-SPLIT."""
    manifest = read_manifest(data)
    verify_shards(data, manifest, split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = ckpt_io.load(checkpoint, device)
    if meta["num_classes"] != len(manifest["classes"]):
        have = len(manifest["classes"])
        raise SegNetError(
            f"checkpoint {checkpoint} predicts {meta['num_classes']} classes, {data} has {have}"
        )
    if engine.use_compile(compile, device):
        engine.compile_model(model)
    loader = eval_loader(str(data), split, meta["image_size"], batch_size)
    meter, examples = engine.evaluate(model, loader, device, meta["num_classes"], keep=overlays)
    result = engine.scores(meter, prefix="")
    cm = meter.matrix.cpu()
    result["split"] = split
    result["checkpoint"] = str(checkpoint)
    result["data_manifest_sha256"] = manifest_id(data)
    result["trained_on_manifest_sha256"] = meta.get("manifest_sha256")
    out = storage.absolute(out or storage.join(checkpoint, f"eval-{split}"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_confusion_matrix(
            cm.numpy(), folder / f"confusion_matrix_{split}.png", f"{meta['config']['model']}, {split}"
        )
        np.savetxt(folder / f"confusion_matrix_{split}.csv", cm.numpy(), fmt="%d", delimiter=",")
        for i, (x, pred, y) in enumerate(examples):
            picture = display_image(x, y.shape)
            save_overlay(picture, pred.numpy(), y.numpy(), folder / f"overlay_{split}_{i}.png")
        (folder / "metrics.json").write_text(json.dumps(result, indent=2))
        storage.copy_folder(folder, out)
    result["out"] = out
    return result


def format_scores(result: dict) -> str:
    lines = [
        f"{result['split']}: G {result['global_accuracy']:.4f}  C {result['class_accuracy']:.4f}  "
        f"mIoU {result['miou']:.4f}  BF {result['bf']:.4f}",
        f"{'class':<12} {'IoU':>7}",
    ]
    for name in CLASSES:
        iou = result[f"iou_{name}"]
        lines.append(f"{name:<12} {iou:>7.4f}" if iou == iou else f"{name:<12} {'absent':>7}")
    return "\n".join(lines)
