"""The registered model, logged as code (MLflow "models from code") with the `segnet` package as its code
path: loading it needs only torch, numpy, pandas, pillow and mlflow-skinny, not this project. The weights
are read with torch.load(weights_only=True) after their sha256 is checked, so nothing from an artifact is
ever unpickled as code.

Input: a DataFrame column `image` whose cells are PNG/JPEG bytes, base64 strings of them, uint8 HxWx3 RGB
arrays, or float32 (N, 3, H, W) batches in [0, 1] (the old input). Output: one uint8 label map (CamVid class
indices) per image, at that image's own size.
"""

import base64
import binascii
import hashlib
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from segnet.errors import SegNetError
from segnet.layers import fold_batch_norm
from segnet.models import model_from_meta
from segnet.weights import load_tensors

MAX_PIXELS = 40_000_000  # per image: larger ones are refused before decoding (decompression bombs)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HxWx3 RGB; the size is read from the header and checked before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SegNetError(f"{name} is over the limit of {max_pixels:,} pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable bytes
        raise SegNetError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e})") from e
    with img:
        check_pixels(img.width, img.height, name, max_pixels)
        if img.format not in ("PNG", "JPEG"):
            raise SegNetError(f"{name} is {img.format}, expected a PNG or JPEG image")
        try:
            return np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a truncated file fails only here
            raise SegNetError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e})") from e


def check_pixels(width: int, height: int, name: str, max_pixels: int = MAX_PIXELS) -> None:
    if width * height > max_pixels:
        raise SegNetError(f"{name} has {width}x{height} pixels, over the limit of {max_pixels:,}")


def as_images(value, name: str) -> list[torch.Tensor]:
    """One input cell -> float32 (3, H, W) tensors in [0, 1]; a float batch gives several."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise SegNetError(f"{name} is a string but not base64 ({e})") from e
    if isinstance(value, bytes | bytearray):
        value = decode_image(bytes(value), name)
    a = np.asarray(value)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        check_pixels(a.shape[1], a.shape[0], name)
        return [torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255)]
    if a.dtype == np.float32 and a.ndim in (3, 4) and a.shape[-3] == 3:
        check_pixels(a.shape[-1], a.shape[-2], name)
        return list(torch.from_numpy(a.reshape(-1, *a.shape[-3:])))
    raise SegNetError(
        f"{name} is a {a.dtype} array of shape {a.shape}; expected PNG/JPEG bytes, a base64 string, "
        "a uint8 HxWx3 array or a float32 (N, 3, H, W) array in [0, 1]"
    )


def input_images(model_input) -> list[torch.Tensor]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise SegNetError(f"input has columns {list(model_input.columns)}; expected a column 'image'")
        model_input = list(model_input["image"])
    elif isinstance(model_input, dict):
        model_input = model_input["image"]
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        model_input = [model_input]
    return [t for i, value in enumerate(model_input) for t in as_images(value, f"image {i}")]


class SegNetModel(mlflow.pyfunc.PythonModel):
    # Inputs are checked by `input_images` against the logged signature (image: binary); MLflow's type-hint
    # validation, and its warning asking for hints, do not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        weights = Path(context.artifacts["weights"])
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != meta["weights_sha256"]:
            raise SegNetError(
                f"{weights} has sha256 {digest}, but the model was logged with {meta['weights_sha256']}: "
                "the weights file was changed after logging; refusing to load it"
            )
        model = model_from_meta(meta)
        state = load_tensors(weights, str(weights))  # tensors only: a pickle with code is refused
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - weights of another model
            raise SegNetError(f"{weights} does not fit {meta['config']['model']}: {e}") from e
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = fold_batch_norm(model).to(self.device, memory_format=torch.channels_last)
        self.size = tuple(meta["image_size"])
        self.mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, classes, H, W): normalised and run at the training size."""
        size = tuple(x.shape[-2:])
        x = (x.to(self.device) - self.mean) / self.std
        if size != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        logits = self.model(x.contiguous(memory_format=torch.channels_last))
        if size != self.size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def predict(self, context, model_input, params=None) -> list[np.ndarray]:
        images = input_images(model_input)
        labels: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):  # same-size images run as one batch
            by_size.setdefault(tuple(image.shape), []).append(i)
        for idx in by_size.values():
            out = self.logits(torch.stack([images[i] for i in idx])).argmax(1).to(torch.uint8).cpu().numpy()
            for i, label in zip(idx, out):
                labels[i] = label
        return labels


mlflow.models.set_model(SegNetModel())
