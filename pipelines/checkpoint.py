"""Checkpoints: a folder or bucket prefix holding model.pt (the weights), optimizer.pt (the optimiser's state
and the epoch) and meta.json (the run's config, metrics, history and the weights' sha256).

Weights and optimiser state are plain tensors, loaded with `weights_only=True`: nothing in a checkpoint runs
code. Reads go through `storage`, so a checkpoint in a bucket loads like a local one.
"""

import hashlib
import io
import json
from pathlib import Path

import torch

from data_prep import storage
from segnet.errors import SegNetError
from segnet.models import model_from_meta
from segnet.weights import load_tensors

WEIGHTS, OPTIMIZER, META = "model.pt", "optimizer.pt", "meta.json"


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
    """The checkpoint folders of a run, oldest first."""
    folders = storage.list_names(run_dir, folders=True)
    return sorted(d for d in folders if storage.exists(storage.join(d, WEIGHTS)))
