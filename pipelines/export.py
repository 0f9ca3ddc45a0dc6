"""`segnet export`: a registered model as ONNX, checked against PyTorch with onnxruntime on CamVid images.

The index-recording pooling (segnet/layers.py) is a torch.autograd.Function; torch.export traces its forward
(max_pool2d, compare, where, strided copies), so the graph holds only standard ONNX ops (MaxPool, Equal,
Where, ScatterND/Slice) and no custom domain. The ONNX model takes the normalised (N, 3, H, W) batch at the
training size and returns logits; the mean, std and size travel in its metadata.
"""

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.augment import MEAN, STD
from data_prep.shards import dataset_of
from pipelines.core import checkpoint as ckpt_io
from pipelines.tracking import registry
from segnet.errors import SegNetError
from segnet.layers import fold_batch_norm

LOGIT_TOLERANCE = 1e-3
MIN_WITHIN = 0.95  # share of logits within LOGIT_TOLERANCE of PyTorch's (see below for why not all)
MIN_AGREEMENT = 0.999  # share of pixels with the same label
# Not every logit can agree to 1e-3: where two values of a 2x2 pooling window differ by less than float
# rounding, the two runtimes may pick different max locations, and unpooling then moves a value to the
# other cell. PyTorch's own two CPU conv backends (mkldnn on and off) differ by 0.14 this way.


def camvid_batch(source: str | Path, n: int, size: tuple[int, int]) -> np.ndarray:
    """The first n CamVid test images, resized to the model's size and normalised: (n, 3, H, W) float32."""
    files = sorted((Path(source) / "test").glob("*.png"))[:n]
    if not files:
        raise SegNetError(f"{source}/test holds no PNG images to check the export against")
    images = [np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BILINEAR)) for f in files]
    x = np.stack(images).astype(np.float32) / 255
    return ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(0, 3, 1, 2).copy()


def median_ms(fn, x: np.ndarray) -> float:
    """Median milliseconds of fn on one image at a time, after one warm-up call."""
    fn(x[:1])
    times = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        fn(x[i : i + 1])
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def export_onnx(uri: str, ref: str, out: str | Path | None, source: str | Path, images: int = 8) -> dict:
    """Export, then compare logits and labels with PyTorch's on `images` CamVid test images."""
    shown = registry.show(uri, ref)
    out = Path(out or f"{shown['name']}-v{shown['version']}.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = ckpt_io.load(registry.download_weights(uri, f"{shown['name']}/{shown['version']}", tmp))
    model = fold_batch_norm(model)
    dataset = dataset_of(meta, f"models:/{shown['name']}/{shown['version']}")
    size = tuple(meta["image_size"])
    x = camvid_batch(source, images, size)
    info = {
        "model": f"models:/{shown['name']}/{shown['version']}",
        "mean": MEAN,
        "std": STD,
        "image_size": size,
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "colors": [list(c) for c in dataset.colors],
        "test_metrics": shown["metrics"],
    }
    write_onnx(model, x[:1], out, info)
    compared = compare_with_torch(model, out, x)
    within, agreement = compared["logits_within_1e-3"], compared["argmax_agreement"]
    if within < MIN_WITHIN or agreement < MIN_AGREEMENT:
        raise SegNetError(
            f"{out} disagrees with PyTorch on {len(x)} CamVid test images: {within:.4%} of logits within "
            f"{LOGIT_TOLERANCE} (limit {MIN_WITHIN:.0%}), labels agree on {agreement:.4%} "
            f"(limit {MIN_AGREEMENT:.1%})"
        )
    return {
        "onnx": str(out),
        "model": info["model"],
        "images": len(x),
        "image_size": f"{size[0]}x{size[1]}",
        **compared,
        "onnx_mb": round(out.stat().st_size / 2**20, 1),
    }


def write_onnx(model: torch.nn.Module, image: np.ndarray, out: Path, info: dict) -> None:
    """The model as ONNX at `out`, with a dynamic batch dimension and `info` (JSON values) in its metadata;
    `image` is one normalised example image."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.from_numpy(np.concatenate([image, image]))  # an example batch of 1 would fix it at 1
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines; stdout is the report
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=True,
            verbose=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
        )
    proto = onnx.load(str(out))
    for key, value in info.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(out))


def compare_with_torch(model: torch.nn.Module, onnx_file: Path, x: np.ndarray) -> dict:
    """onnxruntime's logits and labels against PyTorch's on the batch `x`, and each one's ms per image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
        torch_ms = median_ms(lambda b: model(torch.from_numpy(b)), x)
    theirs = session.run(None, {"image": x})[0]
    diff = np.abs(ours - theirs)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "logits_within_1e-3": float((diff <= LOGIT_TOLERANCE).mean()),
        "argmax_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean()),
        "torch_ms_per_image": round(torch_ms, 1),
        "onnxruntime_ms_per_image": round(median_ms(lambda b: session.run(None, {"image": b}), x), 1),
    }
