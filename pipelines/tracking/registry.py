"""The MLflow model registry: register a checkpoint as a pyfunc, move the `champion` alias, look up."""

import datetime
import hashlib
import importlib.metadata
import io
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec
from PIL import Image

import segnet
from data_prep.augment import MEAN, STD
from data_prep.shards import dataset_of
from pipelines.tracking import runs
from segnet.bayesian import MC_BATCH
from segnet.errors import SegNetError

CHAMPION = "champion"
COMPLETE = "segnet.complete"  # version tag, set last: its model, metrics and tags are all there
FORCED = "segnet.forced"  # version tag of a --force-alias registration: older versions no longer compete
PROMOTED = "segnet.promoted"  # version tag of `segnet registry promote`: when, the champion then, the newest
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
SEGNET_CODE = Path(segnet.__file__).parent  # the model's only code (torch and numpy); wherever Ray put it
# The predict params (pyfunc_model.py): Bayesian SegNet's Monte Carlo samples, per pass, and the uncertainty.
PARAMS = ParamSchema(
    [
        ParamSpec("mc_samples", DataType.long, 1),
        ParamSpec("mc_batch", DataType.long, MC_BATCH),
        ParamSpec("uncertainty", DataType.boolean, False),
    ]
)
# What loading the model needs, pinned to this environment's versions (torch without its +cpu/+cuXXX tag).
REQUIREMENTS = ("mlflow-skinny", "torch", "numpy", "pandas", "pillow")


def _unreachable(uri: str, e: Exception) -> SegNetError:
    return SegNetError(f"MLflow registry at {uri} is unreachable or refused the request: {e}")


def requirements() -> list[str]:
    return [f"{p}=={importlib.metadata.version(p).split('+')[0]}" for p in REQUIREMENTS]


def register(
    uri: str,
    name: str,
    checkpoint: str | Path,
    test_metrics: dict,
    manifest_sha256: str,
    run_id: str,
    force_alias: bool = False,
    log=print,
    source: str | None = None,
    search_run_id: str | None = None,
) -> dict:
    """Log the checkpoint (a local folder; `source` names where it lives, e.g. its bucket URI) as a pyfunc
    under `run_id` with its test metrics on the LoggedModel (linked to the data), register a new version
    with a description, its data identity and training config, mark it complete, and move `champion` only
    when its test mIoU beats the champion's (see `move_champion`: correct when registrations race). A
    search's run (`search_run_id`) gets the LoggedModel as an output, so its page shows the model and its
    registered version too."""
    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / "meta.json").read_text())
    info = log_model(uri, name, checkpoint, meta, test_metrics, manifest_sha256, run_id)
    version = str(info.registered_model_version)
    tags = {
        "data_manifest_sha256": manifest_sha256,
        "training_config": json.dumps(meta["config"]),
        "checkpoint": source or str(checkpoint),
        "model": meta["config"]["model"],
    }
    if force_alias:
        tags[FORCED] = "true"
    c = runs.client(uri)
    try:
        if search_run_id:
            c.log_outputs(search_run_id, [LoggedModelOutput(info.model_id, step=0)])
        text = description(c, meta, test_metrics, manifest_sha256, run_id, search_run_id)
        c.update_model_version(name, version, description=text)
        for key, value in tags.items():
            c.set_model_version_tag(name, version, key, str(value))
        c.set_model_version_tag(name, version, COMPLETE, "true")  # last: only now may it become champion
        moved, reason = registration_outcome(c, name, version)
    except MlflowException as e:
        raise _unreachable(uri, e) from e
    log(reason)
    log(f"registered {name} v{version}: {runs.ui_address(uri, f'#/models/{name}/versions/{version}')}")
    return {
        "name": name,
        "version": version,
        "champion": moved,
        "reason": reason,
        "model_uri": info.model_uri,
        "model_id": info.model_id,
    }


