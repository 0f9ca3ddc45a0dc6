"""Finding and decoding CamVid pairs, in the SegNet layout or the original 32-class colour release."""

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segnet.classes import VOID
from segnet.errors import SegNetError

SPLITS = ("train", "val", "test")
MAX_PIXELS = 40_000_000  # per image (CamVid's are 172,800): larger ones are refused before decoding

# The standard CamVid-11 grouping of the original release's 32 colour classes (as used by SegNet and
# every CamVid-11 benchmark since): RGB colour -> 0 Sky .. 10 Bicyclist, 11 void.
CAMVID32_TO_11 = {
    (128, 128, 128): 0,  # Sky
    (128, 0, 0): 1, (64, 192, 0): 1, (64, 0, 64): 1, (192, 0, 128): 1, (0, 128, 64): 1,
    # Building, Wall, Tunnel, Archway, Bridge
    (192, 192, 128): 2, (0, 0, 64): 2,  # Column_Pole, TrafficCone
    (128, 64, 128): 3, (128, 0, 192): 3, (192, 0, 64): 3,  # Road, LaneMkgsDriv, LaneMkgsNonDriv
    (0, 0, 192): 4, (64, 192, 128): 4, (128, 128, 192): 4,  # Sidewalk, ParkingBlock, RoadShoulder
    (128, 128, 0): 5, (192, 192, 0): 5,  # Tree, VegetationMisc
    (192, 128, 128): 6, (128, 128, 64): 6, (0, 64, 64): 6,  # SignSymbol, Misc_Text, TrafficLight
    (64, 64, 128): 7,  # Fence
    (64, 0, 128): 8, (64, 128, 192): 8, (192, 128, 192): 8, (192, 64, 128): 8, (128, 64, 64): 8,
    # Car, SUVPickupTruck, Truck_Bus, Train, OtherMoving
    (64, 64, 0): 9, (192, 128, 64): 9, (64, 0, 192): 9, (64, 128, 64): 9,
    # Pedestrian, Child, CartLuggagePram, Animal
    (0, 128, 192): 10, (192, 0, 192): 10,  # Bicyclist, MotorcycleScooter
    (0, 0, 0): VOID,  # Void
}  # fmt: skip


@dataclass(frozen=True)
class Pair:
    split: str
    name: str
    image: str
    label: str
    colour_labels: bool  # original release: RGB label of 32 classes


def _label_dir(root: Path, split: str) -> tuple[Path, bool, str]:
    """SegNet layout: `<split>annot/NAME.png`; original release: `<split>_labels/NAME_L.png` (RGB)."""
    if (root / f"{split}annot").is_dir():
        return root / f"{split}annot", False, ""
    if (root / f"{split}_labels").is_dir():
        return root / f"{split}_labels", True, "_L"
    return root / f"{split}annot", False, ""


def find_pairs(
    root: str | Path, limit: int | None = None, splits: dict[str, str] | None = None
) -> dict[str, list[Pair]]:
    """Image/label pairs per split (`splits`: split -> folder, CamVid's own by default). The SegNet
    `<split>.txt` lists give the order when present; their absolute paths belong to the authors' machine,
    so each entry is resolved here by file name."""
    root = Path(root)
    if not root.is_dir():
        raise SegNetError(f"CamVid folder {root} does not exist")
    out = {}
    for split, folder in (splits or {s: s for s in SPLITS}).items():
        image_dir = root / folder
        label_dir, colour, suffix = _label_dir(root, folder)
        if not image_dir.is_dir():
            raise SegNetError(f"split {split!r} is missing: expected the folder {image_dir}")
        listing = root / f"{folder}.txt"
        if listing.is_file() and not colour:
            names = [Path(line.split()[0]).name for line in listing.read_text().splitlines() if line.strip()]
        else:
            names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() == ".png")
        if not names:
            raise SegNetError(f"split {split!r} is empty: no PNG images in {image_dir}")
        if limit is not None:
            names = names[:limit]
        pairs = []
        for name in names:
            image = image_dir / name
            label = label_dir / f"{Path(name).stem}{suffix}.png"
            if not name.isprintable():
                raise SegNetError(f"file name {name!r} in {image_dir} holds a control character: refusing it")
            for path in (image, label):  # a link may point anywhere: read nothing from outside the source
                if not path.resolve().is_relative_to(root.resolve()):
                    raise SegNetError(
                        f"{path} links to {path.resolve()}, outside the source folder {root}: refusing it"
                    )
            if not image.is_file():
                raise SegNetError(f"{image} is listed in {listing.name} but does not exist")
            if not label.is_file():
                raise SegNetError(f"image {image} has no label: expected {label}")
            pairs.append(Pair(split, Path(name).stem, str(image), str(label), colour))
        out[split] = pairs
    return out


def decode_image(data: bytes, path: str, formats: tuple[str, ...] = ("PNG",)) -> Image.Image:
    """An image decoded after its header's size is checked: a small file declaring a huge image is refused."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in formats:
            raise SegNetError(f"{path} is a {img.format} file, expected a {' or '.join(formats)}")
        if img.width * img.height > MAX_PIXELS:
            raise SegNetError(
                f"{path} declares {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS:,}"
            )
        img.load()
    except SegNetError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused by Image.open
        raise SegNetError(f"{path} declares over {MAX_PIXELS:,} pixels, the limit ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise SegNetError(f"{path} is not a readable {' or '.join(formats)} ({e})") from e
    return img


def colour_to_class(rgb: np.ndarray, path: str) -> np.ndarray:
    """Map an original-release RGB label to CamVid-11 indices; an unknown colour is an error."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut = {(r << 16) | (g << 8) | b: c for (r, g, b), c in CAMVID32_TO_11.items()}
    values, inverse = np.unique(code, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in lut]
    if unknown:
        v = unknown[0]
        raise SegNetError(f"{path}: colour {(v >> 16, (v >> 8) & 255, v & 255)} is not a CamVid class")
    return np.array([lut[v] for v in values.tolist()], dtype=np.uint8)[inverse].reshape(code.shape)


def load_pair(pair: Pair) -> dict:
    """Decode and validate one pair: RGB image, one-channel label of 0..11 (void), same size."""
    image_bytes, label_bytes = Path(pair.image).read_bytes(), Path(pair.label).read_bytes()
    img = decode_image(image_bytes, pair.image)
    if img.mode != "RGB":
        raise SegNetError(f"{pair.image} has mode {img.mode} ({len(img.getbands())} channels), expected RGB")
    lab = decode_image(label_bytes, pair.label)
    if pair.colour_labels:
        if lab.mode != "RGB":
            raise SegNetError(f"{pair.label} has mode {lab.mode}, expected an RGB colour label")
        label = colour_to_class(np.asarray(lab), pair.label)
    else:
        if lab.mode not in ("L", "P"):
            raise SegNetError(
                f"{pair.label} has mode {lab.mode} ({len(lab.getbands())} channels), "
                "expected a one-channel label"
            )
        label = np.asarray(lab, dtype=np.uint8)
    if img.size != lab.size:
        raise SegNetError(
            f"{pair.image} is {img.size[1]}x{img.size[0]} but its label {pair.label} is "
            f"{lab.size[1]}x{lab.size[0]}"
        )
    top = int(label.max())
    if top > VOID:
        raise SegNetError(f"{pair.label} has label value {top}, expected 0..10 or {VOID} (void)")
    return {
        "name": pair.name,
        "image": np.asarray(img, dtype=np.uint8),
        "label": label,
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "label_sha256": hashlib.sha256(label_bytes).hexdigest(),
    }
