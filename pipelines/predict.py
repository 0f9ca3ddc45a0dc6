"""`segnet predict`: label PNGs (class indices of the model's dataset) and optional overlays from a
registered model, for an image, a folder or a bucket prefix, as a Ray Data batch job.

An actor pool loads the registered model once per actor (one GPU each when the cluster has GPUs); each image
is predicted at its own size and its label PNG written beside the input layout under --output. An image
that cannot be read is reported by name and skipped; the count of skipped images ends the run. With
`--mc-samples N` (a model trained with dropout) the labels are Bayesian SegNet's, and NAME_uncertainty.png
shows each pixel's uncertainty as a heat map over its colour bar.
"""

import io
import json
import time
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from data_prep import storage
from data_prep.shards import dataset_of
from pipelines.core.plots import overlay, uncertainty_picture, with_legend
from pipelines.tracking import registry
from pipelines.tracking.pyfunc_model import MAX_PIXELS, check_pixels
from segnet.bayesian import MAX_MC_SAMPLES, MC_BATCH, check_samples
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


def read_rgb(location: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # PIL's bomb warning (over 89 M pixels) is our refusal, not a line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(storage.read_bytes(location)))
        with img:
            check_pixels(img.width, img.height, location, max_pixels)  # before decoding: no bombs
            return np.asarray(img.convert("RGB"))
    except SegNetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # refused by Image.open
        raise SegNetError(f"{location} is over the limit of {max_pixels:,} pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files
        raise SegNetError(f"{location} cannot be decoded as an image ({e})") from e


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Predictor:
    """One actor of the pool: the model is loaded once, then each batch of image locations is predicted."""

    def __init__(
        self, uri: str, model_ref: str, root: str, output: str, with_overlay: bool, max_pixels: int, mc: dict
    ):
        self.model = registry.load(uri, model_ref)
        python_model = self.model.unwrap_python_model()
        meta = getattr(python_model, "meta", {})  # models logged before it kept no meta
        self.dataset = dataset_of(meta, model_ref)  # the overlays' colours
        self.root, self.output, self.with_overlay, self.max_pixels = root, output, with_overlay, max_pixels
        self.params = {**mc, "uncertainty": True} if mc["mc_samples"] > 1 else None
        if self.params and not hasattr(python_model, "sampling"):
            raise SegNetError(f"{model_ref} was logged before Monte Carlo sampling: it takes no mc_samples")

    def __call__(self, batch: dict) -> dict:
        written, errors = [], []
        for location in batch["image"]:
            try:
                image = read_rgb(location, self.max_pixels)
            except SegNetError as e:
                written.append("")
                errors.append(str(e))
                continue
            labels = self.model.predict(pd.DataFrame({"image": [image]}), params=self.params)[0]
            stem = str(PurePosixPath(location[len(self.root) + 1 :]).with_suffix(""))
            if self.params:
                picture = uncertainty_picture(labels["uncertainty"])
                storage.write_bytes(storage.join(self.output, f"{stem}_uncertainty.png"), png(picture))
                labels = labels["labels"]
            target = storage.join(self.output, f"{stem}.png")
            storage.write_bytes(target, png(labels))
            if self.with_overlay:
                storage.write_bytes(
                    storage.join(self.output, f"{stem}_overlay.png"),
                    png(with_legend(overlay(image, labels, self.dataset), self.dataset)),
                )
            written.append(target)
            errors.append("")
        return {"image": list(batch["image"]), "written": written, "error": errors}


def sampled_version(uri: str, model_ref: str, mc_samples: int, max_mc_samples: int) -> str:
    """models:/NAME/VERSION of the reference, once it is known to exist and, for mc_samples > 1, to have been
    trained with dropout (its training config): both fail here in one line, before any actor starts."""
    version = registry.resolve_version(uri, model_ref)
    trained = json.loads(version.tags.get("training_config") or "{}")
    ref = f"models:/{version.name}/{version.version}"
    check_samples(mc_samples, max_mc_samples, bool(trained.get("dropout")), ref)
    return ref


def predict(
    uri: str,
    model_ref: str,
    inputs: str,
    output: str,
    with_overlay: bool = False,
    max_pixels: int = MAX_PIXELS,
    log=print,
    mc_samples: int = 1,
    mc_batch: int = MC_BATCH,
    max_mc_samples: int = MAX_MC_SAMPLES,
) -> dict:
    """Predict every image under `inputs` (a file, folder or bucket prefix) into `output`; returns the
    written label PNGs, the skipped images with their reasons and the images/s of the job. An image over
    `max_pixels` (at most the model's own limit, MAX_PIXELS) is skipped before it is decoded. With
    `mc_samples` > 1, Bayesian SegNet's labels and an uncertainty PNG per image (`mc_batch` a pass)."""
    import ray

    from data_prep.shards import init_ray

    if not 0 < max_pixels <= MAX_PIXELS:
        raise SegNetError(f"max_pixels {max_pixels:,}: expected 1 to {MAX_PIXELS:,} (the model's own limit)")
    root, files = input_images(storage.absolute(inputs))
    ref = sampled_version(uri, model_ref, mc_samples, max_mc_samples)
    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1)) // 2))
    mc = {"mc_samples": mc_samples, "mc_batch": mc_batch}
    arguments = (uri, ref, root, storage.absolute(output), with_overlay, max_pixels, mc)
    how = (" on GPUs" if gpus else "") + (f", {mc_samples} dropout samples each" if mc_samples > 1 else "")
    log(f"predicting {len(files)} images from {inputs} with {actors} model actors{how}")
    t0 = time.perf_counter()
    # Ray Data restarts a dead actor forever by default, and Ray then prints a core_worker.cc error that
    # the actor's constructor arguments, in the object store, may be gone by the restart. A batch job is
    # better off failing with the actor's error (an image that kills it by memory would kill it again); an
    # image that cannot be read is skipped without any actor dying. max_restarts has no named parameter
    # in map_batches, so it goes through the `ray_remote_args` that Ray 2.60 warns about.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = ray.data.from_items([{"image": f} for f in files]).map_batches(
            Predictor,
            fn_constructor_args=arguments,
            batch_size=4,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            max_restarts=0,
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
