"""Checkpoints: a folder or bucket prefix holding model.pt (the weights), optimizer.pt (the optimiser's state
and the epoch), meta.json (the run's config, metrics, history and the weights' sha256) and validation.npz
(the epoch's validation confusion matrix and a few predictions, from which the driver draws the plots).

Weights and optimiser state are plain tensors, loaded with `weights_only=True`: nothing in a checkpoint runs
code. Reads go through `storage`, so a checkpoint in a bucket loads like a local one.
"""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from data_prep import storage
from segnet.errors import SegNetError
from segnet.models import model_from_meta
from segnet.weights import load_tensors

WEIGHTS, OPTIMIZER, META, VALIDATION = "model.pt", "optimizer.pt", "meta.json", "validation.npz"


def _tensor_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save(folder: Path, model, optimizer, epoch: int, meta: dict) -> None:
    """Into a local folder (Ray Train then uploads it): weights, optimiser and epoch, and meta.json with
    both files' sha256, so a file damaged later is recognised before it is used. Each file is written under
    a temporary name and renamed into place, meta.json last: a full disk leaves no partial file under a
    checkpoint's names, and a folder without meta.json is no checkpoint."""
    weights = _tensor_bytes(model.state_dict())
    optim = _tensor_bytes({"optimizer": optimizer.state_dict(), "epoch": epoch})
    meta = {
        **meta,
        "epoch": epoch,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "optimizer_sha256": hashlib.sha256(optim).hexdigest(),
    }
    storage.write_bytes(Path(folder) / WEIGHTS, weights)
    storage.write_bytes(Path(folder) / OPTIMIZER, optim)
    storage.write_bytes(Path(folder) / META, json.dumps(meta, indent=2, default=str).encode())


def save_validation(folder: Path, confusion, examples) -> None:
    """The epoch's validation confusion matrix and (input, prediction, label) examples, as numbers: drawing
    them is the driver's (matplotlib in every worker, every epoch, would cost a second an epoch)."""
    arrays = {"confusion": confusion.numpy()}
    for i, (x, pred, label) in enumerate(examples):  # class indices as bytes where they fit (void is K)
        fit = np.uint8 if int(max(pred.max(), label.max())) < 256 else np.int32
        arrays |= {f"image_{i}": x.numpy(), f"prediction_{i}": pred.numpy().astype(fit)}
        arrays[f"label_{i}"] = label.numpy().astype(fit)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    storage.write_bytes(Path(folder) / VALIDATION, buffer.getvalue())


def read_validation(folder: str | Path) -> tuple[np.ndarray, list[tuple]] | None:
    """(confusion matrix, [(input 3xHxW, prediction, label), ...]) of a checkpoint; None for one written
    before checkpoints held them."""
    path = storage.join(folder, VALIDATION)
    if not storage.exists(path):
        return None
    with np.load(io.BytesIO(storage.read_bytes(path))) as arrays:
        count = sum(k.startswith("image_") for k in arrays.files)
        examples = [tuple(arrays[f"{k}_{i}"] for k in ("image", "prediction", "label")) for i in range(count)]
        return arrays["confusion"], examples


def read_meta(folder: str | Path) -> dict:
    meta_file = storage.join(folder, META)
    if not storage.exists(meta_file) or not storage.exists(storage.join(folder, WEIGHTS)):
        raise SegNetError(f"{folder} is not a checkpoint: expected {WEIGHTS} and {META} in it")
    try:
        return json.loads(storage.read_bytes(meta_file))
    except ValueError as e:
        raise SegNetError(f"{meta_file} is not valid JSON: {e}") from e


def _tensors(path: str, expected_sha256: str | None, device="cpu"):
    data = storage.read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise SegNetError(f"{path} has sha256 {digest}, but its checkpoint recorded {expected_sha256}")
    return load_tensors(io.BytesIO(data), path, device)


def verifies(folder: str | Path) -> bool:
    """Whether meta.json reads and model.pt still has the sha256 recorded in it (nothing is unpickled): a
    damaged checkpoint is never chosen as a run's best."""
    try:
        meta = read_meta(folder)
        data = storage.read_bytes(storage.join(folder, WEIGHTS))
    except SegNetError:
        return False
    return meta.get("weights_sha256") in (None, hashlib.sha256(data).hexdigest())


def load(folder: str | Path, device="cpu"):
    """(model, meta) from a checkpoint folder or URI: the model rebuilt from meta.json, then its weights."""
    meta = read_meta(folder)
    model = model_from_meta(meta)
    state = _tensors(storage.join(folder, WEIGHTS), meta.get("weights_sha256"), device)
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise SegNetError(
            f"{storage.join(folder, WEIGHTS)} does not fit {meta['config']['model']}: {e}"
        ) from e
    return model.to(device), meta


def load_matching(folder: str | Path, model) -> tuple[int, list[str]]:
    """Initialise `model` from a checkpoint of another run or dataset (--init-from): every tensor whose shape
    matches is copied; those whose shape differs (the classifier of another class count, and what is as wide
    as it) keep their fresh values. Returns (tensors loaded, names skipped); a checkpoint of a model with
    other tensor names (another family) is refused."""
    meta = read_meta(folder)
    state = _tensors(storage.join(folder, WEIGHTS), meta.get("weights_sha256"))
    own = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(own):
        theirs = set(state) if isinstance(state, dict) else set()
        differ = sorted(set(own) ^ theirs)[:3]
        raise SegNetError(
            f"{folder} holds a {meta.get('config', {}).get('model')!r} model whose tensors differ from this "
            f"run's (e.g. {', '.join(differ)}): expected a checkpoint of the same model"
        )
    skipped = [k for k in own if state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return len(own) - len(skipped), skipped


def restore(folder: str | Path, model, optimizer) -> dict:
    """Load a checkpoint's weights and optimiser into `model` and `optimizer` in place; its meta.json. Both
    files are read and checked before either is applied, so a damaged checkpoint changes nothing."""
    meta = read_meta(folder)
    weights = _tensors(storage.join(folder, WEIGHTS), meta.get("weights_sha256"))
    optim = _tensors(storage.join(folder, OPTIMIZER), meta.get("optimizer_sha256"))
    try:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim["optimizer"])
    except Exception as e:  # noqa: BLE001 - tensors of another model or optimiser
        raise SegNetError(f"{folder} does not fit this run's model and optimiser: {e}") from e
    return meta


def restore_newest_good(folder: str, run_dir: str, model, optimizer, log=print) -> tuple[str, dict]:
    """Restore `folder` (the checkpoint Ray hands back after a failure or on --resume) or, when it is damaged,
    the run's newest older checkpoint that verifies; each damaged one is named in a one-line warning.
    Returns (the checkpoint used, its meta.json)."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    older = [d for d in find(run_dir) if d.rsplit("/", 1)[-1] < name]  # Ray names them by time
    for candidate in [folder, *reversed(older)]:
        try:
            return candidate, restore(candidate, model, optimizer)
        except SegNetError as e:
            if log:
                log(f"warning: checkpoint {candidate} is damaged, trying the one before it: {e}")
    raise SegNetError(f"no checkpoint of {run_dir} verifies (the newest is {folder}): nothing to resume from")


def find(run_dir: str) -> list[str]:
    """The checkpoint folders of a run, oldest first (Ray Train names them checkpoint_TIME; the run's folder
    also holds others, such as the weights --init-from staged)."""
    folders = storage.list_names(run_dir, folders=True)
    named = [d for d in folders if d.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")]
    return sorted(d for d in named if storage.exists(storage.join(d, WEIGHTS)))