def log_model(
    uri: str, name: str, checkpoint: Path, meta: dict, test_metrics: dict, manifest_sha256: str, run_id: str
):
    """The checkpoint logged as a pyfunc under `run_id` and registered as a new version of `name` (no tags
    yet), its test metrics on the LoggedModel, linked to the test data; returns MLflow's ModelInfo."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    scores = {f"test_{k}": float(v) for k, v in test_metrics.items() if isinstance(v, int | float)}
    example = io.BytesIO()
    Image.new("RGB", (48, 32), (128, 64, 32)).save(example, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_CODE),
                    code_paths=[str(SEGNET_CODE)],
                    artifacts=model_artifacts(checkpoint, meta, manifest_sha256, Path(tmp)),
                    signature=ModelSignature(
                        inputs=Schema([ColSpec(DataType.binary, "image")]),
                        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
                        params=PARAMS,
                    ),
                    input_example=pd.DataFrame({"image": [example.getvalue()]}),
                    pip_requirements=requirements(),
                    registered_model_name=name,
                )
                test_data = f"{dataset_of(meta, 'meta.json').name}-test"
                data = runs.dataset(meta["config"]["data"], manifest_sha256, test_data)
                mlflow.log_metrics(scores, model_id=info.model_id, dataset=data)
        except MlflowException as e:
            raise _unreachable(uri, e) from e
    return info


def description(c, meta: dict, test: dict, manifest_sha256: str, run_id: str, search_run_id: str | None):
    """A version's description (Markdown, on its page in the MLflow UI): the model, the data and its
    manifest digest, the training size, the test scores and the runs it came from."""
    height, width = meta["image_size"]
    names = {"global_accuracy": "G", "class_accuracy": "C", "miou": "mIoU", "bf": "BF"}
    scores = ", ".join(f"{short} {test[key]:.4f}" for key, short in names.items() if key in test)

    def run_link(rid: str) -> str:
        info = c.get_run(rid).info
        return f"[{info.run_name}](#/experiments/{info.experiment_id}/runs/{rid})"

    lines = [
        f"- model: {meta['config']['model']}, {meta['num_classes']} classes",
        f"- data: {dataset_of(meta, 'meta.json').name} at `{meta['config']['data']}`, "
        f"manifest sha256 `{manifest_sha256}`",
        f"- image size: {height}x{width}",
        f"- test: {scores}",
        f"- trained in run {run_link(run_id)}",
    ]
    if search_run_id:
        lines.append(f"- from the search {run_link(search_run_id)}")
    return "\n".join(lines)


def model_artifacts(checkpoint: Path, meta: dict, manifest_sha256: str, folder: Path) -> dict:
    """The pyfunc's artifacts, written to `folder`: the weights, and the meta.json serving reads (config,
    class count, the dataset's description (class names and colours), training size, normalisation, and
    the identities of the data and the weights)."""
    weights = folder / "model.pt"
    shutil.copyfile(checkpoint / "model.pt", weights)
    model_meta = {
        "config": meta["config"],
        "num_classes": meta["num_classes"],
        "dataset": dataset_of(meta, f"{checkpoint}/meta.json").to_dict(),  # CamVid for older checkpoints
        "image_size": meta["image_size"],
        "mean": MEAN,
        "std": STD,
        "manifest_sha256": manifest_sha256,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (folder / "meta.json").write_text(json.dumps(model_meta, indent=2))
    return {"weights": str(weights), "meta": str(folder / "meta.json")}


def model_id(version) -> str | None:
    """The LoggedModel behind a version (the store leaves `model_id` empty; its source names it)."""
    if version.model_id:
        return version.model_id
    return version.source.removeprefix("models:/") if version.source.startswith("models:/") else None


def logged_metrics(c, version) -> dict:
    """The test metrics logged on a version's LoggedModel (MLflow links an epoch's metrics of its run to it
    too, which are not this model's)."""
    mid = model_id(version)
    metrics = (c.get_logged_model(mid).metrics or []) if mid else []
    return {m.key: m.value for m in metrics if m.key.startswith("test_")}


def candidates(versions: dict) -> list[str]:
    """The complete versions that compete for `champion`: after the newest decision, all of them when there
    is none. A --force-alias registration F decides for F and every later version; `segnet registry promote
    P` for P and the versions newer than the newest there was when it was promoted. Decisions are ordered by
    the newest version they knew (a forced F knew F; a promotion wins a tie, and two by their time)."""
    decisions = []
    for n, v in versions.items():
        if v.tags.get(FORCED):
            decisions.append(((int(n), ""), [m for m in versions if int(m) >= int(n)]))
        if v.tags.get(PROMOTED):
            done = json.loads(v.tags[PROMOTED])
            later = [m for m in versions if int(m) > done["newest"]]
            decisions.append(((done["newest"], done["at"]), [n, *later]))
    return max(decisions, key=lambda d: d[0])[1] if decisions else list(versions)


