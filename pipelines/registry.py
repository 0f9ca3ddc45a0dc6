"""The MLflow model registry: register a checkpoint as a pyfunc, move the `champion` alias, look up."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipelines import tracking
from segnet.errors import SegNetError

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# A registry that does not answer should say so in seconds, not retry for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _unreachable(uri: str, e: Exception) -> SegNetError:
    return SegNetError(f"MLflow registry at {uri} is unreachable or refused the request: {e}")


def register(
    uri: str,
    name: str,
    checkpoint: str | Path,
    test_metrics: dict,
    manifest_sha256: str,
    run_id: str,
    force_alias: bool = False,
    log=print,
) -> dict:
    """Log the checkpoint as a pyfunc under `run_id`, register a new version with its test metrics, data
    identity and training config, and move `champion` only when its test mIoU beats the champion's."""
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        shutil.copyfile(checkpoint / "model.pt", weights)
        model_meta = {
            "config": meta["config"],
            "num_classes": meta["num_classes"],
            "image_size": meta["image_size"],
            "manifest_sha256": manifest_sha256,
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        }
        (Path(tmp) / "meta.json").write_text(json.dumps(model_meta, indent=2))
        k = meta["num_classes"]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, -1, -1))]),
        )
        h, w = meta["image_size"]
        example = np.random.default_rng(0).random((1, 3, h // 4, w // 4), dtype=np.float32)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_CODE),
                    artifacts={"weights": str(weights), "meta": str(Path(tmp) / "meta.json")},
                    signature=signature,
                    input_example=example,
                    registered_model_name=name,
                )
        except MlflowException as e:
            raise _unreachable(uri, e) from e
    version = str(info.registered_model_version)
    tags = {f"test_{k}": v for k, v in test_metrics.items() if isinstance(v, int | float)}
    tags.update(
        {
            "data_manifest_sha256": manifest_sha256,
            "training_config": json.dumps(meta["config"]),
            "checkpoint": str(checkpoint),
            "model": meta["config"]["model"],
        }
    )
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))
    new = float(test_metrics["miou"])
    moved, reason = _maybe_move_champion(c, name, version, new, force_alias)
    log(reason)
    return {
        "name": name,
        "version": version,
        "champion": moved,
        "reason": reason,
        "model_uri": info.model_uri,
    }


def _maybe_move_champion(c, name: str, version: str, new: float, force: bool) -> tuple[bool, str]:
    try:
        current = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        c.set_registered_model_alias(name, CHAMPION, version)
        return True, f"{name} v{version} is now {CHAMPION}: there was none (test mIoU {new:.4f})"
    old = float(current.tags.get("test_miou", "nan"))
    if force:
        c.set_registered_model_alias(name, CHAMPION, version)
        return (
            True,
            f"{name} v{version} is now {CHAMPION} (--force-alias): mIoU {new:.4f}, "
            f"v{current.version} had {old:.4f}",
        )
    if new > old or old != old:
        c.set_registered_model_alias(name, CHAMPION, version)
        return (
            True,
            f"{name} v{version} is now {CHAMPION}: test mIoU {new:.4f} beats v{current.version}'s {old:.4f}",
        )
    return False, (
        f"{CHAMPION} stays on {name} v{current.version}: its test mIoU {old:.4f} is not beaten by "
        f"v{version}'s {new:.4f} (use --force-alias to move it anyway)"
    )


def list_models(uri: str) -> list[dict]:
    c = tracking.client(uri)
    try:
        models = c.search_registered_models()
    except Exception as e:  # noqa: BLE001
        raise _unreachable(uri, e) from e
    rows = []
    for m in models:
        rows.append({
            "name": m.name,
            "latest_versions": [str(v.version) for v in (m.latest_versions or [])],
            "aliases": dict(m.aliases or {}),
        })  # fmt: skip
    return rows


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """NAME, NAME@ALIAS or NAME/VERSION (a `models:/` prefix is accepted)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.split("/", 1)
        return name, None, version
    return ref, None, None


def resolve_version(uri: str, ref: str):
    """The model version a reference names; unknown names and aliases list what exists."""
    name, alias, version = parse_ref(ref)
    c = tracking.client(uri)
    try:
        names = [m.name for m in c.search_registered_models()]
    except Exception as e:  # noqa: BLE001
        raise _unreachable(uri, e) from e
    if name not in names:
        raise SegNetError(f"no registered model {name!r} in {uri}; registered: {', '.join(names) or 'none'}")
    model = c.get_registered_model(name)
    if alias:
        if alias not in (model.aliases or {}):
            known = ", ".join(f"@{a}" for a in model.aliases or {}) or "none"
            raise SegNetError(f"model {name!r} has no alias {alias!r}; aliases: {known}")
        return c.get_model_version_by_alias(name, alias)
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    if version is None:
        version = str(versions[-1])
    if int(version) not in versions:
        raise SegNetError(f"model {name!r} has no version {version}; versions: {versions}")
    return c.get_model_version(name, version)


def show(uri: str, ref: str) -> dict:
    v = resolve_version(uri, ref)
    model = tracking.client(uri).get_registered_model(v.name)
    aliases = [a for a, ver in (model.aliases or {}).items() if str(ver) == str(v.version)]
    return {
        "name": v.name,
        "version": str(v.version),
        "aliases": aliases,
        "metrics": {k: float(val) for k, val in v.tags.items() if k.startswith("test_")},
        "run_id": v.run_id,
        "data_manifest_sha256": v.tags.get("data_manifest_sha256"),
        "model": v.tags.get("model"),
        "created": v.creation_timestamp,
        "source": v.source,
    }


def load(uri: str, ref: str):
    """The pyfunc of a registered model version (runs pyfunc_model.py; weights_only loading)."""
    v = resolve_version(uri, ref)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{v.name}/{v.version}")
    except SegNetError:
        raise
    except MlflowException as e:
        raise SegNetError(f"could not load models:/{v.name}/{v.version} from {uri}: {e}") from e


def download_weights(uri: str, ref: str, dest: str | Path) -> Path:
    """A registered version's weights and meta.json in a folder that `load_checkpoint` reads, with the
    weights' sha256 checked against the one logged with the model."""
    v = resolve_version(uri, ref)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{v.name}/{v.version}", dst_path=str(dest)))
    except MlflowException as e:
        raise SegNetError(f"could not download models:/{v.name}/{v.version} from {uri}: {e}") from e
    folder = next((p.parent for p in local.rglob("meta.json") if (p.parent / "model.pt").is_file()), None)
    if folder is None:
        raise SegNetError(f"models:/{v.name}/{v.version} holds no model.pt and meta.json")
    meta = json.loads((folder / "meta.json").read_text())
    digest = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    if digest != meta["weights_sha256"]:
        raise SegNetError(
            f"models:/{v.name}/{v.version}: weights sha256 {digest} differs from the logged one"
        )
    return folder
