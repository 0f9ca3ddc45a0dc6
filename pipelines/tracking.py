"""MLflow, in one place: runs, params, per-epoch metrics, the data manifest as input, artifacts."""

import os
import subprocess
import warnings
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from segnet.errors import SegNetError

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(uri: str | None = None) -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else a sqlite file in the working directory (absolute, so
    Ray workers in other directories write to the same store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment; a local store keeps artifacts in mlartifacts beside its database."""
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if uri.startswith("sqlite:///"):  # beside the database file, not wherever the command runs
            location = (Path(uri[len("sqlite:///") :]).parent / DEFAULT_ARTIFACTS).resolve().as_uri()
        elif uri.startswith("file:"):
            location = Path(DEFAULT_ARTIFACTS).resolve().as_uri()
        return c.create_experiment(name, artifact_location=location)
    except Exception as e:  # noqa: BLE001 - an unreachable store raises many types
        raise SegNetError(f"MLflow tracking store {uri} is unreachable or refused the request: {e}") from e


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}: a nested config as MLflow params."""
    flat = {}
    for k, v in values.items():
        flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    config,
    data: str,
    manifest_sha: str,
    parent: str | None = None,
) -> str:
    """Create the run with its params, tags and input dataset (the shard folder or URI `data`); returns the
    run id for the workers.
    A `parent` run id nests it (a Tune trial under its search)."""
    c = client(uri)
    tags = {"mlflow.parentRunId": parent} if parent else None
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    rid = run.info.run_id
    params = {k: str(v) for k, v in flatten(asdict(config)).items() if v is not None}
    for i in range(0, len(params), 90):
        chunk = dict(list(params.items())[i : i + 90])
        c.log_batch(rid, params=[mlflow.entities.Param(k, v) for k, v in chunk.items()])
    tags = {"data.manifest": f"{data}/manifest.json", "data.manifest_sha256": manifest_sha}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for k, v in tags.items():
        c.set_tag(rid, k, v)
    inputs = dataset(data, manifest_sha)
    c.log_inputs(rid, datasets=[mlflow.entities.DatasetInput(inputs._to_mlflow_entity(), [])])
    print(f"MLflow run {rid}: {ui_address(uri, f'#/experiments/{run.info.experiment_id}/runs/{rid}')}")
    return rid


def dataset(folder: str | Path, manifest_sha: str, name: str = "camvid-shards") -> MetaDataset:
    """The shard folder as an MLflow dataset, identified by its manifest's sha256."""
    with warnings.catch_warnings():  # a local folder resolves to two equivalent source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(folder))
    return MetaDataset(source, name=name, digest=manifest_sha[:32])


def ui_address(uri: str, page: str) -> str:
    """Where a person sees `page` (a UI route such as #/models/NAME) of this tracking store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after: mlflow ui --backend-store-uri {uri})"


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
    client(uri).log_batch(run_id, metrics=batch)


def log_artifacts(uri: str, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifacts(run_id, str(folder), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)