def move_champion(c, name: str) -> tuple[str | None, str, Callable[[str], float]]:
    """Point `champion` at the best complete version: (the champion found first, the champion now, a
    version's test mIoU).

    MLflow has no compare-and-set on aliases, so "read the champion, compare, set the alias" loses updates
    when two registrations finish together: both read the old champion, both move the alias, and the later
    write wins even when it is the worse model. Instead every registration (and promotion) converges on one
    rule, a function of the registry's complete versions and their tags only (`candidates`): champion is
    the candidate with the highest test mIoU (the older one on a tie). Each registration, once its own
    version is complete (a promotion, once its tag is set): (1) reads the complete versions S, (2) reads the
    alias and sets it to best(S) if it is elsewhere, (3) reads the complete versions again, and starts over
    if they, or their decision tags, changed.

    Why the alias ends on the best of all complete versions: take the last alias write, from S by a
    registration R, which then re-read S unchanged. A version completed (or a decision tagged) before that
    re-read is in S. One completed after it was read, with the alias, by its own registration after that
    last write: the alias was best(S) and was left there, so best(S + it) = best(S). Versions only become
    complete (tags are never removed), so the loop ends once registrations stop. A registration killed
    before its version is marked complete leaves a version that is never a candidate: @champion only ever
    names a complete version.
    """
    scores: dict[str, float] = {}  # a complete version's metrics never change: read each once

    def score(n: str) -> float:
        if n not in scores:
            scores[n] = logged_metrics(c, c.get_model_version(name, n)).get("test_miou", math.nan)
        return scores[n]

    def rank(n: str) -> tuple:  # a version without the score competes last; the older one wins a tie
        return -math.inf if math.isnan(score(n)) else score(n), -int(n)

    def complete() -> dict:
        return {str(v.version): v for v in c.search_model_versions(f"name='{name}'") if v.tags.get(COMPLETE)}

    def decided(versions: dict) -> dict:
        return {n: (v.tags.get(FORCED), v.tags.get(PROMOTED)) for n, v in versions.items()}

    before = ...  # the champion found first
    while True:
        seen = complete()
        winner = max(candidates(seen), key=rank)
        current = champion_version(c, name)
        before = current if before is ... else before
        if current != winner:
            try:
                c.set_registered_model_alias(name, CHAMPION, winner)
            except MlflowException as e:
                if not _created_at_once(e):
                    raise
                continue  # another registration created the alias at this instant: read it and decide again
        if decided(complete()) == decided(seen):
            return before, winner, score


def _created_at_once(e: MlflowException) -> bool:
    """Whether setting the alias failed because another writer created it at the same instant (the store's
    unique key on the alias: sqlite and Postgres say "unique constraint", MySQL "duplicate entry")."""
    text = str(e).lower()
    return "unique constraint" in text or "duplicate entry" in text


