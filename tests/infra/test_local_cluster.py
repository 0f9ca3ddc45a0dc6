"""A real two-node Ray cluster (`ray start`) and a real MLflow server, started by infra/local-cluster.sh."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines import registry

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local-cluster.sh"
pytestmark = pytest.mark.slow


def _env(state: str) -> dict:
    env = {
        **os.environ,
        "STATE_DIR": state,
        "RAY_PORT": "6391",
        "DASHBOARD_PORT": "8267",
        "MLFLOW_PORT": "5056",
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def cluster():
    state = tempfile.mkdtemp(prefix="sgc", dir="/tmp")  # short: Ray's socket paths live below it
    started = subprocess.run(
        [str(SCRIPT), "start"], env=_env(state), check=True, capture_output=True, text=True, timeout=300
    )
    exports = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    try:
        yield {
            "state": state,
            "dashboard": "http://127.0.0.1:8267",
            "mlflow": "http://127.0.0.1:5056",
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


def test_tune_job_on_two_nodes_registers_champion_on_the_server(cluster, camvid_dir, tmp_path):
    nodes = _state(cluster, f"list_nodes(address='{cluster['dashboard']}')")
    assert len([n for n in nodes if n["state"] == "ALIVE"]) == 2
    shards = tmp_path / "shards"
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "prepare", "--source", str(camvid_dir), "--out", str(shards),
         "--limit", "8", "--shard-size", "4", "--workers", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    submit = [sys.executable, "-m", "pipelines.cli", "submit", "--address", cluster["dashboard"]]
    submit += ["--storage", str(tmp_path / "runs"), "--", "tune", "--data", str(shards), "--num-samples", "2"]
    submit += ["--epochs", "1", "--image-size", "64x96", "--batch-size", "4", "--max-concurrent", "2"]
    submit += ["--workers-per-trial", "1", "--loader-workers", "0", "--mlflow-uri", cluster["mlflow"]]
    r = subprocess.run(submit, capture_output=True, text=True, timeout=900, cwd=ROOT, env=cluster["env"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "SUCCEEDED" in r.stdout + r.stderr
    # both nodes ran training workers
    query = f"list_actors(address='{cluster['dashboard']}', filters=[('class_name', '=', 'RayTrainWorker')], "
    actors = _state(cluster, query + "detail=True, limit=1000)")
    assert len({a["node_id"] for a in actors}) == 2
    entry = registry.show(cluster["mlflow"], "segnet-camvid@champion")
    assert entry["version"] == "1" and "champion" in entry["aliases"]


def test_stop_leaves_no_process_behind(cluster):
    state = cluster["state"]
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout  # running now
    subprocess.run([str(SCRIPT), "stop"], env=_env(state), check=True, timeout=120)
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout == b""
    assert subprocess.run(["pgrep", "-f", "mlflow server.*5056"], capture_output=True).stdout == b""
