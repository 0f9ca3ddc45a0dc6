"""MLflow, in one place: runs, params, per-epoch metrics, the data manifest as input, artifacts."""

import logging
import os
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.core import console
from segnet.errors import SegNetError

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# A request to a server that does not answer fails in seconds, not after MLflow's minutes of backoff: the
# callers below decide what waiting means (buffer an epoch's metrics, or wait for the server to return).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
WAIT_S = 900  # how long a finished run waits for its server to come back


def _quiet_mlflow() -> None:
    """Unless `segnet -v`: MLflow's event stream, which carries its log records (INFO and up, also
    alembic's) and its prints ("Successfully registered model ..."), writes to the command's log file."""
    path = console.library_log()
    if path is None:
        return
    from mlflow.utils import logging_utils

    path.parent.mkdir(parents=True, exist_ok=True)

    class LogFile(logging_utils.MlflowLoggingStream):
        def write(self, text):
            if self.enabled:
                with open(path, "a") as f:
                    f.write(text)

        def flush(self):
            pass

    stream = LogFile()
    logging_utils.MLFLOW_LOGGING_STREAM = stream  # what MLflow's prints are written to
    logger = logging.getLogger("mlflow")
    for handler in logger.handlers:  # MLflow's one handler, also alembic's and sqlalchemy's
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)
    logger.setLevel(logging.INFO)


_quiet_mlflow()


def tracking_uri(uri: str | None = None) -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else a sqlite file in the working directory (absolute, so
    Ray workers in other directories write to the same store)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def unreachable(e: Exception) -> bool:
    """The server did not answer (down, restarting, overloaded), as opposed to refusing the request."""
    text = str(e)
    transient = isinstance(e, MlflowException) and e.get_http_status_code() in (502, 503, 504)
    return transient or "failed with exception" in text or "failed with timeout exception" in text


def check(uri: str) -> None:
    """One clear line, before Ray or any worker starts, when the tracking store does not answer or refuses
    (wrong address, server down, missing or wrong MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - an unreachable store raises many types
        why = "does not answer" if unreachable(e) else "refused the request"
        hint = (
            " (credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)" if "401" in str(e) else ""
        )
        raise SegNetError(f"MLflow tracking store {uri} {why}{hint}: {str(e).splitlines()[0][:300]}") from e


def patiently(uri: str, what: str, call, wait_s: float | None = None):
    """`call()`, retried while the server does not answer (an outage, a restart) for up to `wait_s` seconds;
    used for what a finished run must still record. A refusal (4xx) is not retried."""
    deadline = time.monotonic() + (WAIT_S if wait_s is None else wait_s)
    delay, said = 1.0, False
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001
            if not unreachable(e) or time.monotonic() > deadline:
                raise SegNetError(
                    f"MLflow at {uri} could not record {what}: {str(e).splitlines()[0][:300]}"
                ) from e
            if not said:
                print(f"MLflow at {uri} does not answer; retrying {what} until it is back", flush=True)
                said = True
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


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


def metric_batch(metrics: dict, step: int, stamp_ms: int | None = None) -> list[Metric]:
    """The numbers of `metrics` as one step's points, stamped `stamp_ms` (when measured), else now."""
    stamp = int(time.time() * 1000) if stamp_ms is None else int(stamp_ms)
    return [Metric(k, float(v), stamp, step) for k, v in metrics.items() if isinstance(v, int | float)]


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    patiently(
        uri,
        f"metrics of step {step}",
        lambda: client(uri).log_batch(run_id, metrics=metric_batch(metrics, step)),
    )


class MetricBuffer:
    """Per-epoch metrics (and tags) that reach the server in order, whenever it answers: an epoch logged
    while the server is down waits here and goes with the next one. Each batch keeps the timestamp of its
    epoch, so sending a batch again (its answer lost) stores no second point."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self.pending, self.down = uri, run_id, [], False

    def add(self, metrics: dict, step: int, tags: dict | None = None, stamp_ms: int | None = None) -> None:
        tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self.pending.append((step, metric_batch(metrics, step, stamp_ms), tags))
        self.flush()

    def flush(self) -> None:
        c = client(self.uri)
        while self.pending:
            step, metrics, tags = self.pending[0]
            try:
                c.log_batch(self.run_id, metrics=metrics, tags=tags)
            except Exception as e:  # noqa: BLE001 - training goes on; the driver logs what is missing
                line = str(e).splitlines()[0][:200]
                if not unreachable(e):
                    print(f"MLflow at {self.uri} refused the metrics of step {step}: {line}", flush=True)
                    self.pending.pop(0)
                    continue
                if not self.down:
                    print(
                        f"MLflow at {self.uri} does not answer; epochs wait until it is back: {line}",
                        flush=True,
                    )
                self.down = True
                return
            self.pending.pop(0)
        if self.down:
            print(f"MLflow at {self.uri} is back: buffered metrics sent", flush=True)
        self.down = False


def fill_history(uri: str, run_id: str, history: list[dict], stamp_key: str | None = None) -> list[int]:
    """Log the epochs of `history` (the checkpoint's record of every epoch) that the run lacks, waiting for
    the server if it is away. An epoch's batch is stored all or nothing, and holds the metric `epoch`: its
    step present means the whole epoch is, stamped `h[stamp_key]` (when it ended) if given, else now. Returns
    the epochs it logged."""
    c = client(uri)
    points = patiently(uri, "the metric history", lambda: c.get_metric_history(run_id, "epoch"))
    logged = {m.step for m in points}
    missing = [h for h in history if h["epoch"] not in logged]
    for h in missing:
        numbers = {k: v for k, v in h.items() if k != stamp_key}
        batch = metric_batch(numbers, h["epoch"], h.get(stamp_key))  # stamped when the epoch ended
        patiently(uri, f"metrics of epoch {h['epoch']}", lambda b=batch: c.log_batch(run_id, metrics=b))
    return [h["epoch"] for h in missing]


def log_artifacts(uri: str, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    patiently(
        uri,
        f"artifacts {artifact_path or ''}",
        lambda: client(uri).log_artifacts(run_id, str(folder), artifact_path),
    )


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    patiently(uri, "tags", lambda: client(uri).log_batch(run_id, tags=batch))


def status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return patiently(uri, "the run's status", lambda: client(uri).get_run(run_id).info.status)


def end_run(uri: str, run_id: str, status: str = "FINISHED", wait_s: float | None = None) -> None:
    patiently(
        uri, f"the run's end ({status})", lambda: client(uri).set_terminated(run_id, status=status), wait_s
    )