def champion_version(c, name: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def registration_outcome(c, name: str, version: str) -> tuple[bool, str]:
    """`champion` moved for a new complete version (`move_champion`): True if it is now `version`, and a
    line saying why."""
    before, winner, score = move_champion(c, name)
    new = score(version)
    if winner != version:
        return False, (
            f"{CHAMPION} stays on {name} v{winner}: its test mIoU {score(winner):.4f} is not beaten by "
            f"v{version}'s {new:.4f} (use --force-alias to move it anyway)"
        )
    if before is None or before == version:
        return True, f"{name} v{version} is now {CHAMPION}: there was none (test mIoU {new:.4f})"
    old = score(before)
    if c.get_model_version(name, version).tags.get(FORCED):
        why = f"(--force-alias): mIoU {new:.4f}, v{before} had {old:.4f}"
        return True, f"{name} v{version} is now {CHAMPION} {why}"
    return True, f"{name} v{version} is now {CHAMPION}: test mIoU {new:.4f} beats v{before}'s {old:.4f}"


def promote(uri: str, name: str, version: str) -> tuple[dict, str]:
    """`segnet registry promote NAME VERSION`, a rollback in one line: `champion` moved to a complete
    version through the same compare-and-set as registration (`move_champion`), recorded on the version as
    the tag segnet.promoted (when, the champion then, the newest version then); a version that is champion
    already is left as it is. Later registrations compete with it as with any champion. An unknown or
    incomplete version is refused. Returns (what it did, a line saying it)."""
    v = resolve_version(uri, f"{name}/{version}")
    version = str(v.version)
    if not v.tags.get(COMPLETE):
        raise SegNetError(
            f"{name} v{version} is not complete (its registration did not finish): only a complete version "
            f"can be {CHAMPION}"
        )
    c = runs.client(uri)
    try:
        was = champion_version(c, name)
        if was == version:  # nothing moves: the record of the promotion that made it champion stays
            return {"name": name, "version": version, "champion": was, "previous": was}, (
                f"{name} v{version} is {CHAMPION} already"
            )
        newest = max(int(m.version) for m in _versions(uri, name))
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        record = {"at": at, "was": was, "newest": newest}
        c.set_model_version_tag(name, version, PROMOTED, json.dumps(record))
        before, winner, _ = move_champion(c, name)
    except MlflowException as e:
        raise _unreachable(uri, e) from e
    if winner != version:
        said = f"{CHAMPION} is on {name} v{winner}, not v{version}: a version registered since beats it"
    elif before == version:  # champion by a registration between the check above and the move
        said = f"{name} v{version} is {CHAMPION} already"
    else:
        said = f"{name} v{version} is now {CHAMPION} (was {f'v{before}' if before else 'none'}), by promotion"
    return {"name": name, "version": version, "champion": winner, "previous": before}, said


def _versions(uri: str, name: str | None = None) -> list:
    c = runs.client(uri)
    try:
        return list(c.search_model_versions(f"name='{name}'" if name else None))
    except Exception as e:  # noqa: BLE001
        raise _unreachable(uri, e) from e


def list_models(uri: str) -> list[dict]:
    """Each registered model with its versions and aliases, from `search_model_versions`."""
    c = runs.client(uri)
    rows: dict[str, dict] = {}
    for v in sorted(_versions(uri), key=lambda v: (v.name, int(v.version))):
        row = rows.setdefault(v.name, {"name": v.name, "versions": [], "aliases": {}})
        row["versions"].append(str(v.version))
    for row in rows.values():  # versions from a search carry no aliases
        row["aliases"] = {a: str(n) for a, n in (c.get_registered_model(row["name"]).aliases or {}).items()}
    return list(rows.values())


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
    c = runs.client(uri)
    names = sorted({v.name for v in _versions(uri)})
    if name not in names:
        raise SegNetError(f"no registered model {name!r} in {uri}; registered: {', '.join(names) or 'none'}")
    model = c.get_registered_model(name)
    if alias:
        if alias not in (model.aliases or {}):
            known = ", ".join(f"@{a}" for a in model.aliases or {}) or "none"
            raise SegNetError(f"model {name!r} has no alias {alias!r}; aliases: {known}")
        return c.get_model_version_by_alias(name, alias)
    found = _versions(uri, name)
    versions = sorted(int(v.version) for v in found)
    if version is None:  # the newest complete one: a registration still under way (or killed) is not it
        done = sorted(int(v.version) for v in found if v.tags.get(COMPLETE))
        if not done:
            raise SegNetError(f"model {name!r} has no complete version yet; versions: {versions}")
        version = str(done[-1])
    if int(version) not in versions:
        raise SegNetError(f"model {name!r} has no version {version}; versions: {versions}")
    return c.get_model_version(name, version)


def show(uri: str, ref: str) -> dict:
    v = resolve_version(uri, ref)
    return {
        "name": v.name,
        "version": str(v.version),
        "aliases": list(v.aliases or []),
        "metrics": logged_metrics(runs.client(uri), v),
        "model_id": model_id(v),
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
    """A registered version's weights and meta.json in a folder that `checkpoint.load` reads, with the
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
