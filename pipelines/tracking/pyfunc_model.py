"""The registered model, logged as code (MLflow "models from code") with the `segnet` package as its code
path: loading it needs only torch, numpy, pandas, pillow and mlflow-skinny, not this project. The weights
are read with torch.load(weights_only=True) after their sha256 is checked, so nothing from an artifact is
ever unpickled as code.

Input: a DataFrame column `image` whose cells are PNG/JPEG bytes, base64 strings of them, uint8 HxWx3 RGB
arrays, or float32 (N, 3, H, W) batches in [0, 1] (the old input). Output: one uint8 label map (CamVid class
indices) per image, at that image's own size.

Params (Bayesian SegNet, for a model trained with dropout): `mc_samples` N runs each image N times with
dropout on (`mc_batch` samples per pass) and labels it by the mean softmax; `uncertainty` true makes each
output a dict {"labels": uint8 HxW, "uncertainty": float32 HxW in [0, 1], the predictive entropy / log K}.
At most MAX_MC_SAMPLES samples; a model without dropout refuses more than one.

Memory: an image is resized to the model's size from its uint8 pixels (bilinear reads two rows and two
columns per output pixel, so only those are made float), and the logits are brought back to the image's
size in bands of rows, each band's argmax taken before the next: no float copy of a full-size image and no
full-size logits. What an image costs beyond its own uint8 pixels is a uint8 label map and a fixed amount
(`BAND_PIXELS`); docs/serving.md (Memory per request) gives the formula.
"""

import base64
import binascii
import hashlib
import io
import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from segnet.bayesian import (
    MAX_MC_SAMPLES,
    MC_BATCH,
    check_samples,
    has_dropout,
    mc_softmax,
    normalised_entropy,
)
from segnet.errors import SegNetError
from segnet.layers import fold_batch_norm
from segnet.models import model_from_meta
from segnet.weights import load_tensors

MAX_PIXELS = 40_000_000  # per image: larger ones are refused before decoding (decompression bombs)
BAND_PIXELS = (
    2**20
)  # output pixels per band of upsampled logits: K classes x 4 bytes x 1 M (46 MB for K = 11)


def open_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PNG/JPEG bytes -> a PIL image whose header has been read and checked; nothing is decoded yet."""
    try:
        with warnings.catch_warnings():  # PIL's bomb warning (over 89 M pixels) is our refusal, not a line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SegNetError(f"{name} is over the limit of {max_pixels:,} pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable bytes
        raise SegNetError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e})") from e
    check_pixels(img.width, img.height, name, max_pixels)
    if img.format not in ("PNG", "JPEG"):
        raise SegNetError(f"{name} is {img.format}, expected a PNG or JPEG image")
    return img


def decode_image(data: bytes | Image.Image, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes (or an image from `open_image`) -> uint8 HxWx3 RGB; the size is read from the header
    and checked before decoding."""
    img = data if isinstance(data, Image.Image) else open_image(data, name, max_pixels)
    with img:
        try:
            return np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a truncated file fails only here
            raise SegNetError(f"{name} cannot be decoded as an image ({type(e).__name__}: {e})") from e


def check_pixels(width: int, height: int, name: str, max_pixels: int = MAX_PIXELS) -> None:
    if width * height > max_pixels:
        raise SegNetError(f"{name} has {width}x{height} pixels, over the limit of {max_pixels:,}")


