"""`segnet train`, `train --resume` and `segnet tune` whose shards, checkpoints and search state (and the
MLflow server's artifacts) are in a bucket that throttles, fails, drops connections and answers late
(tests/flaky_proxy.py in front of the loopback S3 server). Ray Train writes through storage's retrying
filesystem (RunConfig.storage_filesystem), the workers read the shards through it, the MLflow server's
boto3 retries in AWS's standard mode; the tests then check against the store itself."""

import io
import json
import os

import mlflow
import pandas as pd
import pytest
from PIL import Image

from data_prep import prepare, storage
from pipelines.core import checkpoint as ckpt_io
from pipelines.search.tune import SEARCH_FILE
from pipelines.tracking import registry
from tests.helpers import free_port, mlflow_store

pytestmark = pytest.mark.slow
SHARES = {"slowdown": 0.03, "internal": 0.03, "reset-before": 0.03, "reset-after": 0.03, "late": 0.03}


def test_train_and_resume_through_a_flaky_bucket_complete_and_lose_or_repeat_no_epoch(
    s3, ray_local, camvid_dir, tmp_path, segnet_cli, flaky_proxy, monkeypatch
):
    shards, runs = f"{s3['bucket']}/flaky-runs/shards", f"{s3['bucket']}/flaky-runs/runs"
    prepare(camvid_dir, shards, shard_size=4, limit=8)  # straight to the store
    proxy = flaky_proxy(s3["env"]["AWS_ENDPOINT_URL"], SHARES, seed=11, delay=0.5)
    db = mlflow_store(tmp_path / "mlruns.db")
    common = ["--mlflow-uri", db, "--json"]
    train = ["train", "--data", shards, "--storage-path", runs, "--image-size", "48x64", "--batch-size", "2"]
    train += ["--workers", "1", "--loader-workers", "0", "--name", "f1", "--epochs", "2", *common]
    # the command and its Ray workers (in the session's Ray) reach the store through the proxy
    through = {"AWS_ENDPOINT_URL": proxy.url}
    try:
        first = segnet_cli(*train, cwd=tmp_path, env=through, worker_env=through)
        assert first.returncode == 0, first.stderr[-3000:]
        faults_first = sum(proxy.counts.values())
        resume = ["train", "--resume", f"{runs}/f1", "--epochs", "3", *common]
        resumed = segnet_cli(*resume, cwd=tmp_path, env=through, worker_env=through)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        proxy.close()
    best = json.loads(resumed.stdout)
    assert [h["epoch"] for h in best["history"]] == [0, 1, 2]
    assert "resuming from the checkpoint of epoch 2" in resumed.stdout + resumed.stderr
    run_id = best["mlflow_run_id"]
    steps = [m.step for m in mlflow.MlflowClient(db).get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [0, 1, 2], steps  # each epoch once in MLflow
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["env"]["AWS_ENDPOINT_URL"])  # the store itself from here
    kept = ckpt_io.find(f"{runs}/f1")
    assert kept and all(ckpt_io.verifies(c) for c in kept), kept
    assert ckpt_io.verifies(best["best_checkpoint"])
    faults = {k: v for k, v in proxy.counts.items() if v}
    assert faults_first >= 3 and sum(faults.values()) > faults_first and len(faults) >= 4, faults
    print("faults injected:", faults, "of", len(proxy.requests), "requests")


def test_a_search_with_its_state_and_its_mlflow_servers_artifacts_in_a_flaky_bucket_completes(
    s3, bucket_shards, tmp_path, segnet_cli, flaky_proxy, start_mlflow, monkeypatch
):
    """`segnet tune` whose search state and trial checkpoints are in the flaky bucket, tracked by an `mlflow
    server` whose artifact store is the same flaky bucket (boto3 in AWS's standard retry mode): the search
    completes and registers its champion; each trial's epoch is in MLflow once, its plots and the
    registered model's files are whole (the model's weights are checked against their sha256 as it loads)."""
    runs, artifacts = f"{s3['bucket']}/flaky-search/runs", f"{s3['bucket']}/flaky-search/mlflow"
    proxy = flaky_proxy(s3["env"]["AWS_ENDPOINT_URL"], SHARES, seed=5, delay=0.5)
    port = free_port()
    boto = {"AWS_ENDPOINT_URL": proxy.url, "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
    start_mlflow(tmp_path / "mlflow", port, env={**os.environ, **boto}, artifacts=artifacts)
    uri = f"http://127.0.0.1:{port}"
    args = ["tune", "--data", bucket_shards, "--storage-path", runs, "--name", "fs", "--num-samples", "2"]
    args += ["--max-concurrent", "2", "--scheduler", "fifo", "--epochs", "1", "--image-size", "48x64"]
    args += ["--batch-size", "2", "--loader-workers", "0", "--mlflow-uri", uri, "--json"]
    try:
        through = {"AWS_ENDPOINT_URL": proxy.url}  # the command and its Ray workers use the proxy
        r = segnet_cli(*args, cwd=tmp_path, env=through, worker_env=through, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["registered"]["name"] == "segnet-camvid"
        client = mlflow.MlflowClient(uri)
        found = client.search_runs([client.get_experiment_by_name("segnet-camvid").experiment_id])
        trials = [run for run in found if "mlflow.parentRunId" in run.data.tags]
        assert len(trials) == 2, [run.info.run_name for run in found]
        for run in trials:
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0]
            assert client.list_artifacts(run.info.run_id, "plots"), f"{run.info.run_name} has no plots"
        model = registry.load(uri, "segnet-camvid@champion")  # its files through the server, from the bucket
        assert model.predict(pd.DataFrame({"image": [_png(40, 60)]}))[0].shape == (40, 60)
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["env"]["AWS_ENDPOINT_URL"])  # the store itself from here
    search = storage.list_names(f"{runs}/fs")
    assert any(n.endswith(SEARCH_FILE) for n in search), search
    assert any("experiment_state" in n for n in search), search  # Tune's own state
    assert storage.list_names(artifacts, folders=True), "no artifact in the bucket"
    faults = {k: v for k, v in proxy.counts.items() if v}
    assert sum(faults.values()) >= 3 and len(faults) >= 3, faults
    print("faults injected:", faults, "of", len(proxy.requests), "requests")


def _png(height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(out, format="PNG")
    return out.getvalue()
