"""A compact copy of CamVid for machines it must travel to (a GPU machine takes at most 64 MiB of files).

Images are RE-ENCODED as JPEG (quality 95), so they differ slightly from the PNG originals; labels stay
exact, as PNG bytes. One Arrow IPC file per split (name, jpeg, label_png). Read with `read_compact`, which
decodes with Pillow only: no Ray, no albumentations.

    python -m data_prep.compact ../shared/camvid .gpu/camvid     # about 50 MB for the three splits
"""

import io
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from PIL import Image

from data_prep.camvid import SPLITS, find_pairs, load_pair
from segnet import class_weights
from segnet.errors import SegNetError

JPEG_QUALITY = 95


def write_compact(source: str | Path, out: str | Path, splits=SPLITS, limit: int | None = None) -> dict:
    """Each split of the CamVid at `source` as out/SPLIT.arrow; returns bytes written per split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = find_pairs(source, limit)
    sizes = {}
    for split in splits:
        names, jpegs, labels = [], [], []
        for pair in pairs[split]:
            sample = load_pair(pair)
            jpeg, png = io.BytesIO(), io.BytesIO()
            Image.fromarray(sample["image"]).save(jpeg, "JPEG", quality=JPEG_QUALITY)
            Image.fromarray(sample["label"]).save(png, "PNG", optimize=True)
            names.append(sample["name"])
            jpegs.append(jpeg.getvalue())
            labels.append(png.getvalue())
        table = pa.table(
            {"name": names, "jpeg": pa.array(jpegs, pa.binary()), "label_png": pa.array(labels, pa.binary())}
        )
        tmp = out / f".{split}.arrow.tmp"
        with ipc.new_file(tmp, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, out / f"{split}.arrow")
        sizes[split] = (out / f"{split}.arrow").stat().st_size
    return sizes


def read_compact(folder: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) uint8, labels (N, H, W) uint8) of a split of a compact copy."""
    path = Path(folder) / f"{split}.arrow"
    if not path.is_file():
        raise SegNetError(f"{path} does not exist: make the compact copy with `python -m data_prep.compact`")
    table = ipc.open_file(path).read_all()
    n = table.num_rows if limit is None else min(limit, table.num_rows)
    jpegs, pngs = table["jpeg"].to_pylist()[:n], table["label_png"].to_pylist()[:n]
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs])
    labels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs])
    return images, labels


def label_weights(labels: np.ndarray, num_classes: int, mode: str = "median_frequency") -> np.ndarray | None:
    """The class weights of a split's labels of `num_classes` classes (void, K, left out), as `prepare`
    computes them for shards: the paper's median-frequency balancing, or None for natural frequency."""
    if mode == "none":
        return None
    flat = labels.reshape(len(labels), -1)
    counts = np.stack([np.bincount(row, minlength=num_classes + 1)[:num_classes] for row in flat])
    image_pixels = np.where(counts > 0, flat.shape[1], 0).sum(0)
    return class_weights(counts.sum(0), image_pixels, mode)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data_prep.compact CAMVID_DIR OUT_DIR")
    written = write_compact(sys.argv[1], sys.argv[2])
    print(", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in written.items()), "(images re-encoded as JPEG q95)")
