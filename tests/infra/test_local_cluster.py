"""A real two-node Ray cluster (`ray start`) and a real MLflow server, started by infra/local-cluster.sh;
the nodes share no folder, only the loopback S3 bucket (infra/local-s3.sh, started by the `s3` fixture)."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from data_prep import storage
from pipelines.tracking import registry
from tests.helpers import free_port_block, kill_all, process_tree, processes_naming, wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local-cluster.sh"
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _local_cluster(s3):
    """infra/local-cluster.sh start, then stop (also after a start that failed half-way). Each cluster has
    its own state folder and ports, free now, not fixed ones: other Ray instances on the machine take ports
    near their defaults."""
    state = tempfile.mkdtemp(prefix="sgc", dir="/tmp")  # short: Ray's socket paths live below it
    base = free_port_block(18)  # the script's ports: 3, then 4 agent ports per node, 10 apart
    offsets = {"RAY_PORT": 0, "DASHBOARD_PORT": 1, "MLFLOW_PORT": 2, "AGENT_PORT_BASE": 4}
    ports = {name: str(base + offset) for name, offset in offsets.items()}
    script = {**os.environ, "STATE_DIR": state, **ports}  # the environment of the script's commands
    script.pop("RAY_ADDRESS", None)
    env = {**script, "ARTIFACTS": f"{s3['bucket']}/e2e/mlflow"}  # the MLflow server keeps them there
    try:  # a start that fails half-way is stopped too
        started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
        if started.returncode:  # the script's line names what did not start, and its log's last lines
            pytest.fail(f"local-cluster.sh start exited {started.returncode}:\n{started.stderr}")
        exports = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
        yield {
            "state": state,
            "dashboard": f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
            "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
            "mlflow_port": ports["MLFLOW_PORT"],
            "script": script,
            "env": {**script, **exports},  # what a user exports after `start`
        }
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=script, timeout=120)


@pytest.fixture(scope="module")
def cluster(s3):
    """One cluster for the tests of this module that leave it whole."""
    with _local_cluster(s3) as started:
        yield started


@pytest.fixture(scope="module")
def own_cluster(s3):
    """A cluster apart from `cluster`, for the tests that kill a node or stop it: the elastic run (which
    kills the worker node and starts it again), then the stop (which must stop it all, the restarted node
    included). One start and stop of a cluster costs about 40 s here."""
    with _local_cluster(s3) as started:
        yield started


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


def _node_processes(state: str, node: str) -> list[int]:
    """One node's processes: those whose command line names its temp directory (raylet, log monitor), and
    their descendants (agents, idle and training workers), which Ray renames."""
    return process_tree(*processes_naming(f"{state}/{node}/ray"))


def _mlflow_run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("segnet-camvid")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'") if exp else []
    return runs[0] if runs else None


# `segnet train`, with Ray Train asked every 2 s (not 60) whether the worker group can grow again.
ELASTIC_DRIVER = (
    "import sys, pipelines.train.driver as t; t.RESIZE_CHECK_S = 2; "
    "from pipelines.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_elastic_run_loses_a_node_mid_epoch_continues_and_grows_back(
    own_cluster, s3, camvid_dir, tmp_path, segnet_cli, ray_local
):
    """`segnet train --workers 1-2` on both nodes; the worker node is SIGKILLed (raylet, agents, workers) in
    epoch 1; the run goes on from epoch 0's checkpoint on the head alone, and once the node is started again
    Ray Train grows the group back to 2 workers (again from the last checkpoint), and the run completes."""
    cluster = own_cluster
    # epochs enough to outlast the shrink and the growth back (by epoch 3 on a loaded 2-CPU machine; a fast
    # one trains more epochs on the head alone while the worker node restarts)
    bucket, state, epochs = f"{s3['bucket']}/elastic", cluster["state"], 18
    (tmp_path / "tmp").mkdir()
    # A restart first asks for the lost node's worker too (Ray's resource view lags by up to 20 s): give up
    # on that placement after 15 s instead of Ray's 60 s, then restart with the workers that fit.
    env = {**cluster["env"], "TMPDIR": str(tmp_path / "tmp"), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    prepare = [
        "prepare",
        "--source",
        camvid_dir,
        "--out",
        f"{bucket}/shards",
        "--limit",
        16,
        "--shard-size",
        8,
        "--workers",
        1,
    ]
    r = segnet_cli(*prepare, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train = [
        "train",
        "--data",
        f"{bucket}/shards",
        "--workers",
        "1-2",
        "--epochs",
        epochs,
        "--batch-size",
        4,
        "--image-size",
        "48x64",
        "--loader-workers",
        0,
        "--max-failures",
        2,
        "--name",
        "elastic",
        "--storage-path",
        f"{bucket}/runs",
        "--mlflow-uri",
        cluster["mlflow"],
    ]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", ELASTIC_DRIVER, *map(str, train)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = MlflowClient(cluster["mlflow"])

    def workers() -> list[tuple[int, int]]:  # (epoch, world size) of each epoch logged so far
        run = _mlflow_run(client, "elastic")
        history = client.get_metric_history(run.info.run_id, "workers") if run else []
        return sorted((m.step, int(m.value)) for m in history)

    tail = lambda: f"training log:\n{log.read_text()[-3000:]}"  # noqa: E731
    try:
        wait_until(lambda: workers(), 300, driver, tail)  # epoch 0 is checkpointed: the kill lands in epoch 1
        kill_all(_node_processes(state, "worker"))  # the worker node: its raylet, agents and workers
        wait_until(lambda: 1 in dict(workers()).values(), 300, driver, tail)  # an epoch on the head alone
        subprocess.run([str(SCRIPT), "start-worker"], env=cluster["script"], check=True, timeout=120)
        driver.wait(timeout=600)
    finally:
        driver.kill()
    out = log.read_text()
    assert driver.returncode == 0, out[-3000:]
    # the session's Ray is another Ray on this machine: the run's actors were told which is theirs
    assert "Found multiple active Ray instances" not in out, out[-3000:]

    per_epoch = workers()
    assert [e for e, _ in per_epoch] == list(range(epochs))  # every epoch logged, each once
    sizes = [w for _, w in per_epoch]
    assert [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]] == [2, 1, 2]  # shrank, grew back
    shrink, grow = sizes.index(1), len(sizes) - sizes[::-1].index(1)
    # each restart began at the last checkpoint: no checkpointed epoch was trained again
    resumed = set(re.findall(r"resuming from the checkpoint of epoch (\d+) with (\d+) workers", out))
    assert resumed == {(str(shrink), "1"), (str(grow), "2")}
    run = _mlflow_run(client, "elastic")
    assert run.info.status == "FINISHED"
    resizes = {k: v for k, v in run.data.tags.items() if k.startswith("resize.")}
    assert resizes == {f"resize.epoch_{shrink}": "2->1", f"resize.epoch_{grow}": "1->2"}


def test_stop_leaves_no_process_behind(own_cluster):
    """After the elastic run (so a node that was killed and started again): `stop` ends every process."""
    state = own_cluster["state"]
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout  # running now
    subprocess.run([str(SCRIPT), "stop"], env=own_cluster["script"], check=True, timeout=120)
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", state], capture_output=True).stdout == b""
    assert (
        subprocess.run(
            ["pgrep", "-f", f"mlflow server.*{own_cluster['mlflow_port']}"], capture_output=True
        ).stdout
        == b""
    )


# Last in the module: its cluster (module scope) is then not running beside the others' own.
def test_nodes_sharing_only_a_bucket_prepare_tune_register_predict_and_resume(
    cluster, s3, camvid_dir, tmp_path, segnet_cli
):
    nodes = _state(cluster, f"list_nodes(address='{cluster['dashboard']}')")
    assert len([n for n in nodes if n["state"] == "ALIVE"]) == 2
    bucket = f"{s3['bucket']}/e2e"
    client = tmp_path / "client"  # a third directory: neither node's, no project files
    (client / "tmp").mkdir(parents=True)
    env = {**cluster["env"], "TMPDIR": str(client / "tmp")}
    tree_before = _tree_status()

    def segnet(*args, timeout=300):
        r = segnet_cli(*args, cwd=client, env=env, timeout=timeout)
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
