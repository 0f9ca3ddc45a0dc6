"""The generic layout: `images/SPLIT/NAME.{png,jpg}` with `masks/SPLIT/NAME.png`, the masks class-index PNGs
or RGB colour PNGs (`masks: index | color` in the description)."""

from pathlib import Path

from data_prep.datasets import pairs
from data_prep.datasets.description import DatasetDescription
from segnet.errors import SegNetError

load_pair = pairs.load_pair


def find_pairs(description: DatasetDescription, root: Path, limit: int | None) -> dict[str, list[pairs.Pair]]:
    images, masks = root / "images", root / "masks"
    if not images.is_dir():
        raise SegNetError(
            f"{images} does not exist: a generic dataset holds images/SPLIT/NAME.png|jpg and "
            "masks/SPLIT/NAME.png"
        )
    out = {}
    for split, folder in pairs.split_folders(description, images).items():
        image_dir = images / folder
        if not image_dir.is_dir():
            raise SegNetError(f"split {split!r} is missing: expected the folder {image_dir}")
        files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in pairs.IMAGE_SUFFIXES)
        if not files:
            raise SegNetError(f"split {split!r} is empty: no PNG or JPEG images in {image_dir}")
        stems = {}
        for p in files:
            if p.stem in stems:
                raise SegNetError(f"{p} and {stems[p.stem]} share the name {p.stem!r}: one image per name")
            stems[p.stem] = p
        out[split] = [
            pairs.checked_pair(
                root, split, p.stem, p, masks / folder / f"{p.stem}.png", description.masks == "color"
            )
            for p in files[:limit]
        ]
    return out