def as_images(value, name: str) -> list[torch.Tensor]:
    """One input cell -> (3, H, W) tensors: uint8 (0..255, not copied) or float32 in [0, 1]; a float
    batch gives several."""
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
        with warnings.catch_warnings():  # a decoded image is read-only; it is only ever read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return [torch.from_numpy(a).permute(2, 0, 1)]
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
        self.meta = meta  # its `dataset` names the classes (serve, predict); none for CamVid models of before
        state = load_tensors(weights, str(weights))  # tensors only: a pickle with code is refused
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - weights of another model
            raise SegNetError(f"{weights} does not fit {meta['config']['model']}: {e}") from e
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = fold_batch_norm(model).to(self.device, memory_format=torch.channels_last)
        self.dropout = has_dropout(self.model)
        self.size = tuple(meta["image_size"])
        self.mean = torch.tensor(meta["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=self.device).view(1, 3, 1, 1)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), uint8 or float in [0, 1] -> normalised float32 at the training size, NHWC."""
        scale = 1.0 if torch.is_floating_point(x) else 255.0
        x = resize_bilinear(x, self.size, scale).to(self.device)  # float32 in [0, 1], the model's size
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W), uint8 or float in [0, 1] -> (N, H, W) uint8 labels: run at the training size, the
        logits upsampled (bilinear, as F.interpolate) and reduced to labels band by band."""
        return upsample_argmax(self.model(self.model_input(x)), tuple(x.shape[-2:]))

    @torch.no_grad()
    def sampled(self, x: torch.Tensor, samples: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, uncertainty) of Bayesian SegNet: the mean softmax of `samples` dropout passes (one
        deterministic pass for 1), upsampled band by band to labels and normalised predictive entropy."""
        x_in = self.model_input(x)
        probs = mc_softmax(self.model, x_in, samples, batch) if samples > 1 else self.model(x_in).softmax(1)
        return upsample_argmax(probs, tuple(x.shape[-2:]), uncertainty=True)

    def sampling(self, params: dict | None) -> tuple[int, bool, int]:
        """(mc_samples, uncertainty, mc_batch) from the predict params, checked against this model."""
        params = params or {}
        samples, batch = params.get("mc_samples", 1), params.get("mc_batch", MC_BATCH)
        check_samples(samples, MAX_MC_SAMPLES, self.dropout, f"model {self.meta['config']['model']!r}")
        if not isinstance(batch, int) or batch < 1:
            raise SegNetError(f"mc_batch {batch!r}: expected a whole number of at least 1")
        return samples, bool(params.get("uncertainty", False)), batch

    def predict(self, context, model_input, params=None) -> list:
        samples, uncertainty, batch = self.sampling(params)
        images = input_images(model_input)
        if samples > 1 or uncertainty:  # each image its own batch of samples
            out = []
            for image in images:
                labels, entropy = (t[0].cpu().numpy() for t in self.sampled(image[None], samples, batch))
                out.append({"labels": labels, "uncertainty": entropy} if uncertainty else labels)
            return out
        labels: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):  # same-size images run as one batch
            by_size.setdefault((image.dtype, *image.shape), []).append(i)
        for idx in by_size.values():
            batch = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
            out = self.labels(batch).cpu().numpy()
            for i, label in zip(idx, out):
                labels[i] = label
        return labels


def source_index(out: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For bilinear resizing of `size` samples to `out` (align_corners=False, as F.interpolate): each output
    sample's two source indices and the weight of the second."""
    src = ((torch.arange(out, dtype=torch.float32) + 0.5) * (size / out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=size - 1)
    return lo, (lo + 1).clamp(max=size - 1), src - lo


def lerp_rows(x: torch.Tensor, lo, hi, w, scale: float = 1.0) -> torch.Tensor:
    """Rows (dim -2) `lo` and `hi` of `x`, float / `scale`, blended with weight `w` of `hi`."""
    a, b = x.index_select(-2, lo).float() / scale, x.index_select(-2, hi).float() / scale
    return torch.lerp(a, b, w.to(a.device).view(-1, 1))


def resize_bilinear(x: torch.Tensor, size: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) of any dtype, divided by `scale` -> float32 (N, C, *size), as F.interpolate(bilinear):
    only the rows and columns that bilinear reads are taken from `x` before they are made float. Dividing
    first (uint8 / 255) gives the very floats a float32 input in [0, 1] has, so both resize alike."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float() / scale
    rows = lerp_rows(x, *source_index(size[0], x.shape[-2]), scale)
    return lerp_rows(rows.transpose(-1, -2), *source_index(size[1], x.shape[-1])).transpose(-1, -2)


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int], uncertainty: bool = False):
    """argmax over classes of the logits resized bilinearly to `size`, computed in bands of output rows
    (BAND_PIXELS each): the full-size float logits never exist. (N, C, h, w) -> uint8 (N, *size). With
    `uncertainty` (the input then a mean softmax), also (labels, float32 normalised entropy (N, *size))."""
    n, _, h, w = logits.shape
    if (h, w) == tuple(size):
        labels = logits.max(1).indices.to(torch.uint8)
        return (labels, normalised_entropy(logits)) if uncertainty else labels
    wide = resize_bilinear(logits, (h, size[1])).contiguous()  # (N, C, h, W): only the width resized
    lo, hi, weight = source_index(size[0], h)
    out = torch.empty((n, *size), dtype=torch.uint8, device=logits.device)
    entropy = torch.empty((n, *size), dtype=torch.float32, device=logits.device) if uncertainty else None
    band = max(1, BAND_PIXELS // (n * size[1]))
    for y in range(0, size[0], band):
        rows = slice(y, y + band)
        band_logits = lerp_rows(wide, lo[rows], hi[rows], weight[rows])
        out[:, rows] = band_logits.max(1).indices.to(torch.uint8)  # first maximum, as argmax; 6x faster
        if entropy is not None:
            entropy[:, rows] = normalised_entropy(band_logits)
    return (out, entropy) if uncertainty else out


mlflow.models.set_model(SegNetModel())
