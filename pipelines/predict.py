"""`segnet predict`: label PNGs (CamVid class indices) and optional overlays from a registered model, for an
image, a folder or a bucket prefix, as a Ray Data batch job.

An actor pool loads the registered model once per actor (one GPU each when the cluster has GPUs); each image
is predicted at its own size and its label PNG written beside the input layout under --output. An image
that cannot be read is reported by name and skipped; the count of skipped images ends the run.
"""

import io
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from data_prep import storage
from pipelines import registry
from pipelines.plots import overlay
from pipelines.pyfunc_model import MAX_PIXELS, check_pixels
from segnet.errors import SegNetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def input_images(location: str) -> tuple[str, list[str]]:
    """(root, images below it): every image under a folder or prefix (recursively), or one image file."""
    import pyarrow.fs as pafs

    found = storage.info(location)
    if found.type == pafs.FileType.File:
        return location.rsplit("/", 1)[0], [location]
    if found.type != pafs.FileType.Directory:
        raise SegNetError(f"input {location} does not exist")
    fs, path = storage.resolve(location)
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        storage.join(location, f.path[len(path) + 1 :])
        for f in listing
        if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise SegNetError(f"{location} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for file in files:
        check_name(location, file)
    return location, files


def check_name(root: str, file: str) -> None:
    """Each label PNG is written at its input's path below --output: refuse an input whose name would lead
    out of it (a bucket key `a/../../b`), holds a control character, or (local) links out of the input."""
    relative = file[len(root) + 1 :]
    if not relative.isprintable():
        raise SegNetError(f"input file name {relative!r} under {root} holds a control character: refusing it")
    if ".." in relative.split("/"):
        raise SegNetError(
            f"input {relative!r} under {root} has a '..' part, so its output would land "
            "outside --output: refusing it"
        )
    if not storage.is_uri(file) and not Path(file).resolve().is_relative_to(Path(root).resolve()):
        raise SegNetError(f"input {file} links to {Path(file).resolve()}, outside {root}: refusing it")


def read_rgb(location: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(location))) as img:
            check_pixels(img.width, img.height, location)  # before decoding: no decompression bombs
            return np.asarray(img.convert("RGB"))
    except SegNetError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused by Image.open
        raise SegNetError(f"{location} is over the limit of {MAX_PIXELS:,} pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files
        raise SegNetError(f"{location} cannot be decoded as an image ({e})") from e


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Predictor:
    """One actor of the pool: the model is loaded once, then each batch of image locations is predicted."""

    def __init__(self, uri: str, model_ref: str, root: str, output: str, with_overlay: bool):
        self.model = registry.load(uri, model_ref)
        self.root, self.output, self.with_overlay = root, output, with_overlay

    def __call__(self, batch: dict) -> dict:
        written, errors = [], []
        for location in batch["image"]:
            try:
                image = read_rgb(location)
            except SegNetError as e:
                written.append("")
                errors.append(str(e))
                continue
            labels = self.model.predict(pd.DataFrame({"image": [image]}))[0]
            stem = str(PurePosixPath(location[len(self.root) + 1 :]).with_suffix(""))
            target = storage.join(self.output, f"{stem}.png")
            storage.write_bytes(target, png(labels))
            if self.with_overlay:
                storage.write_bytes(
                    storage.join(self.output, f"{stem}_overlay.png"), png(overlay(image, labels))
                )
            written.append(target)
            errors.append("")
        return {"image": list(batch["image"]), "written": written, "error": errors}


def predict(
    uri: str, model_ref: str, inputs: str, output: str, with_overlay: bool = False, log=print
) -> dict:
    """Predict every image under `inputs` (a file, folder or bucket prefix) into `output`; returns the
    written label PNGs, the skipped images with their reasons and the images/s of the job."""
    import ray

    from data_prep.shards import init_ray

    root, files = input_images(storage.absolute(inputs))
    version = registry.resolve_version(uri, model_ref)  # an unknown model fails here, before any actor
    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1)) // 2))
    predictor = (Predictor, uri, f"models:/{version.name}/{version.version}", root, storage.absolute(output))
    log(
        f"predicting {len(files)} images from {inputs} with {actors} model actors"
        + (" on GPUs" if gpus else "")
    )
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"image": f} for f in files]).map_batches(
        predictor[0],
        fn_constructor_args=(*predictor[1:], with_overlay),
        batch_size=4,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
    )
    written, skipped = [], []
    for row in ds.iter_rows():
        if row["error"]:
            log(f"skipped {row['image']}: {row['error']}")
            skipped.append(row["image"])
        else:
            written.append(row["written"])
    rate = len(files) / (time.perf_counter() - t0)
    log(f"{len(written)} label PNGs in {storage.absolute(output)}: {rate:.2f} images/s")
    if skipped:
        log(f"skipped {len(skipped)} unreadable images")
    return {"written": written, "skipped": skipped, "images_per_s": rate}
