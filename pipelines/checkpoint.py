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

WEIGHTS, OPTIMIZER, META = "model.pt", "optimizer.pt", "meta.json"


def save(folder: Path, model, optimizer, epoch: int, meta: dict) -> None:
    """Into a local folder (Ray Train then uploads it): weights, optimiser and epoch, and meta.json with
    the weights' sha256, so a file damaged later is recognised before it is used."""
    torch.save(model.state_dict(), folder / WEIGHTS)
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch}, folder / OPTIMIZER)
    meta = {
        **meta,
        "epoch": epoch,
        "weights_sha256": hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest(),
    }
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))


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
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file (a pickle with code) gets one line
        raise SegNetError(f"{path} is not a file of plain tensors (weights_only load failed): {e}") from e


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
    """Load a checkpoint's weights and optimiser into `model` and `optimizer` in place; its meta.json."""
    meta = read_meta(folder)
    model.load_state_dict(_tensors(storage.join(folder, WEIGHTS), meta.get("weights_sha256")))
    optimizer.load_state_dict(_tensors(storage.join(folder, OPTIMIZER), None)["optimizer"])
    return meta


def find(run_dir: str) -> list[str]:
    """The checkpoint folders of a run, oldest first."""
    folders = storage.list_names(run_dir, folders=True)
    return sorted(d for d in folders if storage.exists(storage.join(d, WEIGHTS)))
