"""`segnet predict`: label PNGs (CamVid class indices) and optional overlays from a registered model."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipelines import registry
from pipelines.plots import overlay
from pipelines.pyfunc_model import check_pixels
from segnet.errors import SegNetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def input_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SegNetError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not path.is_file():
        raise SegNetError(f"input {path} does not exist")
    return [path]


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            check_pixels(img.width, img.height, str(path))  # before decoding: no decompression bombs
            return np.asarray(img.convert("RGB"))
    except SegNetError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files
        raise SegNetError(f"{path} cannot be decoded as an image ({e})") from e


def predict(
    uri: str, model_ref: str, inputs: str | Path, output: str | Path, with_overlay: bool = False
) -> list:
    """Predict each image at its own size; write NAME.png (class indices) and NAME_overlay.png."""
    files = input_images(inputs)
    images = [read_rgb(f) for f in files]  # every input decodes before any output is written
    model = registry.load(uri, model_ref)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f, image in zip(files, images):
        labels = model.predict(pd.DataFrame({"image": [image]}))[0]
        target = out / f"{f.stem}.png"
        Image.fromarray(labels).save(target)
        written.append(target)
        if with_overlay:
            Image.fromarray(overlay(image, labels)).save(out / f"{f.stem}_overlay.png")
    return written
