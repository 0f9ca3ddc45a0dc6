"""The Cityscapes layout: `leftImg8bit/SPLIT/CITY/*_leftImg8bit.png` with
`gtFine/SPLIT/CITY/*_gtFine_labelIds.png`, the 34 label ids mapped to the 19 training classes (Cordts et al.,
CVPR 2016; cityscapesScripts' labels.py), everything else void."""

from pathlib import Path

import numpy as np

from data_prep.datasets import pairs
from data_prep.datasets.description import DatasetDescription
from segnet.errors import SegNetError

IMAGE_SUFFIX, MASK_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
TRAIN_VOID = 255  # the trainIds' ignore value: the description's `void`
# labelId -> trainId for the ids that are training classes (road .. bicycle); ids 0..33 otherwise void.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
NUM_LABEL_IDS = 34


def _check(description: DatasetDescription) -> None:
    where = description.source or "the dataset description"
    if description.num_classes != len(TRAIN_IDS):
        raise SegNetError(
            f"{where}: `classes`: the cityscapes layout maps to Cityscapes' {len(TRAIN_IDS)} training "
            f"classes, got {description.num_classes}"
        )
    if description.void != TRAIN_VOID or description.masks != "index":
        raise SegNetError(
            f"{where}: the cityscapes layout reads index masks with `void: {TRAIN_VOID}` (trainIds)"
        )


def find_pairs(description: DatasetDescription, root: Path, limit: int | None) -> dict[str, list[pairs.Pair]]:
    _check(description)
    images, masks = root / "leftImg8bit", root / "gtFine"
    if not images.is_dir():
        raise SegNetError(f"{images} does not exist: a Cityscapes source holds leftImg8bit/ and gtFine/")
    out = {}
    for split, folder in pairs.split_folders(description, images).items():
        image_dir = images / folder
        if not image_dir.is_dir():
            raise SegNetError(f"split {split!r} is missing: expected the folder {image_dir}")
        files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not files:
            raise SegNetError(f"split {split!r} is empty: no CITY/*{IMAGE_SUFFIX} images in {image_dir}")
        found = []
        for p in files[:limit]:
            name = p.name.removesuffix(IMAGE_SUFFIX)
            mask = masks / folder / p.parent.name / f"{name}{MASK_SUFFIX}"
            found.append(pairs.checked_pair(root, split, name, p, mask, False))
        out[split] = found
    return out


def label_id_table(description: DatasetDescription) -> np.ndarray:
    """labelId -> stored index: a training class's trainId, void (K) for the other ids, -1 past id 33."""
    table = np.full(256, -1, np.int16)
    table[:NUM_LABEL_IDS] = description.void_index
    for label_id, train_id in TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def load_pair(description: DatasetDescription, pair: pairs.Pair) -> dict:
    return pairs.load_pair(description, pair, label_id_table(description))
