"""`segnet bench`: measured figures, printed (and as JSON), never asserted by tests."""

import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.augment import AugmentConfig, to_tensors, train_transform
from data_prep.camvid import find_pairs
from data_prep.shards import ShardReader, read_manifest


def _rate(fn, n: int) -> float:
    """Samples per second of fn(i) over i in range(n), after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def bench_data(shard_dir: str | Path, source: str | Path, split: str = "train", n: int = 64, size=(360, 480)):
    """Samples/s of the three input paths, one after the other in this process, on the same samples."""
    reader = ShardReader(shard_dir, split)
    n = min(n, len(reader))
    pairs = find_pairs(source)[split][:n]
    transform = train_transform(AugmentConfig(*size), seed=0)

    def png(i):
        p = pairs[i % n]
        return np.asarray(Image.open(p.image).convert("RGB")), np.asarray(Image.open(p.label))

    def png_aug(i):
        image, label = png(i)
        out = transform(image=image, mask=label)
        return to_tensors(out["image"], out["mask"])

    def shard(i):
        s = reader[i % n]
        return s["image"], s["label"]

    def shard_aug(i):
        s = reader[i % n]
        out = transform(image=s["image"], mask=s["label"])
        return to_tensors(out["image"], out["mask"])

    figures = {
        "split": split,
        "samples": n,
        "augment_size": f"{size[0]}x{size[1]}",
        "png_decode_per_s": _rate(png, n),
        "shard_read_per_s": _rate(shard, n),
        "png_decode_augment_per_s": _rate(png_aug, n),
        "shard_read_augment_per_s": _rate(shard_aug, n),
        "manifest_images": read_manifest(shard_dir)["splits"][split]["num_images"],
    }
    figures["shard_vs_png_with_augment"] = (
        figures["shard_read_augment_per_s"] / figures["png_decode_augment_per_s"]
    )
    return figures
