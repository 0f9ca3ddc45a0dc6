"""--placement-timeout on a cluster whose autoscaler adds nodes: Ray's fake multi-node provider (the one
ray.cluster_utils.AutoscalingCluster drives) behind a real `ray start --head`. AutoscalingCluster itself is
not used: its start() runs `ray stop --force`, which would end every Ray on this machine."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import error_line, free_port, kill_all, mlflow_store, process_tree, processes_naming

pytestmark = pytest.mark.slow


PORT, DASHBOARD = free_port(), free_port()  # not fixed: other Ray instances run on the machine


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """A head with no CPU and one node type (1 CPU, min 0, max 1) that the autoscaler launches on demand."""
    state = tempfile.mkdtemp(prefix="sga", dir="/tmp")  # short: Ray's socket paths live below it
    config = {
        "cluster_name": "segnet-fake",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{PORT}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    path = os.path.join(state, "autoscaling.json")
    with open(path, "w") as f:
        json.dump(config, f)
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--autoscaling-config={path}",
            "--num-cpus=0",
            "--node-ip-address=127.0.0.1",
            f"--port={PORT}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD}",
            f"--temp-dir={state}/ray",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield {"address": f"127.0.0.1:{PORT}", "state": state}
    finally:
        kill_all(set(process_tree(*processes_naming(f"{state}/ray"))))


@pytest.fixture
def shards(shards_4):
    """The session's 4-image shards (tests/conftest.py), read-only."""
    return shards_4


def _train(segnet_cli, shards, tmp_path, address, *extra):
    args = [
        "train",
        "--data",
        shards,
        "--address",
        address,
        "--epochs",
        "1",
        "--image-size",
        "64x96",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--loader-workers",
        "0",
        "--storage-path",
        tmp_path / "runs",
        "--mlflow-uri",
        mlflow_store(tmp_path / "mlruns.db"),
        *extra,
    ]
    t0 = time.monotonic()
    r = segnet_cli(*args, cwd=tmp_path)
    return r, time.monotonic() - t0


def test_a_run_waits_for_the_autoscaler_to_add_a_node(autoscaling_cluster, shards, tmp_path, segnet_cli):
    r, _ = _train(segnet_cli, shards, tmp_path, autoscaling_cluster["address"], "--placement-timeout", "180")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "waiting up to 180 s for the autoscaler to add nodes: 1 workers need 1 CPUs" in r.stdout


def test_a_run_that_cannot_be_placed_in_time_fails_with_one_line(
    autoscaling_cluster, shards, tmp_path, segnet_cli
):
    r, seconds = _train(
        segnet_cli,
        shards,
        tmp_path,
        autoscaling_cluster["address"],
        "--gpus-per-worker",
        "1",
        "--placement-timeout",
        "5",
    )
    assert "no room after --placement-timeout 5 s" in r.stderr, r.stderr[-2000:]
    assert error_line(r, "train").startswith("segnet train: error: no room")  # after Ray's own log
    assert seconds < 120


def test_without_a_timeout_a_run_fails_at_once(autoscaling_cluster, shards, tmp_path, segnet_cli):
    r, _ = _train(segnet_cli, shards, tmp_path, autoscaling_cluster["address"], "--gpus-per-worker", "1")
    assert r.returncode == 2 and "the Ray cluster has" in r.stderr and "waiting" not in r.stdout
