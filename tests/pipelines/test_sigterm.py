"""`segnet train` and `segnet tune` stopped with SIGTERM (as a scheduler or `kill` stops them): the last
checkpoint stays, one line, a non-zero exit, and `--resume` continues from that checkpoint, each epoch
once."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from data_prep import prepare
from pipelines.core import checkpoint as ckpt_io
from tests.helpers import mlflow_store, start_segnet, wait_until

pytestmark = pytest.mark.slow


def test_sigterm_keeps_the_last_checkpoint_exits_with_one_line_and_resume_continues(
    camvid_dir, ray_local, tmp_path, segnet_cli
):
    shards = tmp_path / "shards"
    prepare(camvid_dir, shards, shard_size=8, limit=8)
    db = mlflow_store(tmp_path / "mlruns.db")
    args = ["--data", shards, "--workers", "1", "--batch_size", "2", "--image_size", "48x64"]
    args = [str(a) for a in [*args, "--storage_path", tmp_path / "runs", "--mlflow_uri", db]]
    run = tmp_path / "runs" / "sig"
    # The command's own Ray, as a user's: Ray Train's placement-group cleaner then runs beside other Rays
    own_ray = {"RAY_ADDRESS": "", "SEGNET_LOG_DIR": str(tmp_path / "logs")}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", *args, "--name", "sig", "--epochs", "6"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **own_ray}
    )
    try:
        deadline = time.monotonic() + 300
        while not list(run.glob("checkpoint_*/meta.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    ours = [line for line in err.splitlines() if line.strip() and "(pid=" not in line]  # not a worker's bar
    assert ours[-1] == "segnet train: interrupted", err[-3000:]  # a worker's last bar may be forwarded later
    kept = ckpt_io.find(str(run))
    assert kept and ckpt_io.verifies(kept[-1]), "the last checkpoint went with the run"
    epochs_kept = {json.loads((run / c.rsplit("/", 1)[1] / "meta.json").read_text())["epoch"] for c in kept}
    run_id = json.loads((run / "segnet_run.json").read_text())["mlflow_run_id"]
    assert mlflow.MlflowClient(db).get_run(run_id).info.status == "KILLED"
    r = segnet_cli("train", *args, "--resume", "sig", "--epochs", "6", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # from a kept checkpoint (the newest that Ray Train had committed: one being reported when the signal
    # came may be newer), to the run's 6 epochs, each once in its history and in MLflow
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+)", r.stdout + r.stderr)
    assert resumed and int(resumed[1]) - 1 in epochs_kept, (epochs_kept, r.stderr[-2000:])
    assert [h["epoch"] for h in json.loads(r.stdout)["history"]] == list(range(6))
    steps = [m.step for m in mlflow.MlflowClient(db).get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(6)), steps


def test_tune_on_sigterm_keeps_the_trials_checkpoint_exits_with_one_line_and_resume_continues(
    shards_4, tmp_path, segnet_cli
):
    """`segnet tune` stopped with SIGTERM (the process alone, as a scheduler stops it): the running trial's
    checkpoint stays, one line naming the search and how to continue, a non-zero exit, nothing registered;
    `tune --resume` then completes the trial from that checkpoint, each epoch once in its MLflow run."""
    db, runs = mlflow_store(tmp_path / "mlruns.db"), tmp_path / "runs"
    # epochs enough that the trial is still running when the signal lands (an epoch of 4 images takes < 1 s)
    args = ["tune", "--data", shards_4, "--num-samples", "1", "--epochs", "12", "--scheduler", "fifo"]
    args += ["--image-size", "48x64", "--batch-size", "2", "--loader-workers", "0", "--name", "st"]
    args += ["--storage-path", runs, "--mlflow-uri", db]
    own_ray = {"RAY_ADDRESS": "", "SEGNET_LOG_DIR": str(tmp_path / "logs")}
    proc = start_segnet(*args, env=own_ray)
    try:
        checkpointed = lambda: any(runs.glob("st-*/checkpoint_*/meta.json"))  # noqa: E731
        wait_until(checkpointed, 300, proc, say=lambda: "no checkpoint of the trial")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "Traceback" not in err, (proc.returncode, err[-3000:])
    ours = [line for line in err.splitlines() if line.strip() and "(pid=" not in line]
    assert ours[-1].startswith("segnet tune: error: search st was interrupted"), err[-3000:]
    assert "segnet tune --resume st" in ours[-1], ours[-1]
    (trial,) = runs.glob("st-*")
    kept = ckpt_io.find(str(trial))
    assert kept and ckpt_io.verifies(kept[-1]), "the trial's last checkpoint went with the search"
    client = mlflow.MlflowClient(tracking_uri=db, registry_uri=db)  # not a registry an earlier test set
    assert not client.search_registered_models(), "an interrupted search registered a model"
    r = segnet_cli("tune", "--resume", "st", "--storage-path", runs, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["registered"]["version"] == "1"
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+)", r.stdout + r.stderr)
    assert resumed and 1 <= int(resumed[1]) < 12, r.stderr[-3000:]
    found = client.search_runs([client.get_experiment_by_name("segnet-camvid").experiment_id])
    # the restored trial logs to a run of its own, its history from the checkpoint then the epochs after it
    # (the interrupted trial's run is left as it was: docs/reliability.md)
    trial_runs = [r for r in found if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
    assert len(trial_runs) == 1, [(r.info.run_name, r.info.status) for r in found]
    steps = [m.step for m in client.get_metric_history(trial_runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(12)), steps  # each epoch once
