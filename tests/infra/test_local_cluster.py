"""A real two-node Ray cluster (`ray start`) and a real MLflow server, started by infra/local-cluster.sh;
the nodes share no folder, only the loopback S3 bucket (infra/local-s3.sh, started by the `s3` fixture)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from data_prep import storage
from pipelines import registry

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local-cluster.sh"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ports free now, not fixed ones: other Ray instances on the machine take ports near their defaults.
RAY_PORT, DASHBOARD_PORT, MLFLOW_PORT, AGENT_PORT_BASE = (_free_port() for _ in range(4))


def _env(state: str) -> dict:
    env = {
        **os.environ,
        "STATE_DIR": state,
        "RAY_PORT": str(RAY_PORT),
        "DASHBOARD_PORT": str(DASHBOARD_PORT),
        "MLFLOW_PORT": str(MLFLOW_PORT),
        "AGENT_PORT_BASE": str(AGENT_PORT_BASE),
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def cluster(s3):
    state = tempfile.mkdtemp(prefix="sgc", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**_env(state), "ARTIFACTS": f"{s3['bucket']}/e2e/mlflow"}  # the MLflow server keeps them there
    try:  # a start that fails half-way is stopped too
        started = subprocess.run(
            [str(SCRIPT), "start"], env=env, check=True, capture_output=True, text=True, timeout=300
        )
        exports = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
        yield {
            "state": state,
            "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}",
            "mlflow": f"http://127.0.0.1:{MLFLOW_PORT}",
            "env": {**_env(state), **exports},  # what a user exports after `start`
        }
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=_env(state), timeout=120)


def _state(cluster, call: str) -> list:
    """Ray's state API, asked from a process that holds this cluster's token."""
    code = f"import json, ray.util.state as s; print(json.dumps([vars(a) for a in s.{call}], default=str))"
    r = subprocess.run(
        [sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tree_status() -> str:
    """The new (untracked or ignored) files of the project's tree: a run must add none."""
    git = ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"]
    lines = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    caches = (".venv/", "__pycache__", ".pytest_cache", ".ruff_cache")  # Python's and the tools' own
    return "\n".join(
        line for line in lines if line[:2] in ("??", "!!") and not any(c in line for c in caches)
    )


def _bucket_files(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [f.path[len(path) + 1 :] for f in found if f.type == pafs.FileType.File]


def test_nodes_sharing_only_a_bucket_prepare_tune_register_predict_and_resume(
    cluster, s3, camvid_dir, tmp_path
):
    nodes = _state(cluster, f"list_nodes(address='{cluster['dashboard']}')")
    assert len([n for n in nodes if n["state"] == "ALIVE"]) == 2
    bucket = f"{s3['bucket']}/e2e"
    client = tmp_path / "client"  # a third directory: neither node's, no project files
    (client / "tmp").mkdir(parents=True)
    env = {**cluster["env"], "TMPDIR": str(client / "tmp")}
    tree_before = _tree_status()

    def segnet(*args, timeout=300):
        r = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=client,
            env=env,
        )
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    segnet(
        "prepare",
        "--source",
        camvid_dir,
        "--out",
        f"{bucket}/shards",
        "--limit",
        "8",
        "--shard-size",
        "4",
        "--workers",
        "1",
    )
    tune = [
        "tune",
        "--data",
        f"{bucket}/shards",
        "--name",
        "search",
        "--num-samples",
        "2",
        "--epochs",
        "1",
        "--image-size",
        "64x96",
        "--batch-size",
        "4",
        "--max-concurrent",
        "2",
        "--workers",
        "1",
        "--loader-workers",
        "0",
        "--mlflow-uri",
        cluster["mlflow"],
    ]
    submit = ["submit", "--address", cluster["dashboard"], "--storage", f"{bucket}/runs", "--"]
    assert "SUCCEEDED" in segnet(*submit, *tune, timeout=900)
    # both nodes ran training workers, and each checked the shards once into its own cache
    query = f"list_actors(address='{cluster['dashboard']}', filters=[('class_name', '=', 'RayTrainWorker')], "
    actors = _state(cluster, query + "detail=True, limit=1000)")
    assert len({a["node_id"] for a in actors}) == 2
    state = Path(cluster["state"])
    for node in ("head", "worker"):
        assert list((state / node / "tmp" / "segnet-cache").glob("*.arrow")), node
    entry = registry.show(cluster["mlflow"], "segnet-camvid@champion")
    assert entry["version"] == "1" and "champion" in entry["aliases"]

    images = sorted((camvid_dir / "test").iterdir())[:2]
    for i, image in enumerate(images):  # a bucket prefix of images, one in a sub-prefix
        storage.write_bytes(f"{bucket}/images/{'sub/' * i}{image.name}", image.read_bytes())
    out = segnet(
        "predict",
        "--model",
        "models:/segnet-camvid@champion",
        "--input",
        f"{bucket}/images",
        "--output",
        f"{bucket}/labels",
        "--overlay",
        "--mlflow-uri",
        cluster["mlflow"],
    )
    assert "images/s" in out
    assert storage.exists(f"{bucket}/labels/{images[0].name}")
    assert storage.exists(f"{bucket}/labels/sub/{images[1].stem}_overlay.png")

    files = _bucket_files(bucket)
    assert "shards/manifest.json" in files
    assert any(f.startswith("runs/search-") and f.endswith("/model.pt") for f in files)  # trials' checkpoints
    assert any(f.startswith("runs/search/") and "experiment_state" in f for f in files)  # Tune's state
    assert any(f.startswith("mlflow/") and f.endswith("MLmodel") for f in files)  # the registered model
    # nothing written outside the bucket and each node's own directory (the client's temp files aside)
    assert sorted(p.name for p in client.iterdir()) == ["tmp"]
    assert not (state / "mlartifacts").exists()
    assert _tree_status() == tree_before

    resumed = segnet(*submit, "tune", "--resume", f"{bucket}/runs/search", timeout=600)
    assert "resuming search search" in resumed and "SUCCEEDED" in resumed


def test_stop_leaves_no_process_behind(cluster):
    state = cluster["state"]
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout  # running now
    subprocess.run([str(SCRIPT), "stop"], env=_env(state), check=True, timeout=120)
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout == b""
    assert subprocess.run(["pgrep", "-f", f"mlflow server.*{MLFLOW_PORT}"], capture_output=True).stdout == b""
