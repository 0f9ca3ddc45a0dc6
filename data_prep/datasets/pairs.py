"""Image and mask files found by a layout's reader, decoded (size checked before decoding) and mapped to the
stored class indices by a description: 0..K-1 for the classes, K for void."""

import hashlib
from pathlib import Path

import numpy as np

from data_prep.camvid import Pair, decode_image
from data_prep.datasets.description import DatasetDescription
from segnet.errors import SegNetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")

__all__ = ["IMAGE_SUFFIXES", "Pair", "checked_pair", "index_table", "load_pair", "split_folders"]


def split_folders(description: DatasetDescription, root: Path) -> dict[str, str]:
    """Split -> folder under `root`: the description's, or train and val, and test when its folder exists."""
    if description.splits is not None:
        return dict(description.splits)
    return {"train": "train", "val": "val", **({"test": "test"} if (root / "test").is_dir() else {})}


def checked_pair(root: Path, split: str, name: str, image: Path, mask: Path, colour: bool) -> Pair:
    """A pair whose files exist inside the source: a link may point anywhere, and nothing is read from
    outside."""
    if not name.isprintable():
        raise SegNetError(f"file name {name!r} in {image.parent} holds a control character: refusing it")
    for path in (image, mask):
        if not path.resolve().is_relative_to(root.resolve()):
            raise SegNetError(
                f"{path} links to {path.resolve()}, outside the source folder {root}: refusing it"
            )
    if not mask.is_file():
        raise SegNetError(f"image {image} has no mask: expected {mask}")
    return Pair(split, name, str(image), str(mask), colour)


def index_table(description: DatasetDescription) -> np.ndarray:
    """Mask value -> stored index for index masks: classes keep their value, `void` goes to K, and -1
    marks a value outside the class table."""
    table = np.full(256, -1, np.int16)
    table[: description.num_classes] = np.arange(description.num_classes)
    if description.void is not None:
        table[description.void] = description.void_index
    return table


def _values(table: np.ndarray) -> str:
    """The mask values a table accepts, as ranges: '0..10, 255'."""
    ranges, start = [], None
    valid = np.flatnonzero(table >= 0).tolist()
    for i, v in enumerate(valid):
        start = v if start is None else start
        if i + 1 == len(valid) or valid[i + 1] != v + 1:
            ranges.append(str(v) if v == start else f"{start}..{v}")
            start = None
    return ", ".join(ranges)


def index_classes(
    description: DatasetDescription, mask: np.ndarray, path: str, table: np.ndarray
) -> np.ndarray:
    mapped = table[mask]
    if (mapped < 0).any():
        value = int(mask[mapped < 0].min())
        raise SegNetError(
            f"{path} has label value {value}, outside the class table of {description.name!r} "
            f"(expected {_values(table)})"
        )
    return mapped.astype(np.uint8)


def colour_classes(description: DatasetDescription, rgb: np.ndarray, path: str) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table = description.mask_colors()
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in table), np.int32)
    values = np.array([table[(k >> 16, (k >> 8) & 255, k & 255)] for k in keys.tolist()], np.uint8)
    at = np.minimum(np.searchsorted(keys, code), len(keys) - 1)
    missing = keys[at] != code
    if missing.any():
        v = int(code[missing][0])
        where = description.source or "the description"
        raise SegNetError(
            f"{path}: colour {(v >> 16, (v >> 8) & 255, v & 255)} is missing from the colour map of "
            f"{description.name!r} ({where})"
        )
    return values[at]


def load_pair(description: DatasetDescription, pair: Pair, table: np.ndarray | None = None) -> dict:
    """Decode and validate one pair: an RGB image (PNG or JPEG) and its PNG mask, same size, mapped to
    0..K-1 and K (void). `table` maps an index mask's values (default: `index_table(description)`)."""
    image_bytes, mask_bytes = Path(pair.image).read_bytes(), Path(pair.label).read_bytes()
    img = decode_image(image_bytes, pair.image, IMAGE_FORMATS)
    if img.mode != "RGB":
        raise SegNetError(f"{pair.image} has mode {img.mode} ({len(img.getbands())} channels), expected RGB")
    mask = decode_image(mask_bytes, pair.label)
    if pair.colour_labels:
        if mask.mode not in ("RGB", "P"):
            raise SegNetError(f"{pair.label} has mode {mask.mode}, expected an RGB colour mask")
        label = colour_classes(description, np.asarray(mask.convert("RGB")), pair.label)
    else:
        if mask.mode not in ("L", "P"):
            raise SegNetError(
                f"{pair.label} has mode {mask.mode} ({len(mask.getbands())} channels), "
                "expected a one-channel label"
            )
        table = index_table(description) if table is None else table
        label = index_classes(description, np.asarray(mask, dtype=np.uint8), pair.label, table)
    if img.size != mask.size:
        raise SegNetError(
            f"{pair.image} is {img.size[1]}x{img.size[0]} but its label {pair.label} is "
            f"{mask.size[1]}x{mask.size[0]}"
        )
    return {
        "name": pair.name,
        "image": np.asarray(img, dtype=np.uint8),
        "label": label,
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "label_sha256": hashlib.sha256(mask_bytes).hexdigest(),
    }
