"""Datasets described in one YAML file (`configs/datasets/*.yaml`), and one reader per layout: `camvid`
(the built-in description, both CamVid layouts), `generic` and `cityscapes`. A reader finds the pairs of each
split; `load_pair` decodes one into an RGB image and a label of 0..K-1, void K."""

from pathlib import Path

from data_prep.datasets import camvid, cityscapes, generic
from data_prep.datasets.camvid import CAMVID
from data_prep.datasets.description import DatasetDescription, read_description
from data_prep.datasets.pairs import Pair
from segnet.errors import SegNetError

READERS = {"camvid": camvid, "generic": generic, "cityscapes": cityscapes}

__all__ = ["CAMVID", "READERS", "DatasetDescription", "Pair", "find_pairs", "load_pair", "read_description"]


def find_pairs(
    description: DatasetDescription, root: str | Path, limit: int | None = None
) -> dict[str, list[Pair]]:
    """Each split's pairs, in a stable order; an image without a mask, an empty split or a name in two
    splits is one line naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise SegNetError(f"source folder {root} of the dataset {description.name!r} does not exist")
    found = READERS[description.layout].find_pairs(description, root, limit)
    seen = {}
    for split, split_pairs in found.items():
        for pair in split_pairs:
            if pair.name in seen and seen[pair.name].split != split:
                other = seen[pair.name]
                raise SegNetError(
                    f"{pair.image} ({split}) and {other.image} ({other.split}) share the name {pair.name!r}: "
                    "a name belongs to one split"
                )
            seen[pair.name] = pair
    return found


def load_pair(description: DatasetDescription, pair: Pair) -> dict:
    """`name`, `image` (uint8 HxWx3), `label` (uint8 HxW: 0..K-1, void K) and both files' sha256."""
    return READERS[description.layout].load_pair(description, pair)
